"""--profile-steps: a torch.profiler record of chosen training steps, taken inside the real job.

Each rank writes two files into <save-dir>/profile/: rank<R>.trace.json, the
timeline (Perfetto or chrome://tracing open it), and rank<R>-ops.txt, the
operators and kernels ranked by their own time on the device (on CPU, on the
host). On GPUs the profiler also records CUDA kernels through CUPTI, each
kernel of a CUDA-graph replay included. Outside the
chosen steps it costs one comparison per step.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import torch
from torch.autograd.profiler_util import FunctionEventAvg

from resnet_ddp.core.callbacks import Callback
from resnet_ddp.core.distributed import RankInfo

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"
TABLE_ROWS = 40


class StepProfiler(Callback):
    """Starts the profiler before the first chosen step and writes what it recorded after the last."""

    def __init__(self, steps: Tuple[int, int], rank: RankInfo, save_dir: str, first_steady_step: int):
        """`first_steady_step`: no earlier step is profiled (CUDA-graph capture cannot run under the profiler)."""
        self.first, self.last = max(steps[0], first_steady_step), steps[1]
        self.rank = rank
        self.directory = os.path.join(save_dir, PROFILE_DIR)
        self._profiler: Optional[torch.profiler.profile] = None
        self._recorded_to = 0  # the last step done under the profiler
        self.done = self.first > self.last
        if self.done and rank.is_main:
            log.info(
                f"--profile-steps {steps[0]}:{steps[1]}: nothing profiled, every one of those "
                f"steps comes before step {first_steady_step}, the first after the start-up "
                "steps (and the CUDA-graph capture)"
            )
        elif steps[0] < self.first and rank.is_main:
            log.info(
                f"--profile-steps: profiling from step {self.first}, the first after the "
                "start-up steps (and the CUDA-graph capture)"
            )

    def on_start(self, state) -> None:
        self._steps_done(state.global_step)

    def after_step(self, state) -> None:
        self._steps_done(state.global_step)

    def on_end(self, state, outcome) -> None:
        self.finish()  # a run that ended inside the chosen steps keeps what was recorded

    def _steps_done(self, global_step: int) -> None:
        if self.done:
            return
        if self._profiler is None and global_step == self.first - 1:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.rank.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            else:  # a CUDA build of torch on a machine without GPUs: kineto's failed GPU lookups are noise
                os.environ.setdefault("KINETO_LOG_LEVEL", "6")
            self._profiler = torch.profiler.profile(activities=activities, record_shapes=False)
            self._profiler.start()
        elif self._profiler is not None:
            self._recorded_to = global_step
            if global_step >= self.last:
                self.finish()

    def finish(self) -> None:
        """Stop and write what was recorded: at the last chosen step, or when the run ends before it."""
        if self._profiler is None or self.done:
            return
        if self.rank.device.type == "cuda":
            torch.cuda.synchronize(self.rank.device)  # the chosen steps' kernels are in the record
        self._profiler.stop()
        self.done = True
        os.makedirs(self.directory, exist_ok=True)
        trace = os.path.join(self.directory, f"rank{self.rank.rank}.trace.json")
        ops = os.path.join(self.directory, f"rank{self.rank.rank}-ops.txt")
        # Written beside their names and renamed: a reader never sees half a file.
        self._profiler.export_chrome_trace(trace + ".tmp")
        os.replace(trace + ".tmp", trace)
        with open(ops + ".tmp", "w") as f:
            f.write(self._profiler.key_averages().table(sort_by=_sort_key(self.rank.device), row_limit=TABLE_ROWS))
            f.write("\n")
        os.replace(ops + ".tmp", ops)
        if self.rank.is_main:
            log.info(
                f"profile of steps {self.first}-{self._recorded_to} written to "
                f"{self.directory} (each rank's trace.json and ops.txt)"
            )


def _sort_key(device: torch.device) -> str:
    if device.type != "cuda":
        return "self_cpu_time_total"
    # torch renamed the CUDA totals to "device" ones; older versions have only the first name.
    return "self_device_time_total" if hasattr(FunctionEventAvg, "self_device_time_total") else "self_cuda_time_total"
