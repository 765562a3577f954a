"""Checkpoint files by name, and the lineage that orders them: what a save dir holds, without loading torch.

A checkpoint is <save-dir>/checkpoint-<global step>.pt; <save-dir>/checkpoints.json names
the run's lineage, newest first (core/checkpoint.py says why step numbers alone cannot
order them), and the options its arithmetic was made with. The launcher reads these
before any training process starts.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

from resnet_ddp.errors import UsageError

CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_SUFFIX = ".pt"
LINEAGE_NAME = "checkpoints.json"
FINAL_MODEL_NAME = "model_final.pth"


def checkpoint_path(save_dir: str, global_step: int) -> str:
    return os.path.join(save_dir, f"{CHECKPOINT_PREFIX}{global_step:09d}{CHECKPOINT_SUFFIX}")


def _step_of(name: str) -> Optional[int]:
    middle = name[len(CHECKPOINT_PREFIX) : -len(CHECKPOINT_SUFFIX)]
    if name.startswith(CHECKPOINT_PREFIX) and name.endswith(CHECKPOINT_SUFFIX) and middle.isdigit():
        return int(middle)
    return None


def list_checkpoints(save_dir: str) -> List[str]:
    """The checkpoints in the save dir, highest step first."""
    if not os.path.isdir(save_dir):
        return []
    names = [n for n in os.listdir(save_dir) if _step_of(n) is not None]
    return [os.path.join(save_dir, n) for n in sorted(names, key=_step_of, reverse=True)]


def _record(save_dir: str) -> dict:
    """checkpoints.json as written, or {} where there is none that reads."""
    try:
        with open(os.path.join(save_dir, LINEAGE_NAME)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def read_lineage(save_dir: str) -> List[str]:
    """The lineage's checkpoint names, newest first, as checkpoints.json records them ([] if it does not)."""
    names = _record(save_dir).get("newest_first")
    if not isinstance(names, list):
        return []
    return [n for n in names if isinstance(n, str) and _step_of(n) is not None]


def recorded_fingerprint(save_dir: str, path: str) -> Optional[Dict[str, object]]:
    """The options that shaped the arithmetic of checkpoint `path`, as checkpoints.json records them for its
    lineage; None where `path` is not of that lineage, or the record has none (a save dir of an older version)."""
    record = _record(save_dir)
    names, fingerprint = record.get("newest_first"), record.get("fingerprint")
    if isinstance(names, list) and os.path.basename(path) in names and isinstance(fingerprint, dict):
        return fingerprint
    return None


def other_arithmetic(path: str, saved: Dict[str, object], wanted: Dict[str, object]) -> UsageError:
    """The refusal of a checkpoint made with other arithmetic options."""
    differences = ", ".join(f"{k} {saved.get(k)!r} (now {wanted[k]!r})" for k in wanted if saved.get(k) != wanted[k])
    return UsageError(
        f"checkpoint {path} was made with other arithmetic: {differences}; "
        "run with the same options, or with --resume never and another --save-dir"
    )


def resume_candidates(save_dir: str) -> List[str]:
    """Where `--resume auto` looks, in order: the lineage newest first, then any other checkpoint by step."""
    lineage = [os.path.join(save_dir, n) for n in read_lineage(save_dir)]
    present = [p for p in lineage if os.path.exists(p)]
    return present + [p for p in list_checkpoints(save_dir) if p not in present]


def continued_lineage(save_dir: str, resumed: Optional[str]) -> List[str]:
    """The lineage a run continues: the resumed checkpoint and those written before it along its line."""
    if resumed is None or os.path.dirname(os.path.abspath(resumed)) != os.path.abspath(save_dir):
        return []  # a fresh start, or --resume from elsewhere: a new lineage starts in this save dir
    name = os.path.basename(resumed)
    recorded = read_lineage(save_dir)
    if name in recorded:
        return recorded[recorded.index(name) :]
    # A save dir from before checkpoints.json: the older checkpoints by step, as pruning then went.
    return [name] + [
        os.path.basename(p) for p in list_checkpoints(save_dir) if _step_of(os.path.basename(p)) < _step_of(name)
    ]


def would_overwrite(save_dir: str, start_step: int, continued: List[str]) -> List[str]:
    """What a run that starts at `start_step` on the line `continued` ([] for a new line) would write over, by
    name: checkpoints of other lines at later steps (it writes its own under the same names), and the final
    model where it leaves the line that wrote it."""
    later = [
        os.path.basename(p)
        for p in list_checkpoints(save_dir)
        if os.path.basename(p) not in continued and _step_of(os.path.basename(p)) > start_step
    ]
    leaves_a_line = later or not continued
    final = os.path.exists(os.path.join(save_dir, FINAL_MODEL_NAME)) and leaves_a_line
    return sorted(later, key=_step_of) + ([FINAL_MODEL_NAME] if final else [])
