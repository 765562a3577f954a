"""Scenario presets: named sets of options that make the job do one thing a platform must handle.

A preset only sets defaults: options on the command line or in RESNET_DDP_*
win over it. This module is plain data (no torch), so --help and
--scenario list answer at once. The load shaping and faults a preset turns on
live in load.py and faults.py.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Dict, Tuple

LIST = "list"  # --scenario list: print the table and exit


@dataclass(frozen=True)
class Scenario:
    name: str
    does: str  # what the job does
    checks: str  # the platform behaviour it checks
    options: Tuple[str, ...]  # what it sets, as on a command line


SCENARIOS = (
    Scenario(
        "smoke",
        "about a minute in all: ResNet-18 at 64 px on every visible GPU (one is enough), 45 s of "
        "training, the final model saved, exit 0",
        "the platform runs a distributed GPU job end to end: scheduling, rendezvous and NCCL, logs, "
        "the save volume, a clean exit",
        (
            "--duration",
            "45s",
            "--arch",
            "resnet18",
            "--image-size",
            "64",
            "--batch-size",
            "32",
            "--dataset-size",
            "8192",
            "--epochs",
            "1000",
            "--num-workers",
            "1",
            "--min-gpus",
            "1",
            "--log-interval",
            "20",
        ),
    ),
    Scenario(
        "soak",
        "full load with the ResNet-50 defaults for 12 hours (change it with --duration), a checkpoint every 2000 steps",
        "long-run stability: flat throughput and step time in metrics.jsonl, no memory growth, thermals "
        "and clocks, ECC/Xid errors, log retention, long-lived NCCL connections",
        ("--duration", "12h", "--epochs", "1000000", "--checkpoint-every", "2000"),
    ),
    Scenario(
        "burst",
        "2 minutes of full load, then 1 minute idle (memory and process group held, stops still "
        "answered), repeated for 30 minutes",
        "monitoring that follows load changes (a square wave in GPU utilisation and power), idle-GPU "
        "detectors and reclaim policies, clock and power ramping",
        ("--load-profile", "2m@100,1m@0", "--duration", "30m", "--epochs", "1000000"),
    ),
    Scenario(
        "crash",
        "rank 0 raises a Python error when step 2000 starts (about a minute in on H100s); with a "
        "checkpoint every 1000 steps, each restart resumes at step 1000 and crashes again at 2000",
        "failure detection, the job marked failed (exit 1), the traceback in the collected logs, the "
        "restart policy and its retry limit (backoffLimit)",
        ("--fail-at-step", "2000", "--fail-mode", "exception", "--checkpoint-every", "1000", "--epochs", "1000000"),
    ),
    Scenario(
        "hang",
        "rank 0 stops taking part in collectives when step 2000 starts; the others give up after "
        "--dist-timeout 300 s and the job fails",
        "hang and no-progress detection (the log goes quiet while the waiting GPUs stay busy), the job "
        "ending through the collective timeout, cleanup of stuck processes",
        ("--fail-at-step", "2000", "--fail-mode", "hang", "--dist-timeout", "300", "--epochs", "1000000"),
    ),
    Scenario(
        "preempt-resume",
        "a checkpoint every 500 steps; finishes at step 20000 in all (about 10 minutes on H100s), "
        "however often it is stopped and restarted",
        "preemption: SIGTERM (pod deletion, eviction, a higher-priority job) ends it within the grace "
        "period with a checkpoint and exit 143; restarted on the same save volume it resumes from "
        "that step and ends with exit 0",
        ("--checkpoint-every", "500", "--max-steps", "20000", "--epochs", "1000000"),
    ),
    Scenario(
        "memory",
        "training as usual plus half of each card's memory held (written) for 10 minutes; refused "
        "with exit 2 if that cannot fit beside the job",
        "GPU memory accounting (DCGM, nvidia-smi, dashboards), memory quotas of shared or fractional "
        "GPUs, scheduling by GPU memory",
        ("--gpu-memory-ballast", "0.5", "--duration", "10m", "--epochs", "1000000"),
    ),
    Scenario(
        "nan",
        "rank 0's loss becomes NaN at step 2000; --nan-policy stop (the default) ends the job with "
        "exit 1 and a line naming the step and the rank",
        "alerting on a diverged run from its logs or metrics (metrics.jsonl records the loss as null), "
        "handling of a failed run that did not crash",
        ("--fail-at-step", "2000", "--fail-mode", "nan", "--epochs", "1000000"),
    ),
)

BY_NAME: Dict[str, Scenario] = {s.name: s for s in SCENARIOS}
NAMES = tuple(BY_NAME)


def summary_line() -> str:
    """For --help: the names, and where the full table is."""
    return (
        f"a preset of options for one platform test: {', '.join(NAMES)}; '{LIST}' prints what each "
        "does, checks and sets. Options given on the command line or in RESNET_DDP_* win over it"
    )


def table(width: int = 100) -> str:
    """For --scenario list: each preset, what it does, what it checks, what it sets."""
    lines = []
    for scenario in SCENARIOS:
        lines.append(scenario.name)
        for label, text in (("does", scenario.does), ("checks", scenario.checks), ("sets", " ".join(scenario.options))):
            lines.extend(
                textwrap.wrap(
                    text, width, initial_indent=f"  {label + ':':8}", subsequent_indent=" " * 10, break_on_hyphens=False
                )
            )
        lines.append("")
    lines.append("Use: python train.py --scenario NAME [options]; options you give win over the preset's.")
    return "\n".join(lines)
