"""Checkpoints written in the background: one copy of the state off the training stream, then a thread writes it.

From a GPU, training holds only for one fused copy of the state into GPU staging
buffers, queued on the training stream so that it reads the weights before the
next step changes them; the writer's thread copies those into pinned host memory
on a stream of its own and writes the file atomically (core/files.py). The price
is a second copy of the state in rank 0's GPU memory.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from resnet_ddp.core.tensors import copy_all


class HostSnapshot:
    """Host buffers that a state's tensors are copied into: allocated once, reused by every checkpoint.

    Staging on the GPU first, rather than copying straight into pinned memory on
    the training stream, keeps training from waiting while hundreds of small
    copies are queued and run (the other ranks would wait for rank 0 in the next
    collective); the second copy runs on the writer's own stream (`wait_copied`).
    """

    def __init__(self):
        self._buffers: Dict[tuple, torch.Tensor] = {}  # on the host; pinned where the tensor is on a GPU
        self._staging: Dict[tuple, torch.Tensor] = {}  # on the tensor's GPU, in its layout
        self._streams: Dict[torch.device, "torch.cuda.Stream"] = {}
        self._queued: List[_StagedCopy] = []

    def reserve(self, state: dict) -> None:
        """Allocate the buffers for `state`'s tensors now (pinning memory takes time), copying nothing."""
        self._walk(state, (), [])

    def copy(self, state: dict) -> dict:
        """`state` with every tensor replaced by its host buffer, into which a copy is under way."""
        pairs: List[Tuple[tuple, torch.Tensor]] = []
        snapshot = self._walk(state, (), pairs)
        by_device: Dict[torch.device, List[Tuple[tuple, torch.Tensor]]] = {}
        for path, tensor in pairs:
            if tensor.is_cuda:
                by_device.setdefault(tensor.device, []).append((path, tensor))
            else:
                self._buffers[path].copy_(tensor)
        self._queued = []
        for device, device_pairs in by_device.items():
            staged = _StagedCopy(
                device,
                [self._staging[path] for path, _ in device_pairs],
                [self._buffers[path] for path, _ in device_pairs],
            )
            staged.stage([tensor for _, tensor in device_pairs])
            self._queued.append(staged)
        return snapshot

    def wait_copied(self) -> Optional[float]:
        """In the writer's thread: copy the staged state to the host and wait for it.

        Returns the staging copies' time on the training stream in seconds (the
        longest device's), or None when the state was all on the CPU.
        """
        if not self._queued:
            return None
        for staged in self._queued:
            stream = self._streams.get(staged.device)
            if stream is None:
                stream = self._streams[staged.device] = torch.cuda.Stream(staged.device)
            staged.to_host(stream)
        return max(staged.training_held_s() for staged in self._queued)

    def _walk(self, obj, path: tuple, pairs: list):
        if isinstance(obj, torch.Tensor):
            buffer = self._buffers.get(path)
            if buffer is None or buffer.shape != obj.shape or buffer.dtype != obj.dtype:
                # Contiguous whatever the live tensor's layout: the file holds plain tensors.
                buffer = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=obj.is_cuda)
                self._buffers[path] = buffer
                if obj.is_cuda:  # in the live tensor's layout: a layout change takes the foreach copy's slow path
                    self._staging[path] = torch.empty_like(obj, memory_format=torch.preserve_format)
            pairs.append((path, obj.detach()))
            return buffer
        if isinstance(obj, dict):
            return {key: self._walk(value, path + (key,), pairs) for key, value in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._walk(value, path + (i,), pairs) for i, value in enumerate(obj))
        return obj


class _StagedCopy:
    """One GPU's part of a snapshot: live tensors -> staging (training stream) -> pinned host (a side stream)."""

    def __init__(self, device: torch.device, staging: List[torch.Tensor], host: List[torch.Tensor]):
        self.device, self.staging, self.host = device, staging, host
        self._events: List["torch.cuda.Event"] = []

    def stage(self, live: List[torch.Tensor]) -> None:
        stream = torch.cuda.current_stream(self.device)
        start, staged = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        by_dtype: Dict[torch.dtype, Tuple[List[torch.Tensor], List[torch.Tensor]]] = {}
        for staging, tensor in zip(self.staging, live):  # one dtype per fused copy: mixed, it copies one by one
            destinations, sources = by_dtype.setdefault(tensor.dtype, ([], []))
            destinations.append(staging)
            sources.append(tensor)
        for destinations, sources in by_dtype.values():
            copy_all(destinations, sources)
        staged.record(stream)
        self._events = [start, staged]

    def to_host(self, stream: "torch.cuda.Stream") -> None:
        stream.wait_event(self._events[1])  # after the staging copy
        with torch.cuda.stream(stream):
            for host, staging in zip(self.host, self.staging):
                host.copy_(staging, non_blocking=True)
        done = torch.cuda.Event()
        done.record(stream)
        done.synchronize()

    def training_held_s(self) -> float:
        start, staged = self._events
        return start.elapsed_time(staged) / 1000.0


class CheckpointWriter:
    """Writes states in a background thread, so training goes on while the disk works.

    `submit` queues the state's copy into host buffers (HostSnapshot), then a
    thread waits for the copy and calls `write(state)`, which puts it on disk and
    returns the figures of the write. One write at a time: a new submit first
    waits for the one before (whose buffers it reuses). A failed write is raised
    by the next `submit` or by `wait`, so nothing is reported as saved that is not
    on disk.
    """

    def __init__(self, write: Callable[[dict], dict], on_written: Callable[[dict], None]):
        """`write(state)` runs in the writer's thread; `on_written` gets its figures once the file is on disk."""
        self.write, self.on_written = write, on_written
        self._snapshot = HostSnapshot()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def reserve(self, state: dict) -> None:
        """Allocate host memory for states like this one before training, not at the first checkpoint."""
        self._snapshot.reserve(state)

    def submit(self, state: dict, held_since: float) -> None:
        """`held_since`: when training stopped for this checkpoint (perf_counter), for the figures."""
        self.wait()
        snapshot = self._snapshot.copy(state)
        held_s = time.perf_counter() - held_since
        # Not a daemon: a process that ends while a write is under way finishes it (or its clean-up) first.
        self._thread = threading.Thread(target=self._write, args=(snapshot, held_s), name="checkpoint-writer")
        self._thread.start()

    def _write(self, state: dict, held_s: float) -> None:
        started = time.perf_counter()
        try:
            copy_s = self._snapshot.wait_copied()
            figures = self.write(state)
            figures.update(write_s=time.perf_counter() - started, training_held_s=held_s)
            if copy_s is not None:
                figures["gpu_copy_s"] = copy_s
            self.on_written(figures)
        except BaseException as exc:  # raised in the training thread by the next submit or wait
            self._error = exc

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error
