"""Command line and environment -> a validated Config, then hand over to the launcher.

Precedence for every option: command line, then RESNET_DDP_<OPTION>, then a
scenario preset, then the default. OUTPUT_DIR (set by AstraGo) is the save dir
when none of them names one.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import math
import os
import sys
from typing import List, Mapping, NoReturn, Optional, Sequence, Tuple

from resnet_ddp import __version__
from resnet_ddp.config import (
    ALL_RANKS,
    AMP_MODES,
    ARCHITECTURES,
    DATA_SOURCES,
    FAIL_MODES,
    LOG_FORMATS,
    NAN_POLICIES,
    PREFLIGHT_MODES,
    CheckpointConfig,
    Config,
    HealthConfig,
    ModelConfig,
    ProcessConfig,
    ReportingConfig,
    RunLengthConfig,
    ScenarioConfig,
    SpeedConfig,
    TrainingConfig,
)
from resnet_ddp.core import phases
from resnet_ddp.entry.process import die_with_elastic_agent, exit_on_stop_signals, exit_process
from resnet_ddp.entry.values import (
    parse_bool,
    parse_duration,
    parse_duration_or_zero,
    parse_duty_cycle,
    parse_fail_rank,
    parse_load_profile,
    parse_memory_size,
    parse_preflight_mode,
    parse_profile_steps,
    parse_slow_rank,
    parse_straggler_window,
)
from resnet_ddp.errors import UsageError
from resnet_ddp.observe import console
from resnet_ddp.scenarios import presets

log = logging.getLogger(__name__)

ENV_PREFIX = "RESNET_DDP_"
# Variables of ours that are not options: the test suite's process marker and phase pause (core/phases.py).
_NOT_OPTIONS = {"RESNET_DDP_TEST_MARKER", "RESNET_DDP_TEST_PAUSE_AT"}
MIN_IMAGE_SIZE = 32  # every supported ResNet downsamples by 32
MAX_WORKERS = 256
FLOAT32_MAX = 3.4028234663852886e38  # the optimizer's arithmetic is float32: a larger value overflows in its step
MAX_DIST_TIMEOUT_S = 10**9  # c10d adds it to a clock in int64 nanoseconds: 10**10 s already overflows there
FAST_BATCH_SIZE = 256
USAGE = "resnet-ddp [options]\n       resnet-ddp report SAVE_DIR"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of printing usage, so errors stay one line."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see --help)")


def env_name(action: argparse.Action) -> str:
    """The option's variable: --batch-size -> RESNET_DDP_BATCH_SIZE (named after the option, not its dest)."""
    return _variable_of(action.option_strings[0])


def _variable_of(option: str) -> str:
    return ENV_PREFIX + option.lstrip("-").replace("-", "_").upper()


class _HelpFormatter(argparse.HelpFormatter):
    """Each option's help ends with its effective default (after the preset and the environment) and its
    variable: '(default: 64; 256 with --fast; env RESNET_DDP_BATCH_SIZE)'. No default is shown where there
    is none to show (off flags, unset values)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.help is argparse.SUPPRESS or not action.option_strings or action.dest in ("help", "version"):
            return text
        parts = []
        shown = getattr(action, "shown_default", None)
        if shown is not None:
            parts.append(f"default: {shown}")
        elif action.default is not None and action.default is not False:
            parts.append(f"default: {action.default}")
        parts.append(f"env {env_name(action)}")
        return f"{text} ({'; '.join(parts)})".replace("%", "%%")  # argparse %-formats help


def _option(group, *flags: str, shown_default: Optional[str] = None, **kwargs) -> argparse.Action:
    """add_argument, noting the default that help shows where argparse's own default cannot say it."""
    action = group.add_argument(*flags, **kwargs)
    action.shown_default = shown_default
    return action


def build_parser(environ: Mapping[str, str] = os.environ, scenario: Optional[str] = None) -> argparse.ArgumentParser:
    """The options, with a scenario preset's values (if named) and then the environment as defaults."""
    p = _Parser(
        prog="resnet-ddp",
        usage=USAGE,
        description="Train torchvision ResNet with DDP and SyncBatchNorm on a lazily generated fake dataset: a "
        "real distributed training job for testing GPU clusters. `resnet-ddp report SAVE_DIR` draws a "
        "finished or running job's metrics into SAVE_DIR/report.png and report.html.",
        epilog="Every option can also be set in its environment variable, named in its help "
        f"(e.g. {ENV_PREFIX}BATCH_SIZE=128, {ENV_PREFIX}CPU=1); the command line wins over the environment, "
        "the environment over a --scenario preset. OUTPUT_DIR sets the save dir when neither names one. "
        "Exit codes: 0 finished, 1 failed during the run, 2 bad input or unusable setup (refused before "
        "training), 130/143 stopped by SIGINT/SIGTERM. All options: docs/options.md.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"resnet-ddp {__version__}")
    training, model = TrainingConfig(), ModelConfig()
    length, reporting, ckpt_defaults = RunLengthConfig(), ReportingConfig(), CheckpointConfig()
    process, scenario_defaults, health = ProcessConfig(), ScenarioConfig(), HealthConfig()

    g = p.add_argument_group("training (the original example's options)")
    _option(g, "--epochs", type=int, default=training.epochs, help="epochs to train")
    _option(
        g,
        "--batch-size",
        type=int,
        default=None,
        shown_default=f"{training.batch_size}; {FAST_BATCH_SIZE} with --fast",
        help="batch size per process",
    )
    _option(g, "--dataset-size", type=int, default=training.dataset_size, help="samples in the fake dataset")
    _option(
        g,
        "--lr",
        type=float,
        default=training.lr,
        help="SGD learning rate (on a resume, this run's value applies, and a line says so when it changes)",
    )
    _option(g, "--num-workers", type=int, default=training.num_workers, help="DataLoader workers per process")
    _option(
        g,
        "--save-dir",
        default=None,
        shown_default=f"$OUTPUT_DIR, else {Config.save_dir}",
        help="where checkpoints, logs, summary.json and model_final.pth go",
    )
    _option(
        g,
        "--num-classes",
        type=int,
        default=training.num_classes,
        help="classes in the fake dataset and the model head",
    )

    g = p.add_argument_group("model and data")
    _option(
        g, "--arch", default=model.arch, choices=ARCHITECTURES, help="torchvision architecture (no pretrained weights)"
    )
    _option(g, "--image-size", type=int, default=model.image_size, help="height and width of the fake images")
    _option(g, "--seed", type=int, default=training.seed, help="seed for data, weights and shuffling")
    _option(g, "--no-sync-bn", action="store_true", help="keep plain BatchNorm instead of SyncBatchNorm")
    _option(
        g,
        "--momentum",
        type=float,
        default=training.momentum,
        help="SGD momentum (on a resume, this run's value applies)",
    )
    _option(
        g,
        "--weight-decay",
        type=float,
        default=training.weight_decay,
        help="SGD weight decay (on a resume, this run's value applies)",
    )

    g = p.add_argument_group("speed (only --amp changes the arithmetic)")
    _option(
        g,
        "--fast",
        action="store_true",
        help="maximum load: --amp bf16 --data gpu --batch-size 256, and --compile on GPUs where Triton and a C "
        "compiler are present, unless those are given",
    )
    _option(
        g,
        "--amp",
        default=None,
        choices=AMP_MODES,
        shown_default="off; bf16 with --fast",
        help="mixed precision: bf16 autocast, or fp16 autocast with a gradient scaler",
    )
    _option(
        g,
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        shown_default="on for GPUs",
        help="NHWC memory layout",
    )
    _option(
        g,
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        shown_default="off; on with --fast where it can build its kernels",
        help="torch.compile the model",
    )
    _option(
        g,
        "--data",
        default=None,
        choices=DATA_SOURCES,
        shown_default="cpu; gpu with --fast",
        help="cpu: LazyFakeDataset in DataLoader workers; gpu: fake batches made on the device",
    )
    _option(
        g,
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        shown_default="on for GPUs, except --amp fp16",
        help="capture the whole training step in one CUDA graph",
    )
    _option(
        g,
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="time cuDNN's candidate algorithms for each convolution at the first step and keep the fastest; "
        "on a machine that has not run the job before, that first step takes many seconds longer",
    )
    _option(
        g,
        "--syncbn-symm-mem",
        action=argparse.BooleanOptionalAction,
        default=None,
        shown_default="on where it can run; otherwise NCCL, and one line says why",
        help="SyncBatchNorm exchanges its statistics through symmetric memory (one-shot kernels over NVLink) "
        "instead of NCCL: needs a job on one node whose GPUs have peer access",
    )
    _option(
        g,
        "--fuse-bn-relu",
        action=argparse.BooleanOptionalAction,
        default=None,
        shown_default="on",
        help="each SyncBatchNorm applies the residual add and ReLU after it, in one pass over the activation "
        "on fp32 GPUs (same maths)",
    )

    g = p.add_argument_group("run length and measurement")
    _option(
        g,
        "--duration",
        type=parse_duration,
        default=None,
        dest="duration_s",
        metavar="DURATION",
        help="stop cleanly once training has run this long (90s, 10m, 1h30m, or seconds), whatever --epochs "
        "says: every rank stops after the same step, the final model is saved, exit 0",
    )
    _option(g, "--max-steps", type=int, default=None, help="stop after this many steps in all, whatever --epochs says")
    _option(
        g,
        "--warmup-steps",
        type=int,
        default=length.warmup_steps,
        help="steps left out of the summary's throughput and step times (start-up, autotuning, capture); a run with "
        "no more steps than this leaves out only its first",
    )

    g = p.add_argument_group("reporting")
    _option(
        g,
        "--log-interval",
        type=int,
        default=None,
        shown_default="about every 10 seconds of work",
        help="a step line (and a record in <save-dir>/logs/metrics.jsonl) every N steps",
    )
    _option(
        g,
        "--quiet",
        action="store_true",
        help="print only the original example's per-epoch lines, events and errors (no step lines, progress "
        "bar or summary table)",
    )
    _option(
        g,
        "--metrics-port",
        type=int,
        default=None,
        help="serve Prometheus metrics on this port from each node's local rank 0, with every local rank's "
        "figures labelled rank and local_rank (http://<node>:PORT/metrics)",
    )
    _option(
        g,
        "--metrics-linger",
        type=parse_duration_or_zero,
        default=reporting.metrics_linger_s,
        dest="metrics_linger_s",
        metavar="DURATION",
        shown_default=f"{reporting.metrics_linger_s:g}s",
        help="after the run, keep serving the last values (its state and exit code included) this long, so that "
        "Prometheus scrapes how it ended; at most 5 s after a stop signal; 0 to end at once",
    )
    _option(
        g,
        "--log-format",
        default=reporting.log_format,
        choices=LOG_FORMATS,
        help="text: the lines as shown here; json: one JSON object per line (UTC time, level, rank, host, "
        "message and the step's figures), for Fluent Bit, Loki or Elastic reading the container's output",
    )
    _option(g, "--log-timestamps", action="store_true", help="start each text line with its UTC time")
    _option(
        g,
        "--tensorboard",
        action="store_true",
        help="also write scalars to <save-dir>/tensorboard (pip install 'resnet-ddp[tensorboard]')",
    )
    _option(
        g,
        "--profile-steps",
        type=parse_profile_steps,
        default=None,
        metavar="FIRST:LAST",
        help="record these global steps with torch.profiler (e.g. 200:204; start-up steps are skipped): each "
        "rank writes <save-dir>/profile/rank<R>.trace.json and rank<R>-ops.txt",
    )

    g = p.add_argument_group("checkpoints and resume")
    _option(
        g,
        "--checkpoint-every",
        type=int,
        default=ckpt_defaults.every,
        help="also write <save-dir>/checkpoint-*.pt every N steps (0: at epoch ends and on stop only)",
    )
    _option(
        g,
        "--keep-checkpoints",
        type=int,
        default=ckpt_defaults.keep,
        help="keep this many newest checkpoints; older ones go after a good write",
    )
    _option(
        g,
        "--resume",
        default=ckpt_defaults.resume,
        help="auto: continue from the newest good checkpoint in the save dir, if any; never: start afresh; or a path. "
        "A run that would write over checkpoints of an earlier line in the save dir is refused",
    )

    g = p.add_argument_group("processes and devices")
    _option(g, "--cpu", action="store_true", help="run on CPU processes over gloo instead of GPUs")
    _option(
        g,
        "--nproc-per-node",
        type=int,
        default=None,
        shown_default="every visible GPU; 2 with --cpu",
        help="processes on this node",
    )
    _option(g, "--min-gpus", type=int, default=process.min_gpus, help="refuse to start with fewer GPUs than this")
    _option(
        g,
        "--master-port",
        type=int,
        default=None,
        shown_default="$MASTER_PORT, else a free port",
        help="rendezvous port when this launcher starts the job",
    )
    _option(
        g,
        "--dist-timeout",
        type=float,
        default=process.dist_timeout,
        help="seconds a collective may wait before the job is declared failed",
    )

    g = p.add_argument_group("scenarios and load shaping (for platform tests; SCENARIOS.md)")
    _option(g, "--scenario", default=None, choices=(*presets.NAMES, presets.LIST), help=presets.summary_line())
    _option(
        g,
        "--duty-cycle",
        type=parse_duty_cycle,
        default=scenario_defaults.duty_cycle,
        help="keep the GPUs busy about this fraction of the time (0.5 or 50%): after each step, wait for it "
        "to finish and sleep busy * (1 - F) / F; 1 adds nothing to the step",
    )
    _option(
        g,
        "--load-profile",
        type=parse_load_profile,
        default=None,
        help="phases of load, duration@percent, in order and repeating until the run ends, e.g. "
        "2m@100,1m@0,2m@50; 0 is idle with memory and process group held; every rank switches at the "
        "same step",
    )
    _option(
        g,
        "--gpu-memory-ballast",
        type=parse_memory_size,
        default=None,
        help="also hold this much memory on each GPU for the run, written so it is resident: 20GiB, 512MiB, "
        "or a fraction of the card such as 0.5; refused (exit 2) if it cannot fit beside the job",
    )

    g = p.add_argument_group("fault injection (for platform tests)")
    _option(g, "--fail-at-step", type=int, default=None, help="inject a fault when this global step (1-based) starts")
    _option(
        g, "--fail-rank", type=parse_fail_rank, default=scenario_defaults.fail_rank, help="rank that fails, or 'all'"
    )
    _option(
        g,
        "--fail-mode",
        default=scenario_defaults.fail_mode,
        choices=FAIL_MODES,
        help="exception: Python error (exit 1); exit: exit code 3; kill: SIGKILL itself; hang: stop taking "
        "part in collectives (the job ends through --dist-timeout); oom: the allocator's out-of-memory "
        "error (exit 1); nan: that step's loss is NaN (then --nan-policy decides)",
    )
    _option(
        g,
        "--nan-policy",
        default=scenario_defaults.nan_policy,
        choices=NAN_POLICIES,
        help="when a loss is not finite: stop (exit 1, naming the step and rank), skip (that step's update is "
        "undone on every rank; training goes on) or ignore (train on)",
    )

    g = p.add_argument_group("preflight checks (PREFLIGHT.md)")
    _option(
        g,
        "--preflight",
        nargs="?",
        const="warn",
        default=health.preflight,
        type=parse_preflight_mode,
        choices=PREFLIGHT_MODES,
        metavar="MODE",
        help="before training, measure every GPU's matmul rate and host-to-device copies, all-reduce bandwidth "
        "and latency, /dev/shm and the save dir's write speed; print a table, write "
        "<save-dir>/preflight.json and name slow GPUs and links in WARNING lines. MODE: warn (train "
        "anyway; what --preflight alone means), strict (exit 1 before training on any finding) or off",
    )
    _option(
        g,
        "--preflight-only",
        action="store_true",
        help="run the preflight checks (warn unless --preflight strict) and exit without training: 0, or 1 on "
        "a finding with strict",
    )
    # For tests and short GPU checks (PREFLIGHT.md): how long a rank must stay slow to be named a straggler.
    _option(
        g,
        "--straggler-window",
        type=parse_straggler_window,
        default=health.straggler_window_s,
        dest="straggler_window_s",
        help=argparse.SUPPRESS,
    )
    # Tests only (PREFLIGHT.md), as RESNET_DDP_TEST_SLOW_RANK=RANK:SECONDS: that rank does SECONDS of extra
    # work in every training step and every timed preflight matmul.
    _option(g, "--test-slow-rank", type=parse_slow_rank, default=None, help=argparse.SUPPRESS)
    p.scenario_defaults = _apply_scenario(p, scenario) if scenario else {}
    _apply_environment(p, environ)
    return p


def _apply_scenario(parser: argparse.ArgumentParser, name: str) -> dict:
    """Make a preset's options the parser's defaults (the environment and the command line still win)."""
    plain = vars(parser.parse_args([]))
    given = vars(parser.parse_args(list(presets.BY_NAME[name].options)))
    values = {dest: value for dest, value in given.items() if value != plain[dest]}
    parser.set_defaults(**values)
    for action in parser._actions:
        if action.dest in values and action.option_strings:
            action.shown_default = f"{_shown(values[action.dest])} (from --scenario {name})"
    return values


def _shown(value) -> str:
    return "on" if value is True else str(value)


def _apply_environment(parser: argparse.ArgumentParser, environ: Mapping[str, str]) -> None:
    """Turn RESNET_DDP_<OPTION> variables into defaults, so the command line still wins."""
    for action in parser._actions:
        if not action.option_strings or action.dest in ("help", "version"):
            continue
        name = env_name(action)
        if name not in environ:
            continue
        raw = environ[name]
        try:
            if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)):
                value = parse_bool(raw)
            else:
                value = action.type(raw) if action.type else raw
                if action.choices is not None and value not in action.choices:
                    raise ValueError(f"choose from {', '.join(map(str, action.choices))}")
        except (ValueError, argparse.ArgumentTypeError) as exc:
            raise UsageError(f"{name}={raw!r} is not valid for {action.option_strings[0]}: {exc}") from None
        parser.set_defaults(**{action.dest: value})
        action.shown_default = f"{raw} (from {name})"


def unknown_variables(environ: Mapping[str, str]) -> List[str]:
    """One warning for each RESNET_DDP_* variable that names no option: a typo would otherwise go unnoticed."""
    known = {env_name(a) for a in build_parser({})._actions if a.option_strings and a.dest not in ("help", "version")}
    warnings = []
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known and name not in _NOT_OPTIONS:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"{name} is not an option's variable and is ignored{hint}")
    return warnings


def parse_args(argv: Optional[Sequence[str]] = None, environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else list(argv)
    helping = [arg for arg in argv if arg in ("-h", "--help")]
    if helping:
        try:
            build_parser(environ)
        except UsageError as exc:  # the help still comes, with the defaults the variables would have changed
            log.warning(f"warning: {exc}")
            environ = {}
    parser = build_parser(environ)
    # --help waits for the second parse, which knows a --scenario's defaults and shows them.
    args = parser.parse_args([arg for arg in argv if arg not in helping])
    if args.scenario not in (None, presets.LIST):  # parse again with the preset's defaults under the rest
        parser = build_parser(environ, args.scenario)
        args = parser.parse_args(argv)
        _settle_duty_cycle_and_profile(args, parser.scenario_defaults)
    elif helping:
        parser.parse_args(argv)  # prints the help and exits
    return args


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> Config:
    """The nested Config of the parsed options; --fast's implied values filled in where not given."""
    fast = args.fast
    save_dir = args.save_dir if args.save_dir is not None else (environ.get("OUTPUT_DIR") or Config.save_dir)
    return Config(
        save_dir=save_dir,
        training=TrainingConfig(
            epochs=args.epochs,
            batch_size=_given(args.batch_size, FAST_BATCH_SIZE if fast else None, TrainingConfig.batch_size),
            dataset_size=args.dataset_size,
            lr=args.lr,
            num_workers=args.num_workers,
            num_classes=args.num_classes,
            momentum=args.momentum,
            weight_decay=args.weight_decay,
            seed=args.seed,
            data=_given(args.data, "gpu" if fast else None, TrainingConfig.data),
        ),
        model=ModelConfig(
            arch=args.arch,
            image_size=args.image_size,
            sync_bn=not args.no_sync_bn,
            fuse_bn_relu=args.fuse_bn_relu is not False,
        ),
        speed=SpeedConfig(
            amp=_given(args.amp, "bf16" if fast else None, SpeedConfig.amp),
            channels_last=args.channels_last,
            # None: --fast's "where it can", settled by the launcher once the device is known (resolve.py)
            compile=args.compile if args.compile is not None else (None if fast else False),
            cuda_graphs=args.cuda_graphs,
            cudnn_benchmark=args.cudnn_benchmark,
            syncbn_symm_mem=args.syncbn_symm_mem,
        ),
        length=RunLengthConfig(duration_s=args.duration_s, max_steps=args.max_steps, warmup_steps=args.warmup_steps),
        reporting=ReportingConfig(
            log_interval=args.log_interval,
            quiet=args.quiet,
            metrics_port=args.metrics_port,
            metrics_linger_s=args.metrics_linger_s,
            tensorboard=args.tensorboard,
            profile_steps=args.profile_steps,
            log_format=args.log_format,
            log_timestamps=args.log_timestamps,
        ),
        checkpoint=CheckpointConfig(every=args.checkpoint_every, keep=args.keep_checkpoints, resume=args.resume),
        process=ProcessConfig(
            cpu=args.cpu,
            nproc_per_node=args.nproc_per_node,
            min_gpus=args.min_gpus,
            master_port=args.master_port,
            dist_timeout=args.dist_timeout,
        ),
        scenario=ScenarioConfig(
            name=args.scenario,
            duty_cycle=args.duty_cycle,
            load_profile=args.load_profile,
            gpu_memory_ballast=args.gpu_memory_ballast,
            fail_at_step=args.fail_at_step,
            fail_rank=args.fail_rank,
            fail_mode=args.fail_mode,
            nan_policy=args.nan_policy,
        ),
        health=HealthConfig(
            preflight="warn" if args.preflight_only and args.preflight == "off" else args.preflight,
            preflight_only=args.preflight_only,
            straggler_window_s=args.straggler_window_s,
            test_slow_rank=args.test_slow_rank,
        ),
    )


def parse_config(argv: Optional[Sequence[str]] = None, environ: Mapping[str, str] = os.environ) -> Config:
    config = config_from_args(parse_args(argv, environ), environ)
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
    """Refuse values that could only fail later, or that would run without meaning; each message names the option."""
    training, process, scenario = config.training, config.process, config.scenario
    for option, value, least in (
        ("--epochs", training.epochs, 1),
        ("--batch-size", training.batch_size, 1),
        ("--dataset-size", training.dataset_size, 1),
        ("--num-workers", training.num_workers, 0),
        ("--warmup-steps", config.length.warmup_steps, 0),
        ("--checkpoint-every", config.checkpoint.every, 0),
        ("--keep-checkpoints", config.checkpoint.keep, 1),
        ("--min-gpus", process.min_gpus, 0),
    ):
        if value < least:
            raise UsageError(f"{option} must be at least {least}, got {value}")
    if training.dataset_size > sys.maxsize:  # a length Python's len() can give
        raise UsageError(f"--dataset-size must be at most 2**63 - 1, got {training.dataset_size}")
    if training.num_workers > MAX_WORKERS:
        raise UsageError(
            f"--num-workers must be at most {MAX_WORKERS} DataLoader processes per rank, got {training.num_workers}"
        )
    if training.num_classes < 2:
        raise UsageError(
            f"--num-classes must be at least 2 (with one class the loss is 0 at every step), got {training.num_classes}"
        )
    for option, value in (
        ("--nproc-per-node", process.nproc_per_node),
        ("--fail-at-step", scenario.fail_at_step),
        ("--max-steps", config.length.max_steps),
        ("--log-interval", config.reporting.log_interval),
    ):
        if value is not None and value < 1:
            raise UsageError(f"{option} must be at least 1, got {value}")
    if not config.save_dir.strip():
        raise UsageError(
            f"--save-dir is empty: name a directory (or leave it out for $OUTPUT_DIR, else {Config.save_dir})"
            if config.save_dir != os.environ.get("OUTPUT_DIR")
            else "OUTPUT_DIR is blank: set it to the save dir, or unset it, or pass --save-dir"
        )
    if config.model.image_size < MIN_IMAGE_SIZE:
        raise UsageError(
            f"--image-size must be at least {MIN_IMAGE_SIZE} for {config.model.arch}, got {config.model.image_size}"
        )
    if not (math.isfinite(training.lr) and 0 < training.lr <= FLOAT32_MAX):
        raise UsageError(f"--lr must be a positive number a float32 holds, got {training.lr}")
    for option, value in (("--momentum", training.momentum), ("--weight-decay", training.weight_decay)):
        if not (math.isfinite(value) and 0 <= value <= FLOAT32_MAX):
            raise UsageError(f"{option} must be a number of 0 or more that a float32 holds, got {value}")
    if not 0 <= training.seed < 2**63:
        raise UsageError(f"--seed must be in [0, 2**63), got {training.seed}")
    for option, port in (("--master-port", process.master_port), ("--metrics-port", config.reporting.metrics_port)):
        if port is not None and not 1 <= port <= 65535:
            raise UsageError(f"{option} must be in 1..65535, got {port}")
    if not (math.isfinite(process.dist_timeout) and 1 <= process.dist_timeout <= MAX_DIST_TIMEOUT_S):
        raise UsageError(
            f"--dist-timeout must be between 1 and {MAX_DIST_TIMEOUT_S:,} seconds, got {process.dist_timeout:g}"
        )
    if process.master_port is not None and process.master_port == config.reporting.metrics_port:
        raise UsageError(f"--master-port and --metrics-port are both {process.master_port}: give them different ports")
    if config.checkpoint.resume not in ("auto", "never") and not os.path.isfile(config.checkpoint.resume):
        raise UsageError(f"--resume {config.checkpoint.resume!r}: no such checkpoint file (or use auto / never)")
    if process.cpu and config.speed.amp == "fp16":
        raise UsageError("--amp fp16 is for GPUs: use --amp bf16 on CPU, or drop --cpu")
    if scenario.fail_rank < ALL_RANKS:
        raise UsageError(f"--fail-rank must be a rank (0 or more) or 'all', got {scenario.fail_rank}")
    if scenario.load_profile is not None and scenario.duty_cycle != 1.0:
        raise UsageError(
            "--duty-cycle and --load-profile both given: the profile sets each phase's duty cycle; give one of them"
        )
    if scenario.gpu_memory_ballast is not None and process.cpu:
        preset = presets.BY_NAME.get(scenario.name)
        if preset is not None and "--gpu-memory-ballast" in preset.options:
            raise UsageError(f"--scenario {scenario.name} holds GPU memory, and a --cpu run has none: drop one of them")
        raise UsageError("--gpu-memory-ballast holds GPU memory, and a --cpu run has none: drop one of them")


def _naming_its_variable(message: str, argv: Sequence[str], environ: Mapping[str, str]) -> str:
    """A refusal of an option that came from its RESNET_DDP_* variable says so: the command line has no such word."""
    option = message.split(" ", 1)[0]
    variable = _variable_of(option)
    on_the_command_line = any(arg == option or arg.startswith(option + "=") for arg in argv)
    if option.startswith("--") and variable in environ and not on_the_command_line:
        return f"{message} (from {variable})"
    return message


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["report"]:
        from resnet_ddp.observe import report

        return report.main(argv[1:])
    console.setup_launcher(*_log_format_asked(argv, os.environ))  # before the options parse: their errors too
    try:
        for warning in unknown_variables(os.environ):
            log.warning(f"warning: {warning}")
        args = parse_args(argv)
        if args.scenario == presets.LIST:
            print(presets.table(), flush=True)
            return 0
        config = config_from_args(args)
        try:
            validate(config)
        except UsageError as exc:
            raise UsageError(_naming_its_variable(str(exc), argv, os.environ)) from None
        from resnet_ddp.core import compile_cache

        if not config.health.preflight_only:  # a check leaves its report and logs only
            compile_cache.keep_python_bytecode_in(config.save_dir)  # before torch is imported anywhere
        if not config.process.cpu:  # before CUDA starts here, for every process it starts
            compile_cache.keep_machine_caches_in(config.save_dir)
        # Imported here so that --help and input errors answer without loading torch.
        from resnet_ddp.entry import launch, refusals, resolve

        phases.reached("checks")
        plan = launch.plan_launch(config, os.environ)
        config = resolve.settle(config, plan, announce=plan.holds_rank_zero)
        refusals.refuse_what_cannot_run(config, plan)
    except UsageError as exc:
        log.error(f"error: {exc}")
        return 2
    return launch.run(config, plan)


def _log_format_asked(argv: Sequence[str], environ: Mapping[str, str]) -> Tuple[str, bool]:
    """--log-format and --log-timestamps as given, read before the options parse (a bad value stays text)."""

    def spells(arg: str, option: str) -> bool:  # the option, or an abbreviation argparse takes for it
        return len(arg) > len("--log-") and option.startswith(arg)

    log_format = environ.get(ENV_PREFIX + "LOG_FORMAT", "text")
    for i, arg in enumerate(argv):
        name, equals, value = arg.partition("=")
        if spells(name, "--log-format"):
            log_format = value if equals else (argv[i + 1] if i + 1 < len(argv) else log_format)
    from_environment = environ.get(ENV_PREFIX + "LOG_TIMESTAMPS", "").lower() in ("1", "true", "yes", "on")
    timestamps = from_environment or any(spells(arg, "--log-timestamps") for arg in argv)
    return ("json" if log_format == "json" else "text"), timestamps


def run() -> NoReturn:
    """The command (train.py, python -m resnet_ddp, resnet-ddp): main(), then a quick end of the process."""
    exit_on_stop_signals()  # first: a container's PID 1 ignores the signals it has no handler for
    if "TORCHELASTIC_RUN_ID" in os.environ:  # a torchrun worker: torchrun may be killed while this one starts
        die_with_elastic_agent()
    phases.reached("imports")
    try:
        code = main()
    except BrokenPipeError:  # `resnet-ddp --help | head`: the reader has gone, and nothing more can be said
        code = _quiet_broken_pipe()
    exit_process(code)


def _quiet_broken_pipe() -> int:
    """Point stdout at /dev/null, so that the interpreter's last flush does not raise again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return 0


def describe_options() -> List[Tuple[str, List[Tuple[str, str, str, str]]]]:
    """(group title, [(flags, env variable, default, help)]) for every documented option: docs/options.md."""
    parser = build_parser({})
    groups = []
    for group in parser._action_groups:
        rows = []
        for action in group._group_actions:
            if not action.option_strings or action.help is argparse.SUPPRESS or action.dest in ("help", "version"):
                continue
            flags = ", ".join(action.option_strings)
            if action.metavar or (action.nargs != 0 and not isinstance(action, argparse.BooleanOptionalAction)):
                if not isinstance(action, (argparse._StoreTrueAction,)):
                    value = action.metavar or (
                        ("{" + ",".join(map(str, action.choices)) + "}") if action.choices else action.dest.upper()
                    )
                    flags += " " + (f"[{value}]" if action.nargs == argparse.OPTIONAL else value)  # as --help shows
            shown = getattr(action, "shown_default", None)
            plain = action.default is None or action.default is False
            default = shown if shown is not None else ("" if plain else str(action.default))
            rows.append((flags, env_name(action), default, action.help))
        if rows:
            groups.append((group.title, rows))
    return groups
