"""Which launch mode, how many processes, spawning them and watching over them.

The mode is settled here, once; every process then runs the same code (entry/worker.py).

- torchrun: TORCHELASTIC_RUN_ID or LOCAL_WORLD_SIZE is set. This process is one
  worker; torchrun already set RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous.
- node-env: WORLD_SIZE and MASTER_ADDR are set without torchrun (AstraGo's simple
  runtime, pytorch/examples style). RANK and WORLD_SIZE count nodes; we spawn one
  process per local device with global rank RANK * nproc + local_rank.
- standalone: nothing is set. We spawn one process per local device and
  rendezvous on 127.0.0.1 at a free port unless one is given.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import multiprocessing.resource_tracker
import os
import random
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from resnet_ddp.config import Config
from resnet_ddp.core import phases
from resnet_ddp.core.outcome import EXIT_FAILED, RunOutcome
from resnet_ddp.entry import compile_prebuild, kernel_prebuild
from resnet_ddp.entry.gpus import Gpu, visible_gpus
from resnet_ddp.entry.process import (
    default_stop_signals,
    die_with_parent,
    exit_process,
    stop_signal_pending,
    stop_signals_held,
)
from resnet_ddp.errors import ReportedElsewhere, UsageError
from resnet_ddp.observe import summary_file

log = logging.getLogger(__name__)

DEFAULT_CPU_PROCESSES = 2
# A rank's refusal (UsageError): the job never trained, and leaves the save dir as it was.
REFUSED = 2
# How long ranks get to exit on SIGTERM before SIGKILL, once one rank has failed.
TERMINATE_GRACE_S = 10.0
# How long ranks get to stop after a stop signal before SIGKILL (torchrun waits as long for its workers).
STOP_DEADLINE_S = 30.0


@dataclass(frozen=True)
class LaunchPlan:
    mode: str  # "standalone", "node-env" or "torchrun"
    device_type: str  # "cuda" or "cpu"
    nproc: int  # processes on this node
    node_rank: int
    world_size: int
    master_addr: str
    master_port: int
    gpus: Tuple[Gpu, ...] = ()  # every GPU this process sees

    @property
    def own_gpus(self) -> Tuple[Gpu, ...]:
        """The GPUs of this launcher's processes: under torchrun, this worker's one."""
        if self.mode == "torchrun":
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            return self.gpus[local_rank : local_rank + 1]
        return self.gpus[: self.nproc]

    @property
    def holds_rank_zero(self) -> bool:
        """Whether global rank 0 runs in this process (torchrun) or among its children."""
        if self.mode == "torchrun":
            return os.environ.get("RANK", "0") == "0"
        return self.node_rank == 0

    @property
    def hosts_rendezvous(self) -> bool:
        """Whether global rank 0, which listens on the master port, is one of this launcher's children."""
        return self.mode != "torchrun" and self.node_rank == 0

    @property
    def holds_local_rank_zero(self) -> bool:
        """Whether this node's local rank 0 runs in this process (torchrun) or among its children."""
        if self.mode == "torchrun":
            return os.environ.get("LOCAL_RANK", "0") == "0"
        return True

    def global_rank(self, local_rank: int) -> int:
        """The job's rank of this launcher's `local_rank`-th process."""
        return self.node_rank * self.nproc + local_rank

    def worker_env(self, local_rank: int) -> Dict[str, str]:
        """The torch.distributed env:// variables for one spawned process."""
        return {
            "RANK": str(self.global_rank(local_rank)),
            "WORLD_SIZE": str(self.world_size),
            "LOCAL_RANK": str(local_rank),
            "LOCAL_WORLD_SIZE": str(self.nproc),
            "GROUP_RANK": str(self.node_rank),
            "MASTER_ADDR": self.master_addr,
            "MASTER_PORT": str(self.master_port),
        }


def _env_int(environ: Mapping[str, str], name: str, minimum: int, maximum: Optional[int] = None) -> int:
    raw = environ.get(name, "")
    try:
        value = int(raw)
    except ValueError:
        raise UsageError(f"{name}={raw!r} must be an integer") from None
    if value < minimum:
        raise UsageError(f"{name}={raw!r} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise UsageError(f"{name}={raw!r} must be at most {maximum}")
    return value


def _env_port(environ: Mapping[str, str]) -> int:
    return _env_int(environ, "MASTER_PORT", 1, 65535)


def _master_addr(environ: Mapping[str, str]) -> str:
    addr = environ.get("MASTER_ADDR", "").strip()
    if not addr:
        raise UsageError("MASTER_ADDR is empty: set it to the address of the node that runs rank 0")
    return addr


def _check_torchrun_worker(config: Config, environ: Mapping[str, str], world_size: int) -> None:
    """The variables torchrun gives each worker; a pod that sets LOCAL_WORLD_SIZE itself looks like one too."""
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        if name not in environ:
            raise UsageError(
                f"LOCAL_WORLD_SIZE is set, so this process runs as a torchrun worker, but {name} is not: "
                "start it with torchrun, or leave LOCAL_WORLD_SIZE unset"
            )
    if _env_int(environ, "RANK", 0) >= world_size:
        raise UsageError(f"RANK={environ['RANK']} must be below WORLD_SIZE={world_size}")
    for option, value, name in (
        ("--nproc-per-node", config.process.nproc_per_node, "LOCAL_WORLD_SIZE"),
        ("--master-port", config.process.master_port, "MASTER_PORT"),
    ):
        if value is not None and str(value) != environ.get(name):
            raise UsageError(
                f"{option} {value} contradicts torchrun's {name}={environ.get(name)}: under torchrun, give it to "
                "torchrun, not to train.py"
            )


EPHEMERAL_PORTS = "/proc/sys/net/ipv4/ip_local_port_range"
LOWEST_PICKED_PORT = 20000


def ephemeral_ports() -> Tuple[int, int]:
    """The range the kernel picks from for outgoing connections (Linux's default where it cannot be read)."""
    try:
        with open(EPHEMERAL_PORTS) as f:
            low, high = map(int, f.read().split())
        return low, high
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A port free now for rank 0's store, chosen outside the ephemeral range: the kernel hands ports of that range
    to outgoing connections (every rank's, and every job's on the node) in the seconds before rank 0 listens, and
    a port it gave away there fails the job with EADDRINUSE. The kernel's own pick where nothing else is free."""
    low, high = ephemeral_ports()
    outside = [*range(LOWEST_PICKED_PORT, low), *range(high + 1, 65536)]
    for port in random.sample(outside, min(64, len(outside))):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))  # every address, as the store listens
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _local_process_count(config: Config, gpus: Sequence[Gpu]) -> int:
    process = config.process
    if process.cpu:
        return process.nproc_per_node or DEFAULT_CPU_PROCESSES
    visible = len(gpus)
    wanted = process.nproc_per_node or visible
    if wanted > visible:
        raise UsageError(f"--nproc-per-node {wanted} asks for more GPUs than the {visible} visible here")
    if process.nproc_per_node is not None and wanted < process.min_gpus:
        raise UsageError(f"--nproc-per-node {wanted} is below --min-gpus {process.min_gpus}: lower --min-gpus too")
    if wanted < process.min_gpus:
        raise UsageError(
            f"found {visible} GPU(s), fewer than --min-gpus {process.min_gpus}: "
            "pass --min-gpus 1 to train on fewer, or --cpu to run on CPU processes"
        )
    if wanted < 1:
        raise UsageError("no GPU is visible: pass --cpu to run on CPU processes")
    return wanted


def _check_gpu_features(config: Config, gpus: Sequence[Gpu]) -> None:
    # Compute capability, not torch.cuda.is_bf16_supported(): newer torch counts emulated bf16 (V100) as support.
    older = [gpu for gpu in gpus if gpu.capability < (8, 0)]
    if config.speed.amp == "bf16" and older:
        raise UsageError(f"--amp bf16 needs an Ampere or newer GPU; {older[0].name} lacks bfloat16: use --amp fp16")


def plan_launch(config: Config, environ: Mapping[str, str]) -> LaunchPlan:
    """Settle the launch mode and the process layout, refusing what cannot run."""
    device_type = config.process.device_type
    gpus = () if config.process.cpu else tuple(visible_gpus(environ))
    if "TORCHELASTIC_RUN_ID" in environ or "LOCAL_WORLD_SIZE" in environ:
        world_size = _env_int(environ, "WORLD_SIZE", 1)
        local_rank = _env_int(environ, "LOCAL_RANK", 0)
        _check_torchrun_worker(config, environ, world_size)
        if not config.process.cpu and local_rank >= len(gpus):
            raise UsageError(
                f"LOCAL_RANK {local_rank} has no GPU: {len(gpus)} visible here "
                "(start torchrun with --nproc-per-node at most the GPU count, or pass --cpu)"
            )
        plan = LaunchPlan(
            mode="torchrun",
            device_type=device_type,
            nproc=_env_int(environ, "LOCAL_WORLD_SIZE", 1),
            node_rank=_env_int(environ, "GROUP_RANK", 0) if environ.get("GROUP_RANK") else 0,
            world_size=world_size,
            master_addr=_master_addr(environ),
            master_port=_env_port(environ),
            gpus=gpus,
        )
    elif "WORLD_SIZE" in environ and "MASTER_ADDR" in environ:
        nnodes = _env_int(environ, "WORLD_SIZE", 1)
        node_rank = _env_int(environ, "RANK", 0) if "RANK" in environ else 0
        if node_rank >= nnodes:
            raise UsageError(f"RANK={node_rank} must be below WORLD_SIZE={nnodes} (they count nodes here)")
        if config.process.master_port is None and "MASTER_PORT" not in environ:
            raise UsageError("MASTER_ADDR is set but MASTER_PORT is not: set MASTER_PORT or pass --master-port")
        port = config.process.master_port or _env_port(environ)
        nproc = _local_process_count(config, gpus)
        plan = LaunchPlan("node-env", device_type, nproc, node_rank, nnodes * nproc, _master_addr(environ), port, gpus)
    else:
        if config.process.master_port is not None:
            port = config.process.master_port
        elif "MASTER_PORT" in environ:
            port = _env_port(environ)
        else:
            port = free_port()
        nproc = _local_process_count(config, gpus)
        plan = LaunchPlan("standalone", device_type, nproc, 0, nproc, "127.0.0.1", port, gpus)
    _check_gpu_features(config, plan.own_gpus)
    if config.training.dataset_size < plan.world_size:
        raise UsageError(
            f"--dataset-size {config.training.dataset_size} is smaller than the {plan.world_size} processes of this job"
        )
    if config.scenario.fail_rank >= plan.world_size:
        raise UsageError(f"--fail-rank {config.scenario.fail_rank} is not a rank of this {plan.world_size}-process job")
    slow = config.health.test_slow_rank
    if slow is not None and slow[0] >= plan.world_size:
        raise UsageError(
            f"RESNET_DDP_TEST_SLOW_RANK: rank {slow[0]} is not a rank of this {plan.world_size}-process job"
        )
    return plan


def run(config: Config, plan: LaunchPlan) -> int:
    if plan.mode == "torchrun":
        return _run_torchrun_worker(config, plan)
    return _spawn_and_supervise(config, plan)


def _before_torch(config: Config, plan: LaunchPlan, local_rank: int) -> None:
    """A rank's first steps, before it imports torch. Local rank 0 writes the job's bytecode cache where there is
    one (core/compile_cache.py): on a shared volume, one writer per node is enough. It also has SyncBatchNorm's
    kernels, or the parts of a compiled one-process model, compiled beside the ranks' start."""
    if local_rank != 0:
        if sys.pycache_prefix is not None:
            sys.dont_write_bytecode = True
    elif plan.gpus and kernel_prebuild.wanted(config, plan.gpus[0].shared):
        kernel_prebuild.start(device_index=0)
    elif compile_prebuild.wanted(config, plan.world_size, plan.gpus[0].shared if plan.gpus else None):
        compile_prebuild.start(config, device_index=0)


def _run_torchrun_worker(config: Config, plan: LaunchPlan) -> int:
    """This process is one of torchrun's workers: it dies with torchrun (from its first line, entry/cli.py, where
    torchrun started it), and an error that escapes reaches torchrun's failure report (its error file) through
    torch.distributed.elastic's `record`."""
    die_with_parent()
    _before_torch(config, plan, int(os.environ.get("LOCAL_RANK", "0")))
    from torch.distributed.elastic.multiprocessing.errors import record

    from resnet_ddp.entry import worker

    default_stop_signals()
    try:
        return record(worker.run_process)(config)
    except (UsageError, ReportedElsewhere) as exc:  # refused by the job itself (e.g. a ballast that cannot fit)
        if isinstance(exc, UsageError):
            _say(config, f"error: {exc}")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(REFUSED)  # the process group is up: skip a teardown that could wait on it


def _worker_main(local_rank: int, config: Config, plan: LaunchPlan, launcher_pid: int) -> None:
    """Entry of a spawned process: become a torch.distributed worker, then run the job. It starts with the stop
    signals held (launcher's stop_signals_held): a stop forwarded meanwhile ends it at default_stop_signals()."""
    die_with_parent(launcher_pid)
    phases.reached("rank start", until=stop_signal_pending)
    default_stop_signals()
    os.environ.update(plan.worker_env(local_rank))
    _before_torch(config, plan, local_rank)
    rank = os.environ["RANK"]
    try:
        from resnet_ddp.entry import worker

        code = worker.run_process(config)
    except UsageError as exc:
        _say(config, f"error: {exc}")
        code = REFUSED
    except ReportedElsewhere as exc:
        code = exc.code
    except Exception:  # outside the training (worker.py reports failures in it once, itself)
        _say(config, f"rank {rank} failed:\n{traceback.format_exc().rstrip()}")
        code = 1
    sys.stdout.flush()
    if code != 0:
        # Skip interpreter teardown: it can block on a process group whose peers are gone.
        os._exit(code)
    exit_process(0)


def _say(config: Config, message: str) -> None:
    """An error of a rank outside its training (its own console is closed by then), in the job's log format."""
    from resnet_ddp.observe import console

    console.setup_launcher(config.reporting.log_format, config.reporting.log_timestamps)
    log.error(message)


def _spawn_and_supervise(config: Config, plan: LaunchPlan) -> int:
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(
            target=_worker_main, args=(local_rank, config, plan, os.getpid()), name=f"resnet-ddp-rank{local_rank}"
        )
        for local_rank in range(plan.nproc)
    ]
    received: List[int] = []

    def forward_signal(signum, _frame):
        # In a container this launcher is PID 1, the only process Kubernetes signals.
        received.append(signum)
        for process in processes:
            if process.pid is not None and process.exitcode is None:
                os.kill(process.pid, signum)

    previous = {sig: signal.signal(sig, forward_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    # The first start would start multiprocessing's resource tracker, which unblocks the stop signals as it
    # returns, in the middle of stop_signals_held: start it before.
    multiprocessing.resource_tracker.ensure_running()
    summary_found = summary_file.summary_identity(config.save_dir)
    try:
        for local_rank, process in enumerate(processes):
            if local_rank:
                phases.reached("spawning", until=lambda: bool(received))
            with stop_signals_held():  # a signal from here on is forwarded once the rank has a pid
                if received:  # stopped while starting its ranks: start no more
                    break
                process.start()
        end = _supervise(processes, plan, received)
        if plan.hosts_rendezvous and end.code not in (0, REFUSED):
            _write_summary_where_rank_zero_did_not(config, plan, end, summary_found)
        return end.code
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _write_summary_where_rank_zero_did_not(
    config: Config, plan: LaunchPlan, end: JobEnd, found: Optional[Tuple[int, int]]
) -> None:
    """A job that failed or was stopped, whose rank 0 wrote no end to summary.json (it was killed, ended at once on
    a stop signal, exited, or failed outside its training; the save dir holds the summary `found` at the start,
    none, or rank 0's `running` one): what this launcher saw of the ending, in its place."""
    if summary_file.summary_identity(config.save_dir) != found and not summary_file.says_running(config.save_dir):
        return
    if end.code in STOP_CODES:
        outcome = RunOutcome.stopped(end.code - 128)
    else:
        rank, how = end.first_failure or (0, f"exited with code {end.code}")
        outcome = RunOutcome.failed(
            f"rank {rank} {how}", rank, socket.gethostname(), rank_error_known=False, exit_code=end.code
        )
    device = plan.own_gpus[0].name if plan.own_gpus else "cpu"
    summary_file.write_launcher_summary(config.save_dir, outcome, config, plan.world_size, device)


STOP_CODES = (128 + signal.SIGTERM, 128 + signal.SIGINT, -signal.SIGTERM, -signal.SIGINT)


@dataclass(frozen=True)
class JobEnd:
    code: int  # the launcher's exit code
    first_failure: Optional[Tuple[int, str]] = None  # the first rank seen failing, and how ("exited with code 3")


def _supervise(processes, plan: LaunchPlan, received: List[int]) -> JobEnd:
    """Wait for every rank; the first failure stops the rest and sets the exit code.

    A rank that exits 143 or 130 stopped on an agreed signal, and one killed by SIGTERM or SIGINT before it
    could handle them was stopped too: that is a stop, not a failure. Once one rank has stopped, the others
    get TERMINATE_GRACE_S to follow (they stop after the same step, or have nothing to save yet), then are
    killed: a rank still waiting for a peer that is gone would otherwise wait for --dist-timeout. Once the
    launcher has a stop signal, no rank's exit is a failure: the job was stopped. Rank 0 alone can tell a
    failure from a stop then, as its process holds the job's store, where a peer that ended on the signal
    counts itself: a rank 0 of this launcher that exits 1 failed (its stop's checkpoint could not be written),
    and so did the job. Ranks that
    have not stopped STOP_DEADLINE_S after the launcher's stop signal (one hangs, and the others wait on it)
    are killed, and the job still ends as stopped.
    """
    stopped_since: Optional[float] = None
    while True:
        # One reading of the exit codes per round: read twice, a rank that ended between the reads
        # was neither failed nor running, and the launcher exited 1 without naming it.
        codes = [p.exitcode for p in processes]
        failed = [(i, code) for i, code in enumerate(codes) if code not in (None, 0, *STOP_CODES)]
        # After a stop signal, a rank that breaks was stopped too: a peer still in its first step ended on the
        # signal at once, and the rank waiting on it found it gone (it says so itself, in its own words).
        if failed and not received:
            _report_failures(failed, plan)
            _terminate(processes)
            # Peers of a failed rank fail too, with 1, once their collectives break, and they may
            # end before we look: a more specific code (3 from --fail-mode exit, 2) says more.
            specific = [code for _, code in failed if code > 1]
            local_rank, code = failed[0]
            return JobEnd(specific[0] if specific else 1, (plan.global_rank(local_rank), _how_it_ended(code)))
        never_started = [p for p in processes if p.pid is None]
        running = [p for p, code in zip(processes, codes) if code is None and p.pid is not None]
        if not running:
            break
        if stopped_since is None and (received or any(code in STOP_CODES for code in codes)):
            stopped_since = time.monotonic()
        if (
            stopped_since is not None
            and time.monotonic() - stopped_since > TERMINATE_GRACE_S
            and (never_started or any(code is not None for code in codes))
        ):
            _terminate(running)
            break
        if received and stopped_since is not None and time.monotonic() - stopped_since > STOP_DEADLINE_S:
            _kill_unstopped(processes, plan, received[0])
            break
        multiprocessing.connection.wait([p.sentinel for p in running], timeout=1.0)
    codes = [p.exitcode for p in processes if p.pid is not None]
    stops = [code if code > 0 else 128 - code for code in codes if code]
    if received and plan.hosts_rendezvous and processes[0].exitcode == EXIT_FAILED:
        return JobEnd(EXIT_FAILED, (0, _how_it_ended(EXIT_FAILED)))  # rank 0 tells a failure from a stop
    if received:
        return JobEnd(128 + received[0])
    return JobEnd(stops[0] if stops else 0)


def _how_it_ended(exit_code: int) -> str:
    return f"was killed by {signal.Signals(-exit_code).name}" if exit_code < 0 else f"exited with code {exit_code}"


def _report_failures(failed, plan: LaunchPlan) -> None:
    for local_rank, code in failed:
        log.error(f"rank {plan.global_rank(local_rank)} {_how_it_ended(code)}; stopping the other ranks")


def _kill_unstopped(processes, plan: LaunchPlan, signum: int) -> None:
    """SIGKILL the ranks still running (of `processes`, every rank of this launcher), saying which."""
    running = [(i, p) for i, p in enumerate(processes) if p.pid is not None and p.exitcode is None]
    ranks = ", ".join(str(plan.global_rank(local_rank)) for local_rank, _ in running)
    log.error(
        f"rank {ranks} had not stopped {STOP_DEADLINE_S:.0f} s after {signal.Signals(signum).name} (a rank hangs, "
        "and the others wait on it): killing them"
    )
    for _, process in running:
        process.kill()
    for _, process in running:
        process.join()


def _terminate(processes) -> None:
    """SIGTERM, then SIGKILL after TERMINATE_GRACE_S."""
    for process in processes:
        if process.exitcode is None:
            process.terminate()
    for process in processes:
        process.join(TERMINATE_GRACE_S)
        if process.exitcode is None:
            process.kill()
            process.join()
