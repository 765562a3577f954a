"""How a run ended: the one place that maps it to the exit code, summary.json's exit_reason and the last line.

Without torch until a loop's stop reason is mapped (RunOutcome.of): the launcher, which never imports torch, says
with it how a job ended whose rank 0 could not (observe/summary_file.py)."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Tuple

if TYPE_CHECKING:
    from resnet_ddp.core.stopping import StopReason

# exit_reason in summary.json, by kind of ending: dashboards and tests read these words.
FINISHED, DURATION, SIGNAL, NONFINITE, FAILED = (
    "finished",
    "duration reached",
    "stopped by signal",
    "loss not finite",
    "failed",
)
EXIT_FAILED = 1


@dataclass(frozen=True)
class RunOutcome:
    exit_reason: str
    exit_code: int
    signum: Optional[int] = None
    first_nonfinite: Optional[Tuple[int, int]] = None  # (step, rank)
    error: Optional[str] = None  # FAILED: "Type: first line of the message"
    failed_rank: Optional[int] = None  # FAILED: the rank whose error came first
    failed_host: Optional[str] = None
    failed_error: Optional[str] = None  # FAILED: that rank's error, None where this rank could not learn it

    @classmethod
    def of(cls, reason: StopReason, diverged: Optional[Tuple[int, int]]) -> "RunOutcome":
        """The outcome of a loop that ended for `reason`; `diverged` is the first non-finite loss (step, rank)
        found under --nan-policy stop, which fails the run whatever else ended it."""
        from resnet_ddp.core.stopping import StopReason

        if diverged is not None:
            return cls(NONFINITE, EXIT_FAILED, first_nonfinite=diverged)
        if reason.kind == StopReason.SIGNAL:
            return cls.stopped(reason.signum)
        if reason.kind == StopReason.TIME_UP:
            return cls(DURATION, 0)
        if reason.kind == StopReason.NONFINITE:  # agreed, though no rank found it at the checkpoint
            return cls(NONFINITE, EXIT_FAILED, first_nonfinite=(reason.step, reason.rank))
        return cls(FINISHED, 0)

    @classmethod
    def stopped(cls, signum: int) -> "RunOutcome":
        return cls(SIGNAL, 128 + signum, signum=signum)

    @classmethod
    def failed(
        cls,
        error: str,
        rank: Optional[int],
        host: Optional[str] = None,
        *,
        rank_error_known: bool = True,
        exit_code: int = EXIT_FAILED,
    ) -> "RunOutcome":
        """`error`: the first failure's where known, else this rank's own (then not the failed rank's)."""
        first = error if rank_error_known else None
        return cls(FAILED, exit_code, error=error, failed_rank=rank, failed_host=host, failed_error=first)

    def stopped_late(self, signum: int) -> "RunOutcome":
        """A stop signal that came after the last step: the run's work is done, and the job was stopped all the
        same (its exit code says so)."""
        if self.exit_code:
            return self
        return RunOutcome(self.exit_reason, 128 + signum, signum=signum)

    @property
    def exports_model(self) -> bool:
        """model_final.pth is written for a run that ended as planned, not for a stopped or failed one."""
        return self.exit_reason in (FINISHED, DURATION)

    def summary_fields(self) -> dict:
        """What summary.json says of the ending."""
        fields = {"exit_reason": self.exit_reason, "exit_code": self.exit_code}
        if self.signum is not None:
            fields["signal"] = signal.Signals(self.signum).name
        fields["first_nonfinite_loss"] = (
            {"step": self.first_nonfinite[0], "rank": self.first_nonfinite[1]} if self.first_nonfinite else None
        )
        if self.exit_reason == FAILED:
            fields["error"] = self.error
            fields["first_failure"] = {"rank": self.failed_rank, "host": self.failed_host, "error": self.failed_error}
        return fields

    def error_line(self) -> Optional[str]:
        """The line on stderr that says why the run failed, where the run's own loop found it."""
        if self.first_nonfinite is not None:
            step, rank = self.first_nonfinite
            return (
                f"error: the loss was not finite at step {step} on rank {rank} (--nan-policy stop); "
                "no checkpoint was written after it"
            )
        return None
