"""A rank made slow on purpose, for tests only: RESNET_DDP_TEST_SLOW_RANK=RANK:SECONDS (PREFLIGHT.md)."""

from __future__ import annotations

import time
from typing import Optional, Tuple

import torch


class TestSlowdown:
    __test__ = False  # not a pytest class
    """RESNET_DDP_TEST_SLOW_RANK=RANK:SECONDS, for tests only: that rank does SECONDS of extra work
    at the start of every training step's forward pass and with every timed preflight matmul.

    On a GPU the work is a spin kernel (torch.cuda._sleep) on the current stream,
    so it occupies the GPU (and is captured into a CUDA graph) without a host
    sync; on CPU it is a sleep.
    """

    def __init__(self, chosen: Optional[Tuple[int, float]], rank: int, device: torch.device):
        """`chosen`: (rank, seconds) from --test-slow-rank, or None."""
        self.seconds = chosen[1] if chosen is not None and chosen[0] == rank else 0.0
        self.device = device
        if self.seconds and self.device.type == "cuda":
            self._cycles_per_s = _spin_cycles_per_second(self.device)

    def __bool__(self) -> bool:
        return self.seconds > 0

    def work(self) -> None:
        if not self.seconds:
            return
        if self.device.type != "cuda":
            time.sleep(self.seconds)
            return
        torch.cuda._sleep(int(self.seconds * self._cycles_per_s))

    def install(self, module: torch.nn.Module) -> None:
        """On the bare module (no wrapper): before every forward pass."""
        if self:
            module.register_forward_pre_hook(lambda *_: self.work())


def _spin_cycles_per_second(device: torch.device) -> float:
    """How many torch.cuda._sleep cycles make a second on this GPU (measured once, outside the step)."""
    cycles = 10_000_000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(cycles)  # warm-up
    start.record()
    torch.cuda._sleep(cycles)
    end.record()
    end.synchronize()
    return cycles / (start.elapsed_time(end) / 1000.0)
