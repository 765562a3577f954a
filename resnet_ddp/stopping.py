"""Agreeing to stop: a signal to any rank becomes a stop at the same step on every rank.

SIGTERM (Kubernetes' preemption and deletion) and SIGINT only set a flag here,
and so does the end of --duration on a rank whose clock says the time is up
(flag TIME_UP, below any signal number, so that a signal wins).
Each step every rank contributes its flag to an all-reduce (MAX) on a small gloo
group of its own, started asynchronously and read one step later, so the
training stream never waits on it and every rank reads the same answer after
the same step.
"""

from __future__ import annotations

import signal
from typing import Optional

import torch
import torch.distributed as dist

from resnet_ddp import telemetry

HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
TIME_UP = 1  # not a signal: --duration has run out


class StopAgreement:
    def __init__(self, rank: int):
        self.rank = rank
        self.requested = 0  # the first signal number received, 0 for none
        self.group = dist.new_group(backend="gloo")
        self._flag = torch.zeros(1, dtype=torch.int64)
        self._pending: Optional[dist.Work] = None
        for sig in HANDLED_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        if self.requested in (0, TIME_UP):
            self.requested = signum

    def time_is_up(self) -> None:
        if not self.requested:
            self.requested = TIME_UP

    def poll(self) -> int:
        """Called once after every step on every rank: the agreed signal (0 to go on) as of the previous call."""
        agreed = 0
        if self._pending is not None:
            self._pending.wait()
            agreed = int(self._flag.item())  # a CPU tensor: no device sync
        if agreed:
            self._pending = None
            return agreed
        self._flag.fill_(self.requested)
        self._pending = dist.all_reduce(self._flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return 0

    def settle(self) -> int:
        """Finish the collective in flight (every rank calls this at the same point); return the agreed signal."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None
            return int(self._flag.item())
        return 0

    def announce(self, code: int, global_step: int) -> None:
        reason = "--duration reached" if code == TIME_UP else signal.Signals(code).name
        telemetry.log(self.rank, f"stopping after step {global_step} ({reason})")

    def barrier(self) -> None:
        dist.barrier(group=self.group)
