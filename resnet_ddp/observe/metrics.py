"""Step timing, step lines and <save-dir>/logs/metrics.jsonl with its sinks (Prometheus, TensorBoard).

`MetricsLog` is the one writer of records: every record goes to metrics.jsonl and
to the sinks. `StepTimer` times steps on the device's own timeline without a host
sync in the step. `StepLogger` makes the step lines and records at log points and
the epoch lines at epoch ends.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import resource
import statistics
import time
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

import torch

from resnet_ddp.core.callbacks import Callback
from resnet_ddp.core.files import strict_json
from resnet_ddp.core.stopping import RunLength
from resnet_ddp.observe.console import NOTICE, ProgressBar

log = logging.getLogger(__name__)

LOG_EVERY_S = 10.0


def metrics_path(save_dir: str, node: int) -> str:
    """One file per node: the ranks of a node append to it (one write per record, which one host's kernel keeps
    whole, on NFS too), and different nodes, whose appends to one file a shared volume could interleave, never
    share one. The node of rank 0 writes logs/metrics.jsonl."""
    name = "metrics.jsonl" if node == 0 else f"metrics-node{node}.jsonl"
    return os.path.join(save_dir, "logs", name)


class MetricsLog:
    """<save-dir>/logs/metrics.jsonl, and the sinks every record also goes to.

    Each record is one write to a file opened for appending, so a crash loses at
    most the line being written; records from threads (the checkpoint writer) and
    from the training loop never interleave within a line.
    """

    def __init__(self, path: str, rank: int):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.rank = rank
        self.sinks: list = []
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def add_sink(self, sink) -> None:
        """Also send every record from now on to `sink.write(record)`; `sink.close()` is called with this."""
        self.sinks.append(sink)

    def record(self, payload: dict) -> None:
        record = dict(time=time.time(), rank=self.rank, **strict_json(payload))  # a diverged loss: null
        os.write(self._fd, (json.dumps(record, allow_nan=False) + "\n").encode())
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        os.close(self._fd)
        for sink in self.sinks:
            sink.close()


class StepTimer(Callback):
    """Step times and data-wait time, measured without a host sync in the step.

    On a GPU each step ends with a CUDA event; events are read only once they
    have completed (event.query() does not block), so the times are the GPU's
    timeline. On CPU the step is synchronous and the host clock is the truth.
    `data_wait_s()` is the batches' running total of time spent waiting for data.
    """

    def __init__(self, device: torch.device, warmup_steps: int, data_wait_s: Callable[[], float]):
        self.device = device
        self.warmup_steps = warmup_steps
        self.data_wait_s = data_wait_s
        self.steps = 0
        self.step_ms: List[float] = []
        self._pending: Deque = collections.deque()
        self._free_events: List = []
        self._last_event = None
        self._last_host = time.perf_counter()
        self._steady_wait_from: Optional[float] = None  # the data wait before the steady window
        self._steady_started: Optional[float] = None
        self._steady_ended: Optional[float] = None
        self.steady_window_unix = [time.time(), time.time()]

    @property
    def steady(self) -> bool:
        return self.steps >= self.warmup_steps

    def on_start(self, state) -> None:
        self._last_host = time.perf_counter()
        if self.warmup_steps == 0:
            self._begin_steady_window()

    def _begin_steady_window(self) -> None:
        self._steady_started = time.perf_counter()
        self._steady_wait_from = self.data_wait_s()
        self.steady_window_unix[0] = time.time()

    def after_step(self, state) -> None:
        self.steps += 1
        if self.steps == self.warmup_steps:
            self._begin_steady_window()
        if self.device.type == "cuda":
            event = self._free_events.pop() if self._free_events else torch.cuda.Event(enable_timing=True)
            event.record()
            self._pending.append(event)
            self._drain(block=False)
        else:
            now = time.perf_counter()
            self.step_ms.append((now - self._last_host) * 1000.0)
            self._last_host = now

    def on_epoch_start(self, state) -> None:
        # The work between epochs (epoch lines, checkpoints) is no step's.
        self._last_host = time.perf_counter()

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

    def on_end(self, state, outcome) -> None:
        """Read the last events (one sync, after training) and close the steady window."""
        self._drain(block=True)
        self._steady_ended = time.perf_counter()
        self.steady_window_unix[1] = time.time()

    def stats(self, batch_size: int) -> Dict[str, float]:
        """This rank's steady-state figures (steps after the warm-up, or all but the first if too few)."""
        skip = self.warmup_steps if len(self.step_ms) > self.warmup_steps else min(1, len(self.step_ms) - 1)
        steady = [t for t in self.step_ms[skip:] if t == t]
        total_s = sum(steady) / 1000.0
        if self._steady_started is not None and self._steady_ended is not None:
            window_s = self._steady_ended - self._steady_started
            wait_s = self.data_wait_s() - self._steady_wait_from
        else:
            window_s, wait_s = total_s, self.data_wait_s()
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
        result["peak_rss_gib"] = host_memory_peak_gib()
        return result


def _percentile(values: List[float], q: int) -> float:
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def host_memory_rss_gib() -> Optional[float]:
    """This process's resident memory now (Linux), read at log points only."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def host_memory_peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


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


class StepLogger(Callback):
    """Step lines on the console and step records in metrics.jsonl; the epoch lines and records.

    A line is due every `interval_steps` steps, or when `interval_s` seconds have
    passed. Only then is the loss read from the device (one sync per line), so the
    time between two lines is the GPU's time for the steps between them, across
    epoch ends too. The steps after the last line get a record of their own at the
    end, so that counters (Prometheus' images and steps) end at the run's true total.
    `fields` add figures to every step record (the NVML sample, the straggler verdict);
    `bar` (rank 0's progress bar on a terminal) advances every step.
    """

    def __init__(
        self,
        metrics: MetricsLog,
        rank: int,
        world_size: int,
        device: torch.device,
        batch_size: int,
        length: RunLength,
        interval_steps: Optional[int],
        interval_s: float,
        train_flops_per_image: Optional[float],
        peak: Optional[Tuple[float, str]],
        data_wait_s: Callable[[], float],
        fields: Sequence[Callable[[], dict]] = (),
        bar: Optional[ProgressBar] = None,
    ):
        self.metrics, self.rank, self.world_size, self.device = metrics, rank, world_size, device
        self.batch_size, self.length = batch_size, length
        self.interval_steps, self.interval_s = interval_steps, interval_s
        self.train_flops_per_image, self.peak = train_flops_per_image, peak
        self.data_wait_s, self.fields, self.bar = data_wait_s, list(fields), bar
        self._last_time = time.perf_counter()
        self._last_step = 0
        self._last_loss_sum = 0.0  # the epoch's loss sum at the last line
        self._carried_loss = 0.0  # losses of steps in earlier epochs that no line has reported yet
        self._last_wait = 0.0
        self._last_step_at = (0, 0)

    def on_start(self, state) -> None:
        self._last_time = time.perf_counter()
        self._last_step = state.global_step
        self._last_loss_sum = state.loss_sum.item()  # a resumed epoch's sum so far
        self._last_wait = self.data_wait_s()

    def after_step(self, state) -> None:
        self._last_step_at = (state.epoch, state.step_in_epoch)  # what the end's record reports, epochs later
        if self.bar is not None:
            self.bar.advance(state.global_step)
        if self.interval_steps is not None:
            due = state.global_step % self.interval_steps == 0
        else:
            due = time.perf_counter() - self._last_time >= self.interval_s
        if due:
            self._line(state)

    def on_epoch_end(self, state, losses) -> None:
        self.metrics.record(
            {
                "kind": "epoch",
                "epoch": losses.epoch,
                "global_step": state.global_step,
                "avg_loss": losses.mine,
                "global_avg_loss": losses.everyone,
            }
        )
        # The original example's format, kept exactly: log parsers depend on it.
        log.log(
            NOTICE,
            f"Epoch {losses.epoch:3d} - Avg Loss: {losses.mine:.4f}",
            extra={"fields": {"epoch": losses.epoch, "avg_loss": losses.mine}},
        )
        if self.rank == 0:
            log.info(
                f"Epoch {losses.epoch:3d} - Global Avg Loss: {losses.everyone:.4f} ({self.world_size} ranks)",
                extra={"fields": {"epoch": losses.epoch, "global_avg_loss": losses.everyone}},
            )
        if state.epoch_complete:  # the next epoch's sum starts from zero: carry what no line has reported
            self._carried_loss += losses.per_rank_sums[self.rank] - self._last_loss_sum
            self._last_loss_sum = 0.0

    def on_end(self, state, outcome) -> None:
        if state.global_step > self._last_step:
            self._line(state)

    def _line(self, state) -> None:
        steps = state.global_step - self._last_step
        if steps <= 0:
            return
        loss_now = state.loss_sum.item()  # the one sync a line costs; after it the host clock is the GPU's
        now = time.perf_counter()
        elapsed = now - self._last_time
        step_s = elapsed / steps
        img_s = steps * self.batch_size / elapsed
        wait = self.data_wait_s()
        epoch, step_in_epoch = self._last_step_at
        figures = {
            "kind": "step",
            "epoch": epoch,
            "step": step_in_epoch,
            "steps_per_epoch": state.steps_per_epoch,
            "global_step": state.global_step,
            "total_steps": self.length.last_step,
            "steps": steps,
            "interval_s": elapsed,
            "loss": (self._carried_loss + loss_now - self._last_loss_sum) / steps,
            "img_s": img_s,
            "job_img_s": img_s * self.world_size,
            "step_ms": step_s * 1000,
            "data_wait_frac": min(1.0, (wait - self._last_wait) / elapsed),
            "eta_s": self.length.eta_s(state.global_step, step_s),
            "progress": self.length.fraction_done(state.global_step),
        }
        for field in self.fields:
            figures.update(field())
        if self.device.type == "cuda":
            figures["mem_gib"] = torch.cuda.memory_allocated(self.device) / 2**30
            figures["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        rss = host_memory_rss_gib()
        if rss is not None:
            figures["rss_gib"] = rss
        if self.train_flops_per_image and self.peak:
            figures["mfu"] = img_s * self.train_flops_per_image / (self.peak[0] * 1e12)
            figures["peak_tflops"], figures["peak_precision"] = self.peak
        self.metrics.record(figures)
        if self.bar is not None:
            self.bar.set_total(self._expected_total(state, step_s))
            self.bar.show(figures)
        log.info(_step_line(figures, self.rank == 0), extra={"fields": figures})
        self._last_time, self._last_step, self._last_wait = now, state.global_step, wait
        self._last_loss_sum, self._carried_loss = loss_now, 0.0

    def _expected_total(self, state, step_s: float) -> int:
        """The bar's total: where the run will end, by steps or by --duration at the current speed."""
        return (
            state.global_step + max(0, round(self.length.eta_s(state.global_step, step_s) / step_s))
            if step_s > 0
            else self.length.last_step
        )


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
    if "gpu_util_pct" in f:
        parts.append(f"GPU util {f['gpu_util_pct']:.0f}%")
    if "mfu" in f:
        parts.append(f"MFU {100 * f['mfu']:.1f}% of {f['peak_tflops']:g} TFLOP/s {f['peak_precision']}")
    parts.append(f"ETA {_duration(f['eta_s'])}")
    return " | ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"
