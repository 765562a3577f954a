"""`resnet-ddp report`: the picture and the page, from synthetic records (fast) and from one real run."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime, timezone

import pytest
from conftest import TINY, run_train

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.dates  # noqa: E402
import matplotlib.image  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from resnet_ddp.observe import report  # noqa: E402

START = datetime(2026, 5, 4, 14, 3, 0, tzinfo=timezone.utc).timestamp()  # 14:03:00 UTC
STEPS_PER_EPOCH, EPOCHS, STEP_S = 10, 2, 3.0
CHECKPOINT_TIME = START + STEPS_PER_EPOCH * STEP_S + 1.0
STRAGGLER_TIME = START + 12 * STEP_S + 0.5
END_TIME = START + STEPS_PER_EPOCH * EPOCHS * STEP_S + 2.0


def _step(rank: int, global_step: int, ranks: int, gpu: bool) -> dict:
    record = {
        "time": START + global_step * STEP_S + rank * 0.001,
        "rank": rank,
        "kind": "step",
        "epoch": (global_step - 1) // STEPS_PER_EPOCH + 1,
        "global_step": global_step,
        "step": (global_step - 1) % STEPS_PER_EPOCH + 1,
        "steps_per_epoch": STEPS_PER_EPOCH,
        "total_steps": STEPS_PER_EPOCH * EPOCHS,
        "steps": 1,
        "interval_s": STEP_S,
        "loss": 2.302585092994046 / global_step,
        "img_s": 21.134643171309698,  # the same on every rank
        "job_img_s": 21.134643171309698 * ranks,
        "step_ms": 378.5254350004834,
        "data_wait_frac": 0.003558955025478426,
        "eta_s": 2.649678045003384,
        "progress": global_step / (STEPS_PER_EPOCH * EPOCHS),
        "straggler_ranks": [1] if global_step > 12 else [],
        "rss_gib": 0.9357757568359375 + global_step * 1e-3,
    }
    if gpu:
        record.update(
            mem_gib=21.53 + global_step * 1e-3,
            peak_mem_gib=23.1,
            mfu=0.1290512,
            peak_tflops=494.7,
            peak_precision="tf32",
            gpu_util_pct=97.0,
            gpu_mem_used_gib=25.2,
            gpu_mem_total_gib=79.6,
            gpu_power_w=612.3,
            gpu_temp_c=61.0,
        )
    return record


def records_of_a_run(ranks: int = 2, gpu: bool = False, exit_reason: str = "finished") -> list:
    """Two epochs of steps from every rank, an epoch end each, a checkpoint, a straggler named at step 12, the end."""
    records = []
    for global_step in range(1, STEPS_PER_EPOCH * EPOCHS + 1):
        records += [_step(rank, global_step, ranks, gpu) for rank in range(ranks)]
        if global_step % STEPS_PER_EPOCH == 0:
            records += [
                {
                    "time": START + global_step * STEP_S + 0.2,
                    "rank": rank,
                    "kind": "epoch",
                    "epoch": global_step // STEPS_PER_EPOCH,
                    "global_step": global_step,
                    "avg_loss": 0.5,
                    "global_avg_loss": 0.5,
                }
                for rank in range(ranks)
            ]
        if global_step == STEPS_PER_EPOCH:
            records.append(
                {
                    "time": CHECKPOINT_TIME,
                    "rank": 0,
                    "kind": "checkpoint",
                    "global_step": global_step,
                    "path": "/tmp/x/checkpoint-000000010.pt",
                    "bytes": 44807305,
                    "write_s": 0.3199868179999612,
                    "training_held_s": 0.02942453499963449,
                }
            )
        if global_step == 12:
            records.append(
                {
                    "time": STRAGGLER_TIME,
                    "rank": 0,
                    "kind": "straggler_check",
                    "global_step": 12,
                    "forward_compute_ms": [100.0, 180.0] + [100.0] * (ranks - 2),
                    "median_ms": 100.0,
                    "straggler_ranks": [1],
                }
            )
    end = {
        "kind": "end",
        "global_step": STEPS_PER_EPOCH * EPOCHS,
        "exit_reason": exit_reason,
        "exit_code": 0 if exit_reason == "finished" else 1,
        "first_nonfinite_loss": None,
    }
    if exit_reason == "failed":
        end.update(
            error="RuntimeError: injected failure",
            first_failure={"rank": 1, "host": "node-b", "error": "RuntimeError: injected failure"},
        )
    records += [{"time": END_TIME + rank * 0.001, "rank": rank, **end} for rank in range(ranks)]
    return records


SUMMARY = {
    "exit_reason": "finished",
    "exit_code": 0,
    "img_s": 42.26933841273,
    "img_s_per_gpu": 21.134669206365,
    "step_ms_p50": 378.5254350004834,
    "step_ms_p90": 401.0091,
    "step_ms_p95": 420.5,
    "step_ms_p99": 477.22997,
    "data_wait_frac": 0.005050753890132424,
    "steps": 20,
    "steady_steps": 19,
    "epochs_done": 2,
    "wall_s": 62.6010833349992026,
    "started_utc": "2026-05-04T14:02:58.026Z",
    "ended_utc": "2026-05-04T14:04:02.435Z",
    "world_size": 2,
    "device": "cpu",
    "torch": "2.14.1",
    "version": "0.1.0",
    "hosts": ["vm"],
    "steady_window_unix": [START + 3.0123456, START + 60.9876543],
    "peak_rss_gib_per_rank": [0.9930801391601562, 0.9729881286621094],
    "config": {"training": {"lr": 0.01, "batch_size": 8}, "health": {"straggler_window_s": 60.0}},
}


def write_save_dir(path, records, summary=None):
    (path / "logs").mkdir(parents=True)
    (path / "logs" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary))
    return path


def drawn(monkeypatch, save_dir):
    """The matplotlib Figure that write_report draws for save_dir."""
    figures = []
    draw = report.draw
    monkeypatch.setattr(report, "draw", lambda *args, **kwargs: figures.append(draw(*args, **kwargs)) or figures[-1])
    report.write_report(str(save_dir))
    (figure,) = figures
    return figure


def with_gid(figure, gid):
    return figure.findobj(lambda artist: artist.get_gid() == gid)


def unix_time(x) -> float:
    """An x position (a datetime, or matplotlib's date number) as Unix seconds."""
    if isinstance(x, datetime):
        return x.timestamp()
    return matplotlib.dates.num2date(x).timestamp()


def times_of(lines):
    """Where the lines are on the time axis, as Unix seconds to 0.1 s."""
    return {round(unix_time(x), 1) for line in lines for x in line.get_xdata()}


def panels(figure):
    """The four panels (not the throughput panel's right-hand axis, which has no title)."""
    return [ax for ax in figure.axes if ax.get_title()]


def panel(figure, word):
    (ax,) = [ax for ax in panels(figure) if word in ax.get_title().lower()]
    return ax


def rank_lines(ax):
    """The per-rank lines: by the gid the report gives them, or by their legend label."""
    return [line for line in ax.lines if line.get_gid() == "rank" or re.search(r"\brank \d+$", line.get_label())]


def only(artists):
    assert len(artists) == 1, artists
    return artists[0]


def test_the_files_are_a_1200x800_picture_and_a_page_with_readable_numbers(tmp_path):
    save_dir = write_save_dir(tmp_path, records_of_a_run(), SUMMARY)
    assert report.main([str(save_dir)]) == 0
    assert matplotlib.image.imread(save_dir / "report.png").shape[:2] == (800, 1200)
    page = (save_dir / "report.html").read_text()
    text = re.sub(r'src="data:image/png;base64,[^"]*"', "", page)
    assert "data:image/png;base64," in page and "finished" in text
    long_floats = [n for n in re.findall(r"\d+\.\d+", text) if len(n.split(".")[1].lstrip("0")) > 4]
    assert long_floats == []  # 42.27 img/s, not 42.26933841273
    assert not re.search(r"\b1[5-9]\d{8}\b", text)  # no raw Unix times ...
    assert "2026-05-04T14:03:03.012Z" in text  # ... but UTC, as Grafana shows them (steady_window_unix)
    assert "42.27" in text and "0.01" in text  # figures and the config's values are still there


def test_the_time_axis_is_wall_clock_utc(tmp_path, monkeypatch):
    monkeypatch.setitem(matplotlib.rcParams, "timezone", "Asia/Seoul")  # UTC whatever the local setting
    figure = drawn(monkeypatch, write_save_dir(tmp_path, records_of_a_run(), SUMMARY))
    figure.canvas.draw()
    for ax in panels(figure):
        assert "UTC" in ax.get_xlabel()
        assert isinstance(ax.xaxis.get_major_locator(), matplotlib.dates.DateLocator)
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert labels and all(re.fullmatch(r"14:0[345](:\d\d)?", label) for label in labels), labels
        first, last = (unix_time(x) for x in ax.get_xlim())
        assert first <= START + STEP_S and last >= END_TIME  # from the first step to the end


def test_epochs_checkpoints_stragglers_and_the_end_are_marked(tmp_path, monkeypatch):
    figure = drawn(monkeypatch, write_save_dir(tmp_path, records_of_a_run(), SUMMARY))
    assert times_of(with_gid(figure, "epoch-end")) == {
        round(START + e * STEPS_PER_EPOCH * STEP_S + 0.2, 1) for e in (1, 2)
    }
    checkpoints = with_gid(figure, "checkpoint")
    assert checkpoints and times_of(checkpoints) == {round(CHECKPOINT_TIME, 1)}
    assert all(c.get_marker() not in ("None", "", None) for c in checkpoints)
    stragglers = [a for a in with_gid(figure, "straggler") if hasattr(a, "get_text")]
    assert [s.get_text() for s in stragglers] == ["straggler: rank 1"]  # named once, when first named
    assert unix_time(stragglers[0].get_position()[0]) == pytest.approx(STRAGGLER_TIME, abs=0.1)
    ends = with_gid(figure, "end")
    assert ends and all(
        unix_time(line.get_xdata()[0]) == pytest.approx(END_TIME, abs=0.1) for line in ends if isinstance(line, Line2D)
    )
    assert any("finished" in text.get_text() for text in with_gid(figure, "end-label"))


def test_a_failed_run_ends_in_a_red_line_that_names_the_failure(tmp_path, monkeypatch):
    figure = drawn(monkeypatch, write_save_dir(tmp_path, records_of_a_run(exit_reason="failed")))
    lines = [a for a in with_gid(figure, "end") if isinstance(a, Line2D)]
    assert lines and all(matplotlib.colors.to_hex(line.get_color()) == "#d62728" for line in lines)
    label = only(with_gid(figure, "end-label"))
    assert label.get_text().startswith("failed") and "rank 1" in label.get_text()


def test_an_end_names_what_is_known_of_the_first_failure():
    failure = {"rank": 1, "host": "node-b", "error": "RuntimeError: injected failure"}
    end = {"exit_reason": "failed", "exit_code": 1, "first_failure": failure}
    assert report.describe_end(end) == "failed on rank 1 (node-b): RuntimeError: injected failure, exit 1"
    # a rank that was killed has no error, and one across hosts from its peer no host
    unknown = {**end, "first_failure": {"rank": 0, "host": None, "error": None}}
    assert report.describe_end(unknown) == "failed on rank 0, exit 1"


def test_the_headline_figures_are_on_the_picture(tmp_path, monkeypatch):
    summary = {**SUMMARY, "mfu": 0.1290512, "device": "NVIDIA H200"}
    figure = drawn(monkeypatch, write_save_dir(tmp_path / "done", records_of_a_run(gpu=True), summary))
    headline = only(with_gid(figure, "headline"))
    for figure_text in ("42.3 img/s", "step p50 379 ms", "MFU 12.9%", "finished"):
        assert figure_text in headline.get_text()
    # a running job (its summary.json says so, or it has none yet): the last log point's figures, and no end
    running = [r for r in records_of_a_run(gpu=True) if r["kind"] != "end"]
    for name, summary in (("starting", None), ("running", {"exit_reason": "running", "world_size": 2})):
        figure = drawn(monkeypatch, write_save_dir(tmp_path / name, running, summary))
        headline = only(with_gid(figure, "headline"))
        for figure_text in ("42.3 img/s", "step 379 ms", "MFU 12.9%", "running (figures of the last log point)"):
            assert figure_text in headline.get_text()


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_the_memory_axis_starts_at_zero(tmp_path, monkeypatch, gpu):
    figure = drawn(monkeypatch, write_save_dir(tmp_path, records_of_a_run(gpu=gpu), SUMMARY))
    memory = panel(figure, "memory")
    assert memory.get_ylim()[0] == 0 and rank_lines(memory)


def test_a_cpu_run_draws_no_empty_gpu_panel(tmp_path, monkeypatch):
    figure = drawn(monkeypatch, write_save_dir(tmp_path, records_of_a_run(), SUMMARY))
    assert not any("gpu" in ax.get_title().lower() for ax in panels(figure))
    for ax in panels(figure):
        assert len(rank_lines(ax)) >= 2, ax.get_title()  # every panel draws both ranks ...
        assert not any("no " in text.get_text() for text in ax.texts)  # ... rather than saying it has nothing
    # with GPU figures, that panel is the GPUs' utilisation
    figure = drawn(monkeypatch, write_save_dir(tmp_path / "gpu", records_of_a_run(gpu=True), SUMMARY))
    assert len(rank_lines(panel(figure, "gpu utilisation"))) == 2


def test_rank_lines_do_not_hide_each_other(tmp_path, monkeypatch):
    figure = drawn(monkeypatch, write_save_dir(tmp_path, records_of_a_run(ranks=4), SUMMARY))
    for ax in panels(figure):
        lines = rank_lines(ax)
        styles = {(line.get_linestyle(), line.get_linewidth()) for line in lines}
        assert len(lines) == 4 and len(styles) == 4, ax.get_title()  # equal figures: each rank still shows
    # 32 ranks: one legend entry for them all, thin translucent lines
    figure = drawn(monkeypatch, write_save_dir(tmp_path / "many", records_of_a_run(ranks=32), SUMMARY))
    throughput = panel(figure, "throughput")
    assert len(throughput.get_legend().get_texts()) < 8
    ranks = [line for line in throughput.lines if line.get_gid() == "rank"]
    assert len(ranks) == 32 and all(line.get_alpha() < 1 and line.get_linewidth() <= 1 for line in ranks)


def test_the_report_of_a_real_run(tmp_path, monkeypatch):
    """One real 2-rank CPU run of 2 epochs: its records are what the report expects."""
    save_dir = tmp_path / "out"
    result = run_train(*TINY, "--log-interval", "1", "--save-dir", str(save_dir), timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    figure = drawn(monkeypatch, save_dir)
    records = report.read_records(str(save_dir / "logs" / "metrics.jsonl"))
    assert len(times_of(with_gid(figure, "epoch-end"))) == 2
    saved = {round(r["time"], 1) for r in records if r["kind"] == "checkpoint"}
    assert saved and times_of(with_gid(figure, "checkpoint")) == saved
    assert any("finished" in text.get_text() for text in with_gid(figure, "end-label"))
    headline = only(with_gid(figure, "headline"))
    assert re.search(r"[\d.]+ img/s", headline.get_text()) and "finished" in headline.get_text()
    assert panel(figure, "memory").get_ylim()[0] == 0
    assert matplotlib.image.imread(save_dir / "report.png").shape[:2] == (800, 1200)


def test_a_resumed_run_shows_both_ends_and_is_not_taken_for_the_earlier_one(tmp_path, monkeypatch):
    """A resumed run appends to the same metrics.jsonl, and summary.json is the earlier run's until it ends."""
    earlier = records_of_a_run(exit_reason="stopped by signal")
    later = [{**r, "time": r["time"] + 3600} for r in records_of_a_run() if r["kind"] != "end"]  # an hour on
    summary = {**SUMMARY, "exit_reason": "stopped by signal"}  # ended_utc: the earlier run's end
    figure = drawn(monkeypatch, write_save_dir(tmp_path, earlier + later, summary))
    assert times_of(with_gid(figure, "end")) == {round(END_TIME, 1)}
    for line in rank_lines(panel(figure, "loss")):  # broken between the runs, not joined across the hour
        assert sum(math.isnan(y) for y in line.get_ydata()) == 1
    headline = only(with_gid(figure, "headline")).get_text()
    assert "running" in headline and "stopped by signal" not in headline
    assert "of an earlier run" in (tmp_path / "report.html").read_text()


def test_lines_that_are_no_records_of_ours_are_skipped(tmp_path):
    save_dir = write_save_dir(tmp_path, records_of_a_run(), SUMMARY)
    with open(save_dir / "logs" / "metrics.jsonl", "ab") as f:
        f.write(b'\xff\xfe not text\n{"kind": "step"}\n{"kind": "step", "rank": 0, "time": "x"}\n[1, 2]\n')
    assert report.main([str(save_dir)]) == 0
    assert (save_dir / "report.png").stat().st_size > 0


def test_what_the_report_cannot_do_is_one_line_and_exit_2(tmp_path, capsys):
    save_dir = write_save_dir(tmp_path, records_of_a_run(), SUMMARY)
    (save_dir / "report.png").mkdir()  # where the picture goes
    for argv, says in (
        ([str(save_dir)], "cannot write the report in"),
        ([], "the following arguments are required: save_dir"),
        ([str(save_dir), "extra"], "unrecognized arguments: extra"),
        ([str(tmp_path / "none")], "does not exist"),
    ):
        assert report.main(argv) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("resnet-ddp report: error:") and says in line, line
    assert not list(save_dir.glob("*.tmp")) and not list(save_dir.glob(".*.tmp"))


def test_a_summary_with_fields_of_other_types_is_drawn_without_them(tmp_path):
    edited = {**SUMMARY, "img_s": "fast", "world_size": "two", "mfu": [0.1], "exit_reason": 0}
    save_dir = write_save_dir(tmp_path, records_of_a_run(), edited)
    assert report.main([str(save_dir)]) == 0
    assert (save_dir / "report.png").stat().st_size > 0
