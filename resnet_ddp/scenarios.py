"""Fault injection: make a chosen rank fail at a chosen step, the way a real fault would."""

from __future__ import annotations

import os
import signal
import sys
import time

from resnet_ddp import telemetry
from resnet_ddp.config import ALL_RANKS, Config


class InjectedFault(RuntimeError):
    """The Python error raised by --fail-mode exception."""


class FaultInjector:
    def __init__(self, config: Config, rank: int):
        targeted = config.fail_rank in (ALL_RANKS, rank)
        self.fail_at_step = config.fail_at_step if targeted else None
        self.mode = config.fail_mode
        self.rank = rank

    def before_step(self, global_step: int) -> None:
        """Called with the 1-based global step about to run; does nothing unless it is the chosen one."""
        if global_step != self.fail_at_step:
            return
        telemetry.log(self.rank, f"injecting fault {self.mode!r} at step {global_step}")
        sys.stderr.flush()
        if self.mode == "exception":
            raise InjectedFault(f"fault injected by --fail-at-step {global_step} on rank {self.rank}")
        if self.mode == "exit":
            os._exit(3)
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "hang":
            # Alive but out of every collective: the others must give up after --dist-timeout.
            while True:
                time.sleep(3600)
