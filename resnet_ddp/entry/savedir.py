"""One job per save dir: an exclusive lock held for the job's life, and what an interrupted job left behind.

The process that holds global rank 0 (the launcher, or rank 0's own process under
torchrun) takes a POSIX record lock on <save-dir>/.lock and writes its host and pid
into it. The kernel releases the lock when that process dies, however it dies; on a
shared volume (NFS) the server does, within its lease (90 s by default on NFSv4), so a
pod restarted on another node may meet a lock its predecessor held. A lock held by a
process on this host is a second job: refused at once. One held from another host is
waited for (LOCK_WAIT_S), then refused.
"""

from __future__ import annotations

import fcntl
import glob
import json
import logging
import os
import socket
import time
from datetime import datetime, timezone
from typing import List

from resnet_ddp.errors import UsageError

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
LOCK_WAIT_S = 150.0  # longer than an NFSv4 lease (90 s by default), with room for the server's grace
LOCK_RETRY_S = 2.0
# Temporary files of interrupted atomic writes (core/files.py) and of the preflight's write test.
STALE_PATTERNS = (
    ".checkpoint-*.tmp",
    ".model_final.pth.*.tmp",
    ".summary.json.*.tmp",
    ".checkpoints.json.*.tmp",
    ".preflight.json.*.tmp",
    ".preflight-write-test-*",
)

_held: List[int] = []  # the lock's file descriptor, open for the life of the process


def lock(save_dir: str, wait_s: float = LOCK_WAIT_S) -> None:
    """Hold the save dir for this job, or refuse (UsageError) naming the job that holds it."""
    path = os.path.join(save_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise UsageError(f"save dir {save_dir}: its lock file {path} cannot be opened: {exc.strerror or exc}") from None
    deadline = time.monotonic() + wait_s
    said = False
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            holder = _holder(path)
            here = holder.get("host") == socket.gethostname()
            if here or time.monotonic() >= deadline:
                os.close(fd)
                raise UsageError(
                    f"save dir {save_dir} is in use by another job ({_describe(holder)}): give each "
                    "job its own --save-dir, or stop the other one"
                ) from None
            if not said:
                log.warning(
                    f"waiting up to {wait_s:.0f} s for the save dir {save_dir}, locked by "
                    f"{_describe(holder)} (on a shared volume, a lock whose holder died is released "
                    "within the server's lease)"
                )
                said = True
            time.sleep(LOCK_RETRY_S)
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since_utc": datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
    _held.append(fd)


def _holder(path: str) -> dict:
    try:
        with open(path) as f:
            holder = json.loads(f.read() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a process that has not said who it is"
    return f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since_utc')}"


def remove_stale_files(save_dir: str) -> List[str]:
    """Under the lock: temporary files that interrupted writes left (never renamed, never to be)."""
    removed = []
    for pattern in STALE_PATTERNS:
        for path in glob.glob(os.path.join(save_dir, pattern)):
            try:
                os.unlink(path)
                removed.append(path)
            except OSError:
                pass
    return removed
