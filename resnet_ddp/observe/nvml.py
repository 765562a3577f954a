"""This rank's GPU as NVML sees it (utilisation, memory, power, temperature), sampled off the training path.

NVML is optional at run time: without the nvidia-ml-py package, without the
driver's library, or for a device NVML cannot find, `GpuMonitor.start` returns
None and the figures are simply absent. A figure the GPU does not report (power
on some boards, utilisation on a MIG slice) is left out on its own.
"""

from __future__ import annotations

import threading
from typing import Callable, Dict, Optional

import torch

from resnet_ddp.core.callbacks import Callback

SAMPLE_EVERY_S = 1.0


def nvml_uuid(device: torch.device) -> Optional[str]:
    """The device's UUID as NVML spells it ('GPU-...'), or None on a torch too old to tell it."""
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is None:
        return None
    text = str(uuid)
    return text if text.startswith(("GPU-", "MIG-")) else "GPU-" + text


def _find_handle(pynvml, device: torch.device):
    """NVML numbers GPUs by PCI order, CUDA by CUDA_VISIBLE_DEVICES and speed: match them by UUID."""
    uuid = nvml_uuid(device)
    if uuid is None:
        return None
    try:
        return pynvml.nvmlDeviceGetHandleByUUID(uuid.encode())  # bytes: older nvidia-ml-py takes no str
    except pynvml.NVMLError:
        return None


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class GpuMonitor(Callback):
    """Samples this rank's GPU every SAMPLE_EVERY_S in a thread; stops at the end of the run."""

    def __init__(
        self,
        pynvml,
        handle,
        counting: Callable[[], bool],
        on_sample: Optional[Callable[[Dict[str, str], Dict[str, float]], None]],
    ):
        self._nvml = pynvml
        self._handle = handle
        self._counting = counting
        self._on_sample = on_sample
        self.identity = {"gpu": str(pynvml.nvmlDeviceGetIndex(handle)), "uuid": _text(pynvml.nvmlDeviceGetUUID(handle))}
        self.latest: Dict[str, float] = {}
        self._util_sum, self._util_count = 0.0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="resnet-ddp-nvml", daemon=True)

    @classmethod
    def start(cls, device: torch.device, counting: Callable[[], bool], on_sample=None) -> Optional["GpuMonitor"]:
        """A running monitor for `device`, or None where NVML cannot tell us about it.

        `counting()` says whether a sample counts towards the run's mean utilisation
        (the steady window); `on_sample(identity, sample)` gets every sample.
        """
        if device.type != "cuda":
            return None
        try:
            import pynvml
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError:  # no driver library, or no permission
            return None
        try:
            handle = _find_handle(pynvml, device)
            monitor = cls(pynvml, handle, counting, on_sample) if handle is not None else None
        except Exception:  # monitoring is optional: whatever NVML or an old binding does, train without it
            monitor = None
        if monitor is None:
            pynvml.nvmlShutdown()
            return None
        monitor.sample()  # figures from the start, before the first interval has passed
        monitor._thread.start()
        return monitor

    def sample(self) -> Dict[str, float]:
        nvml, handle = self._nvml, self._handle

        def memory():
            info = nvml.nvmlDeviceGetMemoryInfo(handle)
            return {"gpu_mem_used_gib": info.used / 2**30, "gpu_mem_total_gib": info.total / 2**30}

        readings = (
            lambda: {"gpu_util_pct": float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)},
            memory,
            lambda: {"gpu_power_w": nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0},
            lambda: {"gpu_temp_c": float(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))},
        )
        sample: Dict[str, float] = {}
        for read in readings:
            try:
                sample.update(read())
            except nvml.NVMLError:
                continue  # not supported on this GPU (or not now): leave it out
        if "gpu_util_pct" in sample and self._counting():
            self._util_sum += sample["gpu_util_pct"]
            self._util_count += 1
        self.latest = sample  # replaced whole: readers in other threads see one sample or the next
        if self._on_sample is not None:
            self._on_sample(self.identity, sample)
        return sample

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY_S):
            self.sample()

    def mean_utilisation_pct(self) -> Optional[float]:
        return self._util_sum / self._util_count if self._util_count else None

    def fields(self) -> Dict[str, float]:
        """For every step record: the latest sample."""
        return self.latest

    def on_end(self, state, outcome) -> None:
        self.stop()

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        self._nvml.nvmlShutdown()
