"""`resnet-ddp report SAVE_DIR`: throughput, loss, GPU utilisation and memory over UTC time, as pictures.

Reads SAVE_DIR/logs/metrics.jsonl (a finished run's or a running one's) and
writes SAVE_DIR/report.png and SAVE_DIR/report.html, which embeds the picture
and, where there is one, the run's summary.json. The time axis is wall-clock
UTC, as in Grafana and DCGM, and the run's events (epoch ends, checkpoints,
straggler warnings, the end) are marked on every panel. Needs matplotlib (the
`report` extra); torch is not imported.
"""

from __future__ import annotations

import base64
import glob
import html
import io
import json
import math
import os
import sys
from collections import defaultdict
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence, Tuple

from resnet_ddp.core.files import write_atomically
from resnet_ddp.errors import UsageError
from resnet_ddp.observe.summary_file import RUNNING, read_summary_file, utc_iso

METRICS_PATH = os.path.join("logs", "metrics.jsonl")  # as observe.metrics.metrics_path, without importing torch
OTHER_NODES = os.path.join("logs", "metrics-node*.jsonl")  # the other nodes' files, where they share the save dir
PNG_NAME, HTML_NAME = "report.png", "report.html"
FIGURE_INCHES, DPI = (12, 8), 100  # report.png is 1200 x 800 pixels
FAILURES = ("failed", "loss not finite")
MANY_RANKS = 8  # above this, rank lines are thin, translucent and share one legend entry
RANK_LINESTYLES = ("-", "--", "-.", ":")
FAILURE_RED, MARKER_BLACK = "tab:red", "0.15"


_NUMBER = (int, float)
_SUMMARY_TYPES = {  # the fields the picture and the headline format, with the types summary.json gives them
    "img_s": _NUMBER,
    "step_ms_p50": _NUMBER,
    "mfu": _NUMBER,
    "gpu_util_pct": _NUMBER,
    "world_size": int,
    "device": str,
    "exit_reason": str,
    "ended_utc": str,
}


def read_records(path: str) -> List[dict]:
    """Every complete record; a line cut short by a crash (the last one), or that is no record of ours, is
    skipped."""
    records = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if _is_record(record):
                records.append(record)
    return records


def _is_record(record) -> bool:
    """Every record the job writes has its kind, time and rank (docs/metrics.md)."""
    return (
        isinstance(record, dict)
        and isinstance(record.get("kind"), str)
        and isinstance(record.get("time"), (int, float))
        and isinstance(record.get("rank"), int)
    )


def read_summary(save_dir: str) -> Optional[dict]:
    """summary.json, or None while the run is going (or when it was killed before writing its end)."""
    summary = read_summary_file(save_dir)
    if summary is None or summary.get("exit_reason") == RUNNING:
        return None
    # A field of another type than the job writes (a hand-edited file) is left out rather than drawn.
    return {k: v for k, v in summary.items() if k not in _SUMMARY_TYPES or isinstance(v, _SUMMARY_TYPES[k])}


def utc(unix_time: float) -> datetime:
    return datetime.fromtimestamp(unix_time, timezone.utc)


# What happened when: the run's events, from its records.


def _of_one_rank(records: Sequence[dict], *kinds: str) -> List[dict]:
    """Records of kinds that every rank writes, from one rank only: rank 0, or the lowest there is (a node's own
    metrics.jsonl, where the save dir is not shared, has only its ranks)."""
    mine = [r for r in records if r.get("kind") in kinds]
    lowest = min((r["rank"] for r in mine), default=0)
    return sorted((r for r in mine if r["rank"] == lowest), key=lambda r: r["time"])


def epoch_ends(records: Sequence[dict]) -> List[dict]:
    return _of_one_rank(records, "epoch")


def checkpoints(records: Sequence[dict]) -> List[dict]:
    return sorted((r for r in records if r.get("kind") == "checkpoint"), key=lambda r: r["time"])


def straggler_warnings(records: Sequence[dict]) -> List[Tuple[float, List[int]]]:
    """(time, ranks) where the detector names ranks it did not name just before: its warnings."""
    warnings, named = [], set()
    for r in _of_one_rank(records, "straggler_check", "step"):
        now = set(r.get("straggler_ranks") or ())
        if now - named:
            warnings.append((r["time"], sorted(now - named)))
        named = now
    return warnings


def run_ends(records: Sequence[dict]) -> List[dict]:
    """One `end` record per run: a resumed run appends to the same metrics.jsonl."""
    return _of_one_rank(records, "end")


def last_step_time(records: Sequence[dict]) -> float:
    return max(r["time"] for r in records if r.get("kind") == "step")


def is_of_the_last_run(summary: dict, records: Sequence[dict]) -> bool:
    """False for the summary.json of an earlier run while a resumed one is going."""
    try:
        ended = datetime.fromisoformat(summary["ended_utc"].replace("Z", "+00:00")).timestamp()
    except (KeyError, AttributeError, ValueError):
        return True
    return ended >= last_step_time(records)


def describe_end(end: dict, with_error: bool = True) -> str:
    """The exit reason with what an operator looks up next: the signal, the failing rank and its error."""
    reason = end.get("exit_reason", "ended")
    if end.get("signal"):
        reason += f" ({end['signal']})"
    nonfinite = end.get("first_nonfinite_loss")
    if isinstance(nonfinite, dict):
        reason += f" at step {nonfinite.get('step')} on rank {nonfinite.get('rank')}"
    failure = end.get("first_failure")
    if isinstance(failure, dict):  # host and error are null where the rank telling it could not learn them
        reason += f" on rank {failure.get('rank')}"
        if failure.get("host"):
            reason += f" ({failure['host']})"
        if with_error and failure.get("error"):
            reason += f": {failure['error']}"
    if end.get("exit_code") is not None:
        reason += f", exit {end['exit_code']}"
    return reason


# The headline: the figures an operator reads first.


def short_number(x: float) -> str:
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def headline(summary: Optional[dict], records: Sequence[dict]) -> str:
    """summary.json's figures; for a running job (its summary.json says so, or it has none yet), those of its last
    log point."""
    if summary is not None and is_of_the_last_run(summary, records):
        parts = [
            f"{short_number(summary['img_s'])} img/s" if "img_s" in summary else None,
            f"step p50 {short_number(summary['step_ms_p50'])} ms" if "step_ms_p50" in summary else None,
            f"MFU {100 * summary['mfu']:.1f}%" if summary.get("mfu") is not None else None,
            f"GPU util {summary['gpu_util_pct']:.0f}%" if summary.get("gpu_util_pct") is not None else None,
            f"{summary['world_size']} ranks, {summary.get('device', '')}" if "world_size" in summary else None,
            summary.get("exit_reason", ""),
        ]
        return "   ·   ".join(p for p in parts if p)
    last = {r["rank"]: r for r in sorted((r for r in records if r.get("kind") == "step"), key=lambda r: r["time"])}
    first = last[min(last)]
    ends = [r for r in run_ends(records) if r["time"] >= last_step_time(records)]
    parts = [
        f"{short_number(first['job_img_s'])} img/s" if first.get("job_img_s") is not None else None,
        f"step {short_number(max(r.get('step_ms', 0) for r in last.values()))} ms",
        f"MFU {100 * first['mfu']:.1f}%" if first.get("mfu") is not None else None,
        f"at step {first.get('global_step')} of {first.get('total_steps')}",
        ends[0]["exit_reason"] if ends else "running (figures of the last log point)",
    ]
    return "   ·   ".join(p for p in parts if p)


# The picture.


def steps_with_gaps(records: Sequence[dict]) -> List[dict]:
    """The step records in time order, and a gap for every rank where a run ended, so that a resumed run's lines
    (it appends to the same metrics.jsonl) do not join the earlier run's across the time between them."""
    steps = [r for r in records if r.get("kind") == "step"]
    ranks = {r["rank"] for r in steps}
    gaps = [{"kind": "gap", "rank": rank, "time": end["time"]} for end in run_ends(records) for rank in ranks]
    return sorted(steps + gaps, key=lambda r: r["time"])


def _series(steps: Sequence[dict], key: str, scale: float = 1.0) -> Dict[int, tuple]:
    """Per rank, (UTC times, values) of the step records that carry `key`; NaN at a gap, which breaks the line."""
    points = defaultdict(lambda: ([], []))
    for r in steps:
        if r.get(key) is not None or (r["kind"] == "gap" and r["rank"] in points):
            xs, ys = points[r["rank"]]
            xs.append(utc(r["time"]))
            ys.append(math.nan if r["kind"] == "gap" else r[key] * scale)
    return dict(sorted(points.items()))


def _plot_per_rank(ax, series: Dict[int, tuple], label: str = "", alpha: Optional[float] = None) -> None:
    """One line per rank, in the rank's colour. A few ranks: each later line thinner and in another dash, so that
    where ranks are equal (ranks in step) every one still shows. Many: thin, translucent, one legend entry."""
    ranks = list(series)
    for i, (rank, (xs, ys)) in enumerate(series.items()):
        if len(ranks) > MANY_RANKS:
            style = dict(
                linewidth=0.8, alpha=alpha or 0.5, label=f"{label}ranks {ranks[0]}-{ranks[-1]}" if i == 0 else None
            )
        else:
            style = dict(
                linewidth=max(0.8, 2.4 - 0.4 * i),
                linestyle=RANK_LINESTYLES[i % len(RANK_LINESTYLES)],
                alpha=alpha,
                label=f"{label}rank {rank}",
            )
        ax.plot(xs, ys, color=f"C{i % 10}", gid="rank", **style)


def _from_zero(ax) -> None:
    """The y axis from 0, with a little room above the highest point."""
    ax.set_ylim(0, ax.get_ylim()[1] * 1.05)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.35")
    ax.set_yticks([])


def _draw_throughput(ax, steps: Sequence[dict]) -> None:
    """Each rank's img/s, and on the right the job's scale (the job's img/s is rank 0's times the ranks): a line of
    the job's own would squash the ranks' under it, or, on an axis of its own, cover them."""
    _plot_per_rank(ax, _series(steps, "img_s"))
    _from_zero(ax)
    ax.set_title("throughput: img/s per rank (left), the job's (right)")
    ranks = world_size(steps)
    job = ax.secondary_yaxis("right", functions=(lambda y: y * ranks, lambda y: y / ranks))
    job.set_ylabel(f"job img/s (a rank's x {ranks})")


def world_size(steps: Sequence[dict]) -> int:
    """From the step records themselves (job_img_s is a rank's img/s times the ranks), so that a node's own
    metrics.jsonl, which has only its ranks, still gives the job's."""
    for r in steps:
        if r.get("job_img_s") and r.get("img_s"):
            return round(r["job_img_s"] / r["img_s"])
    return len({r["rank"] for r in steps})


def _draw_loss(ax, steps: Sequence[dict], records: Sequence[dict]) -> None:
    _plot_per_rank(ax, _series(steps, "loss"))
    averages = [r for r in epoch_ends(records) if r.get("global_avg_loss") is not None]
    if averages:
        ax.plot(
            [utc(r["time"]) for r in averages],
            [r["global_avg_loss"] for r in averages],
            "o",
            color="black",
            label="epoch average (all ranks)",
        )
    ax.set_title("training loss")


def _draw_utilisation_or_data_wait(ax, steps: Sequence[dict]) -> None:
    """GPU utilisation where NVML gave it; otherwise (a CPU run) the share of time spent waiting for data."""
    utilisation = _series(steps, "gpu_util_pct")
    if utilisation:
        _plot_per_rank(ax, utilisation)
        ax.set_ylim(0, 105)
        ax.set_title("GPU utilisation (%, NVML)")
    else:
        _plot_per_rank(ax, _series(steps, "data_wait_frac", scale=100))
        _from_zero(ax)
        ax.set_title("waiting for data (% of step time)")


def _draw_memory(ax, steps: Sequence[dict]) -> None:
    gpu, host = _series(steps, "mem_gib"), _series(steps, "rss_gib")
    _plot_per_rank(ax, gpu, "GPU (PyTorch), ")
    _plot_per_rank(ax, host, "host RSS, " if gpu else "", alpha=0.45 if gpu else None)  # lighter beside GPU's
    if gpu or host:
        _from_zero(ax)  # 50 MiB more is not a jump
        ax.set_title("GPU memory (PyTorch) and host RSS (GiB)" if gpu else "host memory RSS (GiB)")
    else:
        ax.set_title("memory")
        _no_data(ax, "no memory figures in metrics.jsonl")


def _mark_events(ax, records: Sequence[dict], labelled: bool) -> None:
    """Epoch ends, checkpoints, straggler warnings and the end, on one panel; `labelled`: with their words."""
    top = ax.get_xaxis_transform()  # x in time, y from 0 (bottom) to 1 (top) of the panel
    for i, r in enumerate(epoch_ends(records)):
        ax.axvline(
            utc(r["time"]),
            color="0.55",
            linewidth=0.8,
            linestyle=":",
            gid="epoch-end",
            label="epoch end" if labelled and i == 0 else None,
        )
    saved = checkpoints(records)
    if saved:
        ax.plot(
            [utc(r["time"]) for r in saved],
            [1.0] * len(saved),
            linestyle="none",
            marker="v",
            markersize=8,
            color=MARKER_BLACK,
            transform=top,
            clip_on=False,
            gid="checkpoint",
            label="checkpoint" if labelled else None,
        )
    for i, (when, ranks) in enumerate(straggler_warnings(records)):
        ax.plot(
            [utc(when)],
            [1.0],
            linestyle="none",
            marker="X",
            markersize=8,
            color=MARKER_BLACK,
            transform=top,
            clip_on=False,
            gid="straggler",
            label="straggler named" if labelled and i == 0 else None,
        )
        if labelled:
            named = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ", ".join(map(str, ranks))
            ax.text(
                utc(when),
                0.97,
                f"straggler: {named}",
                transform=top,
                rotation=90,
                ha="right",
                va="top",
                fontsize="small",
                gid="straggler",
                in_layout=False,
            )
    for end in run_ends(records):
        colour = FAILURE_RED if end.get("exit_reason") in FAILURES else MARKER_BLACK
        ax.axvline(utc(end["time"]), color=colour, linewidth=1.5, gid="end")
        if labelled:
            ax.text(
                utc(end["time"]),
                0.97,
                describe_end(end, with_error=False),
                transform=top,
                rotation=90,
                ha="right",
                va="top",
                fontsize="small",
                color=colour,
                gid="end-label",
                in_layout=False,
            )


def _utc_time_axis(ax, start: float, end: float) -> None:
    """Wall-clock UTC ticks (14:03:20) with the date beside the axis, as Grafana and DCGM show them."""
    from matplotlib import dates

    locator = dates.AutoDateLocator(tz=timezone.utc)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(
        dates.ConciseDateFormatter(
            locator,
            tz=timezone.utc,
            formats=["%Y", "%b", "%d", "%H:%M", "%H:%M", "%H:%M:%S.%f"],
            zero_formats=["", "%Y", "%b", "%b-%d", "%H:%M", "%H:%M:%S"],
            offset_formats=["", "%Y", "%Y-%m", "%Y-%m-%d", "%Y-%m-%d", "%Y-%m-%d"],
        )
    )
    margin = max(0.02 * (end - start), 0.5)
    ax.set_xlim(utc(start - margin), utc(end + margin))
    ax.set_xlabel("time (UTC)")


def draw(records: Sequence[dict], title: str, summary: Optional[dict] = None):
    from matplotlib.figure import Figure

    steps = steps_with_gaps(records)
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    figure.suptitle(f"{title}\n{headline(summary, records)}", gid="headline")
    (throughput, loss), (utilisation, memory) = figure.subplots(2, 2)
    _draw_throughput(throughput, steps)
    _draw_loss(loss, steps, records)
    _draw_utilisation_or_data_wait(utilisation, steps)
    _draw_memory(memory, steps)

    start, end = min(r["time"] for r in records if r.get("kind") == "step"), max(r["time"] for r in records)
    for ax in (throughput, loss, utilisation, memory):
        _mark_events(ax, records, labelled=ax is throughput)
        _utc_time_axis(ax, start, end)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small", loc="best")
    return figure


# The page.


def readable(value, key: str = "") -> str:
    """A summary.json value as a person reads it: floats to 4 significant digits, Unix times as UTC."""
    if isinstance(value, list):
        return ", ".join(readable(v, key) for v in value)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and key.endswith("_unix"):
        return utc_iso(value)
    if isinstance(value, float) and math.isfinite(value):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (bool, type(None))):
        return json.dumps(value)
    return str(value)


def _flat(summary: dict, prefix: str = "") -> List[Tuple[str, object]]:
    """Nested sections (config, first_failure) as dotted keys: config.training.lr."""
    rows = []
    for key, value in sorted(summary.items()):
        if isinstance(value, dict):
            rows += _flat(value, f"{prefix}{key}.")
        else:
            rows.append((f"{prefix}{key}", value))
    return rows


def _table(rows: Sequence[Tuple[str, str]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
        + "</table>"
    )


def _events_table(records: Sequence[dict]) -> str:
    """The marked events at their exact UTC times, to find them in Grafana or in the pods' logs."""
    events = [
        (r["time"], f"epoch {r.get('epoch')} ends (global step {r.get('global_step')})") for r in epoch_ends(records)
    ]
    events += [
        (
            r["time"],
            f"checkpoint {os.path.basename(str(r.get('path')))} written in "
            f"{readable(r.get('write_s'))} s (training held {readable(r.get('training_held_s'))} s)",
        )
        for r in checkpoints(records)
    ]
    events += [(when, "straggler: rank " + ", ".join(map(str, ranks))) for when, ranks in straggler_warnings(records)]
    events += [(r["time"], f"end: {describe_end(r)}") for r in run_ends(records)]
    return "<h2>Events (UTC)</h2>" + _table([(utc_iso(t), what) for t, what in sorted(events)])


def _summary_table(summary: Optional[dict], records: Sequence[dict]) -> str:
    if summary is None:
        return "<p>No summary.json yet (the run is still going, or it was killed).</p>"
    heading = (
        "summary.json"
        if is_of_the_last_run(summary, records)
        else "summary.json, of an earlier run (a resumed run is still going)"
    )
    return f"<h2>{heading}</h2>" + _table([(k, readable(v, k)) for k, v in _flat(summary)])


def write_report(save_dir: str) -> List[str]:
    metrics = os.path.join(save_dir, METRICS_PATH)
    if not os.path.isfile(metrics):
        raise UsageError(f"{metrics} does not exist: give the --save-dir of a run (it writes logs/metrics.jsonl)")
    records = read_records(metrics)
    for path in sorted(glob.glob(os.path.join(save_dir, OTHER_NODES))):
        records += read_records(path)
    records.sort(key=lambda r: r.get("time", 0))
    if not any(r.get("kind") == "step" for r in records):
        raise UsageError(f"{metrics} has no step lines yet: wait for the run's first log point (--log-interval)")
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise UsageError(
            "the report needs matplotlib, which is not installed: "
            "pip install 'resnet-ddp[report]' (or pip install matplotlib)"
        ) from None
    summary = read_summary(save_dir)
    title = f"resnet-ddp: {os.path.abspath(save_dir)}"
    buffer = io.BytesIO()
    draw(records, title, summary).savefig(buffer, format="png", dpi=DPI)
    png = buffer.getvalue()
    png_path, html_path = os.path.join(save_dir, PNG_NAME), os.path.join(save_dir, HTML_NAME)
    page = (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}</style></head>"
        f"<body><h1>{html.escape(title)}</h1><p>{html.escape(headline(summary, records))}</p>"
        f'<img alt="throughput, loss, GPU utilisation or data wait, and memory over UTC time" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"{_events_table(records)}{_summary_table(summary, records)}</body></html>\n"
    )
    try:
        write_atomically(png_path, lambda f: f.write(png))  # a failed write leaves no half-written report
        write_atomically(html_path, lambda f: f.write(page.encode("utf-8")))
    except OSError as exc:
        raise UsageError(f"cannot write the report in {save_dir}: {exc.strerror or exc} ({exc.filename})") from None
    return [png_path, html_path]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from resnet_ddp.entry.cli import _Parser  # errors in one line

    parser = _Parser(prog="resnet-ddp report", description=__doc__.split("\n\n")[0])
    parser.add_argument("save_dir", help="the run's --save-dir (it holds logs/metrics.jsonl)")
    try:
        paths = write_report(parser.parse_args(argv).save_dir)
    except UsageError as exc:
        print(f"resnet-ddp report: error: {exc}", file=sys.stderr)
        return 2
    print("wrote " + " and ".join(paths))
    return 0
