"""Stragglers: name a rank that keeps the others waiting; and the test knob that makes one.

What is measured, and why. Every rank waits for the slowest at each
SyncBatchNorm collective and at DDP's gradient all-reduce, so a step takes the
same wall time on every rank: step time cannot tell a straggler from its peers.
What differs is how each rank's step splits into computing and waiting: a slow
rank computes longer and waits least. So we time each rank's forward pass
*outside* the layers where ranks wait for each other (SyncBatchNorm: its local
statistics, the all-gather, the normalisation), that is the convolutions,
activations, pooling and head, which no peer can delay. With --no-sync-bn the
forward pass holds no collective and is timed whole. The backward pass runs the
same layers at about twice the cost and tells the same story; leaving it out
keeps the marks few.

How, without a host sync in the step. Hooks record a mark (a CUDA event on a
GPU, the host clock on CPU) at the start and end of the model's forward pass and
before and after every SyncBatchNorm layer. Eager steps carry the hooks only on
the one step sampled per check, so the other steps pay nothing. A CUDA-graphed
step records its marks inside the graph (events made with external=True, which
newer torch has), so every replay records them and the check reads the latest.
A check happens about every window / CHECKS_PER_WINDOW seconds, at a step number
all ranks agree on: one synchronisation of this rank's device, then one small
all-gather on a gloo group of (forward compute, host seconds per step, clock).
Every rank then holds the same figures and reaches the same verdict.
"""

from __future__ import annotations

import collections
import inspect
import logging
import math
import statistics
import time
from fractions import Fraction
from typing import Callable, Deque, List, Optional, Tuple

import torch
import torch.distributed as dist

from resnet_ddp.core import distributed
from resnet_ddp.core.callbacks import Callback

log = logging.getLogger(__name__)

EXCESS = 0.10  # a rank computing more than 10% above the median of all ranks is slow
CHECKS_PER_WINDOW = 6  # checks within one window: a straggler is slow at two thirds of them or more
_EVENTS_HAVE_EXTERNAL = "external" in inspect.signature(torch.cuda.Event.__new__).parameters


class StragglerTracker:
    """Which ranks have computed more than EXCESS above the median at most checks of a whole window.

    Most, not all: a GPU shared with another process (time-sliced) is slow at
    most sampled steps but not every one, and one fast sample must not hide it.
    A rank is named once its slow spell has lasted a window and at least
    NAME_SHARE of the checks in the last window found it slow; a named rank is
    back once fewer than BACK_SHARE of them did. Pure bookkeeping over the
    figures of each check, so that every rank, given the same figures, names the
    same ranks.
    """

    NAME_SHARE = Fraction(2, 3)  # exact: 4 slow checks of 6 are two thirds
    BACK_SHARE = Fraction(1, 3)

    def __init__(self, world_size: int, window_s: float, excess: float = EXCESS):
        self.window_s = window_s
        self.excess = excess
        self.slow_since: List[Optional[float]] = [None] * world_size
        self.checks: List[Deque[Tuple[float, bool, float]]] = [collections.deque() for _ in range(world_size)]
        self.named: List[int] = []

    def update(self, now: float, compute_ms: List[float]) -> Tuple[List[int], List[int]]:
        """Take one check's figures (NaN: none this time); return (newly named, recovered) ranks."""
        valid = [v for v in compute_ms if math.isfinite(v)]
        if len(valid) < 2:
            return [], []
        limit = (1 + self.excess) * statistics.median(valid)
        newly, recovered = [], []
        for rank, value in enumerate(compute_ms):
            if not math.isfinite(value):
                continue
            slow_now = value > limit
            checks = self.checks[rank]
            checks.append((now, slow_now, value))
            while checks[0][0] < now - self.window_s:
                checks.popleft()
            if rank in self.named:
                slow, total = self._slow_since(rank, -math.inf)
                if slow < self.BACK_SHARE * total:
                    self.named.remove(rank)
                    recovered.append(rank)
                continue
            since = self.slow_since[rank]
            if since is None:
                self.slow_since[rank] = now if slow_now else None
                continue
            # The spell's share: before it began the rank was healthy, and those checks do not count.
            slow, total = self._slow_since(rank, since)
            if slow < self.NAME_SHARE * total:
                self.slow_since[rank] = None
            elif now - since >= self.window_s:
                self.named.append(rank)
                self.slow_since[rank] = None
                newly.append(rank)
        self.named.sort()
        return newly, recovered

    def _slow_since(self, rank: int, start: float) -> Tuple[int, int]:
        """(slow, all) of `rank`'s checks in the last window from `start` on."""
        chosen = [slow for t, slow, _ in self.checks[rank] if t >= start]
        return sum(chosen), len(chosen)

    def window_figures(self, rank: int) -> Tuple[int, int, float]:
        """(slow checks, all checks, median compute ms) of `rank` over the last window, for the WARNING line."""
        slow, total = self._slow_since(rank, -math.inf)
        return slow, total, statistics.median(value for _, _, value in self.checks[rank])


class ForwardComputeTimer:
    """Marks around the forward pass and each layer where ranks wait for each other (SyncBatchNorm); reads forward
    time minus the time in those layers."""

    def __init__(self, module: torch.nn.Module, waiting_layers, device: torch.device, in_graph: bool):
        """`module` is the bare model (no DDP or compile wrapper)."""
        self.model = module
        self.device = device
        self.layers = list(waiting_layers)
        count = 2 + 2 * len(self.layers)
        if device.type == "cuda":
            extra = {"external": True} if in_graph else {}
            self._events = [torch.cuda.Event(enable_timing=True, **extra) for _ in range(count)]
        self._times = [math.nan] * count
        self._handles: List = []
        self.in_graph = in_graph
        if in_graph:
            self.arm()  # the graph is captured once, from an eager call: the hooks must be there then

    def _mark(self, index: int) -> None:
        if self.device.type == "cuda":
            self._events[index].record()
        else:
            self._times[index] = time.perf_counter()

    def _hook(self, index: int) -> Callable:
        return lambda *_: self._mark(index)

    def arm(self) -> None:
        """Mark the next forward pass."""
        if self._handles:
            return
        # prepend: the start mark comes before any other pre-hook (such as the test knob's work)
        handles = [
            self.model.register_forward_pre_hook(self._hook(0), prepend=True),
            self.model.register_forward_hook(self._hook(1)),
        ]
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(self._hook(2 + 2 * i), prepend=True))
            handles.append(layer.register_forward_hook(self._hook(3 + 2 * i)))
        self._handles = handles

    def disarm(self) -> None:
        if self.in_graph:
            return
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def read_ms(self) -> float:
        """Forward compute of the last marked step in ms (NaN if none); on a GPU, after one device sync."""
        try:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                spans = [a.elapsed_time(b) for a, b in zip(self._events[0::2], self._events[1::2])]
            else:
                spans = [(b - a) * 1000.0 for a, b in zip(self._times[0::2], self._times[1::2])]
                self._times = [math.nan] * len(self._times)
        except RuntimeError:  # an event never recorded
            return math.nan
        return spans[0] - sum(spans[1:])


class StragglerDetector(Callback):
    """Checks compute times across ranks every few steps; names a rank slow for a whole window, once."""

    def __init__(
        self,
        window_s: float,
        rank: distributed.RankInfo,
        module: torch.nn.Module,
        waiting_layers,
        in_graph: bool,
        record: Callable[[dict], None],
        first_check_step: int,
    ):
        """`first_check_step` samples a steady step: after the start-up steps and the summary's warm-up."""
        self.rank = rank
        self.window_s = window_s
        self.check_every_s = self.window_s / CHECKS_PER_WINDOW
        self.record = record
        self.first_check = first_check_step
        self.timer = ForwardComputeTimer(module, waiting_layers, rank.device, in_graph)
        self.tracker = StragglerTracker(rank.world_size, self.window_s)
        self.group = dist.new_group(backend="gloo")
        self.places: List[dict] = [None] * rank.world_size  # type: ignore[list-item]
        dist.all_gather_object(self.places, distributed.placement(rank), group=self.group)
        self.straggler_ranks: List[int] = []  # the ranks named now; the step records carry this list
        self.scores: List[float] = [math.nan] * rank.world_size  # each rank's compute over the median, last check
        self._next_check: Optional[int] = None
        self._last_step = 0
        self._last_time = 0.0

    @staticmethod
    def unavailable(window_s: float, world_size: int, compiled: bool, cuda_graphs: bool) -> Optional[str]:
        """Why the detector cannot run here ('' where it has nothing to do), or None where it can."""
        if window_s <= 0 or world_size < 2:
            return ""
        if compiled:
            return (
                "--compile traces the model, and the timing marks would break its graphs "
                "(--no-compile keeps the detector, also with --fast)"
            )
        if cuda_graphs and not _EVENTS_HAVE_EXTERNAL:
            return (
                f"torch {torch.__version__} cannot time inside a CUDA graph (torch.cuda.Event has no "
                "external=True); --no-cuda-graphs turns it on"
            )
        return None

    def fields(self) -> dict:
        """For every step record: the ranks named now, and this rank's compute over the median at the last check."""
        score = self.scores[self.rank.rank]
        return {"straggler_ranks": list(self.straggler_ranks), "straggler_score": score if score == score else None}

    def after_step(self, state) -> None:
        """Called by every rank after every step; does work only before and after a sampled step."""
        global_step = state.global_step
        if self._next_check is None:
            self._next_check = max(global_step + 1, self.first_check)
            self._last_step, self._last_time = global_step, time.perf_counter()
        if global_step == self._next_check:
            self._check(global_step)  # sets the next check
        if global_step + 1 == self._next_check:
            self.timer.arm()

    def _check(self, global_step: int) -> None:
        compute_ms = self.timer.read_ms()
        self.timer.disarm()
        now = time.perf_counter()
        step_s = (now - self._last_time) / max(1, global_step - self._last_step)
        mine = torch.tensor([compute_ms, step_s, time.monotonic()], dtype=torch.float64)
        everyone = [torch.empty_like(mine) for _ in range(self.rank.world_size)]
        dist.all_gather(everyone, mine, group=self.group)
        figures = [t[0].item() for t in everyone]
        clock = everyone[0][2].item()  # rank 0's clock, so that every rank counts the same window
        newly, recovered = self.tracker.update(clock, figures)
        self.straggler_ranks[:] = self.tracker.named
        valid = [v for v in figures if math.isfinite(v)]
        median = statistics.median(valid) if valid else math.nan
        self.scores = [v / median if math.isfinite(v) and median > 0 else math.nan for v in figures]
        if self.rank.is_main:
            self.record(
                {
                    "kind": "straggler_check",
                    "global_step": global_step,
                    "forward_compute_ms": [v if math.isfinite(v) else None for v in figures],
                    "median_ms": median,
                    "straggler_ranks": list(self.straggler_ranks),
                }
            )
            for r in newly:
                slow, checks, its_median = self.tracker.window_figures(r)
                log.warning(
                    (
                        f"WARNING straggler: {distributed.describe(self.places[r])} spent more than "
                        f"{100 * EXCESS:.0f}% longer in forward compute than the median of all {len(figures)} ranks "
                        f"at {slow} of {checks} checks over {self.window_s:.0f} s ({its_median:.1f} ms per step at "
                        f"its median check; all ranks' median now {median:.1f} ms): every rank waits for it at "
                        "each collective"
                    )
                )
            for r in recovered:
                log.warning(
                    f"straggler: {distributed.describe(self.places[r])} is back within "
                    f"{100 * EXCESS:.0f}% of the median at most checks over {self.window_s:.0f} s"
                )
        slowest_step_s = max(t[1].item() for t in everyone)
        every = max(1, round(self.check_every_s / slowest_step_s)) if slowest_step_s > 0 else 1
        self._next_check = global_step + every
        self._last_step, self._last_time = global_step, now
