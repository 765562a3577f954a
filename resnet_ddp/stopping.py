"""Agreeing to stop: a signal to any rank becomes a stop at the same step on every rank.

SIGTERM (Kubernetes' preemption and deletion) and SIGINT only set a flag here,
and so does the end of --duration on a rank whose clock says the time is up
(flag TIME_UP, below any signal number, so that a signal wins).
Each step every rank contributes its flag to an all-reduce (MAX) on a small gloo
group of its own, started asynchronously and read one step later, so the
training stream never waits on it and every rank reads the same answer after
the same step.

The same all-reduce carries the few other things every rank must agree on at
the same step, each in a slot of its own where MAX gives the answer: the first
non-finite loss (--nan-policy stop ends the run on it), the load phase (rank 0's
clock decides; load.py) and the slowest rank's busy time of its last step (the
duty cycle's sleeps are the same length on every rank).
"""

from __future__ import annotations

import signal
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from resnet_ddp import telemetry

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TIME_UP = 1  # not a signal: --duration has run out
NONFINITE = 1000  # not a signal: a loss was not finite under --nan-policy stop; wins over any signal

STOP, NONFINITE_AT, PHASE, BUSY_US = range(4)  # the slots
_LATEST = 2**62  # NONFINITE_AT holds _LATEST - (step << 24 | rank): MAX finds the earliest step, then the lowest rank
_RANK_BITS = 24


class StopAgreement:
    def __init__(self, rank: int):
        self.rank = rank
        self.requested = 0  # the first signal number received, 0 for none
        self.group = dist.new_group(backend="gloo")
        self._flag = torch.zeros(4, dtype=torch.int64)
        self._flag_values = self._flag.numpy()  # the same memory: filled in place each step
        self._offers = [0, 0, 0, 0]
        self.agreed = [0, 0, 0, 0]  # the slots as of the last poll
        self._pending: Optional[dist.Work] = None
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.requested in (0, TIME_UP):
            self.requested = signum

    def time_is_up(self) -> None:
        if not self.requested:
            self.requested = TIME_UP

    def nonfinite_at(self, global_step: int) -> None:
        """This rank's loss was not finite at this step, under --nan-policy stop."""
        self.requested = NONFINITE
        key = _LATEST - (global_step << _RANK_BITS | self.rank)
        self._offers[NONFINITE_AT] = max(self._offers[NONFINITE_AT], key)

    def offer(self, slot: int, value: int) -> None:
        """What this rank puts in a slot of the next all-reduce (PHASE, BUSY_US)."""
        self._offers[slot] = value

    @property
    def first_nonfinite(self) -> Optional[Tuple[int, int]]:
        """(step, rank) of the earliest non-finite loss agreed on, if any."""
        key = self.agreed[NONFINITE_AT]
        if not key:
            return None
        packed = _LATEST - key
        return packed >> _RANK_BITS, packed & (2**_RANK_BITS - 1)

    def poll(self) -> int:
        """Called once after every step on every rank: the agreed signal (0 to go on) as of the previous call."""
        agreed = 0
        if self._pending is not None:
            self._pending.wait()
            self.agreed = self._flag.tolist()  # a CPU tensor: no device sync
            agreed = self.agreed[STOP]
        if agreed:
            self._pending = None
            return agreed
        self._flag_values[:] = [self.requested, *self._offers[1:]]
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return 0

    def settle(self) -> int:
        """Finish the collective in flight (every rank calls this at the same point); return the agreed signal."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
            self.agreed = self._flag.tolist()
            return self.agreed[STOP]
        return 0

    def announce(self, code: int, global_step: int) -> None:
        if code == NONFINITE:
            step, rank = self.first_nonfinite or (0, 0)
            reason = f"loss not finite at step {step} on rank {rank}, --nan-policy stop"
        else:
            reason = "--duration reached" if code == TIME_UP else signal.Signals(code).name
        telemetry.log(self.rank, f"stopping after step {global_step} ({reason})")

    def barrier(self) -> None:
        dist.barrier(group=self.group)
