"""SyncBatchNorm's jitted kernels compiled by a helper process while the ranks start, not in their first step.

On a GPU, in fp32, the layer runs kernels that torch compiles with NVRTC at their
first use and keeps in its kernel cache (PYTORCH_KERNEL_CACHE_PATH, in the save dir:
core/compile_cache.py). A job with a new save dir would compile them in its first
step, seconds after everything else is ready. Instead, the process of local rank 0
starts a helper the moment it starts, before it imports torch; the helper compiles
them (layers/syncbn.build_fused_kernels) while the ranks import torch and build the
model, holding a lock on the cache for as long as it runs. Before its first step,
every local rank waits for that lock, then finds the kernels in the cache.

Nothing depends on the helper: one that fails, or is not started, leaves the ranks
to compile what the cache lacks, as they would without it. It is not started where
its second CUDA context could disturb the job: a GPU whose compute mode lets one
process only (or whose mode is unknown), preflight checks that measure the GPU, and
a memory ballast sized from the GPU's free memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from typing import List, Optional

from resnet_ddp.config import Config
from resnet_ddp.entry.process import start_helper

log = logging.getLogger(__name__)

LOCK_NAME = ".prebuild.lock"
WAIT_S = 120.0  # far above the helper's few seconds: past it, a rank compiles what is missing itself
_POLL_S = 0.05

_helper: List[subprocess.Popen] = []  # local rank 0's helper, waited for before its first step


def wanted(config: Config, gpu_shared: Optional[bool], environ=os.environ) -> bool:
    """Whether this job's ranks will run the jitted kernels and a helper may compile them beside them."""
    model, speed = config.model, config.speed
    return (
        not config.process.cpu
        and model.sync_bn
        and model.fuse_bn_relu
        and speed.amp == "off"
        and not speed.compile
        and gpu_shared is True
        and config.health.preflight == "off"
        and config.scenario.gpu_memory_ballast is None
        and environ.get("USE_PYTORCH_KERNEL_CACHE") != "0"
        and bool(environ.get("PYTORCH_KERNEL_CACHE_PATH"))
    )


def start(device_index: int, environ=os.environ) -> None:
    """In local rank 0's process, before torch: start the helper if the kernel cache is empty (a new save dir)."""
    cache = environ["PYTORCH_KERNEL_CACHE_PATH"]
    try:
        os.makedirs(cache, exist_ok=True)
        if any(name != LOCK_NAME for name in os.listdir(cache)):
            return  # filled by an earlier start: loading them takes no time
        helper = start_helper(__name__, [cache, str(device_index), str(os.getpid())], environ)
    except OSError as exc:  # a read-only cache, no room for a process: the ranks compile them
        log.debug(f"SyncBatchNorm's kernels are not prebuilt: {exc}")
        return
    _helper.append(helper)


def wait(cache: Optional[str], timeout_s: float = WAIT_S) -> bool:
    """Before the first step: wait until no helper is filling `cache`; whether it was free within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while _helper:
        with contextlib.suppress(subprocess.TimeoutExpired):
            code = _helper[-1].wait(max(0.0, deadline - time.monotonic()))
            if code != 0:
                log.debug(f"the helper prebuilding SyncBatchNorm's kernels exited with {code}")
        _helper.pop()  # one that outlived the wait is left to its end: it dies with this process
    if not cache:
        return True
    try:
        fd = os.open(os.path.join(cache, LOCK_NAME), os.O_RDONLY)
    except OSError:  # no helper has run here
        return True
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    return False
                time.sleep(_POLL_S)
            except OSError:  # a file system without flock: nothing to wait on
                return True
    finally:
        os.close(fd)  # releases the shared lock


def _main(argv: List[str]) -> int:
    """The helper: `python -m resnet_ddp.entry.kernel_prebuild CACHE_DIR DEVICE_INDEX PARENT_PID`. It locks the
    cache, then compiles the kernels into it on the rank's GPU, and dies with the rank (its parent)."""
    cache, device_index, parent = argv[0], int(argv[1]), int(argv[2])
    from resnet_ddp.entry.process import die_with_parent

    die_with_parent(parent)
    os.nice(10)  # the ranks' own start comes first
    fd = os.open(os.path.join(cache, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)  # held until this process ends, however it ends
    os.environ["PYTORCH_KERNEL_CACHE_PATH"] = cache
    import torch

    from resnet_ddp.layers.syncbn import build_fused_kernels

    build_fused_kernels(torch.device("cuda", device_index))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
