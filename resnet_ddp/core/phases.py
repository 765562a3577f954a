"""The phases of a process's life, marked so that a test can stop it at one.

RESNET_DDP_TEST_PAUSE_AT=<phase> (tests only) makes every process that reaches
that phase say so on stderr and wait there, so that a test sends its signal at a
known point instead of after a guessed delay. Without the variable, `reached`
costs one dictionary lookup. `<phase>@<rank>` pauses that rank only, and a
comma-separated list pauses at each. The phases, in order: imports, checks, spawning (the
launcher, between starting two ranks), rank start (a spawned rank, its stop signals
still held), rendezvous, model build, first step, first step ending (a rank that has
trained its first step, before it counts as having one), first step ended, steady
training, epoch end, final export; and in rank 0's checkpoint writer, checkpoint recorded (checkpoints.json names
the new file, which has no name yet) and checkpoint written (named, not yet pruned).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Callable

from resnet_ddp.core.callbacks import Callback

PAUSE_ENV = "RESNET_DDP_TEST_PAUSE_AT"
PAUSE_LIMIT_S = 120.0  # then the process goes on: a test that never signals must not hang the suite


def reached(phase: str, until: Callable[[], bool] = lambda: False) -> None:
    """Pause here if a test asked for this phase, until `until()` (a stop was asked for) or the limit."""
    asked = os.environ.get(PAUSE_ENV)
    if not asked or not _asked_here(asked, phase):
        return
    # One write: ranks sharing the launcher's stderr must not interleave their lines.
    sys.stderr.write(f"resnet-ddp: paused at {phase} (pid {os.getpid()}, {PAUSE_ENV})\n")
    sys.stderr.flush()
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while time.monotonic() < deadline and not until():
        time.sleep(0.05)  # signal handlers run between the sleeps


def _asked_here(asked: str, phase: str) -> bool:
    for item in asked.split(","):
        name, _, rank = item.partition("@")
        if name == phase and (not rank or rank == os.environ.get("RANK")):
            return True
    return False


def pausing() -> bool:
    return PAUSE_ENV in os.environ


class TrainingPhases(Callback):
    """The phases inside training, for RESNET_DDP_TEST_PAUSE_AT: each pause ends once a stop is requested."""

    def __init__(self, stop_requested: Callable[[], bool]):
        self.until = stop_requested
        self._steady_at = None

    def on_start(self, state) -> None:
        reached("first step", self.until)
        self._steady_at = state.global_step + 3

    def after_step(self, state) -> None:
        if state.global_step == self._steady_at:
            reached("steady training", self.until)

    def on_epoch_end(self, state, losses) -> None:
        reached("epoch end", self.until)

    def on_end(self, state, outcome) -> None:
        reached("final export", self.until)
