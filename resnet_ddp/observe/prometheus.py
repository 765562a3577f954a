"""The Prometheus endpoint (--metrics-port): every local rank's figures, served by the node's local rank 0.

What a dashboard or an alert needs (docs/monitoring.md): what ran (resnet_ddp_info), progress and
throughput counters, step time as a histogram (histogram_quantile works across ranks), the
checkpoint's age, size and write time, each rank's straggler score, GPU figures from NVML,
and the run's state and exit code, served for --metrics-linger after the end so that the
last scrape sees how the run ended.

Each rank writes its own gauges and counters through prometheus_client's
multiprocess mode: one memory-mapped file per process in a directory that the
node's ranks share. Local rank 0 serves the whole directory through a
MultiProcessCollector, so one scrape of a node returns every rank on it, told
apart by the `rank` and `local_rank` labels. The ranks never talk to each
other for this: a rank writes at its log points (figures already on the host)
and from its NVML sampling thread, never inside the training step.

Gauges use the `mostrecent` mode: no pid label is added, and after a torchrun
restart a rank's newest value wins over what its previous process left.
"""

from __future__ import annotations

import glob
import math
import os
import socket
import tempfile
import time
from typing import Callable, Dict, List, Optional

from resnet_ddp.errors import UsageError

MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
RANK_LABELS = ("rank", "local_rank")
GPU_LABELS = ("rank", "local_rank", "gpu", "uuid")

# name -> (help, the step record's key, factor to the metric's unit)
STEP_GAUGES = {
    "resnet_ddp_loss": ("Mean training loss over the last log interval", "loss", 1.0),
    "resnet_ddp_step_mean_seconds": ("Mean time of one training step over the last log interval", "step_ms", 1e-3),
    "resnet_ddp_images_per_second": ("This rank's training throughput over the last log interval", "img_s", 1.0),
    "resnet_ddp_epoch": ("Epoch in progress, from 1", "epoch", 1.0),
    "resnet_ddp_data_wait_ratio": (
        "Share of the last log interval spent waiting for the DataLoader",
        "data_wait_frac",
        1.0,
    ),
    "resnet_ddp_eta_seconds": ("Estimated time to the last step at the current speed", "eta_s", 1.0),
    "resnet_ddp_memory_allocated_bytes": (
        "GPU memory held by PyTorch's tensors on this rank's GPU",
        "mem_gib",
        2.0**30,
    ),
    "resnet_ddp_memory_peak_bytes": (
        "Peak GPU memory held by PyTorch's tensors on this rank's GPU",
        "peak_mem_gib",
        2.0**30,
    ),
    "resnet_ddp_host_memory_rss_bytes": ("Resident host memory of this rank's process", "rss_gib", 2.0**30),
    "resnet_ddp_mfu_ratio": ("Model FLOPs per second over the GPU's assumed dense peak", "mfu", 1.0),
    "resnet_ddp_straggler_score": (
        "This rank's forward compute time over the median of all ranks at the last "
        "check (1 is typical; the detector names a rank above 1.1; PREFLIGHT.md)",
        "straggler_score",
        1.0,
    ),
}
# name -> (help, the checkpoint record's key, factor to the metric's unit); rank 0's series
CHECKPOINT_GAUGES = {
    "resnet_ddp_checkpoint_timestamp_seconds": (
        "Unix time the newest checkpoint was on disk (its age: time() - this)",
        "time",
        1.0,
    ),
    "resnet_ddp_checkpoint_write_seconds": (
        "Seconds the newest checkpoint took to write, fsync included",
        "write_s",
        1.0,
    ),
    "resnet_ddp_checkpoint_size_bytes": ("Size of the newest checkpoint file", "bytes", 1.0),
}
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# exit_reason (summary.json) -> the run state it ends in
RUN_STATES = {
    "finished": "finished",
    "duration reached": "finished",
    "stopped by signal": "stopped",
    "loss not finite": "failed",
    "failed": "failed",
}
SIGNALLED_LINGER_S = 5.0  # a run stopped by a signal has 10 s in all to end (RELIABILITY.md)
# name -> (help, the NVML sample's key, factor to the metric's unit)
GPU_GAUGES = {
    "resnet_ddp_gpu_utilization_ratio": ("Share of time the GPU ran a kernel (NVML)", "gpu_util_pct", 1e-2),
    "resnet_ddp_gpu_memory_used_bytes": ("GPU memory in use by all processes (NVML)", "gpu_mem_used_gib", 2.0**30),
    "resnet_ddp_gpu_memory_total_bytes": ("GPU memory in all (NVML)", "gpu_mem_total_gib", 2.0**30),
    "resnet_ddp_gpu_power_watts": ("GPU power draw (NVML)", "gpu_power_w", 1.0),
    "resnet_ddp_gpu_temperature_celsius": ("GPU core temperature (NVML)", "gpu_temp_c", 1.0),
}


def metrics_dir(port: int) -> str:
    """The node's shared directory for this endpoint: the port is what tells jobs on one node apart."""
    return os.path.join(tempfile.gettempdir(), f"resnet-ddp-prometheus-{os.getuid()}-{port}")


def check_can_serve(port: int) -> None:
    """Refuse at start-up what would stop the endpoint later: a taken port, a directory we cannot write."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # Bind as the endpoint will (all IPv4 interfaces, SO_REUSEADDR), and let go again.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("0.0.0.0", port))
        except OSError as exc:
            raise UsageError(
                f"--metrics-port {port} cannot be served on this node ({exc.strerror or exc}): choose a free port"
            ) from None
    directory = metrics_dir(port)
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(
            f"--metrics-port needs a writable {directory} ({exc.strerror or exc}): set TMPDIR to a writable directory"
        ) from None


def _import_in_multiprocess_mode(directory: str):
    """prometheus_client picks its value store when first imported: the directory must be set before."""
    os.environ[MULTIPROC_DIR_ENV] = directory
    import prometheus_client
    from prometheus_client import multiprocess, values  # noqa: F401 (multiprocess: used as an attribute)

    if not getattr(values.ValueClass, "_multiprocess", False):
        raise RuntimeError("prometheus_client was imported before its multiprocess directory was set")
    return prometheus_client


class PrometheusExporter:
    """This rank's series, written from the records of metrics.jsonl (a MetricsLog sink); on local rank 0 also
    the node's HTTP endpoint.

    Every rank of the job builds one at the same point of start-up: local rank 0
    empties the directory, then all wait at `barrier` before writing into it.
    """

    def __init__(
        self,
        port: int,
        rank: int,
        local_rank: int,
        batch_size: int,
        barrier: Callable[[], None],
        info: Dict[str, str],
        step_times_ms: Callable[[], List[float]],
        linger_s: float,
        signalled: Callable[[], bool],
    ):
        """`info`: the labels of resnet_ddp_info (what ran); `step_times_ms()`: every step time so far, the
        histogram's source; `linger_s`: how long local rank 0 serves after the end (less once `signalled()`)."""
        directory = metrics_dir(port)
        self.serving = local_rank == 0
        self.directory = directory
        if self.serving:
            os.makedirs(directory, exist_ok=True)
            for path in glob.glob(os.path.join(directory, "*.db")):
                os.unlink(path)  # a previous job's or a restarted worker's files
        barrier()
        os.makedirs(directory, exist_ok=True)
        client = _import_in_multiprocess_mode(directory)
        self.batch_size = batch_size
        self.rank = rank
        self.step_times_ms, self.linger_s, self.signalled = step_times_ms, linger_s, signalled
        self._labels = {"rank": str(rank), "local_rank": str(local_rank)}
        self._last_step = 0
        self._observed = 0  # step times already in the histogram

        def counter(name: str, text: str):
            return client.Counter(name, text, RANK_LABELS, registry=None).labels(**self._labels)

        def gauge(name: str, text: str, labels=RANK_LABELS):
            return client.Gauge(name, text, labels, registry=None, multiprocess_mode="mostrecent")

        gauge(
            "resnet_ddp_info",
            "What ran: the job's version, model and settings (always 1)",
            (*RANK_LABELS, *sorted(info)),
        ).labels(**self._labels, **info).set(1)
        self.images = counter("resnet_ddp_images", "Training images this rank has processed")
        self.steps = counter("resnet_ddp_steps", "Training steps this rank has run")
        self.step_seconds = client.Histogram(
            "resnet_ddp_step_seconds",
            "Time of each training step on this rank (on GPUs the device's own timeline)",
            RANK_LABELS,
            buckets=STEP_BUCKETS_S,
            registry=None,
        ).labels(**self._labels)
        self.progress = gauge(
            "resnet_ddp_progress_ratio", "How far along the run is, by steps or --duration, whichever ends it"
        ).labels(**self._labels)
        self.step_gauges = {
            key: (gauge(name, text).labels(**self._labels), factor) for name, (text, key, factor) in STEP_GAUGES.items()
        }
        self.checkpoint_gauges = {
            key: (gauge(name, text).labels(**self._labels), factor)
            for name, (text, key, factor) in CHECKPOINT_GAUGES.items()
        }
        self.checkpoints = counter("resnet_ddp_checkpoints", "Checkpoints written (rank 0)")
        self._gpu_families = {
            name: (gauge(name, text, GPU_LABELS), key, factor) for name, (text, key, factor) in GPU_GAUGES.items()
        }
        self._gpu_gauges: Dict[str, tuple] = {}
        self._straggler_family = gauge(
            "resnet_ddp_straggler", "1 while the straggler detector names this rank, else 0 (PREFLIGHT.md)"
        )
        self._straggler = None  # made by the first step record that carries the detector's verdict
        self._state = gauge(
            "resnet_ddp_run_state",
            "1 for the state the run is in: running, finished, stopped (by a signal) or failed",
            (*RANK_LABELS, "state"),
        )
        self._exit_code = gauge("resnet_ddp_exit_code", "The process's exit code, once the run has ended").labels(
            **self._labels
        )
        self._ended: Optional[str] = None
        self._set_state("running")
        if self.serving:
            registry = client.CollectorRegistry()
            client.multiprocess.MultiProcessCollector(registry, path=directory)
            try:
                # A daemon thread of this process: it serves until the process ends.
                client.start_http_server(port, registry=registry)
            except OSError as exc:  # taken between the launcher's check and now
                raise UsageError(
                    f"--metrics-port {port} cannot be served on this node ({exc.strerror or exc}): choose a free port"
                ) from None

    def _set_state(self, state: str) -> None:
        for name in ("running", *dict.fromkeys(RUN_STATES.values())):
            self._state.labels(**self._labels, state=name).set(1.0 if name == state else 0.0)

    def starting_at(self, global_step: int, progress: float) -> None:
        """Where counting starts (after a resume, the steps already done are not this process's)."""
        self._last_step = global_step
        self.progress.set(progress)

    def write(self, record: dict) -> None:
        """A MetricsLog sink: takes what it exports from each record."""
        kind = record.get("kind")
        if kind == "step":
            self._step(record)
        elif kind == "checkpoint":
            for key, (child, factor) in self.checkpoint_gauges.items():
                child.set(record[key] * factor)
            self.checkpoints.inc()
        elif kind == "end":
            self._count_steps_to(record["global_step"])  # a failed run's end comes without a last step record
            self._observe_step_times()  # those after the last log point
            self._ended = record["exit_reason"]
            self._set_state(RUN_STATES.get(self._ended, "failed"))
            self._exit_code.set(record["exit_code"])

    def _count_steps_to(self, step: int) -> None:
        done = step - self._last_step
        self._last_step = max(step, self._last_step)
        if done > 0:  # images first: a scrape between the two never sees more steps than images
            self.images.inc(done * self.batch_size)
            self.steps.inc(done)

    def _step(self, record: dict) -> None:
        self._count_steps_to(record["global_step"])
        self._observe_step_times()
        self.progress.set(record["progress"])
        for key, (child, factor) in self.step_gauges.items():
            if key in record:  # absent keys (no GPU, no known peak) stay unexported
                value = record[key]
                child.set(value * factor if value is not None else math.nan)  # None: a diverged loss
        if "straggler_ranks" in record:  # absent while the detector is off: so is the series
            if self._straggler is None:
                self._straggler = self._straggler_family.labels(**self._labels)
            self._straggler.set(1.0 if self.rank in record["straggler_ranks"] else 0.0)

    def _observe_step_times(self) -> None:
        times = self.step_times_ms()
        for ms in times[self._observed :]:
            if ms == ms:  # a GPU's first step has no start mark (NaN)
                self.step_seconds.observe(ms / 1000.0)
        self._observed = len(times)

    def gpu_sample(self, identity: Dict[str, str], sample: Dict[str, float]) -> None:
        """Called from the NVML sampling thread with this rank's GPU figures."""
        for name, (family, key, factor) in self._gpu_families.items():
            if key in sample:
                child = self._gpu_gauges.get(name)
                if child is None:
                    child = self._gpu_gauges[name] = family.labels(**self._labels, **identity)
                child.set(sample[key] * factor)

    def close(self) -> None:
        """After the job's end, on every rank: local rank 0 serves the last values for --metrics-linger (at most
        a few seconds once a stop signal came), then removes the ranks' files."""
        if not self.serving:
            return
        # A failed run's other ranks may wait in a collective for this one: it must not hold them long.
        linger_s = min(self.linger_s, SIGNALLED_LINGER_S) if self._ended in (None, "failed") else self.linger_s
        deadline = time.monotonic() + linger_s
        while time.monotonic() < deadline:
            if self.signalled():
                deadline = min(deadline, time.monotonic() + SIGNALLED_LINGER_S)
            time.sleep(0.1)
        for path in glob.glob(os.path.join(self.directory, "*.db")):
            os.unlink(path)
        try:
            os.rmdir(self.directory)
        except OSError:  # another local rank's file has come since, or it has gone: either is fine
            pass
