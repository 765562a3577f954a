"""The one typed configuration: a frozen tree of sections, built once by the CLI and passed down.

Each component receives the section it needs (`config.checkpoint`, `config.scenario`, ...),
not the whole tree. The launcher settles every value that depends on the machine
(compile, CUDA graphs, channels_last, symmetric memory) before any training process
starts, and a training process settles the one thing only it can learn (whether
symmetric memory maps) before its Trainer is built; after that the tree is never
rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
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
LOG_FORMATS = ("text", "json")
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
class TrainingConfig:
    """What is trained and how: the original example's options and the optimizer."""

    epochs: int = 100
    batch_size: int = 64  # per process
    dataset_size: int = 100_000
    lr: float = 0.001
    num_workers: int = 4  # DataLoader workers per process
    num_classes: int = 100
    momentum: float = 0.0
    weight_decay: float = 0.0
    seed: int = 0
    data: str = "cpu"  # cpu: LazyFakeDataset in DataLoader workers; gpu: batches made on the device


@dataclass(frozen=True)
class ModelConfig:
    arch: str = "resnet50"
    image_size: int = 224
    sync_bn: bool = True
    fuse_bn_relu: bool = True  # SyncBatchNorm applies the add and ReLU after it: one pass on fp32 GPUs


@dataclass(frozen=True)
class SpeedConfig:
    """How the step runs. Only `amp` changes the arithmetic. None means "settle where it can run" until the
    launcher has settled it (entry/resolve.py); a Trainer only ever sees plain values."""

    amp: str = "off"
    channels_last: Optional[bool] = None
    compile: Optional[bool] = False
    cuda_graphs: Optional[bool] = None
    syncbn_symm_mem: Optional[bool] = None
    cudnn_benchmark: bool = False


@dataclass(frozen=True)
class RunLengthConfig:
    """What ends the run besides --epochs, and the steps the summary leaves out."""

    duration_s: Optional[float] = None
    max_steps: Optional[int] = None
    warmup_steps: int = 20


@dataclass(frozen=True)
class ReportingConfig:
    log_interval: Optional[int] = None  # steps; None: about every LOG_EVERY_S seconds of work
    quiet: bool = False
    metrics_port: Optional[int] = None  # Prometheus endpoint on each node's local rank 0
    metrics_linger_s: float = 30.0  # local rank 0 serves the last values this long after the end
    tensorboard: bool = False
    profile_steps: Optional[Tuple[int, int]] = None  # (first, last) global steps to record with torch.profiler
    log_format: str = "text"  # text, or json: one object per line for log agents
    log_timestamps: bool = False  # text lines start with the UTC time


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 0  # steps; 0: at epoch ends (and on stop) only
    keep: int = 2
    resume: str = "auto"  # auto, never, or a checkpoint's path


@dataclass(frozen=True)
class ProcessConfig:
    """Placement and the process group."""

    cpu: bool = False
    nproc_per_node: Optional[int] = None
    min_gpus: int = 2
    master_port: Optional[int] = None
    dist_timeout: float = 600.0

    @property
    def device_type(self) -> str:
        return "cpu" if self.cpu else "cuda"


@dataclass(frozen=True)
class ScenarioConfig:
    """Load shaping and fault injection for platform tests (SCENARIOS.md)."""

    name: Optional[str] = None  # the preset the options came from, if any
    duty_cycle: float = 1.0
    load_profile: Optional[Tuple[LoadPhase, ...]] = None
    gpu_memory_ballast: Optional[MemorySize] = None
    fail_at_step: Optional[int] = None
    fail_rank: int = 0
    fail_mode: str = "exception"
    nan_policy: str = "stop"

    @property
    def load_phases(self) -> Tuple[LoadPhase, ...]:
        """The run's phases in order (they repeat): --load-profile, else --duty-cycle for the whole run."""
        return self.load_profile or (LoadPhase(float("inf"), self.duty_cycle),)


@dataclass(frozen=True)
class HealthConfig:
    """Preflight checks and the straggler detector (PREFLIGHT.md)."""

    preflight: str = "off"  # off, warn (report findings) or strict (exit 1 on a finding)
    preflight_only: bool = False
    straggler_window_s: float = STRAGGLER_WINDOW_S  # 0: detector off
    test_slow_rank: Optional[Tuple[int, float]] = None  # tests only: (rank, extra seconds of work per step)


@dataclass(frozen=True)
class Config:
    save_dir: str = "./checkpoints"
    training: TrainingConfig = field(default_factory=TrainingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    length: RunLengthConfig = field(default_factory=RunLengthConfig)
    reporting: ReportingConfig = field(default_factory=ReportingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    process: ProcessConfig = field(default_factory=ProcessConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def fingerprint(self) -> dict:
        """The options that change the arithmetic: a checkpoint made with others is refused."""
        return {
            "arch": self.model.arch,
            "num_classes": self.training.num_classes,
            "image_size": self.model.image_size,
            "amp": self.speed.amp,
        }
