"""What the job reports: step lines, metrics.jsonl, --quiet, the progress bar, the Prometheus endpoint,
TensorBoard, the end-of-run summary and `resnet-ddp report`."""

from __future__ import annotations

import base64
import fcntl
import json
import math
import os
import pty
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
import urllib.request

import pytest
from conftest import REPO, TINY, Job, assert_records_follow_the_schema, clean_env, free_port, run_train, train_command
from test_training import DONE_LINE, EPOCH_LINE, GLOBAL_LINE

STEP_LINE = re.compile(r"^\[Rank (\d)\] epoch (\d+) step (\d+)/4 \((\d+)/8\) \| loss (\d+\.\d{4}) \| (\d+) img/s", re.M)


def _records(save_dir, kind, rank=None):
    lines = (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind and rank in (None, r["rank"])]


def test_step_lines_records_across_epoch_ends_the_last_steps_and_the_profile(tmp_path):
    """Lines every step, and every 3 steps of 4-step epochs, with the same seed (the same losses, epoch by epoch):
    the line at step 6 covers steps 4, 5 and 6 (its loss their mean, its time theirs), and steps 7 and 8, after
    the last due line, get a record at the end (counters reach 8 steps)."""
    every_step, every_third = tmp_path / "one", tmp_path / "three"
    runs = {}
    for save_dir, interval in ((every_step, "1"), (every_third, "3")):
        profile = ["--profile-steps", "4:5"] if interval == "1" else []
        runs[interval] = run_train(
            *TINY, "--seed", "4", "--log-interval", interval, *profile, "--save-dir", str(save_dir)
        )
        assert runs[interval].returncode == 0, runs[interval].stderr[-2000:]
    assert GLOBAL_LINE.findall(runs["1"].stdout) == GLOBAL_LINE.findall(runs["3"].stdout)  # same seed, same losses
    result = runs["1"]
    lines = STEP_LINE.findall(result.stdout)
    assert sorted((rank, int(g)) for rank, _, _, g, _, _ in lines) == [(r, g) for r in "01" for g in range(1, 9)]
    assert "(job " in result.stdout and "ETA " in result.stdout
    # no TTY (a pod's log): plain lines only, no progress bar and no carriage returns
    assert "\r" not in result.stdout and "\r" not in result.stderr and "step/s" not in result.stderr
    for record in _records(every_step, "step"):
        assert {
            "time",
            "rank",
            "epoch",
            "step",
            "global_step",
            "loss",
            "img_s",
            "job_img_s",
            "step_ms",
            "data_wait_frac",
            "eta_s",
            "progress",
            "steps",
            "interval_s",
        } <= record.keys()
        assert math.isfinite(record["loss"]) and record["img_s"] > 0 and 0 <= record["data_wait_frac"] <= 1
    # each epoch record carries the value of the original example's line for that rank
    epochs = _records(every_step, "epoch")
    printed = {(rank, int(epoch)): float(loss) for rank, epoch, loss in EPOCH_LINE.findall(result.stdout)}
    assert len(epochs) == 4 and {(str(r["rank"]), r["epoch"]): round(r["avg_loss"], 4) for r in epochs} == printed
    for rank in (0, 1):
        loss = {r["global_step"]: r["loss"] for r in _records(every_step, "step", rank)}
        third = _records(every_third, "step", rank)
        assert [(r["global_step"], r["epoch"], r["step"], r["steps"]) for r in third] == [
            (3, 1, 3, 3),
            (6, 2, 2, 3),
            (8, 2, 4, 2),
        ]
        for record, covered in zip(third, ((1, 2, 3), (4, 5, 6), (7, 8))):
            assert record["loss"] == pytest.approx(sum(loss[s] for s in covered) / len(covered), rel=1e-5)
            assert record["img_s"] == pytest.approx(record["steps"] * 8 / record["interval_s"])
            assert record["step_ms"] == pytest.approx(1000 * record["interval_s"] / record["steps"])
    summary = json.loads((every_third / "summary.json").read_text())
    assert summary["steps"] == 8 and _records(every_third, "step")[-1]["global_step"] == 8
    # --profile-steps: each rank's record of steps 4 and 5 (one across the epoch end), complete files only
    assert f"[Rank 0] profile of steps 4-5 written to {every_step / 'profile'}" in result.stdout
    assert sorted(p.name for p in (every_step / "profile").iterdir()) == [
        "rank0-ops.txt",
        "rank0.trace.json",
        "rank1-ops.txt",
        "rank1.trace.json",
    ]
    for rank in (0, 1):
        trace = json.loads((every_step / "profile" / f"rank{rank}.trace.json").read_text())
        names = {event.get("name") for event in trace["traceEvents"]}
        assert "aten::convolution_backward" in names and "_SyncBatchNormFunction" in names
        ops = (every_step / "profile" / f"rank{rank}-ops.txt").read_text()
        assert "Self CPU" in ops and "c10d::allgather_" in ops  # SyncBatchNorm's statistics, over gloo


def test_quiet_prints_only_the_seeds_lines(save_dir):
    result = run_train(*TINY, "--quiet", "--log-interval", "1", "--save-dir", str(save_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines and all(EPOCH_LINE.match(line) or DONE_LINE.match(line) for line in lines), lines
    assert (save_dir / "logs" / "metrics.jsonl").stat().st_size > 0  # the file is still written


def test_mfu_counts_the_flops_of_a_training_image():
    from resnet_ddp.core.model import train_flops_per_image
    from resnet_ddp.observe.metrics import assumed_peak_tflops

    # ResNet-50 at 224 px: 4.1 GMAC forward, so about 24.5 GFLOP forward and backward
    assert abs(train_flops_per_image("resnet50", 100, 224) / 24.5e9 - 1) < 0.02
    assert assumed_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == (989.4, "bf16")
    assert assumed_peak_tflops("NVIDIA H100 80GB HBM3", "off") == (494.7, "tf32")
    assert assumed_peak_tflops("Some Future GPU", "bf16") is None


def test_a_nan_loss_is_written_as_null(tmp_path):
    from resnet_ddp.observe.metrics import MetricsLog

    path = tmp_path / "logs" / "metrics.jsonl"
    metrics = MetricsLog(str(path), rank=0)
    metrics.record({"kind": "step", "global_step": 1, "loss": float("nan")})
    metrics.close()
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["loss"] is None and record["global_step"] == 1 and record["rank"] == 0


def scrape_samples(port: int) -> list:
    """The resnet_ddp_ samples at http://127.0.0.1:PORT/metrics, read with prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:  # not serving yet
        return []
    return [
        sample
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("resnet_ddp_")
    ]


def scrape(port: int) -> dict:
    """{(sample name, rank): value}; every series carries both rank labels."""
    samples = {}
    for sample in scrape_samples(port):
        assert sample.labels["local_rank"] == sample.labels["rank"]  # one node: they agree
        samples[sample.name, int(sample.labels["rank"])] = sample.value
    return samples


def scrape_until(job: Job, port: int, ready, within_s: float = 150) -> dict:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        assert job.process.poll() is None, job.wait().stderr[-2000:]
        samples = scrape(port)
        if ready(samples):
            return samples
        time.sleep(0.3)
    raise AssertionError(f"the endpoint never showed what was expected; last scrape: {samples}")


def _pixels_of(image, rgb, tolerance=0.06):
    import numpy

    return int((numpy.abs(image[:, :, :3] - numpy.array(rgb) / 255.0).max(axis=2) < tolerance).sum())


def _until_the_end_is_served(job: Job, port: int, within_s: float = 120) -> list:
    """Samples of the endpoint once both ranks' series say the run has ended (served for --metrics-linger)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        samples = scrape_samples(port)
        ended = [s for s in samples if s.name == "resnet_ddp_exit_code"]
        if len(ended) == 2:
            return samples
        assert job.process.poll() is None, "the job ended without serving its end"
        time.sleep(0.2)
    raise AssertionError("the endpoint never showed the run's end")


def test_endpoint_tensorboard_summary_and_report_of_a_run_stopped_by_sigterm(save_dir):
    """One real run serves both ranks' series on one endpoint (and, after the end, how the run ended), writes
    TensorBoard scalars, a summary with its exit reason and the table, and `report` draws its metrics."""
    from resnet_ddp import __version__

    port = free_port()
    # rank 1 slowed, so that the straggler detector names it (and the series says so) within the run
    job = Job(
        train_command(
            *TINY,
            "--epochs",
            "500",
            "--log-interval",
            "1",
            "--warmup-steps",
            "1",
            "--metrics-port",
            str(port),
            "--metrics-linger",
            "1m",
            "--tensorboard",
            "--save-dir",
            str(save_dir),
        ),
        {"RESNET_DDP_TEST_SLOW_RANK": "1:0.15", "RESNET_DDP_STRAGGLER_WINDOW": "1.5s"},
    )
    # both ranks past their first epoch (so an epoch record and a checkpoint exist) and two log points on
    seen = scrape_until(
        job,
        port,
        lambda m: (
            all(m.get(("resnet_ddp_steps_total", r), 0) >= 6 for r in (0, 1))
            and m.get(("resnet_ddp_straggler", 1)) == 1
        ),
    )
    job.process.send_signal(signal.SIGTERM)
    final = _until_the_end_is_served(job, port)  # a stopped run serves its end for at most 5 s of the linger
    result = job.wait(timeout=120)
    assert result.returncode == 143, result.stderr[-2000:]
    summary = json.loads((save_dir / "summary.json").read_text())

    for rank in (0, 1):
        steps = seen["resnet_ddp_steps_total", rank]
        images = seen["resnet_ddp_images_total", rank]
        assert images % 8 == 0 and images >= 6 * 8  # batch 8 per step
        assert 0 < seen["resnet_ddp_progress_ratio", rank] <= min(1.0, (steps + 1) / 2000)  # 500 epochs x 4
        assert seen["resnet_ddp_epoch", rank] >= 2
        assert 0 < seen["resnet_ddp_loss", rank] < 10 and 0 < seen["resnet_ddp_step_mean_seconds", rank] < 60
        assert seen["resnet_ddp_images_per_second", rank] > 0 and 0 <= seen["resnet_ddp_data_wait_ratio", rank] <= 1
        assert seen["resnet_ddp_host_memory_rss_bytes", rank] > 2**20
    assert seen["resnet_ddp_straggler", 0] == 0  # rank 1 named, rank 0 not
    assert seen["resnet_ddp_straggler_score", 1] > 1.1 > seen["resnet_ddp_straggler_score", 0]
    # CPU ranks: no GPU figures at all, rather than zeros
    assert not any(name.startswith(("resnet_ddp_gpu_", "resnet_ddp_memory_", "resnet_ddp_mfu")) for name, _ in seen)

    def values(name, **labels):
        return [s.value for s in final if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]

    for rank in ("0", "1"):
        # how the run ended, and every step it ran, the ones after the last log point included
        assert values("resnet_ddp_run_state", rank=rank, state="stopped") == [1.0]
        assert values("resnet_ddp_run_state", rank=rank, state="running") == [0.0]
        assert values("resnet_ddp_exit_code", rank=rank) == [143.0]
        assert values("resnet_ddp_steps_total", rank=rank) == [summary["steps"]]
        assert values("resnet_ddp_images_total", rank=rank) == [8 * summary["steps"]]
        (info,) = [s for s in final if s.name == "resnet_ddp_info" and s.labels["rank"] == rank]
        assert info.value == 1 and (
            info.labels["version"],
            info.labels["arch"],
            info.labels["world_size"],
            info.labels["amp"],
            info.labels["device"],
        ) == (__version__, "resnet18", "2", "off", "cpu")
        # step time as a histogram: cumulative buckets, +Inf equal to the count of steps timed
        buckets = sorted(
            (float(s.labels["le"]), s.value)
            for s in final
            if s.name == "resnet_ddp_step_seconds_bucket" and s.labels["rank"] == rank
        )
        counts = [count for _, count in buckets]
        assert buckets[0][0] == 0.001 and buckets[-1][0] == math.inf and counts == sorted(counts)
        assert counts[-1] == values("resnet_ddp_step_seconds_count", rank=rank)[0] == summary["steps"]
        assert 0 < values("resnet_ddp_step_seconds_sum", rank=rank)[0] < 60 * summary["steps"]
    # rank 0's checkpoint series: the newest on disk, its size and its time (preemption alerts use its age)
    newest = max(save_dir.glob("checkpoint-*.pt"))
    assert values("resnet_ddp_checkpoint_size_bytes", rank="0") == [newest.stat().st_size]
    assert abs(values("resnet_ddp_checkpoint_timestamp_seconds", rank="0")[0] - newest.stat().st_mtime) < 60
    assert (
        values("resnet_ddp_checkpoints_total", rank="0")[0] >= 2
        and values("resnet_ddp_checkpoint_write_seconds", rank="0")[0] > 0
    )
    from resnet_ddp.observe.prometheus import metrics_dir

    assert not os.path.exists(metrics_dir(port))  # the ranks' files are cleaned up with the job
    # every record follows docs/metrics.md (steps, epochs, checkpoints, straggler checks, the end)
    records = [json.loads(line) for line in (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "epoch", "checkpoint", "straggler_check", "end"} <= {r["kind"] for r in records}
    assert_records_follow_the_schema(records)

    assert summary["exit_reason"] == "stopped by signal" and summary["steps"] >= 6 and summary["epochs_done"] >= 1
    for key in ("wall_s", "img_s", "img_s_per_gpu", "step_ms_p50", "step_ms_p90", "step_ms_p99", "data_wait_frac"):
        assert summary[key] >= 0, key
    assert len(summary["peak_rss_gib_per_rank"]) == 2 and min(summary["peak_rss_gib_per_rank"]) > 0
    assert "gpu_util_pct" not in summary and "mfu" not in summary  # CPU: unknown, so absent
    assert re.search(r"^\[Rank 0\]   exit reason +stopped by signal$", result.stdout, re.M)
    assert re.search(r"^\[Rank 0\]   step time +p50 [\d.]+ ms, p90 [\d.]+ ms, p99 [\d.]+ ms$", result.stdout, re.M)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(save_dir / "tensorboard"))
    events.Reload()
    assert {
        "train/loss",
        "train/img_s",
        "train/step_ms",
        "train/data_wait_frac",
        "memory/host_rss_gib",
        "epoch/global_avg_loss",
    } <= set(events.Tags()["scalars"])
    records = [json.loads(line) for line in (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    logged = {r["global_step"]: r["loss"] for r in records if r["kind"] == "step" and r["rank"] == 0}
    written = {e.step: e.value for e in events.Scalars("train/loss")}
    assert written.keys() == logged.keys() and all(written[s] == pytest.approx(logged[s]) for s in logged)

    report = subprocess.run(
        [sys.executable, "-m", "resnet_ddp", "report", str(save_dir)],
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert report.returncode == 0, report.stderr
    import matplotlib.image

    png = (save_dir / "report.png").read_bytes()
    image = matplotlib.image.imread(save_dir / "report.png")
    assert image.shape[:2] == (800, 1200)
    # the ranks' lines are drawn in matplotlib's first two colours in every panel: throughput, loss, memory, and
    # on a CPU run (no GPU figures) waiting for data where the GPU panel would be (tests/test_report.py has more)
    ranks = ((31, 119, 180), (255, 127, 14))
    top, bottom = image[:400], image[400:]
    for panel in (top[:, :600], top[:, 600:], bottom[:, 600:], bottom[:, :600]):
        assert sum(_pixels_of(panel, colour) for colour in ranks) > 200
    page = (save_dir / "report.html").read_text()
    assert base64.b64encode(png).decode() in page and "stopped by signal" in page


def test_a_finished_run_with_the_endpoint_and_data_loader_workers_exits(save_dir):
    # The endpoint's parts held the DataLoader past the run; at exit multiprocessing then waited for ever on
    # its workers (they ignore SIGTERM). TINY has no workers, so this run gives it one.
    args = [*TINY, "--num-workers", "1", "--epochs", "1", "--metrics-port", str(free_port()), "--metrics-linger", "0"]
    result = run_train(*args, "--save-dir", str(save_dir), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((save_dir / "summary.json").read_text())["exit_reason"] == "finished"


def test_a_resumed_run_keeps_tensorboards_steps_up_to_its_checkpoint_and_replaces_those_after(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from resnet_ddp.observe.tensorboard import TensorBoardWriter

    def log(writer, steps, loss):
        for step in steps:
            writer.write({"kind": "step", "global_step": step, "time": 1e9 + step, "loss": loss})
        writer.close()

    log(TensorBoardWriter(str(tmp_path), 0), range(1, 5), loss=1.0)  # interrupted after step 4; checkpoint at 2
    log(TensorBoardWriter(str(tmp_path), 2), range(3, 6), loss=2.0)  # resumed from step 2
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (1, 1.0),
        (2, 1.0),
        (3, 2.0),
        (4, 2.0),
        (5, 2.0),
    ]


def test_a_failed_runs_counters_include_the_steps_after_its_last_log_point(save_dir):
    port = free_port()
    args = ["--log-interval", "5", "--fail-at-step", "7", "--fail-rank", "1", "--metrics-port", str(port)]
    job = Job(train_command(*TINY, "--epochs", "50", *args, "--metrics-linger", "1m", "--save-dir", str(save_dir)))
    final = _until_the_end_is_served(job, port)
    assert job.wait(timeout=120).returncode == 1
    records = [json.loads(line) for line in (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    for end in (r for r in records if r["kind"] == "end"):
        rank = str(end["rank"])
        (steps,) = [s.value for s in final if s.name == "resnet_ddp_steps_total" and s.labels["rank"] == rank]
        (images,) = [s.value for s in final if s.name == "resnet_ddp_images_total" and s.labels["rank"] == rank]
        assert end["global_step"] == 6 and (steps, images) == (6, 6 * 8)  # the last log point was step 5


def test_a_busy_metrics_port_is_refused_before_any_training_process_starts(save_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_train(*TINY, "--metrics-port", str(port), "--save-dir", str(save_dir), timeout=120)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("resnet-ddp: error: --metrics-port") and str(port) in line and "in use" in line
    assert result.stdout == "" and not (save_dir / "logs").exists()


def test_missing_optional_packages_and_a_dir_without_metrics_are_one_line_errors(tmp_path, monkeypatch, capsys):
    from resnet_ddp.entry import cli

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    assert cli.main([*TINY, "--tensorboard", "--save-dir", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "--tensorboard" in line and "pip install 'resnet-ddp[tensorboard]'" in line

    assert cli.main(["report", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "metrics.jsonl does not exist" in line
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "metrics.jsonl").write_text(
        json.dumps({"kind": "step", "time": 1.0, "rank": 0, "global_step": 1, "img_s": 1.0, "loss": 1.0}) + "\n"
    )
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["report", str(tmp_path)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "matplotlib" in line and "pip install 'resnet-ddp[report]'" in line


def _run_on_a_terminal(args, timeout=180):
    """Run train.py with stdout and stderr on a pseudo-terminal; return (exit code, everything it drew)."""
    controller, terminal = pty.openpty()
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    process = subprocess.Popen(
        train_command(*args), cwd=REPO, env=clean_env(), stdin=subprocess.DEVNULL, stdout=terminal, stderr=terminal
    )
    os.close(terminal)
    output, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if select.select([controller], [], [], 1.0)[0]:
                try:
                    chunk = os.read(controller, 65536)
                except OSError:  # EIO: every process holding the terminal has gone
                    break
                if not chunk:
                    break
                output += chunk
        return process.wait(timeout=30), output.decode(errors="replace")
    finally:
        os.close(controller)
        if process.poll() is None:
            process.kill()


def test_an_interactive_terminal_shows_rank_0s_progress_bar_ending_full_when_duration_ends_the_run(save_dir):
    code, screen = _run_on_a_terminal(
        [*TINY, "--epochs", "500", "--duration", "5s", "--log-interval", "2", "--save-dir", str(save_dir)]
    )
    assert code == 0, screen[-2000:]
    done = json.loads((save_dir / "summary.json").read_text())["steps"]
    # tqdm's bar, finished at the steps run, not at 500 epochs' 2000
    assert re.search(rf"\[Rank 0\] training: +100%\|.*\| {done}/{done} \[", screen), screen[-1500:]
    assert "step/s" in screen
    # the original example's lines are still there, whole, each on its own line once the bar's redraws are out
    lines = [part.split("\r")[-1].replace("\x1b[K", "") for part in screen.split("\r\n")]
    epochs = sorted((m.group(1), m.group(2)) for m in map(EPOCH_LINE.match, lines) if m)
    assert epochs and epochs == sorted((rank, str(e)) for rank in "01" for e in range(1, len(epochs) // 2 + 1))
    assert sum(1 for line in lines if DONE_LINE.match(line)) == 2


def test_pytest_lanes_split_the_selected_tests_between_them(pytester):
    """--lane I/N: the GPU suite split over GPU pairs runs every selected test once, and only those."""
    pytester.makeconftest((REPO / "tests" / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs GPUs\n")
    # The unmarked test first: lanes split what -m selected, not what was collected.
    pytester.makepyfile(
        test_made_up="import pytest\ndef test_not_gpu(): pass\n"
        + "".join(f"@pytest.mark.gpu\ndef test_{i}(): pass\n" for i in range(7))
    )

    def collected(*args):
        result = pytester.runpytest_inprocess("--collect-only", "-q", "-m", "gpu", *args)
        return [line for line in result.outlines if "::test_" in line]

    whole, first, second = collected(), collected("--lane", "1/2"), collected("--lane", "2/2")
    assert len(whole) == 7 and sorted(first + second) == sorted(whole) and len(first) == 4 and len(second) == 3
    assert pytester.runpytest_inprocess("--lane", "3/2").ret == pytest.ExitCode.USAGE_ERROR
