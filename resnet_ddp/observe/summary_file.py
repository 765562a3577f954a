"""summary.json as a file, without torch: its name, its times, writing it, and the short one a launcher
writes when rank 0 ended without writing its own.

observe/summary.py writes the summary of every run that rank 0 sees end. A rank 0 that is killed (the OOM
killer, --fail-mode kill) or ends at once on a stop signal before its first step writes none, and an earlier
run's summary.json would then pass for this one's. The launcher that started rank 0 (standalone and node-env
modes) sees it end, and writes what it knows; it never imports torch.
"""

from __future__ import annotations

import dataclasses
import os
import time
from datetime import datetime, timezone
from typing import Optional, Tuple

from resnet_ddp import __version__
from resnet_ddp.core.files import write_json

SUMMARY_NAME = "summary.json"


def utc_iso(unix_time: float) -> str:
    return datetime.fromtimestamp(unix_time, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_summary(save_dir: str, summary: dict) -> None:
    write_json(os.path.join(save_dir, SUMMARY_NAME), summary)


def summary_identity(save_dir: str) -> Optional[Tuple[int, int]]:
    """Which summary.json the save dir holds now (None: none): every write replaces the file, so a run that
    wrote one leaves another identity than it found."""
    try:
        stat = os.stat(os.path.join(save_dir, SUMMARY_NAME))
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns


def write_launcher_summary(save_dir: str, outcome, config, world_size: int, device: str) -> None:
    """summary.json of a job whose rank 0 wrote none, from what its launcher saw: how the job ended (a
    core.outcome.RunOutcome) and what it was; no figures (the ranks had them). Never raises: the job's exit code
    is what must get out."""
    summary = {
        **outcome.summary_fields(),
        "world_size": world_size,
        "device": device,
        "version": __version__,
        "config": dataclasses.asdict(config),  # write_json makes its infinities null
        "ended_utc": utc_iso(time.time()),
    }
    try:
        write_summary(save_dir, summary)
    except OSError:
        pass
