"""The one protocol of the services around the training loop, and the list that calls them in order.

Every optional service (timing, the watchdog, load shaping, the ballast, the
profiler, the straggler detector, the non-finite report, fault injection, the step
logger and its sinks, the checkpoint manager's end, the summary) implements some
of these methods; the Trainer calls each method on every callback, in the order of
the list. That order is part of the contract, and is written down once, where the
list is built (entry/build.py).

Every rank calls the same methods at the same steps, so a callback may run a
collective in any of them. None of them may synchronise the device in the step's
hot path unless its option asks for it (a duty cycle below 1, a log line).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, List, Optional, Sequence

if TYPE_CHECKING:
    from resnet_ddp.core.outcome import RunOutcome
    from resnet_ddp.core.progress import EpochLosses, TrainState
    from resnet_ddp.core.stopping import StopReason


class Callback:
    """Override what you need; each default does nothing."""

    def on_start(self, state: "TrainState") -> None:
        """Once, before the first step of this process (after a resume, at the step it continues from)."""

    def on_epoch_start(self, state: "TrainState") -> None:
        """Before the first step of each epoch this process runs (the resumed one included)."""

    def before_step(self, state: "TrainState") -> None:
        """Before step `state.global_step + 1` runs, its batch in hand."""

    def after_step(self, state: "TrainState") -> None:
        """After each step, before the ranks agree whether to stop: what a callback offers to that agreement
        goes in here."""

    def between_steps(self, state: "TrainState") -> Optional["StopReason"]:
        """After the agreement said go on, before the next step: time that belongs to no step (a duty cycle's
        sleep, an idle phase). Returns a stop agreed meanwhile, or None."""
        return None

    def on_epoch_end(self, state: "TrainState", losses: "EpochLosses") -> None:
        """After an epoch's last step (or the run's last, inside an epoch), with the epoch's losses."""

    def on_end(self, state: "TrainState", outcome: "RunOutcome") -> None:
        """Once, after the loop, however it ended but by an exception."""


class Callbacks:
    """Calls each method on every callback of the list, in order (skipping the ones a callback leaves as is,
    so that an unused hook costs the step nothing)."""

    def __init__(self, callbacks: Sequence[Callback]):
        self.callbacks: List[Callback] = list(callbacks)
        self._methods = {
            name: [getattr(c, name) for c in self.callbacks if getattr(type(c), name) is not getattr(Callback, name)]
            for name in (
                "on_start",
                "on_epoch_start",
                "before_step",
                "after_step",
                "between_steps",
                "on_epoch_end",
                "on_end",
            )
        }

    def on_start(self, state) -> None:
        for method in self._methods["on_start"]:
            method(state)

    def on_epoch_start(self, state) -> None:
        for method in self._methods["on_epoch_start"]:
            method(state)

    def before_step(self, state) -> None:
        for method in self._methods["before_step"]:
            method(state)

    def after_step(self, state) -> None:
        for method in self._methods["after_step"]:
            method(state)

    def between_steps(self, state):
        for method in self._methods["between_steps"]:
            reason = method(state)
            if reason is not None:
                return reason
        return None

    def on_epoch_end(self, state, losses) -> None:
        for method in self._methods["on_epoch_end"]:
            method(state, losses)

    def on_end(self, state, outcome) -> None:
        for method in self._methods["on_end"]:
            method(state, outcome)
