"""Settling every "where it can run" value of the configuration into a plain one, before any process starts.

What the launcher can know (the device kind, the compiler, peer access between the
node's GPUs, the torch in use) is settled here once; a refusal is a UsageError
(exit 2). The one thing only a training process can learn, whether symmetric
memory actually maps, is settled by that process before its Trainer is built
(entry/build.py); after that the configuration is never rewritten.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
from dataclasses import replace
from typing import Optional, Tuple

from resnet_ddp.config import Config
from resnet_ddp.errors import UsageError

log = logging.getLogger(__name__)


def settle(config: Config, plan, announce: bool) -> Config:
    """The configuration with channels_last, CUDA graphs, compile and symmetric memory as plain booleans.

    `plan` is the launch plan (entry/launch.py); `announce`: this process says, in one line, where a
    choice made for the user fell back.
    """
    cpu = plan.device_type != "cuda"
    speed = config.speed
    capturable = not cpu and speed.amp != "fp16"  # fp16's gradient scaler reads the host every step
    speed = replace(
        speed,
        channels_last=(not cpu) if speed.channels_last is None else speed.channels_last,
        cuda_graphs=capturable if speed.cuda_graphs is None else (speed.cuda_graphs and capturable),
        compile=_settle_compile(config, plan.device_type, announce),
    )
    config = replace(config, speed=speed)
    return replace(config, speed=replace(speed, syncbn_symm_mem=_settle_symm_mem(config, plan, announce)))


def _settle_compile(config: Config, device_type: str, announce: bool) -> bool:
    """--fast without --compile/--no-compile compiles on GPUs where inductor can build its kernels; an explicit
    --compile where it cannot is refused. A slim image without a compiler still runs --fast, uncompiled, and
    says so."""
    wanted = config.speed.compile
    if wanted is False:
        return False
    missing = compiler_missing(device_type)
    if wanted:
        if missing is not None:
            raise UsageError(f"--compile {missing}: drop --compile, or use an image that has it")
        return True
    if device_type != "cuda":  # compiling the CPU step buys little for minutes of start-up
        return False
    why = f"torch.compile {missing}" if missing is not None else None
    if why is None and config.model.sync_bn:
        version = torch_version()
        if _release(version) < (2, 5):  # the gate of layers/syncbn.py's traceable collectives
            why = (
                f"torch {version} splits the compiled graph at every SyncBatchNorm layer (2.5 or newer compiles "
                "it whole); --compile asks for it anyway"
            )
    if why is not None and announce:
        log.info(f"--fast runs without --compile here: {why}")
    return why is None


def compiler_missing(device_type: str) -> Optional[str]:
    """What inductor lacks here to build its kernels, or None.

    On GPUs inductor writes Triton kernels, and Triton builds its launcher with a
    C compiler (CC, else gcc or clang); on CPUs inductor writes C++ and builds it
    with CXX, else g++. Slim runtime images often have neither.
    """
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "needs Triton to build GPU kernels, and it is not installed here"
        wanted = "a C compiler (gcc or clang, or the one CC names)"
        names = [os.environ["CC"]] if os.environ.get("CC") else ["gcc", "clang"]
    else:
        wanted, names = "a C++ compiler (g++, or the one CXX names)", [os.environ.get("CXX") or "g++"]
    if not any(shutil.which(name) for name in names):
        return f"needs {wanted} to build its kernels, and this machine has none"
    return None


def torch_version() -> str:
    """The installed torch's version, read from its package's metadata: importing torch costs seconds."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # a torch built in place, without metadata
        import torch

        return torch.__version__


def _release(version: str) -> Tuple[int, int]:
    """'2.11.0+cu130' -> (2, 11)."""
    major, minor = (version.split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def _settle_symm_mem(config: Config, plan, announce: bool) -> bool:
    """--syncbn-symm-mem is refused where it cannot run; unless given, it is on where it can."""
    wanted = config.speed.syncbn_symm_mem
    if wanted is False:
        return False
    why = _symm_mem_unusable(config, plan)
    if wanted:
        if why is not None:
            raise UsageError(f"--syncbn-symm-mem: {why}")
        return True
    # Said only where a GPU job of several processes with SyncBatchNorm stays on NCCL: where it had a choice.
    if why is not None and announce and plan.device_type == "cuda" and plan.world_size > 1 and config.model.sync_bn:
        log.info(f"SyncBatchNorm's collectives stay on NCCL: {why}")
    return why is None


def _symm_mem_unusable(config: Config, plan) -> Optional[str]:
    if plan.device_type != "cuda":
        return "symmetric memory is for GPUs"
    if not config.model.sync_bn:
        return "SyncBatchNorm is off (--no-sync-bn)"
    if plan.world_size == 1:
        return "a job of one process has no peers"
    if plan.world_size != plan.nproc:
        return (
            f"this launcher starts {plan.nproc} of the job's {plan.world_size} processes, and symmetric memory "
            "needs every process on one node, started together"
        )
    from resnet_ddp.layers import syncbn, syncbn_symm

    # Compiled, inductor lowers the collectives to symmetric memory's kernels; uncompiled, the layer calls them.
    missing = syncbn.symmetric_memory_missing() if config.speed.compile else syncbn_symm.missing()
    if missing is not None:
        return missing
    import torch

    if torch.cuda.device_count() < plan.nproc:
        return f"this process sees {torch.cuda.device_count()} of the node's {plan.nproc} GPUs"
    for a in range(plan.nproc):
        for b in range(plan.nproc):
            if a != b and not torch.cuda.can_device_access_peer(a, b):
                return f"GPU {a} has no peer access to GPU {b}"
    return None
