"""One training process from start to end: join the group, check, build, train, report, tear down.

Every launch mode ends up here, once per process, after the process group's
environment is set (by our launcher or by torchrun). Whatever ends the run, the
parts built for it are closed in one place (an ExitStack), and a failure is
reported once: the rank that failed first says why on the console, with its
traceback; ranks that failed because of it say so in one line (their tracebacks go
to their log files), and rank 0 names the first failure in summary.json.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import traceback
from typing import Optional

import torch.distributed as dist

from resnet_ddp.config import Config
from resnet_ddp.core import distributed, phases
from resnet_ddp.core.outcome import EXIT_FAILED, RunOutcome
from resnet_ddp.core.stopping import StopReason, first_signal
from resnet_ddp.errors import CheckpointWriteError, ReportedElsewhere, UsageError
from resnet_ddp.observe import console as console_setup
from resnet_ddp.observe.metrics import MetricsLog, metrics_path
from resnet_ddp.observe.summary import RunFacts, write_failure_summary

log = logging.getLogger(__name__)

LOG_FILE = os.path.join("logs", "rank{rank}.log")


def run_process(config: Config) -> int:
    """The exit code of this process's part of the job."""
    phases.reached("rendezvous")
    rank = distributed.init_process_group(config.process.device_type, config.process.dist_timeout)
    log_file = os.path.join(config.save_dir, LOG_FILE.format(rank=rank.rank))
    console = console_setup.setup(
        rank.rank, config.reporting.quiet, log_file, config.reporting.log_format, config.reporting.log_timestamps
    )
    try:
        code = _preflight(config, rank) if config.health.preflight != "off" else None
        if code is None:
            code = _train(config, rank, console, log_file)
    finally:
        console.close()
    distributed.destroy_process_group()
    return code


def _preflight(config: Config, rank: distributed.RankInfo) -> Optional[int]:
    """The checks, on every rank; the exit code if the job ends here (strict findings, --preflight-only)."""
    from resnet_ddp.health import preflight

    findings = preflight.run(config, rank)
    if findings and config.health.preflight == "strict":
        if rank.is_main:  # the job failed: summary.json says why, as for any failed run
            from resnet_ddp.entry.build import device_name

            error = preflight.strict_ending(findings, config.save_dir)
            outcome = RunOutcome.failed(error, rank.rank, distributed.placement(rank)["host"])
            facts = RunFacts(config, rank.world_size, device_name(rank.device))
            write_failure_summary(config.save_dir, facts, outcome, steps=0, epochs_done=0)
        dist.barrier()  # every rank ends once rank 0 has written its reports: the first exit stops the rest
        return EXIT_FAILED
    return 0 if config.health.preflight_only else None


def _train(config: Config, rank: distributed.RankInfo, console, log_file: str) -> int:
    from resnet_ddp.entry.build import build_trainer, device_name

    facts = RunFacts(config, rank.world_size, device_name(rank.device))
    facts.mark("joined")  # imports done, the process group formed
    trainer = None
    with contextlib.ExitStack() as stack:
        metrics = MetricsLog(metrics_path(config.save_dir, rank.node), rank.rank)
        stack.callback(metrics.close)
        try:
            trainer = build_trainer(config, rank, console, metrics, facts, stack)
            outcome = trainer.train()
            late = first_signal()  # a signal during the end's work: the job was stopped all the same
            return outcome.stopped_late(late).exit_code if late else outcome.exit_code
        except (UsageError, ReportedElsewhere):
            raise  # a refusal: the launcher says it in one line and exits 2
        except Exception as exc:
            console.stop_bar()
            signum = first_signal()
            if signum is not None and not isinstance(exc, CheckpointWriteError) and distributed.broken_by_a_stop():
                outcome = _stopped_unagreed(signum, log_file)
            else:
                outcome = _failed(exc, rank, log_file)
            _record_the_end(outcome, config, rank, facts, trainer, metrics)
            return outcome.exit_code


def _failed(exc: Exception, rank: distributed.RankInfo, log_file: str) -> RunOutcome:
    """Say why this rank failed, once, where it belongs; the outcome names the first failure (for the `end`
    record, and rank 0's summary.json)."""
    error = one_line(exc)
    place = distributed.placement(rank)
    first = distributed.record_failure(place, error, rank.local_world_size)
    _tell_torchrun(exc)
    how = "failed first"
    if first is None and not rank.is_main:
        # The job's store lives in rank 0's process (or torchrun's agent): unreachable, that ended first.
        first, how = {"rank": 0, "host": None, "error": None}, "ended first"
    elif first is not None and first.get("ended"):
        how = "ended first, without an error (killed, as by the OOM killer, or it exited)"
    if first is None or first["rank"] == rank.rank:
        _say_why(exc, error, log_file)
    else:
        who = f"rank {first['rank']}" + (f" (host {first['host']})" if first["host"] else "")
        log.error(f"failed because {who} {how}: {error} (traceback in {log_file})")
        log.debug(traceback.format_exc().rstrip())  # the log file's only
    cause = first or {"rank": rank.rank, "host": place["host"], "error": error}
    return RunOutcome.failed(
        cause["error"] or error, cause["rank"], cause["host"], rank_error_known=cause["error"] is not None
    )


def _stopped_unagreed(signum: int, log_file: str) -> RunOutcome:
    """A stop signal came, and then the job broke: a peer had ended on the signal at once (it had not finished
    its first step, so had nothing to save) while this rank had finished its first and waited to agree on a step.
    The job was stopped, with nothing saved: this rank says so in one line and exits as a stopped rank does.
    (A signal that comes because a peer failed, from a launcher stopping the rest, is no such stop: the store
    says which, distributed.broken_by_a_stop.)"""
    outcome = RunOutcome.of(StopReason(StopReason.SIGNAL, signum=signum), None)
    log.info(
        f"stopped by {signal.Signals(signum).name} before the ranks agreed on a step: a rank still in its first "
        f"step ended at once, and this run's steps are not saved (what broke is in {log_file})"
    )
    log.debug(traceback.format_exc().rstrip())  # the log file's only
    return outcome


def _record_the_end(
    outcome: RunOutcome, config: Config, rank: distributed.RankInfo, facts: RunFacts, trainer, metrics: MetricsLog
) -> None:
    """A broken run's `end` record, and (rank 0) its summary.json, from what this rank knows."""
    steps = trainer.state.global_step if trainer is not None else 0
    with contextlib.suppress(Exception):  # a full disk may refuse even this line
        metrics.record({"kind": "end", "global_step": steps, **outcome.summary_fields()})
    if rank.is_main:
        epochs = trainer.state.epoch - 1 if trainer is not None else 0
        write_failure_summary(config.save_dir, facts, outcome, steps, epochs)


def _say_why(exc: Exception, error: str, log_file: str) -> None:
    """The root cause, on the console: one line for what the user can act on, a traceback for a bug."""
    if isinstance(exc, CheckpointWriteError):  # a full or read-only disk
        log.error(f"error: {exc}")
    elif out_of_memory(exc):
        log.error(
            f"error: out of memory: {error} (a smaller --batch-size or --image-size needs less; the "
            f"traceback is in {log_file})"
        )
        log.debug(traceback.format_exc().rstrip())
    else:
        log.error(f"failed:\n{traceback.format_exc().rstrip()}")


def out_of_memory(exc: BaseException) -> bool:
    """The allocator's own error (a GPU's or the host's), not a bug."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))


def _tell_torchrun(exc: BaseException) -> None:
    """Under torchrun, its failure report (and a TrainJob's) names this error, not `error_file: <N/A>`."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return
    with contextlib.suppress(Exception):
        from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

        ErrorHandler().record_exception(exc)


def one_line(exc: BaseException) -> str:
    """'Type: first line of the message', at most 500 characters."""
    message = (str(exc).strip().splitlines() or [""])[0][:500]
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
