"""Command line and environment -> a validated Config, then hand over to the launcher.

Precedence for every option: command line, then RESNET_DDP_<OPTION>, then the
default. OUTPUT_DIR (set by AstraGo) is the save dir when neither names one.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from typing import Mapping, NoReturn, Optional, Sequence

from resnet_ddp import scenarios
from resnet_ddp.config import (ALL_RANKS, AMP_MODES, ARCHITECTURES, DATA_SOURCES, FAIL_MODES, NAN_POLICIES,
                               PREFLIGHT_MODES, Config, LoadPhase, MemorySize)
from resnet_ddp.errors import UsageError

ENV_PREFIX = "RESNET_DDP_"
MIN_IMAGE_SIZE = 32  # every supported ResNet downsamples by 32
MAX_PROFILED_STEPS = 20
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so errors stay one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '10m', '2h', '1d' or plain seconds -> seconds."""
    text = text.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:], None)
    number = text[:-1] if unit else text
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 10m or 2h") from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration")
    return seconds


def _fraction_or_percent(text: str) -> float:
    text = text.strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def parse_duty_cycle(text: str) -> float:
    """'0.5' or '50%' -> 0.5; above 0 and at most 1."""
    try:
        value = _fraction_or_percent(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction like 0.5 (or a percentage like 50%)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be above 0 and at most 1 (for idle phases use --load-profile, e.g. 1m@0)")
    return value


def parse_load_profile(text: str) -> tuple:
    """'2m@100,1m@0,2m@50' -> phases of (seconds, duty cycle): duration@percent, in order."""
    phases = []
    for part in text.split(","):
        duration, at, percent = part.strip().partition("@")
        try:
            seconds = parse_duration(duration) if duration.strip() else None
            load = float(percent.strip().rstrip("%")) if at else None
        except (argparse.ArgumentTypeError, ValueError):
            seconds = load = None
        if seconds is None or load is None or not 0 <= load <= 100:
            where = f" in {text!r}" if "," in text else ""
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r}{where} is not a phase like 2m@100 (a duration, @, a load from 0 to 100 percent)")
        phases.append(LoadPhase(seconds, load / 100))
    return tuple(phases)


_BYTE_UNITS = {"": None, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
               "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
               "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


def parse_memory_size(text: str) -> MemorySize:
    """'20GiB', '512MiB', '16G' (decimal, as in Kubernetes) or a fraction of the card such as '0.5'."""
    stripped = text.strip()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = stripped[len(number):].strip().lower() if number else None
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _BYTE_UNITS or not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 20GiB or 512MiB, or a fraction like 0.5")
    if _BYTE_UNITS[unit] is None:
        if value >= 1:
            raise argparse.ArgumentTypeError(
                f"{text!r} needs a unit (e.g. 20GiB) or must be a fraction of the card below 1 (e.g. 0.5)")
        return MemorySize(fraction=value)
    return MemorySize(bytes=int(value * _BYTE_UNITS[unit]))


def _fail_rank(text: str) -> int:
    if text == "all":
        return ALL_RANKS
    return int(text)


def _preflight_mode(text: str) -> str:
    """off / warn / strict; a flag's words work too (RESNET_DDP_PREFLIGHT=1 is warn, 0 is off)."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return "warn"
    if lowered in _FALSE:
        return "off"
    return lowered  # argparse's choices refuse anything else


def _straggler_window(text: str) -> float:
    if text.strip().lower() in ("0", "off"):
        return 0.0
    return parse_duration(text)


def _slow_rank(text: str):
    """'RANK:SECONDS' -> (rank, seconds), for RESNET_DDP_TEST_SLOW_RANK."""
    rank, _, seconds = text.partition(":")
    try:
        value = (int(rank), float(seconds))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not RANK:SECONDS, e.g. 1:0.05") from None
    if value[0] < 0 or not (math.isfinite(value[1]) and 0 < value[1] <= 60):
        raise argparse.ArgumentTypeError(f"{text!r}: the rank must be 0 or more, the seconds in (0, 60]")
    return value


def _profile_steps(text: str):
    """'FIRST:LAST' or 'STEP' -> (first, last) global steps, for --profile-steps."""
    first, _, last = text.partition(":")
    try:
        value = (int(first), int(last or first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIRST:LAST (global steps, e.g. 200:204)") from None
    if not 1 <= value[0] <= value[1] or value[1] - value[0] >= MAX_PROFILED_STEPS:
        raise argparse.ArgumentTypeError(f"{text!r}: steps start at 1, FIRST <= LAST, and at most "
                                         f"{MAX_PROFILED_STEPS} steps (a trace grows with every step)")
    return value


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends an option's default unless its help already says it (those whose default depends on others)."""

    def _get_help_string(self, action):
        return action.help if "default:" in (action.help or "") else super()._get_help_string(action)


def build_parser(environ: Mapping[str, str] = os.environ, scenario: Optional[str] = None) -> argparse.ArgumentParser:
    """The options, with a scenario preset's values (if named) and then the environment as defaults."""
    p = _Parser(
        prog="resnet-ddp",
        description="Train torchvision ResNet with DDP and SyncBatchNorm on a lazily "
        "generated fake dataset: a real distributed training job for testing GPU clusters.",
        epilog=f"Every option can also be set as {ENV_PREFIX}<OPTION> in upper snake case "
        f"(e.g. {ENV_PREFIX}BATCH_SIZE=128, {ENV_PREFIX}CPU=1); the command line wins over "
        "the environment. OUTPUT_DIR sets the save dir when --save-dir is not given. "
        "Exit codes: 0 finished, 1 failed during the run, 2 bad input or unusable setup, "
        "130/143 stopped by SIGINT/SIGTERM. `resnet-ddp report SAVE_DIR` draws a finished or running "
        "job's metrics into SAVE_DIR/report.png and report.html.",
        formatter_class=_HelpFormatter,
    )
    d = Config()
    seed = p.add_argument_group("training (the seed's options)")
    seed.add_argument("--epochs", type=int, default=d.epochs, help="epochs to train")
    seed.add_argument("--batch-size", type=int, default=None, help=f"batch size per process (default: {d.batch_size}; 256 with --fast)")
    seed.add_argument("--dataset-size", type=int, default=d.dataset_size, help="samples in the fake dataset")
    seed.add_argument("--lr", type=float, default=d.lr, help="SGD learning rate")
    seed.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers per process")
    seed.add_argument("--save-dir", default=None, help=f"where model_final.pth goes (default: $OUTPUT_DIR, else {d.save_dir})")
    seed.add_argument("--num-classes", type=int, default=d.num_classes, help="classes in the fake dataset and the model head")

    model = p.add_argument_group("model and data")
    model.add_argument("--arch", default=d.arch, choices=ARCHITECTURES, help="torchvision architecture (no pretrained weights)")
    model.add_argument("--image-size", type=int, default=d.image_size, help="height and width of the fake images")
    model.add_argument("--seed", type=int, default=d.seed, help="seed for data, weights and shuffling")
    model.add_argument("--no-sync-bn", action="store_true", help="keep plain BatchNorm instead of SyncBatchNorm")
    model.add_argument("--momentum", type=float, default=d.momentum, help="SGD momentum")
    model.add_argument("--weight-decay", type=float, default=d.weight_decay, help="SGD weight decay")

    speed = p.add_argument_group("speed (only --amp changes the arithmetic)")
    speed.add_argument("--fast", action="store_true",
                       help="maximum load: --amp bf16 --data gpu --batch-size 256, and --compile on GPUs where "
                            "Triton and a C compiler are present, unless those are given")
    speed.add_argument("--amp", default=None, choices=AMP_MODES,
                       help="mixed precision: bf16 autocast, or fp16 autocast with a gradient scaler (default: off)")
    speed.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                       help="NHWC memory layout (default: on for GPUs)")
    speed.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                       help="torch.compile the model (default: off; on with --fast where it can build its kernels)")
    speed.add_argument("--data", default=None, choices=DATA_SOURCES,
                       help="cpu: LazyFakeDataset in DataLoader workers; gpu: fake batches made on the device (default: cpu)")
    speed.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                       help="capture the whole training step in one CUDA graph (default: on for GPUs, except --amp fp16)")
    speed.add_argument("--syncbn-symm-mem", action=argparse.BooleanOptionalAction, default=None,
                       help="SyncBatchNorm exchanges its statistics through symmetric memory (one-shot kernels "
                            "over NVLink) instead of NCCL: needs a job on one node whose GPUs have peer access "
                            "(default: on where it can run; otherwise NCCL, and one line says why)")
    speed.add_argument("--fuse-bn-relu", action=argparse.BooleanOptionalAction, default=None,
                       help="each SyncBatchNorm applies the residual add and ReLU after it, in one pass over the "
                            "activation on fp32 GPUs (same maths; default: on)")

    length = p.add_argument_group("run length and measurement")
    length.add_argument("--duration", type=parse_duration, default=None, dest="duration_s",
                        help="stop cleanly once training has run this long (90s, 10m, 2h, or seconds), whatever "
                             "--epochs says: every rank stops after the same step, the final model is saved, exit 0")
    length.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in all, whatever --epochs says")
    length.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                        help="steps left out of the summary's throughput and step times (start-up, autotuning, capture)")

    out = p.add_argument_group("reporting")
    out.add_argument("--log-interval", type=int, default=None,
                     help="a step line (and a record in <save-dir>/logs/metrics.jsonl) every N steps "
                          "(default: about every 10 seconds of work)")
    out.add_argument("--quiet", action="store_true",
                     help="print only the seed's per-epoch lines and errors "
                          "(no step lines, progress bar or summary table)")
    out.add_argument("--metrics-port", type=int, default=None,
                     help="serve Prometheus metrics on this port from each node's local rank 0, with every local "
                          "rank's figures labelled rank and local_rank (http://<node>:PORT/metrics)")
    out.add_argument("--tensorboard", action="store_true",
                     help="also write scalars to <save-dir>/tensorboard (pip install 'resnet-ddp[tensorboard]')")
    out.add_argument("--profile-steps", type=_profile_steps, default=None, metavar="FIRST:LAST",
                     help="record these global steps with torch.profiler (e.g. 200:204; steps before the warm-up "
                          "and CUDA-graph capture are skipped): each rank writes <save-dir>/profile/rank<R>.trace.json "
                          "(open in Perfetto) and rank<R>-ops.txt (operators and kernels by device time)")

    ckpt = p.add_argument_group("checkpoints and resume")
    ckpt.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                      help="also write <save-dir>/checkpoint-*.pt every N steps (0: at epoch ends and on stop only)")
    ckpt.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints,
                      help="keep this many newest checkpoints; older ones go after a good write")
    ckpt.add_argument("--resume", default=d.resume,
                      help="auto: continue from the newest good checkpoint in the save dir, if any; never; or a path")

    place = p.add_argument_group("processes and devices")
    place.add_argument("--cpu", action="store_true", help="run on CPU processes over gloo instead of GPUs")
    place.add_argument("--nproc-per-node", type=int, default=None,
                       help="processes on this node (default: every visible GPU; 2 with --cpu)")
    place.add_argument("--min-gpus", type=int, default=d.min_gpus, help="refuse to start with fewer GPUs than this")
    place.add_argument("--master-port", type=int, default=None,
                       help="rendezvous port when this launcher starts the job (default: $MASTER_PORT, else a free port)")
    place.add_argument("--dist-timeout", type=float, default=d.dist_timeout,
                       help="seconds a collective may wait before the job is declared failed")

    load = p.add_argument_group("scenarios and load shaping (for platform tests; SCENARIOS.md)")
    load.add_argument("--scenario", default=None, choices=(*scenarios.NAMES, scenarios.LIST),
                      help=scenarios.summary_line())
    load.add_argument("--duty-cycle", type=parse_duty_cycle, default=d.duty_cycle,
                      help="keep the GPUs busy about this fraction of the time (0.5 or 50%%): after each step, "
                           "wait for it to finish and sleep busy * (1 - F) / F; 1 adds nothing to the step")
    load.add_argument("--load-profile", type=parse_load_profile, default=None,
                      help="phases of load, duration@percent, in order and repeating until the run ends, e.g. "
                           "2m@100,1m@0,2m@50; 0 is idle with memory and process group held; every rank "
                           "switches at the same step")
    load.add_argument("--gpu-memory-ballast", type=parse_memory_size, default=None,
                      help="also hold this much memory on each GPU for the run, written so it is resident: "
                           "20GiB, 512MiB, or a fraction of the card such as 0.5; refused (exit 2) if it "
                           "cannot fit beside the job")

    fault = p.add_argument_group("fault injection (for platform tests)")
    fault.add_argument("--fail-at-step", type=int, default=None, help="inject a fault when this global step (1-based) starts")
    fault.add_argument("--fail-rank", type=_fail_rank, default=d.fail_rank, help="rank that fails, or 'all'")
    fault.add_argument("--fail-mode", default=d.fail_mode, choices=FAIL_MODES,
                       help="exception: Python error (exit 1); exit: exit code 3; kill: SIGKILL itself; "
                            "hang: stop taking part in collectives (the job ends through --dist-timeout); "
                            "oom: the allocator's out-of-memory error (exit 1); nan: that step's loss is NaN "
                            "(then --nan-policy decides)")
    fault.add_argument("--nan-policy", default=d.nan_policy, choices=NAN_POLICIES,
                       help="when a loss is not finite: stop (exit 1, naming the step and rank), skip (that "
                            "step's update is undone on every rank; training goes on) or ignore (train on)")

    pre = p.add_argument_group("preflight checks (PREFLIGHT.md)")
    pre.add_argument("--preflight", nargs="?", const="warn", default=d.preflight, type=_preflight_mode,
                     choices=PREFLIGHT_MODES, metavar="MODE",
                     help="before training, measure every GPU's matmul rate and host-to-device copies, all-reduce "
                          "bandwidth and latency, /dev/shm and the save dir's write speed; print a table, write "
                          "<save-dir>/preflight.json and name slow GPUs and links in WARNING lines. MODE: warn "
                          "(the default when --preflight is given alone: train anyway), strict (exit 1 before "
                          "training on any finding) or off")
    pre.add_argument("--preflight-only", action="store_true",
                     help="run the preflight checks (warn unless --preflight strict) and exit without training: "
                          "0, or 1 on a finding with strict")
    # For tests and short GPU checks (PREFLIGHT.md): how long a rank must stay slow to be named a straggler.
    pre.add_argument("--straggler-window", type=_straggler_window, default=d.straggler_window_s,
                     dest="straggler_window_s", help=argparse.SUPPRESS)
    # Tests only (PREFLIGHT.md), as RESNET_DDP_TEST_SLOW_RANK=RANK:SECONDS: that rank does SECONDS of extra
    # work in every training step and every timed preflight matmul.
    pre.add_argument("--test-slow-rank", type=_slow_rank, default=None, help=argparse.SUPPRESS)
    p.scenario_defaults = _apply_scenario(p, scenario) if scenario else {}
    _apply_environment(p, environ)
    return p


def _apply_scenario(parser: argparse.ArgumentParser, name: str) -> dict:
    """Make a preset's options the parser's defaults (the environment and the command line still win)."""
    plain = vars(parser.parse_args([]))
    given = vars(parser.parse_args(list(scenarios.BY_NAME[name].options)))
    values = {dest: value for dest, value in given.items() if value != plain[dest]}
    parser.set_defaults(**values)
    return values


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def _apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Turn RESNET_DDP_<OPTION> variables into defaults, so the command line still wins."""
    for action in parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        # Named after the option (--batch-size -> RESNET_DDP_BATCH_SIZE), not its destination.
        name = ENV_PREFIX + action.option_strings[0].lstrip("-").replace("-", "_").upper()
        if name not in environ:
            continue
        raw = environ[name]
        try:
            if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
                value = _parse_bool(raw)
            else:
                value = action.type(raw) if action.type else raw
                if action.choices is not None and value not in action.choices:
                    raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise UsageError(f"{name}={raw!r} is not valid for {action.option_strings[0]}: {exc}") from None
        parser.set_defaults(**{action.dest: value})


def parse_config(argv: Optional[Sequence[str]] = None, environ: Mapping[str, str] = os.environ) -> Config:
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.scenario not in (None, scenarios.LIST):  # parse again with the preset's defaults under the rest
        parser = build_parser(environ, args.scenario)
        args = parser.parse_args(argv)
        _settle_duty_cycle_and_profile(args, parser.scenario_defaults)
    # Options map onto Config fields by name; these few are derived.
    fields = {field.name for field in dataclasses.fields(Config)}
    values = {name: value for name, value in vars(args).items() if name in fields}
    values.update(
        save_dir=args.save_dir or environ.get("OUTPUT_DIR") or Config.save_dir,
        sync_bn=not args.no_sync_bn,
        batch_size=_given(args.batch_size, 256 if args.fast else None, Config.batch_size),
        amp=_given(args.amp, "bf16" if args.fast else None, Config.amp),
        data=_given(args.data, "gpu" if args.fast else None, Config.data),
        # None: --fast's "where it can", settled once the device is known (resolve_compile)
        compile=args.compile if args.compile is not None else (None if args.fast else False),
        syncbn_symm_mem=args.syncbn_symm_mem,  # None: on where it can run, settled by resolve_syncbn_symm_mem
        fuse_bn_relu=args.fuse_bn_relu is not False,
        preflight="warn" if args.preflight_only and args.preflight == "off" else args.preflight,
    )
    config = Config(**values)
    validate(config)
    return config


def _settle_duty_cycle_and_profile(args: argparse.Namespace, preset: dict) -> None:
    """One of them from the preset, the other given: the one given wins."""
    if args.load_profile is None or args.duty_cycle == 1.0:
        return
    if "load_profile" in preset and args.load_profile == preset["load_profile"]:
        args.load_profile = None
    elif "duty_cycle" in preset and args.duty_cycle == preset["duty_cycle"]:
        args.duty_cycle = 1.0


def _given(value, fast_value, default):
    """An option's value: what was given, else what --fast implies, else the default."""
    if value is not None:
        return value
    return fast_value if fast_value is not None else default


def validate(config: Config) -> None:
    """Refuse values that could only fail later; each message names the option."""
    at_least_one = {
        "--epochs": config.epochs,
        "--batch-size": config.batch_size,
        "--dataset-size": config.dataset_size,
        "--num-classes": config.num_classes,
    }
    for option, value in at_least_one.items():
        if value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    if config.image_size < MIN_IMAGE_SIZE:
        raise UsageError(f"--image-size must be at least {MIN_IMAGE_SIZE} for {config.arch}, got {config.image_size}")
    if config.num_workers < 0:
        raise UsageError(f"--num-workers must be 0 or more, got {config.num_workers}")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise UsageError(f"--lr must be a positive finite number, got {config.lr}")
    for option, value in (("--momentum", config.momentum), ("--weight-decay", config.weight_decay)):
        if not (math.isfinite(value) and value >= 0):
            raise UsageError(f"{option} must be a finite number of 0 or more, got {value}")
    if not 0 <= config.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {config.seed}")
    if config.nproc_per_node is not None and config.nproc_per_node < 1:
        raise UsageError(f"--nproc-per-node must be at least 1, got {config.nproc_per_node}")
    if config.min_gpus < 0:
        raise UsageError(f"--min-gpus must be 0 or more, got {config.min_gpus}")
    if config.master_port is not None and not 1 <= config.master_port <= 65535:
        raise UsageError(f"--master-port must be in 1..65535, got {config.master_port}")
    if config.metrics_port is not None and not 1 <= config.metrics_port <= 65535:
        raise UsageError(f"--metrics-port must be in 1..65535, got {config.metrics_port}")
    if not (math.isfinite(config.dist_timeout) and config.dist_timeout > 0):
        raise UsageError(f"--dist-timeout must be a positive number of seconds, got {config.dist_timeout}")
    if config.fail_at_step is not None and config.fail_at_step < 1:
        raise UsageError(f"--fail-at-step must be at least 1, got {config.fail_at_step}")
    if config.max_steps is not None and config.max_steps < 1:
        raise UsageError(f"--max-steps must be at least 1, got {config.max_steps}")
    if config.warmup_steps < 0:
        raise UsageError(f"--warmup-steps must be 0 or more, got {config.warmup_steps}")
    if config.log_interval is not None and config.log_interval < 1:
        raise UsageError(f"--log-interval must be at least 1, got {config.log_interval}")
    if config.checkpoint_every < 0:
        raise UsageError(f"--checkpoint-every must be 0 or more, got {config.checkpoint_every}")
    if config.keep_checkpoints < 1:
        raise UsageError(f"--keep-checkpoints must be at least 1, got {config.keep_checkpoints}")
    if config.resume not in ("auto", "never") and not os.path.isfile(config.resume):
        raise UsageError(f"--resume {config.resume!r}: no such checkpoint file (or use auto / never)")
    if config.cpu and config.amp == "fp16":
        raise UsageError("--amp fp16 is for GPUs: use --amp bf16 on CPU, or drop --cpu")
    if config.fail_rank < ALL_RANKS:
        raise UsageError(f"--fail-rank must be a rank (0 or more) or 'all', got {config.fail_rank}")
    if config.load_profile is not None and config.duty_cycle != 1.0:
        raise UsageError("--duty-cycle and --load-profile both given: the profile sets each phase's duty cycle; "
                         "give one of them")
    if config.gpu_memory_ballast is not None and config.cpu:
        raise UsageError("--gpu-memory-ballast holds GPU memory, and a --cpu run has none: drop one of them")


def resolve_compile(config: Config, device_type: str, announce: bool) -> Config:
    """--fast without --compile/--no-compile: compile on GPUs where inductor can build its kernels.

    A slim image without a compiler still runs --fast, uncompiled, and says so.
    """
    if config.compile is not None:
        return config
    if device_type != "cuda":  # compiling the CPU step buys little for minutes of start-up
        return dataclasses.replace(config, compile=False)
    from resnet_ddp import model, syncbn

    missing = model.compiler_missing(device_type)
    why = f"torch.compile {missing}" if missing is not None else None
    if why is None and config.sync_bn and not syncbn.COMPILES_WHOLE:
        import torch

        why = (f"torch {torch.__version__} splits the compiled graph at every SyncBatchNorm layer (2.5 or newer "
               "compiles it whole); --compile asks for it anyway")
    if why is not None and announce:
        print(f"resnet-ddp: --fast runs without --compile here: {why}", flush=True)
    return dataclasses.replace(config, compile=why is None)


def resolve_syncbn_symm_mem(config: Config, plan, announce: bool) -> Config:
    """--syncbn-symm-mem refused where it cannot run; unless given (None), on where it can.

    `plan` is the launch plan: the job's processes, and how many of them run on this node.
    """
    if config.syncbn_symm_mem is False:
        return config
    why = _symm_mem_unusable(config, plan)
    if config.syncbn_symm_mem:
        if why is not None:
            raise UsageError(f"--syncbn-symm-mem: {why}")
        return config
    # Said only where a GPU job of several processes with SyncBatchNorm stays on NCCL: where it had a choice.
    if why is not None and announce and plan.device_type == "cuda" and plan.world_size > 1 and config.sync_bn:
        print(f"resnet-ddp: SyncBatchNorm's collectives stay on NCCL: {why}", flush=True)
    return dataclasses.replace(config, syncbn_symm_mem=why is None)


def _symm_mem_unusable(config: Config, plan) -> Optional[str]:
    if plan.device_type != "cuda":
        return "symmetric memory is for GPUs"
    if not config.sync_bn:
        return "SyncBatchNorm is off (--no-sync-bn)"
    if plan.world_size == 1:
        return "a job of one process has no peers"
    if plan.world_size != plan.nproc:
        return (f"this launcher starts {plan.nproc} of the job's {plan.world_size} processes, and symmetric memory "
                "needs every process on one node, started together")
    from resnet_ddp import syncbn, syncbn_symm

    # Compiled, inductor lowers the collectives to symmetric memory's kernels; uncompiled, the layer calls them.
    missing = syncbn.symmetric_memory_missing() if config.compile else syncbn_symm.missing()
    if missing is not None:
        return missing
    import torch

    if torch.cuda.device_count() < plan.nproc:
        return f"this process sees {torch.cuda.device_count()} of the node's {plan.nproc} GPUs"
    for a in range(plan.nproc):
        for b in range(plan.nproc):
            if a != b and not torch.cuda.can_device_access_peer(a, b):
                return f"GPU {a} has no peer access to GPU {b}"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        from resnet_ddp import report

        return report.main(argv[1:])
    # Imported here so that `--help` and input errors answer without loading torch.
    try:
        config = parse_config(argv)
        if config.scenario == scenarios.LIST:
            print(scenarios.table())
            return 0
        from resnet_ddp import checkpoint, launch, model, prometheus, telemetry

        plan = launch.plan_launch(config, os.environ)
        checkpoint.ensure_writable_dir(config.save_dir)
        if plan.holds_rank_zero:
            # Refuse a mismatched checkpoint before any training process starts; rank 0 reports the rest.
            checkpoint.find_resume_point(config, report=False)
        if config.tensorboard and plan.holds_rank_zero:
            telemetry.require_tensorboard()
        if config.metrics_port is not None and plan.holds_local_rank_zero:
            prometheus.check_can_serve(config.metrics_port)
        config = resolve_compile(config, plan.device_type, announce=plan.holds_rank_zero)
        if config.compile:
            model.require_compiler(plan.device_type)
        config = resolve_syncbn_symm_mem(config, plan, announce=plan.holds_rank_zero)
    except UsageError as exc:
        print(f"resnet-ddp: error: {exc}", file=sys.stderr)
        return 2
    return launch.run(config, plan)


def run() -> NoReturn:
    """The command (train.py, python -m resnet_ddp, resnet-ddp): main(), then a quick end of the process."""
    code = main()
    from resnet_ddp.launch import exit_process

    exit_process(code)
