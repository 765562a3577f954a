"""Caches kept in the save dir, so that a restarted job (a new pod: an empty /tmp and home) reuses them.

Python's bytecode of torch, where the image has none (keep_python_bytecode_in). Then two kinds of
kernels. The CUDA driver's cache of kernels compiled from PTX at load time
(CUDA_CACHE_PATH, by default in the home directory) and torch's cache of the kernels
it compiles with NVRTC (PYTORCH_KERNEL_CACHE_PATH, SyncBatchNorm's fused kernels):
both key their entries themselves, and a restart that finds them empty spends many
seconds in its first step compiling again. They go to <save-dir>/compile-cache/cuda
and .../kernels unless the user has set those variables.

Inductor keeps its compiled graphs and kernels under TORCHINDUCTOR_CACHE_DIR and
Triton its binaries under TRITON_CACHE_DIR, by default in /tmp, which a restarted
pod has lost. Here they live in <save-dir>/compile-cache/<key>/, the save dir being
what survives a restart. The key names everything that could make an artifact
wrong for this job (torch, Triton, CUDA, the GPU's model and compute capability,
Python, the options that change the compiled graph), so that another torch, GPU or
configuration never finds another's artifacts; key.json beside them says what the
key is made of, and a directory whose key.json does not match its name is emptied
before use rather than trusted.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import shutil
import sys
import tempfile
from typing import Dict

CACHE_DIR = "compile-cache"
KEY_NAME = "key.json"
BYTECODE_DIR = "python"


def keep_machine_caches_in(save_dir: str) -> None:
    """Before CUDA starts in this process (its children inherit it): the driver's and torch's kernel caches
    in the save dir, where the user has not chosen a place for them. Nothing is created here."""
    base = os.path.join(os.path.abspath(save_dir), CACHE_DIR)
    os.environ.setdefault("CUDA_CACHE_PATH", os.path.join(base, "cuda"))
    if os.environ.get("USE_PYTORCH_KERNEL_CACHE") != "0":
        os.environ.setdefault("PYTORCH_KERNEL_CACHE_PATH", os.path.join(base, "kernels"))


def keep_python_bytecode_in(save_dir: str) -> None:
    """Where the installed torch has no bytecode beside its sources, the job's processes keep what they compile
    in <save-dir>/compile-cache/python, before any of them imports torch.

    An image built without bytecode (PYTHONDONTWRITEBYTECODE set, or pip's --no-compile) has every process
    compile torch's Python source again as it imports it: seconds of each start, in each process. With
    PYTHONPYCACHEPREFIX set, Python reads and writes bytecode only under that directory, never beside the
    sources; so it is left unset where the image has the bytecode (it would be hidden), as is a prefix
    the user chose.
    """
    if sys.pycache_prefix is not None or os.environ.get("PYTHONPYCACHEPREFIX"):
        return
    spec = importlib.util.find_spec("torch")  # found, not imported
    if spec is None or not spec.origin or os.path.exists(importlib.util.cache_from_source(spec.origin)):
        return
    prefix = os.path.join(os.path.abspath(save_dir), CACHE_DIR, BYTECODE_DIR)
    os.environ["PYTHONPYCACHEPREFIX"] = prefix
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    sys.pycache_prefix, sys.dont_write_bytecode = prefix, False


def cache_key(fields: Dict[str, object]) -> str:
    """A short, stable name for `fields`."""
    text = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def environment_fields(device) -> Dict[str, object]:
    """What the installed software and the GPU contribute to the key."""
    import torch

    fields: Dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "device": str(device.type),
    }
    try:
        import triton

        fields["triton"] = triton.__version__
    except ImportError:
        fields["triton"] = None
    if device.type == "cuda":
        fields["gpu"] = torch.cuda.get_device_name(device)
        fields["capability"] = list(torch.cuda.get_device_capability(device))
    return fields


def job_fields(config, device, world_size: int) -> Dict[str, object]:
    """Everything of a job (a Config) and its machine that shapes what torch.compile makes for it."""
    speed = config.speed
    return {
        **environment_fields(device),
        **config.fingerprint(),
        "batch_size": config.training.batch_size,
        "channels_last": speed.channels_last,
        "cuda_graphs": speed.cuda_graphs,
        "sync_bn": config.model.sync_bn,
        "fuse_bn_relu": config.model.fuse_bn_relu,
        "syncbn_symm_mem": speed.syncbn_symm_mem,
        "world_size": world_size,
    }


def compiled_before(save_dir: str) -> bool:
    """Whether a job in this save dir has compiled anything (without importing torch): a restart loads it."""
    try:
        return any(
            os.path.isdir(os.path.join(save_dir, CACHE_DIR, name, "inductor"))
            for name in os.listdir(os.path.join(save_dir, CACHE_DIR))
        )
    except OSError:
        return False


def directory(save_dir: str, fields: Dict[str, object]) -> str:
    return os.path.join(save_dir, CACHE_DIR, cache_key(fields))


def prepare(save_dir: str, fields: Dict[str, object]) -> str:
    """The cache directory for `fields` under the save dir, made, checked and ready; its path.

    The directory appears with its key.json in it (renamed into place whole), so that a process preparing it
    beside another (the rank and its compile helper, entry/compile_prebuild.py) never finds it without one.
    """
    path = directory(save_dir, fields)
    if os.path.isdir(path) and _read(os.path.join(path, KEY_NAME)) != fields:
        shutil.rmtree(path, ignore_errors=True)  # not what its name says: never load from it
    if not os.path.isdir(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        new = tempfile.mkdtemp(prefix=".new-", dir=os.path.dirname(path))
        with open(os.path.join(new, KEY_NAME), "w") as f:
            json.dump(fields, f, indent=2, sort_keys=True)
        try:
            os.rename(new, path)
        except OSError:  # made meanwhile by another process
            shutil.rmtree(new, ignore_errors=True)
    return path


def use(directory: str) -> None:
    """Point inductor's and Triton's caches of this process at `directory` (before anything is compiled)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(directory, "inductor")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(directory, "triton")


def _read(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
