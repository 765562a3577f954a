"""Files a user keeps, written so that a kill at any instant leaves the old file or the new one, never half of one.

Every file goes to a temporary name beside its own, is flushed, fsynced and
renamed over the name, and then the directory is fsynced.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import BinaryIO, Callable, Optional

TEMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(
    path: str, write: Callable[[BinaryIO], None], before_rename: Optional[Callable[[], None]] = None
) -> None:
    """`write` into a temporary file beside `path`, fsync it, rename it over `path`, fsync the dir.
    `before_rename` runs once the data is safe on disk, before the file takes its name (a record naming it)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=TEMP_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_rename is not None:
            before_rename()
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(directory)


def save_atomically(obj, path: str, before_rename: Optional[Callable[[], None]] = None) -> None:
    import torch

    write_atomically(path, lambda f: torch.save(obj, f), before_rename)


def strict_json(value):
    """`value` with every non-finite float (a diverged loss, the percentile of no steps) as None: JSON has no NaN,
    and jq, log agents and Prometheus' tooling refuse it."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(item) for item in value]
    return value


def write_json(path: str, payload: dict) -> None:
    text = json.dumps(strict_json(payload), indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomically(path, lambda f: f.write(text.encode()))


def root_cause(exc: BaseException) -> str:
    """The operating system's words for a failed write, if an OSError lies under the exception."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return str(exc)
