"""One process's training loop.

The loop runs steps, asks the ranks' agreement after each whether to stop, and
hands everything else to its parts: the checkpoint manager decides what to save,
the callbacks (core/callbacks.py, in the order entry/build.py gives) time, log,
pace, inject and report. Every rank runs the same loop over the same number of
steps, so every collective in it lines up across ranks.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from resnet_ddp.core import distributed
from resnet_ddp.core.callbacks import Callbacks
from resnet_ddp.core.checkpoint import EPOCH_END, INTERVAL, STOP, CheckpointManager
from resnet_ddp.core.outcome import RunOutcome
from resnet_ddp.core.progress import EpochLosses, TrainState
from resnet_ddp.core.stopping import StopAgreement, StopReason


class Trainer:
    def __init__(
        self,
        step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        batches,
        state: TrainState,
        stop: StopAgreement,
        checkpoints: CheckpointManager,
        callbacks: Callbacks,
        rank: int,
    ):
        """`step(images, labels)` trains on one batch and returns its loss on the device; `batches.epoch(epoch,
        start_step)` yields an epoch's batches from a step on."""
        self.step, self.batches, self.state = step, batches, state
        self.stop, self.checkpoints, self.callbacks, self.rank = stop, checkpoints, callbacks, rank

    def train(self) -> RunOutcome:
        state, stop = self.state, self.stop
        stop.length.start_clock()
        reason: Optional[StopReason] = stop.length.reached(state.global_step)  # a resumed run may be done
        self.callbacks.on_start(state)
        while reason is None:
            self.callbacks.on_epoch_start(state)
            for images, labels in self.batches.epoch(state.epoch, state.step_in_epoch):
                self.callbacks.before_step(state)
                state.step_done(self.step(images, labels))
                self.callbacks.after_step(state)
                reason = stop.poll(state.global_step)  # a signal, --duration, a NaN, or the last step
                if reason is None:
                    self.checkpoints.maybe_save(state, INTERVAL)
                    reason = self.callbacks.between_steps(state)  # a duty cycle's sleep, an idle phase
                if reason is not None:
                    break
            if reason is None or reason.completes_epoch:
                self._end_epoch(state)
                self.checkpoints.maybe_save(state, EPOCH_END)
            else:
                self.checkpoints.maybe_save(state, STOP)
        outcome = RunOutcome.of(reason, self.checkpoints.diverged)
        self.callbacks.on_end(state, outcome)
        return outcome

    def _end_epoch(self, state: TrainState) -> None:
        """The epoch's losses from every rank (one collective), its lines and records; then the next epoch."""
        sums = [row[0] for row in distributed.gather_rows(state.loss_sum.double().view(1))]
        self.callbacks.on_epoch_end(state, EpochLosses(state.epoch, state.step_in_epoch, sums, self.rank))
        if state.epoch_complete:  # else --max-steps ended the run inside it
            state.next_epoch()
