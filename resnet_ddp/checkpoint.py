"""Writing files so that a kill at any instant leaves either the old file or the new one."""

from __future__ import annotations

import os
import tempfile

import torch

from resnet_ddp.errors import UsageError

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


def save_atomically(obj, path: str) -> None:
    """torch.save to a temporary file beside `path`, fsync it, rename it over `path`, fsync the dir."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def export_final_model(state_dict: dict, save_dir: str) -> str:
    path = os.path.join(save_dir, FINAL_MODEL_NAME)
    save_atomically(state_dict, path)
    return path
