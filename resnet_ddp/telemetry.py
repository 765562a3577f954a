"""What the job tells people: per-rank console lines in the seed's format, step timing, the summary."""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
import sys
import time
from typing import Deque, Dict, List, Optional, Tuple

import torch

from resnet_ddp.checkpoint import write_atomically


def log(rank: int, message: str) -> None:
    # One write per line, so that lines from ranks sharing a terminal do not interleave.
    sys.stdout.write(f"[Rank {rank}] {message}\n")
    sys.stdout.flush()


def epoch_line(rank: int, epoch: int, avg_loss: float) -> None:
    # The seed's format, kept exactly: log parsers depend on it.
    log(rank, f"Epoch {epoch:3d} - Avg Loss: {avg_loss:.4f}")


def global_epoch_line(rank: int, epoch: int, avg_loss: float, world_size: int) -> None:
    log(rank, f"Epoch {epoch:3d} - Global Avg Loss: {avg_loss:.4f} ({world_size} ranks)")


def completed_line(rank: int, seconds: float) -> None:
    log(rank, f"Training completed in {seconds:.2f} seconds")


class StepTimer:
    """Step times and data-wait time, measured without a host sync in the step.

    On a GPU each step ends with a CUDA event; events are read only once they
    have completed (event.query() does not block), so the times are the GPU's
    timeline. On CPU the step is synchronous and the host clock is the truth.
    """

    def __init__(self, device: torch.device, warmup_steps: int):
        self.device = device
        self.warmup_steps = warmup_steps
        self.steps = 0
        self.step_ms: List[float] = []
        self._pending: Deque = collections.deque()
        self._free_events: List = []
        self._last_event = None
        self._last_host = time.perf_counter()
        self._data_wait_s = 0.0
        self._steady_data_wait_s = 0.0
        self._steady_started: Optional[float] = None
        self._steady_ended: Optional[float] = None
        self.steady_window_unix = [time.time(), time.time()]

    @property
    def steady(self) -> bool:
        return self.steps >= self.warmup_steps

    @property
    def data_wait_s(self) -> float:
        return self._data_wait_s

    def data_waited(self, seconds: float) -> None:
        self._data_wait_s += seconds
        if self.steady:
            self._steady_data_wait_s += seconds

    def step_done(self) -> None:
        self.steps += 1
        if self.steps == self.warmup_steps:
            self._steady_started = time.perf_counter()
            self.steady_window_unix[0] = time.time()
        if self.device.type == "cuda":
            event = self._free_events.pop() if self._free_events else torch.cuda.Event(enable_timing=True)
            event.record()
            self._pending.append(event)
            self._drain(block=False)
        else:
            now = time.perf_counter()
            self.step_ms.append((now - self._last_host) * 1000.0)
            self._last_host = now

    def _drain(self, block: bool) -> None:
        while self._pending and (block or self._pending[0].query()):
            event = self._pending.popleft()
            if block:
                event.synchronize()
            if self._last_event is not None:
                self.step_ms.append(self._last_event.elapsed_time(event))
                self._free_events.append(self._last_event)
            else:
                self.step_ms.append(float("nan"))  # the first step has no start mark
            self._last_event = event

    def finish(self) -> None:
        """Read the last events (one sync, after training) and close the steady window."""
        self._drain(block=True)
        self._steady_ended = time.perf_counter()
        self.steady_window_unix[1] = time.time()

    def stats(self, batch_size: int) -> Dict[str, float]:
        """This rank's steady-state figures (steps after the warm-up, or all but the first if too few)."""
        skip = self.warmup_steps if len(self.step_ms) > self.warmup_steps else min(1, len(self.step_ms) - 1)
        steady = [t for t in self.step_ms[skip:] if t == t]
        total_s = sum(steady) / 1000.0
        window_s = ((self._steady_ended - self._steady_started)
                    if self._steady_started is not None and self._steady_ended is not None else total_s)
        wait_s = self._steady_data_wait_s if self._steady_started is not None else self._data_wait_s
        result = {
            "steady_window_unix": self.steady_window_unix,
            "steps": self.steps,
            "steady_steps": len(steady),
            "img_s": len(steady) * batch_size / total_s if total_s > 0 else 0.0,
            "data_wait_frac": min(1.0, wait_s / window_s) if window_s > 0 else 0.0,
        }
        for q in (50, 90, 95, 99):
            result[f"step_ms_p{q}"] = _percentile(steady, q)
        if self.device.type == "cuda":
            result["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return result


def _percentile(values: List[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


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
    return summary


def write_json(path: str, payload: dict) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()))


# Dense datasheet peaks, TFLOP/s per GPU, by the precision the convolutions run in. fp32
# training runs its convolutions in TF32 (PyTorch's default for cuDNN), so it is rated at tf32.
_PEAK_TFLOPS = (
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0}),
    ("H100", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7}),
    ("H200", {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7}),
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0, "tf32": 183.0}),
    ("V100", {"fp16": 125.0, "tf32": 15.7}),  # no TF32 on Volta: fp32 runs at its fp32 rate
)


def assumed_peak_tflops(device_name: str, amp: str) -> Optional[Tuple[float, str]]:
    """(peak, precision) from the datasheet table, or None for a device we have no figure for."""
    precision = {"bf16": "bf16", "fp16": "fp16"}.get(amp, "tf32")
    for name, peaks in _PEAK_TFLOPS:
        if name in device_name and precision in peaks:
            return peaks[precision], precision
    return None


class StepLogger:
    """Step lines on the console and step records in <save-dir>/logs/metrics.jsonl.

    A line is due every `interval_steps` steps, or when `interval_s` seconds have
    passed. Only then is the loss read from the device (one sync per line), so
    the time between two lines is the GPU's time for the steps between them.
    Each record is one write to a file opened for appending, so ranks sharing
    the file never interleave and a crash loses at most the line being written.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, batch_size: int, total_steps: int,
                 metrics_path: str, interval_steps: Optional[int], interval_s: float, quiet: bool,
                 train_flops_per_image: Optional[float], peak: Optional[Tuple[float, str]]):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.batch_size, self.total_steps = batch_size, total_steps
        self.interval_steps, self.interval_s, self.quiet = interval_steps, interval_s, quiet
        self.train_flops_per_image, self.peak = train_flops_per_image, peak
        os.makedirs(os.path.dirname(metrics_path), exist_ok=True)
        self._fd = os.open(metrics_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._last_time = time.perf_counter()
        self._last_step = 0
        self._last_loss_sum = 0.0
        self._last_wait = 0.0
        self.extra: Dict[str, object] = {}  # more fields for every step record (e.g. straggler_ranks)

    def record(self, payload: dict) -> None:
        # A diverged loss is NaN: written as null, so every line stays strict JSON for jq.
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in payload.items()}
        line = json.dumps(dict(time=time.time(), rank=self.rank, **record))
        os.write(self._fd, (line + "\n").encode())

    def epoch_started(self, loss_sum_so_far: float, global_step: int) -> None:
        self._last_loss_sum = loss_sum_so_far
        self._last_step = global_step

    def after_step(self, global_step: int, epoch: int, step_in_epoch: int, steps_per_epoch: int,
                   loss_sum: torch.Tensor, data_wait_s: float) -> None:
        now = time.perf_counter()
        steps = global_step - self._last_step
        if self.interval_steps is not None:
            due = global_step % self.interval_steps == 0
        else:
            due = now - self._last_time >= self.interval_s
        if not due or steps <= 0:
            return
        loss_now = loss_sum.item()  # the one sync a line costs; after it the host clock is the GPU's
        now = time.perf_counter()
        elapsed = now - self._last_time
        step_s = elapsed / steps
        img_s = steps * self.batch_size / elapsed
        figures = {
            "kind": "step", "epoch": epoch, "step": step_in_epoch, "steps_per_epoch": steps_per_epoch,
            "global_step": global_step, "total_steps": self.total_steps,
            "loss": (loss_now - self._last_loss_sum) / steps, "img_s": img_s,
            "job_img_s": img_s * self.world_size, "step_ms": step_s * 1000,
            "data_wait_frac": min(1.0, (data_wait_s - self._last_wait) / elapsed),
            "eta_s": (self.total_steps - global_step) * step_s,
        }
        figures.update(self.extra)
        if self.device.type == "cuda":
            figures["mem_gib"] = torch.cuda.memory_allocated(self.device) / 2**30
            figures["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.train_flops_per_image and self.peak:
            figures["mfu"] = img_s * self.train_flops_per_image / (self.peak[0] * 1e12)
            figures["peak_tflops"], figures["peak_precision"] = self.peak
        self.record(figures)
        if not self.quiet:
            log(self.rank, _step_line(figures, self.rank == 0))
        self._last_time, self._last_step, self._last_loss_sum, self._last_wait = now, global_step, loss_now, data_wait_s

    def close(self) -> None:
        os.close(self._fd)


def _step_line(f: dict, main: bool) -> str:
    parts = [
        f"epoch {f['epoch']} step {f['step']}/{f['steps_per_epoch']} ({f['global_step']}/{f['total_steps']})",
        f"loss {f['loss']:.4f}",
        f"{f['img_s']:.0f} img/s" + (f" (job {f['job_img_s']:.0f})" if main else ""),
        f"step {f['step_ms']:.1f} ms",
        f"data wait {100 * f['data_wait_frac']:.1f}%",
    ]
    if "mem_gib" in f:
        parts.append(f"mem {f['mem_gib']:.1f}/{f['peak_mem_gib']:.1f} GiB")
    if "mfu" in f:
        parts.append(f"MFU {100 * f['mfu']:.1f}% of {f['peak_tflops']:g} TFLOP/s {f['peak_precision']}")
    parts.append(f"ETA {_duration(f['eta_s'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
