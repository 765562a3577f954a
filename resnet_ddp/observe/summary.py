"""The end of a run: every rank's figures gathered into <save-dir>/summary.json, the table, the last line.

summary.json is written by rank 0 as training starts (`running`) and for every run
that ends, finished, stopped or failed (a failed one from what is known where it
failed: entry/worker.py), and by its launcher where rank 0 ended without a word
(summary_file.py); the `end` record closes every rank's part of metrics.jsonl.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from resnet_ddp import __version__
from resnet_ddp.core.callbacks import Callback
from resnet_ddp.core.stopping import first_signal
from resnet_ddp.observe.console import NOTICE
from resnet_ddp.observe.metrics import MetricsLog, StepTimer
from resnet_ddp.observe.summary_file import RUNNING, utc_iso, write_summary

log = logging.getLogger(__name__)


def summarise(rank_stats: List[Dict[str, float]], world_size: int) -> Dict[str, float]:
    """The job's figures from every rank's: throughput adds up, step times are the slowest rank's."""
    img_s = sum(s["img_s"] for s in rank_stats)
    summary = {
        "img_s": img_s,
        "img_s_per_gpu": img_s / world_size,
        "data_wait_frac": max(s["data_wait_frac"] for s in rank_stats),
        "steps": rank_stats[0]["steps"],
        "steady_steps": rank_stats[0]["steady_steps"],
        "steady_window_unix": rank_stats[0]["steady_window_unix"],
    }
    for q in (50, 90, 95, 99):
        summary[f"step_ms_p{q}"] = max(s[f"step_ms_p{q}"] for s in rank_stats)
    if "peak_mem_gib" in rank_stats[0]:
        summary["peak_mem_gib_per_rank"] = [s["peak_mem_gib"] for s in rank_stats]
    if all("peak_rss_gib" in s for s in rank_stats):
        summary["peak_rss_gib_per_rank"] = [s["peak_rss_gib"] for s in rank_stats]
    utils = [s.get("gpu_util_pct") for s in rank_stats]
    if utils and all(u is not None for u in utils):
        summary["gpu_util_pct"] = sum(utils) / len(utils)
        summary["gpu_util_pct_per_rank"] = utils
    return summary


def add_mfu(summary: dict, train_flops_per_image: Optional[float], peak: Optional[Tuple[float, str]]) -> None:
    """The job's MFU over the steady window: every GPU's share of its assumed peak, on average."""
    if train_flops_per_image and peak and summary.get("steady_steps"):
        summary["mfu"] = summary["img_s_per_gpu"] * train_flops_per_image / (peak[0] * 1e12)
        summary["peak_tflops"], summary["peak_precision"] = peak


class RunFacts:
    """What every summary.json says, failed runs' included: the job, where it ran, when."""

    def __init__(self, config, world_size: int, device_name: str):
        self.config, self.world_size, self.device_name = config, world_size, device_name
        self.started_unix = time.time()  # the process's start
        self.training_started = time.perf_counter()  # reset when the first step is about to run
        self.startup_s: Dict[str, float] = {}

    def training_starts(self) -> None:
        """The first step is about to run: the wall time counts from here, and the start-up split marks it."""
        self.training_started = time.perf_counter()
        self.mark("training_ready")

    def mark(self, moment: str) -> None:
        """When this process reached `moment`, in seconds after the job's start (its launcher's): summary.json's
        start-up split, which says where the time to the first step goes."""
        seconds = seconds_since_start_of(os.getppid())
        if seconds is not None:
            self.startup_s[moment] = round(seconds, 2)

    def wall_s(self) -> float:
        """Seconds since training started (the original example's "Training completed in" figure)."""
        return time.perf_counter() - self.training_started

    def start_fields(self) -> dict:
        """What summary.json says of the run before it ends."""
        return {
            "world_size": self.world_size,
            "device": self.device_name,
            "torch": torch.__version__,
            "version": __version__,
            "config": dataclasses.asdict(self.config),  # write_json makes its infinities null
            "started_utc": utc_iso(self.started_unix),
            "startup_s": dict(self.startup_s),
        }

    def fields(self) -> dict:
        return {**self.start_fields(), "ended_utc": utc_iso(time.time()), "wall_s": self.wall_s()}


def seconds_since_start_of(pid: int) -> Optional[float]:
    """How long ago process `pid` started (Linux; None elsewhere), to the kernel's clock tick."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: start time, in ticks since boot
        return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class RunSummary(Callback):
    """on_end, on every rank: the `end` record, the figures gathered (one collective), rank 0's summary.json and
    table, and the original example's last line."""

    def __init__(
        self,
        facts: RunFacts,
        save_dir: str,
        rank,
        metrics: MetricsLog,
        timer: StepTimer,
        batch_size: int,
        epochs_done: Callable[[], int],
        train_flops_per_image: Optional[float],
        peak: Optional[Tuple[float, str]],
        gpu_util_pct: Callable[[], Optional[float]],
        skipped_updates: Callable[[], int],
    ):
        self.facts, self.save_dir, self.rank, self.metrics, self.timer = facts, save_dir, rank, metrics, timer
        self.batch_size, self.epochs_done = batch_size, epochs_done
        self.train_flops_per_image, self.peak = train_flops_per_image, peak
        self.gpu_util_pct, self.skipped_updates = gpu_util_pct, skipped_updates

    def on_start(self, state) -> None:
        self.facts.training_starts()
        self._first_step_after_s: Optional[float] = None
        if self.rank.is_main:  # replaced at the end; left as it is where rank 0 dies without a word under torchrun
            with contextlib.suppress(OSError):  # a full disk fails the run at its first checkpoint, not here
                write_summary(self.save_dir, {"exit_reason": RUNNING, "exit_code": None, **self.facts.start_fields()})

    def after_step(self, state) -> None:
        if self._first_step_after_s is not None or state.steps_run != 1:
            return
        # Once, after the first step: how long the job took to train, from its launcher's start (torchrun's,
        # under torchrun): the figure a restart test watches. One wait for the device, outside every later step.
        if self.rank.device.type == "cuda":
            torch.cuda.synchronize(self.rank.device)
        self.facts.mark("first_step_done")
        self._first_step_after_s = self.facts.startup_s.get("first_step_done")
        if self._first_step_after_s is not None and self.rank.is_main:
            log.info(f"first step done {self._first_step_after_s:.1f} s after the job started")

    def on_end(self, state, outcome) -> None:
        late = first_signal()
        if late is not None:  # came during the end's work: say that the job was stopped, as its exit code will
            outcome = outcome.stopped_late(late)
        self.metrics.record({"kind": "end", "global_step": state.global_step, **outcome.summary_fields()})
        stats = self.timer.stats(self.batch_size)
        stats["gpu_util_pct"] = self.gpu_util_pct()
        stats["host"] = socket.gethostname()
        rank_stats: List[Optional[dict]] = [None] * self.rank.world_size
        dist.all_gather_object(rank_stats, stats)
        if self.rank.is_main:
            summary = summarise(rank_stats, self.rank.world_size)
            summary.update(
                self.facts.fields(),
                **outcome.summary_fields(),
                epochs_done=self.epochs_done(),
                time_to_first_step_s=self._first_step_after_s,
                skipped_updates=self.skipped_updates(),
                hosts=sorted({s["host"] for s in rank_stats}),
            )
            add_mfu(summary, self.train_flops_per_image, self.peak)
            write_summary(self.save_dir, summary)
            summary_table(summary)
        error = outcome.error_line()
        if error is not None and self.rank.is_main:
            log.error(error)
        log.log(NOTICE, f"Training completed in {self.facts.wall_s():.2f} seconds")


def summary_table(summary: dict) -> None:
    """The end-of-run table rank 0 prints: the figures of summary.json a person looks at first."""
    rows = [
        ("exit reason", summary["exit_reason"]),
        ("wall time", f"{summary['wall_s']:.1f} s"),
        ("epochs / steps done", f"{summary['epochs_done']} / {summary['steps']}"),
    ]
    if summary.get("steady_steps"):
        rows += [
            (
                "throughput",
                f"{summary['img_s']:.1f} img/s ({summary['img_s_per_gpu']:.1f} per process), "
                f"over {summary['steady_steps']} steps after the warm-up",
            ),
            ("step time", ", ".join(f"p{q} {summary[f'step_ms_p{q}']:.1f} ms" for q in (50, 90, 99))),
            ("waiting on data", f"{100 * summary['data_wait_frac']:.1f}%"),
        ]
    else:
        rows.append(("throughput", "n/a (no step after the warm-up)"))
    for key, what in (("peak_mem_gib_per_rank", "peak GPU memory"), ("peak_rss_gib_per_rank", "peak host memory")):
        if key in summary:
            rows.append((what, _per_rank(summary[key], "GiB")))
    if "gpu_util_pct" in summary:
        rows.append(("GPU utilisation", f"{summary['gpu_util_pct']:.1f}% (NVML, mean over GPUs and the steady window)"))
    if "mfu" in summary:
        rows.append(
            ("MFU", f"{100 * summary['mfu']:.1f}% of {summary['peak_tflops']:g} TFLOP/s {summary['peak_precision']}")
        )
    table = "\n".join(f"  {name:<21} {value}" for name, value in rows)
    log.info(f"run summary (also in summary.json):\n{table}", extra={"fields": {"summary": summary}})


def _per_rank(values: Sequence[float], unit: str) -> str:
    if len(values) <= 4:
        return ", ".join(f"{v:.2f}" for v in values) + f" {unit} (rank 0 first)"
    high = max(range(len(values)), key=values.__getitem__)
    return f"{values[high]:.2f} {unit} at most (rank {high}), {min(values):.2f} {unit} at least"


def write_failure_summary(save_dir: str, facts: Optional[RunFacts], outcome, steps: int, epochs_done: int) -> None:
    """summary.json of a run that failed (or broke after a stop signal), from what this rank knows; never raises
    (the first error is the one to report)."""
    summary = {**outcome.summary_fields(), "steps": steps, "epochs_done": epochs_done}
    if facts is not None:
        with contextlib.suppress(Exception):  # a broken device may not even answer its name
            summary.update(facts.fields())
    with contextlib.suppress(Exception):
        write_summary(save_dir, summary)
