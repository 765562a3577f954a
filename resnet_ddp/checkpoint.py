"""Checkpoints and the final model: atomic writes, pruning, finding where to resume.

Every file is written to a temporary name, flushed, fsynced and renamed, so a
kill at any instant leaves either the old file or the new one.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from typing import BinaryIO, Callable, Dict, List, Optional, Tuple

import torch

from resnet_ddp.errors import CheckpointWriteError, UsageError
from resnet_ddp.tensors import copy_all

FINAL_MODEL_NAME = "model_final.pth"


def ensure_writable_dir(path: str) -> None:
    """Create the save dir and prove we can write there, before any training starts."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise UsageError(f"save dir {path!r} is not writable: {exc.strerror or exc}") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """`write` into a temporary file beside `path`, fsync it, rename it over `path`, fsync the dir."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def save_atomically(obj, path: str) -> None:
    write_atomically(path, lambda f: torch.save(obj, f))


def export_final_model(state_dict: dict, save_dir: str) -> str:
    path = os.path.join(save_dir, FINAL_MODEL_NAME)
    save_atomically(state_dict, path)
    return path


CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_SUFFIX = ".pt"
FORMAT_VERSION = 1


def checkpoint_path(save_dir: str, global_step: int) -> str:
    return os.path.join(save_dir, f"{CHECKPOINT_PREFIX}{global_step:09d}{CHECKPOINT_SUFFIX}")


def list_checkpoints(save_dir: str) -> List[str]:
    """The checkpoints in the save dir, newest (highest step) first."""
    if not os.path.isdir(save_dir):
        return []
    names = [n for n in os.listdir(save_dir) if n.startswith(CHECKPOINT_PREFIX) and n.endswith(CHECKPOINT_SUFFIX)
             and n[len(CHECKPOINT_PREFIX):-len(CHECKPOINT_SUFFIX)].isdigit()]
    return [os.path.join(save_dir, n) for n in sorted(names, reverse=True)]


def save_checkpoint(state: dict, save_dir: str, keep: int) -> str:
    """Write atomically, then prune the older ones: a failed write leaves the previous checkpoints as they were."""
    path = checkpoint_path(save_dir, state["global_step"])
    try:
        save_atomically(dict(state, format=FORMAT_VERSION), path)
    except Exception as exc:  # torch.save wraps the disk's OSError in a RuntimeError
        raise CheckpointWriteError(f"could not write checkpoint {path}: {_root_cause(exc)}; "
                                   "the previous checkpoints are intact") from exc
    for old in list_checkpoints(save_dir)[keep:]:
        os.unlink(old)
    return path


class HostSnapshot:
    """Host buffers that a state's tensors are copied into: allocated once, reused by every checkpoint.

    From a GPU, training holds only for one fused copy of the state into GPU
    staging buffers, queued on the training stream so that it reads the weights
    before the next step changes them. The writer's thread then copies the
    staging buffers into pinned host memory on a stream of its own, beside the
    next steps (`wait_copied`). Copying straight into pinned memory on the
    training stream held ResNet-50 training 4-5 ms on the GPU, after 6-8 ms of
    host time queueing 320 copies (the other ranks wait for rank 0 in the next
    collective); a blocking copy into fresh pageable memory held it 0.02-0.10 s.
    The price: a second copy of the state in rank 0's GPU memory.
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
            staged = _StagedCopy(device, [self._staging[path] for path, _ in device_pairs],
                                 [self._buffers[path] for path, _ in device_pairs])
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
    """Writes checkpoints in a background thread, so training goes on while the disk works.

    `submit` queues the state's copy into host buffers (HostSnapshot), then a
    thread waits for the copy, writes it atomically and prunes the old ones. One
    write at a time: a new submit first waits for the one before (whose buffers
    it reuses). A failed write is raised by the next `submit` or by `wait`,
    which the job calls before it ends or stops, so nothing is reported as saved
    that is not on disk.
    """

    def __init__(self, save_dir: str, keep: int, on_written: Callable[[dict], None]):
        """`on_written` gets, from the writer's thread, the figures of each write once it is on disk."""
        self.save_dir, self.keep, self.on_written = save_dir, keep, on_written
        self._snapshot = HostSnapshot()
        self._thread: Optional[threading.Thread] = None
        self._error: Optional[BaseException] = None

    def reserve(self, state: dict) -> None:
        """Allocate host memory for checkpoints of this state before training, not at the first checkpoint."""
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
            path = save_checkpoint(state, self.save_dir, self.keep)
            figures = {"global_step": state["global_step"], "path": path, "bytes": os.path.getsize(path),
                       "write_s": time.perf_counter() - started, "training_held_s": held_s}
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


def _root_cause(exc: BaseException) -> str:
    """The operating system's words for a failed write, if an OSError lies under the exception."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(exc)


def _load(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except TypeError:  # torch < 1.13 has no weights_only
        return torch.load(path, map_location="cpu")


def _describe_mismatch(saved: dict, wanted: dict) -> str:
    return ", ".join(f"{k} {saved.get(k)!r} (now {wanted[k]!r})" for k in wanted if saved.get(k) != wanted[k])


def find_resume_point(config, report: bool = True) -> Optional[Tuple[str, dict]]:
    """The checkpoint to continue from, loaded, or None to start afresh.

    auto: the newest checkpoint in the save dir that loads; an unreadable one is
    reported and the one before it tried. A checkpoint made with other
    arithmetic options is refused (UsageError), not loaded and not overwritten.
    """
    if config.resume == "never":
        return None
    candidates = [config.resume] if config.resume != "auto" else list_checkpoints(config.save_dir)
    for path in candidates:
        try:
            state = _load(path)
            state["global_step"]  # a file torch can read but that is no checkpoint of ours
        except Exception as exc:  # truncated, corrupt, or not ours
            if config.resume != "auto":
                raise UsageError(f"--resume {path}: not a readable checkpoint ({type(exc).__name__})") from None
            if report:
                print(f"resnet-ddp: checkpoint {path} is unreadable ({type(exc).__name__}); "
                      "trying the one before it", file=sys.stderr, flush=True)
            continue
        wanted = config.fingerprint()
        if state.get("fingerprint") != wanted:
            raise UsageError(
                f"checkpoint {path} was made with other arithmetic: {_describe_mismatch(state.get('fingerprint') or {}, wanted)}; "
                "run with the same options, or with --resume never and another --save-dir"
            )
        return path, state
    return None
