"""Shaping the load for platform tests: duty cycle, load phases and a GPU memory ballast.

`LoadPacer` keeps the GPUs busy about a chosen fraction of the time. After a
step it waits for the step to finish on the device (the one host sync a duty
cycle below 1 costs; at 1 it does nothing at all), takes the time from the
step's start as the step's busy time, and sleeps busy * (1 - F) / F. The busy
time it sleeps on is the slowest rank's of the step before, agreed through the
per-step stop agreement, so every rank sleeps the same and the next step starts
together. Load phases (--load-profile) change F on rank 0's clock, each phase
lasting its own seconds from the step it began after (so a long start-up stretches
the first phase and skips none); the phase number rides on the same agreement, so
every rank switches after the same step.
An idle phase (0%) runs no step: it ticks the agreement every IDLE_TICK_S, so
stops and --duration are still answered, while memory and the process group stay
as they are.

`GpuMemoryBallast` holds extra device memory, written so that it is resident.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from resnet_ddp.config import LoadPhase, MemorySize, ScenarioConfig
from resnet_ddp.core.callbacks import Callback
from resnet_ddp.core.distributed import RankInfo
from resnet_ddp.core.stopping import BUSY_US, PHASE, StopAgreement, StopReason
from resnet_ddp.errors import ReportedElsewhere, UsageError
from resnet_ddp.observe.console import NOTICE

log = logging.getLogger(__name__)

IDLE_TICK_S = 0.25


def describe_phase(phase: LoadPhase) -> str:
    length = "the whole run" if math.isinf(phase.seconds) else _length(phase.seconds)
    if phase.duty_cycle == 0:
        return f"idle for {length}"
    if phase.duty_cycle == 1:
        return f"full load for {length}"
    return f"duty cycle {100 * phase.duty_cycle:g}% for {length}"


def _length(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:g}s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes // 60}h{minutes % 60:02d}m{rest:02d}s" if minutes >= 60 else f"{minutes}m{rest:02d}s"


class LoadPacer(Callback):
    def __init__(
        self,
        config: ScenarioConfig,
        rank: RankInfo,
        stop: StopAgreement,
        record: Callable[[dict], None],
        record_every_steps: Optional[int],
        record_every_s: float,
        first_steady_step: int,
        data_wait_s: Callable[[], float],
    ):
        """The first steps (cuDNN autotuning, CUDA-graph warm-up and capture) can take seconds each; sleeping
        three times that at 25% would stretch the start-up into minutes, so they run unpaced. The sleep after
        a step is sized on the step before it (agreed a step late), so pacing starts one step after
        `first_steady_step`, when that step is a steady one."""
        self.paced_from_step = first_steady_step + 1
        self.phases = config.load_phases
        self.active = any(phase.duty_cycle < 1 for phase in self.phases)
        self.rank, self.stop, self.record = rank, stop, record
        self.record_every_steps, self.record_every_s = record_every_steps, record_every_s
        self.data_wait_s = data_wait_s
        self.phase_number = 0  # agreed; the phase is phases[phase_number % len(phases)]
        self._phase_started = self._step_started = self._last_record = time.perf_counter()
        self._data_wait_s = 0.0
        self._busy_s = 0.0
        self._sums = _IntervalSums()

    @property
    def phase(self) -> LoadPhase:
        return self.phases[self.phase_number % len(self.phases)]

    def on_start(self, state) -> None:
        """Training starts now: the phases' clock starts."""
        self._phase_started = self._step_started = self._last_record = time.perf_counter()
        self._data_wait_s = self.data_wait_s()
        if self.active and self.rank.is_main:
            where = f"1 of {len(self.phases)}, " if len(self.phases) > 1 else ""
            log.log(NOTICE, f"load phase {where}from the start: {describe_phase(self.phase)}")

    def on_epoch_start(self, state) -> None:
        """The work between epochs (epoch lines, checkpoints) is not the next step's."""
        self._step_started = time.perf_counter()

    def after_step(self, state) -> None:
        """Below full load, wait for the step and note its busy time for the agreement."""
        if not self.active:
            return
        data_wait_s = self.data_wait_s()
        waited, self._data_wait_s = data_wait_s - self._data_wait_s, data_wait_s
        if 0 < self.phase.duty_cycle < 1:
            if self.rank.device.type == "cuda":
                torch.cuda.current_stream(self.rank.device).synchronize()
            self._busy_s = max(0.0, time.perf_counter() - self._step_started - waited)
            self.stop.offer(BUSY_US, int(self._busy_s * 1e6))
        else:
            self._busy_s = 0.0
            self.stop.offer(BUSY_US, 0)
        if self.rank.is_main:
            self.stop.offer(PHASE, self._phase_number_by_clock())

    def between_steps(self, state) -> Optional[StopReason]:
        """After the step's agreement: switch phase if agreed, then sleep or idle as the phase says. Returns a
        stop agreed while idle (None if none): the loop handles it as one agreed after the step."""
        if not self.active:
            return None
        global_step = state.global_step
        self._switch_to(self.stop.agreed[PHASE], global_step)
        duty = self.phase.duty_cycle
        reason = None
        if duty == 0:
            reason = self._idle(global_step)
        elif duty < 1 and global_step >= self.paced_from_step:
            agreed_busy_s = self.stop.agreed[BUSY_US] / 1e6
            basis = agreed_busy_s or self._busy_s  # the first step of a phase has no agreed figure yet
            target = basis * (1 - duty) / duty
            slept = self._sleep(target)
            self._sums.add_step(self._busy_s, basis, bool(agreed_busy_s), target, slept)
        self._maybe_record(global_step)
        self._step_started = time.perf_counter()
        return reason

    def _sleep(self, seconds: float) -> float:
        """Sleep in short slices, cut short by a stop request (agreed after the next step, like any other)."""
        started = time.perf_counter()
        while True:
            left = seconds - (time.perf_counter() - started)
            if left <= 0:
                break
            time.sleep(min(left, IDLE_TICK_S))
            if self.stop.tick():
                break
        return time.perf_counter() - started

    def _idle(self, global_step: int) -> Optional[StopReason]:
        started = time.perf_counter()
        reason = None
        while self.phase.duty_cycle == 0 and reason is None:
            time.sleep(IDLE_TICK_S)
            if self.rank.is_main:
                self.stop.offer(PHASE, self._phase_number_by_clock())
            reason = self.stop.poll(global_step)
            self._sums.idle_s += time.perf_counter() - started
            started = time.perf_counter()
            if reason is None:
                self._switch_to(self.stop.agreed[PHASE], global_step)
        return reason

    def on_end(self, state, outcome) -> None:
        """The run is over: write what was not recorded yet."""
        if self.active:
            self._write_record(state.global_step)

    def _phase_number_by_clock(self) -> int:
        # One phase at a time, each for its own seconds from the step it began after: a start-up
        # (autotuning, graph capture, compilation) longer than a phase stretches that phase; it must
        # not skip the next, which a platform test is there to watch.
        if time.perf_counter() - self._phase_started >= self.phase.seconds:
            return self.phase_number + 1
        return self.phase_number

    def _switch_to(self, number: int, global_step: int) -> None:
        if number <= self.phase_number:
            return
        self._write_record(global_step)
        self.phase_number = number
        self._phase_started = time.perf_counter()
        index = number % len(self.phases)
        log.log(
            NOTICE,
            f"load phase {index + 1} of {len(self.phases)} after step {global_step}: {describe_phase(self.phase)}",
        )
        self.record(
            {"kind": "load_phase", "global_step": global_step, "phase": index + 1, "duty_cycle": self.phase.duty_cycle}
        )

    def _maybe_record(self, global_step: int) -> None:
        if self.record_every_steps is not None:
            due = global_step % self.record_every_steps == 0
        else:
            due = time.perf_counter() - self._last_record >= self.record_every_s
        if due:
            self._write_record(global_step)

    def _write_record(self, global_step: int) -> None:
        sums = self._sums
        if sums.steps or sums.idle_s:
            self.record(
                {
                    "kind": "load",
                    "global_step": global_step,
                    "phase": self.phase_number % len(self.phases) + 1,
                    "duty_cycle": self.phase.duty_cycle,
                    **sums.figures(),
                }
            )
        self._sums = _IntervalSums()
        self._last_record = time.perf_counter()


class _IntervalSums:
    """What the pacer did since its last metrics record (steps below full load, idle time)."""

    def __init__(self):
        self.steps = self.agreed_steps = 0
        self.busy_s = self.basis_s = self.target_s = self.slept_s = self.idle_s = 0.0

    def add_step(self, busy_s: float, basis_s: float, agreed: bool, target_s: float, slept_s: float) -> None:
        self.steps += 1
        self.agreed_steps += agreed
        self.busy_s += busy_s
        self.basis_s += basis_s
        self.target_s += target_s
        self.slept_s += slept_s

    def figures(self) -> dict:
        ms = 1000 / max(1, self.steps)  # means per step, in milliseconds
        active = self.busy_s + self.slept_s
        return {
            "steps": self.steps,
            "busy_ms": round(self.busy_s * ms, 3),
            "sleep_basis_ms": round(self.basis_s * ms, 3),
            "agreed_steps": self.agreed_steps,
            "sleep_target_ms": round(self.target_s * ms, 3),
            "slept_ms": round(self.slept_s * ms, 3),
            "idle_s": round(self.idle_s, 3),
            "busy_frac": round(self.busy_s / active, 4) if active > 0 else None,
        }


BALLAST_MARGIN_BYTES = 2**30  # left free for the job's own later allocations (NCCL, gathers at checkpoints)
BALLAST_CHUNK_BYTES = 2**30
BALLAST_FILL = 0xA5


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


class GpuMemoryBallast(Callback):
    """--gpu-memory-ballast: extra memory held on this rank's GPU for the run.

    Checked twice, each time on every rank at the same point and agreed on, so
    that a refusal ends every rank with exit 2 and one line: before training,
    against the GPU's free memory (`check_before_training`); and after the last
    start-up step (when the job's own peak, CUDA graphs included, is in the
    allocator's pool), when it is allocated.
    """

    def __init__(self, size: MemorySize, rank: RankInfo, group: dist.ProcessGroup, first_steady_step: int):
        self.size, self.rank, self.group = size, rank, group
        self.device = rank.device
        self.allocate_after_step = first_steady_step - 1
        self.bytes = size.resolve(torch.cuda.mem_get_info(self.device)[1])
        self.held: List[torch.Tensor] = []

    def after_step(self, state) -> None:
        if state.global_step == self.allocate_after_step:
            self.allocate()

    def _what(self) -> str:
        exact = f" ({_gib(self.bytes)})" if self.size.fraction is not None else ""
        return (
            f"--gpu-memory-ballast {self.size}{exact} does not fit on rank {self.rank.rank}'s GPU "
            f"(cuda:{self.rank.local_rank}, {torch.cuda.get_device_name(self.device)})"
        )

    @classmethod
    def check_before_training(cls, size: MemorySize, rank: RankInfo, group: dist.ProcessGroup) -> None:
        """Against the GPU's free memory, before the job takes any (a collective: every rank agrees)."""
        ballast = cls(size, rank, group, first_steady_step=0)
        free, total = torch.cuda.mem_get_info(ballast.device)
        problem = None
        if ballast.bytes > free - BALLAST_MARGIN_BYTES:
            problem = (
                f"{ballast._what()}: {_gib(free)} free of {_gib(total)}, less a {_gib(BALLAST_MARGIN_BYTES)} "
                "margin for the job"
            )
        ballast._agree(problem)

    def allocate(self) -> None:
        """Once the job's peak is known: check again, then take the memory and write it."""
        free, total = torch.cuda.mem_get_info(self.device)
        problem = None
        if self.bytes > free - BALLAST_MARGIN_BYTES:
            problem = (
                f"{self._what()} beside the training job: the job holds "
                f"{_gib(torch.cuda.memory_reserved(self.device))} (peak "
                f"{_gib(torch.cuda.max_memory_allocated(self.device))} in use), {_gib(free)} are free of "
                f"{_gib(total)}, less a {_gib(BALLAST_MARGIN_BYTES)} margin: lower the ballast or the "
                "batch size"
            )
        self._agree(problem)
        left = self.bytes
        while left > 0:
            chunk = torch.empty(min(left, BALLAST_CHUNK_BYTES), dtype=torch.uint8, device=self.device)
            chunk.fill_(BALLAST_FILL)  # written, so the pages are resident whatever the driver's policy
            self.held.append(chunk)
            left -= chunk.numel()
        torch.cuda.synchronize(self.device)  # once: the memory is really taken before we say so
        free_after = torch.cuda.mem_get_info(self.device)[0]
        log.log(
            NOTICE,
            f"holding a {_gib(self.bytes)} GPU memory ballast on cuda:{self.rank.local_rank} "
            f"(written; {_gib(free_after)} left free)",
        )

    def _agree(self, problem: Optional[str]) -> None:
        problems: List[Optional[str]] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(problems, problem, group=self.group)
        failed = [p for p in problems if p]
        if not failed:
            return
        if self.rank.is_main:
            others = f" (and on {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
            raise UsageError(failed[0] + others)
        raise ReportedElsewhere(2)
