"""A one-process job's compiled model: helper processes compile its parts while the rank starts.

Compiling ResNet-50 takes most of a compiled job's first start, in one thread of
the rank. One process compiles its model in parts (core/model.py,
CompiledInParts). The rank's process starts a helper for each part the moment it
starts, before it imports torch; a helper builds the same model on the same
device, compiles its part, forward and backward, into the job's compile cache
(core/compile_cache.py, keyed as the rank keys it) and ends. The rank sets up
meanwhile, waits for each part's helper before that part's first call, and loads
its graphs from the cache. torch keys every compiled graph by the graph, its
inputs' shapes and layouts, its settings and the GPU: where anything differs, the
rank finds no match and compiles the part itself.

Nothing depends on the helpers: one that fails, or is not started, leaves the rank
to compile its part. They are not started where a restart finds compiled artifacts
in the save dir (it loads them), where a job has several processes (each compiles
graphs of its own: its SyncBatchNorm's collectives name its rank), and, as the
kernel helper (kernel_prebuild.py), where their CUDA contexts could disturb the job.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

from resnet_ddp.config import Config
from resnet_ddp.core import compile_cache
from resnet_ddp.entry.process import start_helper

log = logging.getLogger(__name__)

PARTS = 4  # core/model.py CompiledInParts (layers/blocks.py PARTS): a helper compiles each
WAIT_S = 300.0  # far above the helpers' tens of seconds: past it, the rank compiles what is missing itself
# inductor's compile workers in one process: one a CPU, at most this many (its decide_compile_threads)
ONE_PROCESS_COMPILE_THREADS = 32

# The rank's helpers by part, each waited for before its part's first call, until WAIT_S after their start.
_helpers: Dict[int, Tuple[subprocess.Popen, float]] = {}


def wanted(config: Config, world_size: int, gpu_shared: Optional[bool]) -> bool:
    """Whether this job compiles in parts and helpers may compile them beside its one rank."""
    on_gpu = not config.process.cpu
    return (
        bool(config.speed.compile)
        and world_size == 1
        and (gpu_shared is True or not on_gpu)
        and config.health.preflight == "off"
        and config.scenario.gpu_memory_ballast is None
        and not compile_cache.compiled_before(config.save_dir)
    )


def start(config: Config, device_index: int, environ=os.environ) -> None:
    """In the rank's process, before torch: start a helper for each part, handing it the job's configuration."""
    deadline, pickled = time.monotonic() + WAIT_S, pickle.dumps(config)
    threads = str(compile_threads_each(_cpus()))
    helper_environ = {"TORCHINDUCTOR_COMPILE_THREADS": threads, **environ}  # a job's own setting wins
    for part in range(PARTS):
        args = [str(os.getpid()), str(device_index), str(part)]
        try:
            _helpers[part] = (start_helper(__name__, args, helper_environ, stdin=pickled), deadline)
        except OSError as exc:  # no room for a process: the rank compiles that part
            log.debug(f"part {part + 1} of the compiled model is not prebuilt: {exc}")


def compile_threads_each(cpus: int) -> int:
    """Inductor's compile workers for each helper. Every process that compiles starts a pool of them at its
    first compile, one a CPU: the helpers share out one process's pool, rather than each filling the job pod's
    CPUs and memory with a pool of its own, all importing torch at once."""
    return max(1, min(cpus, ONE_PROCESS_COMPILE_THREADS) // PARTS)


def _cpus() -> int:
    """The CPUs this process may run on, as inductor counts them."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def wait(part: int) -> None:
    """Before part `part`'s first call: wait for its helper to end, if one was started."""
    if part not in _helpers:
        return
    helper, deadline = _helpers.pop(part)
    started = time.monotonic()
    try:
        code = helper.wait(max(0.0, deadline - started))
    except subprocess.TimeoutExpired:  # left to its end: it dies with this process
        log.debug(f"gave up waiting for the helper compiling part {part + 1} of the model")
        return
    if code != 0:
        log.debug(f"the helper compiling part {part + 1} of the model exited with {code}")
    log.debug(f"waited {time.monotonic() - started:.1f} s for the helper compiling part {part + 1} of the model")


def _main(argv: List[str]) -> int:
    """A helper: `python -m resnet_ddp.entry.compile_prebuild PARENT_PID DEVICE_INDEX PART`, the job's Config
    pickled on stdin. It dies with the rank (its parent)."""
    from resnet_ddp.entry.process import die_with_parent, exit_process

    die_with_parent(int(argv[0]))
    config: Config = pickle.load(sys.stdin.buffer)
    import torch

    from resnet_ddp.core.data import normalise
    from resnet_ddp.core.model import CompiledInParts, job_model, settle_compile_for_one_process
    from resnet_ddp.core.step import AMP_DTYPES

    device = torch.device("cpu") if config.process.cpu else torch.device("cuda", int(argv[1]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = config.speed.cudnn_benchmark  # as the rank has it (entry/build.py)
    compile_cache.use(compile_cache.prepare(config.save_dir, compile_cache.job_fields(config, device, 1)))
    settle_compile_for_one_process()
    # The rank's model, layout and batch (entry/build.py, core/step.py): the same graphs, so the same keys.
    model = job_model(config).to(device)
    if not CompiledInParts.fits(model):
        return 0
    size, batch = config.model.image_size, config.training.batch_size
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, device=device)
    amp = AMP_DTYPES.get(config.speed.amp)
    with torch.autocast(device.type, dtype=amp) if amp else contextlib.nullcontext():
        out = CompiledInParts(model).compiling_one_part(int(argv[2]), normalise(images, config.speed.channels_last))
    # compiles the part's backward (its graph is fixed by the forward's, whatever gradient comes in), and the
    # cache keeps forward and backward together
    out.backward(torch.ones_like(out))
    exit_process(0)


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
