"""Checkpoints and the final model: atomic writes, pruning, finding where to resume.

Every file is written to a temporary name, flushed, fsynced and renamed, so a
kill at any instant leaves either the old file or the new one.
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import BinaryIO, Callable, List, Optional, Tuple

import torch

from resnet_ddp.errors import CheckpointWriteError, UsageError

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
