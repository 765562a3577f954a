"""The GPUs this process can use, as the launcher needs them: how many, their name, compute capability and memory.

Asked of NVML and filtered by CUDA_VISIBLE_DEVICES the way CUDA filters it, so that the
launcher starts its ranks without importing torch, which takes seconds of every start.
Where NVML cannot say for certain which GPUs CUDA will show (no NVML, MIG instances, an
entry it cannot match), torch is asked instead.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import List, Mapping, Optional, Sequence, Tuple


@dataclass(frozen=True)
class Gpu:
    name: str
    capability: Tuple[int, int]
    total_memory: int  # bytes
    shared: Optional[bool] = None  # whether other processes may use it beside ours (compute mode); None: unknown


def visible_gpus(environ: Mapping[str, str]) -> List[Gpu]:
    """The GPUs CUDA will show this process, in its order where that can matter."""
    found = _from_nvml(environ)
    return found if found is not None else _from_torch()


def select(visible: Optional[str], uuids: Sequence[str], names: Sequence[str], pci_order: bool) -> Optional[List[int]]:
    """NVML's indices of the GPUs that CUDA_VISIBLE_DEVICES=`visible` shows, or None where that is uncertain.

    Entries are indices in CUDA's order or (prefixes of) UUIDs; CUDA ignores everything from the first index
    that names no GPU ("-1" or "" hides them all). CUDA's indices follow NVML's PCI order with CUDA_DEVICE_ORDER=
    PCI_BUS_ID, or where every GPU is of one model (its fastest-first order cannot tell them apart then).
    """
    if visible is None:
        return list(range(len(uuids)))
    chosen: List[int] = []
    for entry in (part.strip() for part in visible.split(",")):
        if not entry:
            break
        if entry.startswith("MIG-"):
            return None  # a MIG instance: CUDA shows the instance, NVML the GPU that holds it
        if entry.lstrip("-").isdigit():
            index = int(entry)
            if not pci_order and len(set(names)) > 1:
                return None
            if not 0 <= index < len(uuids):
                break
            found = index
        else:
            matches = [i for i, uuid in enumerate(uuids) if uuid.startswith(entry)]
            if len(matches) != 1:
                return None
            found = matches[0]
        if found in chosen:
            return None
        chosen.append(found)
    return chosen


def _from_nvml(environ: Mapping[str, str]) -> Optional[List[Gpu]]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # no nvidia-ml-py, or no driver: torch will say what it sees
        return None
    try:
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if any(_mig_enabled(pynvml, handle) for handle in handles):
            return None
        uuids = [_text(pynvml.nvmlDeviceGetUUID(handle)) for handle in handles]
        names = [_text(pynvml.nvmlDeviceGetName(handle)) for handle in handles]
        pci_order = environ.get("CUDA_DEVICE_ORDER") == "PCI_BUS_ID"
        chosen = select(environ.get("CUDA_VISIBLE_DEVICES"), uuids, names, pci_order)
        if chosen is None:
            return None
        return [
            Gpu(
                names[i],
                tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handles[i])),
                int(pynvml.nvmlDeviceGetMemoryInfo(handles[i]).total),
                _shared(pynvml, handles[i]),
            )
            for i in chosen
        ]
    except Exception:  # an NVML error, or an nvidia-ml-py too old for one of these calls: torch is asked
        return None
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()


def _mig_enabled(pynvml, handle) -> bool:
    try:
        current, _pending = pynvml.nvmlDeviceGetMigMode(handle)
    except pynvml.NVMLError:  # a GPU without MIG
        return False
    return bool(current)


def _shared(pynvml, handle) -> Optional[bool]:
    """Whether the GPU's compute mode lets several processes hold a context on it (NVML's default mode)."""
    try:
        return pynvml.nvmlDeviceGetComputeMode(handle) == pynvml.NVML_COMPUTEMODE_DEFAULT
    except Exception:  # an nvidia-ml-py without the call, or an NVML error: not known
        return None


def _from_torch() -> List[Gpu]:
    import torch

    gpus = []
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        gpus.append(Gpu(properties.name, (properties.major, properties.minor), int(properties.total_memory)))
    return gpus


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
