"""The one typed configuration object, built once by the CLI and passed down."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Tuple

ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "resnext50_32x4d",
)
FAIL_MODES = ("exception", "exit", "kill", "hang", "oom", "nan")
NAN_POLICIES = ("stop", "skip", "ignore")
AMP_MODES = ("off", "bf16", "fp16")
DATA_SOURCES = ("cpu", "gpu")
PREFLIGHT_MODES = ("off", "warn", "strict")
STRAGGLER_WINDOW_S = 60.0  # a rank slower than its peers for this long is named (PREFLIGHT.md)
ALL_RANKS = -1  # --fail-rank all


class LoadPhase(NamedTuple):
    """One phase of --load-profile: this duty cycle (0 idle, 1 full load) for this many seconds."""

    seconds: float
    duty_cycle: float


class MemorySize(NamedTuple):
    """--gpu-memory-ballast: a number of bytes, or a fraction of the card's total memory."""

    bytes: Optional[int] = None
    fraction: Optional[float] = None

    def resolve(self, total_bytes: int) -> int:
        return self.bytes if self.bytes is not None else int(self.fraction * total_bytes)

    def __str__(self) -> str:
        return f"{self.bytes / 2**30:.1f} GiB" if self.bytes is not None else f"{self.fraction:g} of the card"


@dataclass(frozen=True)
class Config:
    # The seed's options, same names and defaults.
    epochs: int = 100
    batch_size: int = 64
    dataset_size: int = 100_000
    lr: float = 0.001
    num_workers: int = 4
    save_dir: str = "./checkpoints"
    num_classes: int = 100
    # Model and data.
    arch: str = "resnet50"
    image_size: int = 224
    seed: int = 0
    sync_bn: bool = True
    momentum: float = 0.0
    weight_decay: float = 0.0
    # Speed: none of these changes the maths except --amp.
    amp: str = "off"
    channels_last: Optional[bool] = None  # None: on for GPUs, off on CPU
    compile: Optional[bool] = False  # None (from --fast): on GPUs where inductor can build, settled at start-up
    data: str = "cpu"
    cuda_graphs: Optional[bool] = None  # None: on where the step can be captured
    syncbn_symm_mem: Optional[bool] = None  # None: on where it can run, settled at start-up
    fuse_bn_relu: bool = True  # SyncBatchNorm applies the add and ReLU after it: one pass on fp32 GPUs
    # Run length and measurement.
    duration_s: Optional[float] = None
    max_steps: Optional[int] = None
    warmup_steps: int = 20
    log_interval: Optional[int] = None  # steps; None: about every 10 s of work
    quiet: bool = False
    metrics_port: Optional[int] = None  # Prometheus endpoint on each node's local rank 0
    tensorboard: bool = False
    profile_steps: Optional[Tuple[int, int]] = None  # (first, last) global steps to record with torch.profiler
    # Checkpoints and resume.
    checkpoint_every: int = 0  # steps; 0: at epoch ends (and on stop) only
    keep_checkpoints: int = 2
    resume: str = "auto"  # auto, never, or a checkpoint's path
    # Placement and process group.
    cpu: bool = False
    nproc_per_node: Optional[int] = None
    min_gpus: int = 2
    master_port: Optional[int] = None
    dist_timeout: float = 600.0
    # Load shaping and fault injection for platform tests (scenarios).
    scenario: Optional[str] = None
    duty_cycle: float = 1.0
    load_profile: Optional[Tuple[LoadPhase, ...]] = None
    gpu_memory_ballast: Optional[MemorySize] = None
    fail_at_step: Optional[int] = None
    fail_rank: int = 0
    fail_mode: str = "exception"
    nan_policy: str = "stop"
    # Preflight checks and the straggler detector (PREFLIGHT.md).
    preflight: str = "off"  # off, warn (report findings) or strict (exit 1 on a finding)
    preflight_only: bool = False
    straggler_window_s: float = STRAGGLER_WINDOW_S  # 0: detector off
    test_slow_rank: Optional[Tuple[int, float]] = None  # tests only: (rank, extra seconds of work per step)

    @property
    def device_type(self) -> str:
        return "cpu" if self.cpu else "cuda"

    def fingerprint(self) -> dict:
        """The options that change the arithmetic: a checkpoint made with others is refused."""
        return {"arch": self.arch, "num_classes": self.num_classes, "image_size": self.image_size, "amp": self.amp}

    @property
    def load_phases(self) -> Tuple[LoadPhase, ...]:
        """The run's phases in order (they repeat): --load-profile, else --duty-cycle for the whole run."""
        return self.load_profile or (LoadPhase(float("inf"), self.duty_cycle),)

    @property
    def use_channels_last(self) -> bool:
        return (not self.cpu) if self.channels_last is None else self.channels_last

    @property
    def use_cuda_graphs(self) -> bool:
        """Graph the whole step on GPUs unless asked not to; fp16's gradient scaler reads the host."""
        capturable = not self.cpu and self.amp != "fp16"
        return capturable if self.cuda_graphs is None else (self.cuda_graphs and capturable)
