"""Option values as people write them: durations, duty cycles, load profiles, memory sizes, step ranges.

Each parser raises argparse.ArgumentTypeError with a message that names what was wrong,
which the CLI turns into one line and exit 2.
"""

from __future__ import annotations

import argparse
import math
import re

from resnet_ddp.config import ALL_RANKS, LoadPhase, MemorySize

MAX_PROFILED_STEPS = 20
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}

_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)([dhms])")


def parse_duration(text: str) -> float:
    """'90s', '10m', '1h30m', '2d', or plain seconds ('45', '1.5') -> seconds."""
    cleaned = text.strip().lower().replace(" ", "")
    try:
        seconds = float(cleaned)
    except ValueError:
        parts = _DURATION_PART.findall(cleaned)
        if not parts or "".join(number + unit for number, unit in parts) != cleaned:
            raise argparse.ArgumentTypeError(f"{text.strip()!r} is not a duration like 90s, 10m, 1h30m or 2h") from None
        seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
    if not (math.isfinite(seconds) and seconds > 0):
        raise argparse.ArgumentTypeError(f"{text.strip()!r} is not a positive duration")
    return seconds


def parse_duration_or_zero(text: str) -> float:
    """A duration, or 0 (none)."""
    try:
        if float(text.strip().rstrip("smh")) == 0:  # 0, 0.0, 00, 0s, 0m
            return 0.0
    except ValueError:
        pass
    return parse_duration(text)


def _fraction_or_percent(text: str) -> float:
    text = text.strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def parse_duty_cycle(text: str) -> float:
    """'0.5' or '50%' -> 0.5; above 0 and at most 1."""
    try:
        value = _fraction_or_percent(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction like 0.5 (or a percentage like 50%)") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} must be above 0 and at most 1 (for idle phases use --load-profile, e.g. 1m@0)"
        )
    return value


def parse_load_profile(text: str) -> tuple:
    """'2m@100,1m@0,2m@50' -> phases of (seconds, duty cycle): duration@percent, in order."""
    phases = []
    for part in text.split(","):
        duration, at, percent = part.strip().partition("@")
        try:
            seconds = parse_duration(duration) if duration.strip() else None
            load = float(percent.strip().rstrip("%")) if at else None
        except (argparse.ArgumentTypeError, ValueError):
            seconds = load = None
        if seconds is None or load is None or not 0 <= load <= 100:
            where = f" in {text!r}" if "," in text else ""
            raise argparse.ArgumentTypeError(
                f"{part.strip()!r}{where} is not a phase like 2m@100 (a duration, @, a load from 0 to 100 percent)"
            )
        phases.append(LoadPhase(seconds, load / 100))
    return tuple(phases)


_BYTE_UNITS = {
    "": None,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "m": 10**6,
    "mb": 10**6,
    "g": 10**9,
    "gb": 10**9,
    "t": 10**12,
    "tb": 10**12,
    "ki": 2**10,
    "kib": 2**10,
    "mi": 2**20,
    "mib": 2**20,
    "gi": 2**30,
    "gib": 2**30,
    "ti": 2**40,
    "tib": 2**40,
}


def parse_memory_size(text: str) -> MemorySize:
    """'20GiB', '512MiB', '16G' (decimal, as in Kubernetes) or a fraction of the card such as '0.5'."""
    stripped = text.strip()
    number = stripped.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ").strip()
    unit = stripped[len(number) :].strip().lower() if number else None
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if unit not in _BYTE_UNITS or not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a size like 20GiB or 512MiB, or a fraction like 0.5")
    if _BYTE_UNITS[unit] is None:
        if value >= 1:
            raise argparse.ArgumentTypeError(
                f"{text!r} needs a unit (e.g. 20GiB) or must be a fraction of the card below 1 (e.g. 0.5)"
            )
        return MemorySize(fraction=value)
    return MemorySize(bytes=int(value * _BYTE_UNITS[unit]))


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def parse_fail_rank(text: str) -> int:
    if text == "all":
        return ALL_RANKS
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a rank (0, 1, ...) or 'all'") from None


def parse_preflight_mode(text: str) -> str:
    """off / warn / strict; a flag's words work too (RESNET_DDP_PREFLIGHT=1 is warn, 0 is off)."""
    lowered = text.strip().lower()
    if lowered in _TRUE:
        return "warn"
    if lowered in _FALSE:
        return "off"
    return lowered  # argparse's choices refuse anything else


def parse_straggler_window(text: str) -> float:
    if text.strip().lower() in ("0", "off"):
        return 0.0
    return parse_duration(text)


def parse_slow_rank(text: str):
    """'RANK:SECONDS' -> (rank, seconds), for RESNET_DDP_TEST_SLOW_RANK."""
    rank, _, seconds = text.partition(":")
    try:
        value = (int(rank), float(seconds))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not RANK:SECONDS, e.g. 1:0.05") from None
    if value[0] < 0 or not (math.isfinite(value[1]) and 0 < value[1] <= 60):
        raise argparse.ArgumentTypeError(f"{text!r}: the rank must be 0 or more, the seconds in (0, 60]")
    return value


def parse_profile_steps(text: str):
    """'FIRST:LAST' or 'STEP' -> (first, last) global steps, for --profile-steps."""
    first, _, last = text.partition(":")
    try:
        value = (int(first), int(last or first))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not FIRST:LAST (global steps, e.g. 200:204)") from None
    if not 1 <= value[0] <= value[1] or value[1] - value[0] >= MAX_PROFILED_STEPS:
        raise argparse.ArgumentTypeError(
            f"{text!r}: steps start at 1, FIRST <= LAST, and at most "
            f"{MAX_PROFILED_STEPS} steps (a trace grows with every step)"
        )
    return value
