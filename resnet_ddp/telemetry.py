"""What the job tells people: per-rank console lines in the seed's format, the progress bar, step timing,
metrics.jsonl and its sinks (TensorBoard here; Prometheus in prometheus.py), the summary and its table.
"""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
import sys
import time
from typing import Deque, Dict, List, Optional, Sequence, Tuple

import torch

from resnet_ddp.checkpoint import write_atomically
from resnet_ddp.errors import UsageError

TENSORBOARD_DIR = "tensorboard"
# On an interactive terminal a line starts by going back to the line's start and clearing it, so that
# another rank's line replaces rank 0's half-drawn progress bar (redrawn below it) instead of joining it.
_CLEAR_LINE = "\r\x1b[K"


class _Console:
    bar = None  # rank 0's progress bar, on an interactive terminal
    prefix = ""


def log(rank: int, message: str) -> None:
    line = f"[Rank {rank}] {message}\n"
    if _Console.bar is not None:
        _Console.bar.write(line)
        return
    # One write per line, so that lines from ranks sharing a terminal do not interleave.
    sys.stdout.write(_Console.prefix + line)
    sys.stdout.flush()


def interactive_terminal() -> bool:
    return sys.stdout.isatty() and sys.stderr.isatty()


class ProgressBar:
    """Rank 0's tqdm bar over the run's steps, on stderr; console lines are written above it."""

    def __init__(self, total_steps: int, steps_done: int):
        from tqdm import tqdm

        self._tqdm = tqdm
        self._bar = tqdm(total=total_steps, initial=steps_done, unit="step", file=sys.stderr,
                         desc="[Rank 0] training", mininterval=0.5, smoothing=0.1, dynamic_ncols=True)
        self._done = steps_done

    def advance(self, global_step: int) -> None:
        """Every step: a host-side count, no device work; tqdm redraws at most twice a second."""
        self._bar.update(global_step - self._done)
        self._done = global_step

    def write(self, line: str) -> None:
        self._tqdm.write(line, file=sys.stdout, end="")
        sys.stdout.flush()

    def show(self, figures: dict) -> None:
        self._bar.set_postfix_str(f"epoch {figures['epoch']}, loss {figures['loss']:.4f}, "
                                  f"{figures['job_img_s']:.0f} img/s", refresh=False)

    def close(self) -> None:
        self._bar.close()


def start_console(rank: int, quiet: bool, total_steps: int, steps_done: int) -> Optional[ProgressBar]:
    """On an interactive terminal, rank 0 gets a progress bar; in a pod's log (no TTY) lines stay plain."""
    if quiet or not interactive_terminal():
        return None
    _Console.prefix = _CLEAR_LINE
    if rank != 0:
        return None
    _Console.bar = ProgressBar(total_steps, steps_done)
    return _Console.bar


def stop_console() -> None:
    bar, _Console.bar = _Console.bar, None
    if bar is not None:
        bar.close()


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
        result["peak_rss_gib"] = host_memory_peak_gib()
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


def host_memory_rss_gib() -> Optional[float]:
    """This process's resident memory now (Linux), read at log points only."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**30


def host_memory_peak_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def summary_table(rank: int, summary: dict) -> None:
    """The end-of-run table rank 0 prints: the figures of summary.json a person looks at first."""
    rows = [("exit reason", summary["exit_reason"]),
            ("wall time", f"{summary['wall_s']:.1f} s"),
            ("epochs / steps done", f"{summary['epochs_done']} / {summary['steps']}")]
    if summary.get("steady_steps"):
        rows += [
            ("throughput", f"{summary['img_s']:.1f} img/s ({summary['img_s_per_gpu']:.1f} per process), "
                           f"over {summary['steady_steps']} steps after the warm-up"),
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
        rows.append(("MFU", f"{100 * summary['mfu']:.1f}% of {summary['peak_tflops']:g} TFLOP/s "
                            f"{summary['peak_precision']}"))
    log(rank, "run summary (also in summary.json):")
    for name, value in rows:
        log(rank, f"  {name:<21} {value}")


def _per_rank(values: Sequence[float], unit: str) -> str:
    if len(values) <= 4:
        return ", ".join(f"{v:.2f}" for v in values) + f" {unit} (rank 0 first)"
    high = max(range(len(values)), key=values.__getitem__)
    return f"{values[high]:.2f} {unit} at most (rank {high}), {min(values):.2f} {unit} at least"


def require_tensorboard() -> None:
    """--tensorboard without TensorBoard installed: refused at start-up rather than failing in rank 0."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError("--tensorboard needs TensorBoard, which is not installed: "
                         "pip install 'resnet-ddp[tensorboard]' (or pip install tensorboard)") from None


# (record key, TensorBoard tag) for step records
_TENSORBOARD_STEP_SCALARS = (
    ("loss", "train/loss"), ("job_img_s", "train/img_s"), ("img_s", "train/img_s_rank0"),
    ("step_ms", "train/step_ms"), ("data_wait_frac", "train/data_wait_frac"), ("epoch", "train/epoch"),
    ("mfu", "train/mfu"), ("mem_gib", "memory/gpu_allocated_gib"), ("peak_mem_gib", "memory/gpu_peak_gib"),
    ("rss_gib", "memory/host_rss_gib"), ("gpu_util_pct", "gpu/util_pct"), ("gpu_mem_used_gib", "gpu/mem_used_gib"),
    ("gpu_power_w", "gpu/power_w"), ("gpu_temp_c", "gpu/temp_c"),
)


class TensorBoardWriter:
    """A StepLogger sink on rank 0: the step and epoch records as scalars in <save-dir>/tensorboard."""

    def __init__(self, save_dir: str, steps_done: int):
        from torch.utils.tensorboard import SummaryWriter

        # After a resume, purge_step makes TensorBoard drop what the interrupted run logged past the checkpoint.
        self._writer = SummaryWriter(os.path.join(save_dir, TENSORBOARD_DIR), purge_step=steps_done or None)

    def write(self, record: dict) -> None:
        step, when = record["global_step"], record["time"]
        if record["kind"] == "step":
            pairs = _TENSORBOARD_STEP_SCALARS
        else:
            pairs = (("avg_loss", "epoch/avg_loss_rank0"), ("global_avg_loss", "epoch/global_avg_loss"))
        for key, tag in pairs:
            value = record.get(key)
            if value is not None:
                self._writer.add_scalar(tag, value, step, walltime=when)

    def close(self) -> None:
        self._writer.close()


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
    Each record also goes to the `sinks` (Prometheus, TensorBoard), which the
    logger closes with itself. `gpu` (an nvml.GpuMonitor) adds its latest NVML
    sample to each step record; `bar` (rank 0's ProgressBar) advances every step.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, batch_size: int, total_steps: int,
                 metrics_path: str, interval_steps: Optional[int], interval_s: float, quiet: bool,
                 train_flops_per_image: Optional[float], peak: Optional[Tuple[float, str]],
                 sinks: Sequence = (), gpu=None, bar: Optional[ProgressBar] = None):
        self.rank, self.world_size, self.device = rank, world_size, device
        self.batch_size, self.total_steps = batch_size, total_steps
        self.interval_steps, self.interval_s, self.quiet = interval_steps, interval_s, quiet
        self.train_flops_per_image, self.peak = train_flops_per_image, peak
        self.sinks, self.gpu, self.bar = list(sinks), gpu, bar
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
        record = dict(time=time.time(), rank=self.rank, **record)
        os.write(self._fd, (json.dumps(record) + "\n").encode())
        for sink in self.sinks:
            sink.write(record)

    def epoch_started(self, loss_sum_so_far: float, global_step: int) -> None:
        self._last_loss_sum = loss_sum_so_far
        self._last_step = global_step

    def after_step(self, global_step: int, epoch: int, step_in_epoch: int, steps_per_epoch: int,
                   loss_sum: torch.Tensor, data_wait_s: float) -> None:
        if self.bar is not None:
            self.bar.advance(global_step)
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
        rss = host_memory_rss_gib()
        if rss is not None:
            figures["rss_gib"] = rss
        if self.train_flops_per_image and self.peak:
            figures["mfu"] = img_s * self.train_flops_per_image / (self.peak[0] * 1e12)
            figures["peak_tflops"], figures["peak_precision"] = self.peak
        if self.gpu is not None:
            figures.update(self.gpu.latest)
        self.record(figures)
        if self.bar is not None:
            self.bar.show(figures)
        if not self.quiet:
            log(self.rank, _step_line(figures, self.rank == 0))
        self._last_time, self._last_step, self._last_loss_sum, self._last_wait = now, global_step, loss_now, data_wait_s

    def close(self) -> None:
        os.close(self._fd)
        for sink in self.sinks:
            sink.close()


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
