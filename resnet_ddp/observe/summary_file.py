"""summary.json as a file, without torch: its name, its times, writing it, and the short one a launcher
writes when rank 0 ended without writing its own.

observe/summary.py writes the summary of every run that rank 0 sees end, and one that says `running` as its
training starts, so that an earlier run's never passes for this one's. A rank 0 that is killed (the OOM
killer, --fail-mode kill) or ends at once on a stop signal writes no end: the launcher that started it
(standalone and node-env modes) sees it end, and writes what it knows; it never imports torch. Under torchrun,
whose agent is rank 0's parent, the `running` one stays.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from datetime import datetime, timezone
from typing import Optional, Tuple

from resnet_ddp import __version__
from resnet_ddp.core.files import write_json

SUMMARY_NAME = "summary.json"
RUNNING = "running"  # the exit_reason of a run that has not ended, or ended without a word


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


def read_summary_file(save_dir: str) -> Optional[dict]:
    """The save dir's summary.json as written, or None where there is none, or none that parses to an object."""
    try:
        with open(os.path.join(save_dir, SUMMARY_NAME), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    return summary if isinstance(summary, dict) else None


def says_running(save_dir: str) -> bool:
    """Whether the save dir's summary.json is that of a run that has not written its end."""
    summary = read_summary_file(save_dir)
    return summary is not None and summary.get("exit_reason") == RUNNING


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
