"""Faults on purpose, for testing how a platform handles failures: a chosen rank fails at a chosen step the way
a real fault would (a Python error, an exit, SIGKILL, a hang, running out of memory, a NaN loss).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Callable, List

import torch

from resnet_ddp.config import ALL_RANKS, ScenarioConfig
from resnet_ddp.core.callbacks import Callback

log = logging.getLogger(__name__)

OOM_CHUNK_BYTES = 2**30
# More than any address space (x86-64 and arm64 map at most 2**57 bytes): the allocator
# refuses at once, as it refuses a real allocation it cannot serve, and nothing is touched.
IMPOSSIBLE_CPU_BYTES = 2**62


class InjectedFault(RuntimeError):
    """The Python error raised by --fail-mode exception."""


class FaultInjector(Callback):
    """--fail-at-step, --fail-rank, --fail-mode: strikes before the chosen step on the chosen rank(s)."""

    def __init__(
        self, config: ScenarioConfig, rank: int, device: torch.device, before_failing: Callable[[], None] = lambda: None
    ):
        """`before_failing` runs just before a fault strikes: the job lets an in-flight checkpoint write finish,
        so that the newest checkpoint a restart finds is always the last one the job started (reproducible)."""
        targeted = config.fail_rank in (ALL_RANKS, rank)
        self.fail_at_step = config.fail_at_step if targeted else None
        self.mode = config.fail_mode
        self.rank = rank
        self.device = device
        self.before_failing = before_failing
        # --fail-mode nan: the step multiplies its loss by this (NaN at the chosen step, else 1).
        self.loss_poison = (
            torch.ones((), device=device) if self.fail_at_step is not None and self.mode == "nan" else None
        )
        self._poisoned = False

    def before_step(self, state) -> None:
        """Does nothing unless the step about to run (global_step + 1, 1-based) is the chosen one."""
        if self._poisoned:  # the NaN was for one step only
            self.loss_poison.fill_(1.0)
            self._poisoned = False
        step = state.global_step + 1
        if step != self.fail_at_step:
            return
        self.before_failing()
        log.warning(f"injecting fault {self.mode!r} at step {step}")
        sys.stdout.flush()
        sys.stderr.flush()
        if self.mode == "exception":
            raise InjectedFault(f"fault injected by --fail-at-step {step} on rank {self.rank}")
        if self.mode == "exit":
            os._exit(3)
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "hang":
            # Alive but out of every collective: the others must give up after --dist-timeout.
            while True:
                time.sleep(3600)
        if self.mode == "oom":
            exhaust_memory(self.device)
        if self.mode == "nan":
            self.loss_poison.fill_(float("nan"))  # on the stream, so a graph replay reads it too
            self._poisoned = True


def exhaust_memory(device: torch.device) -> None:
    """Fail with the allocator's own out-of-memory error, as a job that outgrows its memory does.

    On a GPU: allocate until the card is full (torch.cuda.OutOfMemoryError,
    torch.OutOfMemoryError in newer torch); what was taken stays held while the
    error ends the process. On CPU, where filling memory would hurt the whole
    machine: one request larger than any address space, which the allocator
    refuses at once with the error a failed allocation raises (a RuntimeError,
    'DefaultCPUAllocator: can't allocate memory', in torch 2.2 to 2.14).
    """
    if device.type == "cuda":
        held: List[torch.Tensor] = []
        while True:
            held.append(torch.empty(OOM_CHUNK_BYTES, dtype=torch.uint8, device=device))
    torch.empty(IMPOSSIBLE_CPU_BYTES, dtype=torch.uint8)
