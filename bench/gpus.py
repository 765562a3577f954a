"""Which GPUs a benchmark's child jobs get: the first N of those this process may use.

With CUDA_VISIBLE_DEVICES=2,3 a script runs its jobs on GPUs 2 and 3, so two
benchmarks can share one machine side by side. The numbers are also NVML's
indices: children number GPUs in PCI bus order, as NVML does.
"""

from __future__ import annotations

import os
from typing import List

# NVLink multicast stays off (a shared machine's rule) in every child; CUDA numbers GPUs as NVML does.
SAFE_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
    "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
}


def first_gpus(count: int) -> List[int]:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    indices = [int(i) for i in visible.split(",") if i.strip()] if visible else list(range(count))
    if len(indices) < count:
        raise SystemExit(f"bench: {count} GPU(s) asked for, CUDA_VISIBLE_DEVICES={visible} has {len(indices)}")
    return indices[:count]


def child_env(count: int, **extra: str) -> dict:
    """This process's environment for a child job on the first `count` GPUs, multicast off."""
    return dict(os.environ, **SAFE_ENV, CUDA_VISIBLE_DEVICES=",".join(map(str, first_gpus(count))), **extra)
