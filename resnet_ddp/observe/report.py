"""`resnet-ddp report SAVE_DIR`: throughput, loss, GPU utilisation and memory over time, as pictures.

Reads SAVE_DIR/logs/metrics.jsonl (a finished run's or a running one's) and
writes SAVE_DIR/report.png and SAVE_DIR/report.html, which embeds the picture
and, where there is one, the run's summary.json. Needs matplotlib (the
`report` extra); torch is not imported.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import json
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

from resnet_ddp.errors import UsageError

METRICS_PATH = os.path.join("logs", "metrics.jsonl")  # as observe.metrics.METRICS_PATH, without importing torch
SUMMARY_NAME = "summary.json"
PNG_NAME, HTML_NAME = "report.png", "report.html"
FIGURE_INCHES, DPI = (12, 8), 100  # report.png is 1200 x 800 pixels


def read_records(path: str) -> List[dict]:
    """Every complete JSON line; a line cut short by a crash (the last one) is skipped."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def _series(records: Sequence[dict], key: str, start: float, scale: float) -> Dict[int, tuple]:
    """Per rank, (times, values) of the step records that carry `key`."""
    points = defaultdict(lambda: ([], []))
    for r in records:
        if r.get("kind") == "step" and r.get(key) is not None:
            xs, ys = points[r["rank"]]
            xs.append((r["time"] - start) / scale)
            ys.append(r[key])
    return dict(sorted(points.items()))


def _plot_per_rank(ax, series: Dict[int, tuple], label: str, **style) -> None:
    many = len(series) > 8  # a legend for 64 ranks says nothing: draw them thin and unlabelled
    for rank, (xs, ys) in series.items():
        ax.plot(xs, ys, linewidth=0.8 if many else 1.5, label=None if many else f"{label}rank {rank}", **style)


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, wrap=True, color="0.35")
    ax.set_xticks([])
    ax.set_yticks([])


def draw(records: Sequence[dict], title: str):
    from matplotlib.figure import Figure

    steps = [r for r in records if r.get("kind") == "step"]
    start = min(r["time"] for r in steps)
    span = max(r["time"] for r in steps) - start
    scale, unit = (60.0, "min") if span > 600 else (1.0, "s")
    figure = Figure(figsize=FIGURE_INCHES, dpi=DPI, layout="constrained")
    figure.suptitle(title)
    (throughput, loss), (utilisation, memory) = figure.subplots(2, 2)

    _plot_per_rank(throughput, _series(steps, "img_s", start, scale), "")
    job = _series([r for r in steps if r["rank"] == 0], "job_img_s", start, scale)
    if 0 in job:
        throughput.plot(*job[0], color="black", linewidth=2, label="job (rank 0 x ranks)")
    throughput.set_title("throughput (img/s)")

    _plot_per_rank(loss, _series(steps, "loss", start, scale), "")
    epochs = [r for r in records if r.get("kind") == "epoch" and r.get("rank") == 0
              and r.get("global_avg_loss") is not None]
    if epochs:
        loss.plot([(r["time"] - start) / scale for r in epochs], [r["global_avg_loss"] for r in epochs],
                  "o", color="black", label="epoch average (all ranks)")
    loss.set_title("training loss")

    util = _series(steps, "gpu_util_pct", start, scale)
    if util:
        _plot_per_rank(utilisation, util, "")
        utilisation.set_ylim(0, 105)
        utilisation.set_title("GPU utilisation (%, NVML)")
    else:
        utilisation.set_title("GPU utilisation")
        _no_data(utilisation, "no GPU utilisation in metrics.jsonl\n(a CPU run, or NVML was not available)")

    gpu_mem, rss = _series(steps, "mem_gib", start, scale), _series(steps, "rss_gib", start, scale)
    if gpu_mem or rss:
        _plot_per_rank(memory, gpu_mem, "GPU (PyTorch), ")
        _plot_per_rank(memory, rss, "host RSS, ", linestyle="--")
        memory.set_title("memory (GiB)")
    else:
        memory.set_title("memory")
        _no_data(memory, "no memory figures in metrics.jsonl")

    for ax in (throughput, loss, utilisation, memory):
        if ax.lines:
            ax.set_xlabel(f"time since the first step line ({unit})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
    return figure


def _summary_table(save_dir: str) -> str:
    path = os.path.join(save_dir, SUMMARY_NAME)
    try:
        with open(path, encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return "<p>No summary.json yet (the run is still going, or it was killed).</p>"
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>"
                   for k, v in sorted(summary.items()))
    return f"<h2>summary.json</h2><table>{rows}</table>"


def write_report(save_dir: str) -> List[str]:
    metrics = os.path.join(save_dir, METRICS_PATH)
    if not os.path.isfile(metrics):
        raise UsageError(f"{metrics} does not exist: give the --save-dir of a run (it writes logs/metrics.jsonl)")
    records = read_records(metrics)
    if not any(r.get("kind") == "step" for r in records):
        raise UsageError(f"{metrics} has no step lines yet: wait for the run's first log point (--log-interval)")
    try:
        import matplotlib

        matplotlib.use("Agg")
    except ImportError:
        raise UsageError("the report needs matplotlib, which is not installed: "
                         "pip install 'resnet-ddp[report]' (or pip install matplotlib)") from None
    title = f"resnet-ddp: {os.path.abspath(save_dir)}"
    buffer = io.BytesIO()
    draw(records, title).savefig(buffer, format="png", dpi=DPI)
    png = buffer.getvalue()
    png_path, html_path = os.path.join(save_dir, PNG_NAME), os.path.join(save_dir, HTML_NAME)
    with open(png_path, "wb") as f:
        f.write(png)
    page = (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}th{text-align:left;padding-right:1em}</style></head>"
            f"<body><h1>{html.escape(title)}</h1>"
            f"<img alt=\"throughput, loss, GPU utilisation and memory over time\" "
            f"src=\"data:image/png;base64,{base64.b64encode(png).decode()}\">"
            f"{_summary_table(save_dir)}</body></html>\n")
    with open(html_path, "w", encoding="utf-8") as f:
        f.write(page)
    return [png_path, html_path]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="resnet-ddp report", description=__doc__.split("\n\n")[0])
    parser.add_argument("save_dir", help="the run's --save-dir (it holds logs/metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        paths = write_report(args.save_dir)
    except UsageError as exc:
        print(f"resnet-ddp report: error: {exc}", file=sys.stderr)
        return 2
    print("wrote " + " and ".join(paths))
    return 0
