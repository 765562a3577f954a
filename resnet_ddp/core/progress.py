"""Where training stands: what a checkpoint records, and what the loop and its callbacks see after every step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch


@dataclass
class Progress:
    """What a checkpoint records besides the weights."""

    epoch: int = 1  # the epoch in progress, from 1
    step_in_epoch: int = 0  # steps of that epoch already done
    global_step: int = 0  # steps done in all
    epoch_loss_sum: float = 0.0  # this rank's, so that a resumed epoch's line reports the whole epoch


@dataclass(frozen=True)
class EpochLosses:
    """An epoch's mean loss on this rank and over every rank (the original example's lines)."""

    epoch: int
    steps: int  # the epoch's steps (fewer than an epoch's where --max-steps ended it)
    per_rank_sums: List[float]
    rank: int

    @property
    def mine(self) -> float:
        return self.per_rank_sums[self.rank] / self.steps

    @property
    def everyone(self) -> float:
        return sum(self.per_rank_sums) / (self.steps * len(self.per_rank_sums))


class TrainState:
    """The run as the loop advances it. The loss sum stays on the device: reading it is a host sync, done only
    where a line, an epoch's end or a checkpoint needs it."""

    def __init__(self, progress: Progress, steps_per_epoch: int, device: torch.device):
        self.epoch = progress.epoch
        self.step_in_epoch = progress.step_in_epoch
        self.global_step = progress.global_step
        self.first_step = progress.global_step  # where this process started
        self.steps_per_epoch = steps_per_epoch
        self.loss_sum = torch.full((), progress.epoch_loss_sum, device=device)  # this epoch's, on this rank

    @property
    def epoch_complete(self) -> bool:
        return self.step_in_epoch >= self.steps_per_epoch

    @property
    def steps_run(self) -> int:
        """Steps this process has run."""
        return self.global_step - self.first_step

    def step_done(self, loss: torch.Tensor) -> None:
        self.loss_sum += loss
        self.global_step += 1
        self.step_in_epoch += 1

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.loss_sum.zero_()

    def progress(self) -> Progress:
        """Where a checkpoint taken now resumes (one read of the loss sum from the device)."""
        return Progress(self.epoch, self.step_in_epoch, self.global_step, self.loss_sum.item())
