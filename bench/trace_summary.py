"""Where a profiled step's GPU time goes: a `--profile-steps` trace, summed by kernel kind.

    python bench/trace_summary.py SAVE_DIR/profile/rank0.trace.json --steps 5
    python bench/trace_summary.py one-gpu.trace.json two-gpus.trace.json --steps 5   # and what changed

For each trace: GPU kernel time per step by kind (convolutions and GEMMs, Triton's fused
elementwise and reduction kernels, PyTorch's native BatchNorm, SyncBatchNorm's jitted
kernels and other kernels, NCCL, copies), and the time per step at least one kernel ran
(kernels of a CUDA-graph replay run on several streams at once, so the kinds add up to more
than that). Given two traces, the
kernel families whose time per step changed most between them. `--steps` is the number of
steps the trace holds (`--profile-steps A:B` records B - A + 1, fewer if the run ended first).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from typing import Dict, Iterable, List, Tuple

GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
KINDS = (
    "convolution/GEMM",
    "Triton elementwise",
    "Triton reduction",
    "native BatchNorm",
    "jitted BatchNorm",
    "other kernels",
    "NCCL",
    "copies",
)
# The kernels SyncBatchNorm compiles with torch's jiterator (resnet_ddp/syncbn.py), named after their functions
# (the last is its ReLU backward of a forked block output).
JITTED_BATCHNORM = ("bn_relu", "bn_add_relu", "relu_grad_of_sum")


def kind_of(name: str, category: str) -> str:
    lowered = name.lower()
    if category != "kernel" or lowered.startswith(("memcpy", "memset")):
        return "copies"
    if "nccl" in lowered:
        return "NCCL"
    if lowered.startswith("triton_poi"):
        return "Triton elementwise"
    if lowered.startswith(("triton_red", "triton_per")):
        return "Triton reduction"
    if any(mark in lowered for mark in ("xmma", "cutlass", "nvjet", "gemm", "wgrad", "dgrad", "fprop")):
        return "convolution/GEMM"
    if "batch_norm" in lowered:
        return "native BatchNorm"
    if lowered.startswith(JITTED_BATCHNORM):
        return "jitted BatchNorm"
    return "other kernels"


def gpu_events(path: str) -> List[dict]:
    with open(path) as f:
        trace = json.load(f)
    return [e for e in trace["traceEvents"] if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES]


def busy_us(events: Iterable[dict]) -> float:
    """Time covered by at least one event (the union of their intervals), in us."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in events):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def by_kind(events: Iterable[dict]) -> Dict[str, Tuple[int, float]]:
    """kind -> (kernel count, total us)."""
    sums: Dict[str, List[float]] = collections.defaultdict(lambda: [0, 0.0])
    for e in events:
        entry = sums[kind_of(e["name"], e["cat"])]
        entry[0] += 1
        entry[1] += e["dur"]
    return {kind: (int(n), us) for kind, (n, us) in sums.items()}


def family(name: str) -> str:
    """A kernel's name without Triton's per-graph number, so the same fused kernel matches across runs."""
    return re.sub(r"_\d+$", "", name)


def by_family(events: Iterable[dict]) -> Dict[str, float]:
    sums: Dict[str, float] = collections.defaultdict(float)
    for e in events:
        sums[family(e["name"])] += e["dur"]
    return sums


def report(path: str, steps: int) -> List[dict]:
    events = gpu_events(path)
    kinds = by_kind(events)
    print(f"{path}: {len(events)} GPU events, {steps} step(s)")
    print(f"  {'busy (any kernel running)':28s} {busy_us(events) / 1000 / steps:8.2f} ms/step")
    for kind in KINDS:
        if kind in kinds:
            count, us = kinds[kind]
            print(f"  {kind:28s} {us / 1000 / steps:8.2f} ms/step  {count / steps:7.0f} per step")
    return events


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("traces", nargs="+", help="one trace, or two to compare (the second against the first)")
    parser.add_argument("--steps", type=int, required=True, help="steps each trace holds")
    parser.add_argument("--top", type=int, default=15, help="kernel families to list when comparing")
    args = parser.parse_args()
    if len(args.traces) > 2:
        parser.error("give one trace, or two to compare")
    events = [report(path, args.steps) for path in args.traces]
    if len(events) == 2:
        before, after = by_family(events[0]), by_family(events[1])
        changes = sorted(
            ((after.get(n, 0.0) - before.get(n, 0.0), n) for n in set(before) | set(after)),
            key=lambda change: -abs(change[0]),
        )
        print("largest changes, second trace against the first (ms/step):")
        for delta, name in changes[: args.top]:
            print(
                f"  {delta / 1000 / args.steps:+8.2f}  {before.get(name, 0.0) / 1000 / args.steps:7.2f} -> "
                f"{after.get(name, 0.0) / 1000 / args.steps:7.2f}  {name[:100]}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
