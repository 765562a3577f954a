"""What the job tells people: per-rank console lines in the seed's format, step timing, the summary."""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from typing import Deque, Dict, List, Optional

import torch


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


def _percentile(values: List[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


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
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
