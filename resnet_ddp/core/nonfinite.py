"""Non-finite losses, noticed on the device without a host sync, and what --nan-policy does about them.

`NonFiniteWatch` runs inside the training step (CUDA graphs included): it counts
the steps whose loss is not finite and, with --nan-policy skip, undoes updates whose
gradients are not finite. The host learns what it saw from a copy made after every
step that is read, never waited for (`NonFiniteReport`, a callback).
"""

from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional

import torch

from resnet_ddp.core.callbacks import Callback
from resnet_ddp.core.tensors import copy_all

log = logging.getLogger(__name__)


class NonFiniteWatch:
    """Non-finite losses and (with --nan-policy skip) non-finite updates, counted on the device.

    `state` holds, as int64 on the step's device: the global step of the last
    step run, the first step whose loss on this rank was not finite (0: none),
    how many such steps there were, how many updates were skipped and the last
    skipped step. DDP has averaged the gradients before the update, so every
    rank sees the same non-finite gradients and skips the same steps.
    """

    STEP, FIRST_BAD, BAD_STEPS, SKIPPED, LAST_SKIPPED = range(5)

    def __init__(self, device: torch.device, optimizer: torch.optim.Optimizer, undo_updates: bool):
        self.undo_updates = undo_updates
        self.optimizer = optimizer
        self.state = torch.zeros(5, dtype=torch.int64, device=device)
        self._step, self._first_bad, self._bad_steps, self._skipped, self._last_skipped = self.state.unbind()
        # The host's view: a pinned copy refreshed after every step, read without waiting.
        self._host = torch.zeros(5, dtype=torch.int64, pin_memory=True) if device.type == "cuda" else self.state
        self._saved: Dict[int, torch.Tensor] = {}
        self.seen = [0] * 5  # what the host has reported so far

    def start_at(self, global_step: int) -> None:
        """Steps run so far (0, or where a resume continues), before the first step."""
        self._step.fill_(global_step)
        self.seen[self.STEP] = global_step

    def observe_loss(self, loss: torch.Tensor) -> None:
        """In the step: count the step and note whether this rank's loss is finite."""
        self._step.add_(1)
        bad = torch.isfinite(loss).logical_not_()
        torch.where(bad & self._first_bad.eq(0), self._step, self._first_bad, out=self._first_bad)
        self._bad_steps.add_(bad)

    def update(self, apply_update: Callable[[], None]) -> None:
        """In the step: run the optimizer's update; with policy skip, undo it if the gradients are not finite.

        No host sync: the update runs, and then every tensor it changed is set back
        to its copy from before (torch.where on an on-device flag) when the flag is set.
        """
        if not self.undo_updates:
            apply_update()
            return
        with torch.no_grad():
            self._update_or_undo(apply_update)

    def _update_or_undo(self, apply_update: Callable[[], None]) -> None:
        before = self._tensors_of_update()
        saved = [self._saved_copy(t) for t in before]
        copy_all(saved, before)
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        found = torch.stack(_norms(grads)).isfinite().all().logical_not_()
        apply_update()
        for tensor, copy in zip(before, saved):
            torch.where(found, copy, tensor, out=tensor)
        known = {id(t) for t in before}
        for tensor in self._tensors_of_update():
            if id(tensor) not in known:  # state the update created (the first momentum buffer): as if it had not run
                tensor.masked_fill_(found, 0)
        self._skipped.add_(found)
        torch.where(found, self._step, self._last_skipped, out=self._last_skipped)

    def _tensors_of_update(self) -> List[torch.Tensor]:
        tensors = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                tensors.append(p)
                for value in self.optimizer.state.get(p, {}).values():
                    if torch.is_tensor(value) and value.is_floating_point():
                        tensors.append(value)
        return tensors

    def _saved_copy(self, tensor: torch.Tensor) -> torch.Tensor:
        copy = self._saved.get(id(tensor))
        if copy is None:  # once per tensor: the copies are reused every step
            copy = self._saved[id(tensor)] = torch.empty_like(tensor)
        return copy

    def publish(self) -> None:
        """After the step, outside any graph: queue the copy the host reads later."""
        if self._host is not self.state:
            self._host.copy_(self.state, non_blocking=True)

    def flush(self) -> None:
        """Bring the host's view up to date, waiting for the device (before a checkpoint, which waits anyway)."""
        if self._host is not self.state:
            self._host.copy_(self.state)

    @property
    def first_bad_step_on_device(self) -> torch.Tensor:
        """The first step with a non-finite loss on this rank (0: none), as a tensor on the step's device."""
        return self._first_bad

    def news(self) -> Optional[Dict[str, int]]:
        """What the device has reported since the last call (None if nothing new), without waiting for it."""
        now = self._host.tolist()  # pinned memory the device writes: a value is the old one or the new one
        first_bad = now[self.FIRST_BAD] if not self.seen[self.FIRST_BAD] else 0
        skipped = now[self.SKIPPED] - self.seen[self.SKIPPED]
        self.seen = [max(a, b) for a, b in zip(self.seen, now)]
        if not first_bad and skipped <= 0:
            return None
        return {
            "first_bad_step": first_bad,
            "skipped": max(0, skipped),
            "skipped_total": self.seen[self.SKIPPED],
            "last_skipped_step": self.seen[self.LAST_SKIPPED],
        }


class NonFiniteReport(Callback):
    """After every step: says what the watch saw (without waiting for the device) and, under --nan-policy stop,
    offers the first non-finite step to the stop agreement."""

    def __init__(self, watch: NonFiniteWatch, policy: str, stop):
        self.watch, self.policy, self.stop = watch, policy, stop

    def after_step(self, state) -> None:
        self.watch.publish()
        self._report()

    def on_end(self, state, outcome) -> None:
        self.watch.flush()
        self._report()  # what the last steps did

    def _report(self) -> None:
        news = self.watch.news()
        if news is None:
            return
        step = news["first_bad_step"]
        if step:
            outcome = {"stop": "stopping the job", "skip": "its update is skipped", "ignore": "training on"}[
                self.policy
            ]
            log.warning(f"loss is not finite at step {step} (--nan-policy {self.policy}: {outcome})")
            if self.policy == "stop":
                self.stop.nonfinite_at(step)
        if news["skipped"]:
            log.warning(
                f"skipped the update of step {news['last_skipped_step']}: gradients not finite "
                f"({news['skipped_total']} skipped so far, --nan-policy skip)"
            )


def _norms(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    if hasattr(torch, "_foreach_norm"):
        return list(torch._foreach_norm(tensors))
    return [torch.linalg.vector_norm(t) for t in tensors]
