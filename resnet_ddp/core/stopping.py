"""Why a run stops, and agreeing to stop: every rank stops after the same step, for the same reason.

SIGTERM (Kubernetes' preemption and deletion) and SIGINT only set a flag here,
and so does the end of --duration on a rank whose clock says the time is up.
After every step each rank contributes its flag to an all-reduce (MAX) on a small
gloo group of its own, started asynchronously and read one step later, so the
training stream never waits on it and every rank reads the same answer after the
same step. The end of --epochs and --max-steps needs no agreement: every rank
counts the same steps.

The same all-reduce carries the few other things every rank must agree on at the
same step, each in a slot of its own where MAX gives the answer: the first
non-finite loss (--nan-policy stop ends the run on it), the load phase (rank 0's
clock decides; scenarios/load.py) and the slowest rank's busy time of its last
step (the duty cycle's sleeps are the same length on every rank).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from resnet_ddp.core import distributed, phases

log = logging.getLogger(__name__)

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list = []  # the stop signals this process has received


def signal_received() -> bool:
    """Whether a stop signal has reached this process (for work after the loop that should cut itself short)."""
    return bool(_received)


def first_signal() -> Optional[int]:
    return _received[0] if _received else None


@dataclass(frozen=True)
class StopReason:
    """Why the loop ends. `kind` is one of the names below; a signal and a non-finite loss say more."""

    kind: str
    signum: Optional[int] = None  # SIGNAL
    step: Optional[int] = None  # NONFINITE: the first step whose loss was not finite ...
    rank: Optional[int] = None  # ... and the lowest rank where it was

    FINISHED = "finished"  # the last step of --epochs
    MAX_STEPS = "max steps"
    TIME_UP = "time up"  # --duration
    SIGNAL = "signal"
    NONFINITE = "nonfinite"  # under --nan-policy stop

    @property
    def completes_epoch(self) -> bool:
        """The run ends where it was meant to: the epoch in progress gets its line and its checkpoint."""
        return self.kind in (self.FINISHED, self.MAX_STEPS)

    def describe(self) -> str:
        if self.kind == self.SIGNAL:
            return signal.Signals(self.signum).name
        if self.kind == self.TIME_UP:
            return "--duration reached"
        if self.kind == self.NONFINITE:
            return f"loss not finite at step {self.step} on rank {self.rank}, --nan-policy stop"
        return self.kind


# What a rank offers in the STOP slot: 0 to go on; the larger wins, so a signal beats the clock.
_TIME_UP_CODE = 1
_NONFINITE_CODE = 1000  # beats any signal: the run has failed
STOP, NONFINITE_AT, PHASE, BUSY_US = range(4)  # the slots
_LATEST = 2**62  # NONFINITE_AT holds _LATEST - (step << 24 | rank): MAX finds the earliest step, then the lowest rank
_RANK_BITS = 24


class RunLength:
    """What ends a run by itself: the last step of --epochs or --max-steps, and --duration's deadline."""

    def __init__(self, last_step: int, ends_by_max_steps: bool, duration_s: Optional[float]):
        self.last_step = last_step  # the global step after which the run ends, whatever ends it
        self.ends_by_max_steps = ends_by_max_steps
        self.duration_s = duration_s
        self.started = time.perf_counter()

    @classmethod
    def of(
        cls,
        epochs: int,
        max_steps: Optional[int],
        duration_s: Optional[float],
        global_step: int,
        epoch: int,
        step_in_epoch: int,
        steps_per_epoch: int,
    ) -> "RunLength":
        """From where this process starts: steps already done count, and so do the steps still to come."""
        by_epochs = global_step + (epochs - epoch + 1) * steps_per_epoch - step_in_epoch
        ends_by_max_steps = max_steps is not None and max_steps < by_epochs
        return cls(max_steps if ends_by_max_steps else by_epochs, ends_by_max_steps, duration_s)

    def start_clock(self) -> None:
        self.started = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.started

    def time_is_up(self) -> bool:
        return self.duration_s is not None and self.elapsed_s() >= self.duration_s

    def reached(self, global_step: int) -> Optional[StopReason]:
        if global_step < self.last_step:
            return None
        return StopReason(StopReason.MAX_STEPS if self.ends_by_max_steps else StopReason.FINISHED)

    def eta_s(self, global_step: int, step_s: float) -> float:
        """Time to the end at `step_s` a step: the steps left, or --duration's deadline if that comes first."""
        by_steps = (self.last_step - global_step) * step_s
        if self.duration_s is None:
            return by_steps
        return max(0.0, min(by_steps, self.duration_s - self.elapsed_s()))

    def fraction_done(self, global_step: int) -> float:
        """How far along the run is, by steps or by --duration, whichever is further (so, whichever ends it)."""
        by_steps = global_step / self.last_step if self.last_step > 0 else 1.0
        if self.duration_s is None:
            return min(1.0, by_steps)
        return min(1.0, max(by_steps, self.elapsed_s() / self.duration_s))


class StopAgreement:
    """The per-step agreement. `poll(global_step)` after every step returns a StopReason, or None to go on."""

    def __init__(self, rank: int, length: RunLength, group, heartbeat: Callable[[], None] = lambda: None):
        """`group`: a gloo group of every rank, for the agreement's small collectives off the training stream;
        `heartbeat` is called on every poll and tick (the progress watchdog's beat)."""
        self.rank = rank
        self.length = length
        self.heartbeat = heartbeat
        self.requested = 0  # the first signal number received, 0 for none
        self.group = group
        self._flag = torch.zeros(4, dtype=torch.int64)
        self._flag_values = self._flag.numpy()  # the same memory: filled in place each step
        self._offers = [0, 0, 0, 0]
        self.agreed = [0, 0, 0, 0]  # the slots as of the last poll
        self._pending: Optional[dist.Work] = None
        self._nonfinite = False
        self._stepped = False  # a step has run to its end (the first compiles, autotunes, captures)
        install_stop_handlers(self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        _received.append(signum)
        if not self._stepped:
            # Still starting (the first step may compile for a minute): nothing to save yet, and a stop
            # agreed after that step would come too late for a pod's grace period. End now.
            distributed.count_a_stop_at_once()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)
        if not self.requested:
            self.requested = signum

    def nonfinite_at(self, global_step: int) -> None:
        """This rank's loss was not finite at this step, under --nan-policy stop."""
        self._nonfinite = True
        key = _LATEST - (global_step << _RANK_BITS | self.rank)
        self._offers[NONFINITE_AT] = max(self._offers[NONFINITE_AT], key)

    def offer(self, slot: int, value: int) -> None:
        """What this rank puts in a slot of the next all-reduce (PHASE, BUSY_US)."""
        self._offers[slot] = value

    def tick(self) -> bool:
        """While waiting between steps (a duty cycle's sleep): feed the watchdog; True if this rank wants to stop."""
        self.heartbeat()
        return bool(self._code())

    def _code(self) -> int:
        if self._nonfinite:
            return _NONFINITE_CODE
        if self.requested:
            return self.requested
        return _TIME_UP_CODE if self.length.time_is_up() else 0

    def poll(self, global_step: int) -> Optional[StopReason]:
        """Called after every step on every rank: the agreed reason to stop as of the previous call, or the end
        of the run's steps, or None to go on. A reason that interrupts the run is announced in a line."""
        if not self._stepped:
            phases.reached("first step ending")
            self._stepped = True
            phases.reached("first step ended", until=lambda: bool(self.requested))
        self.heartbeat()
        code = 0
        if self._pending is not None:
            self._pending.wait()
            self.agreed = self._flag.tolist()  # a CPU tensor: no device sync
            code = self.agreed[STOP]
        if code:
            self._pending = None
            reason = self._reason(code)
            log.info(f"stopping after step {global_step} ({reason.describe()})")
            return reason
        self._flag_values[:] = [self._code(), *self._offers[1:]]
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return self.length.reached(global_step)

    def _reason(self, code: int) -> StopReason:
        if code == _NONFINITE_CODE:
            step, rank = self.first_nonfinite or (0, 0)
            return StopReason(StopReason.NONFINITE, step=step, rank=rank)
        if code == _TIME_UP_CODE:
            return StopReason(StopReason.TIME_UP)
        return StopReason(StopReason.SIGNAL, signum=code)

    @property
    def first_nonfinite(self) -> Optional[Tuple[int, int]]:
        """(step, rank) of the earliest non-finite loss agreed on, if any."""
        key = self.agreed[NONFINITE_AT]
        if not key:
            return None
        packed = _LATEST - key
        return packed >> _RANK_BITS, packed & (2**_RANK_BITS - 1)

    def close(self) -> None:
        """At the end, on every rank: finish the collective in flight (a signal that comes with the last step is
        too late: the run is complete), then wait for every rank."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
        dist.barrier(group=self.group)


def install_stop_handlers(handler) -> None:
    for sig in HANDLED_SIGNALS:
        signal.signal(sig, handler)
