"""Benchmark harness: the original example (the baseline), our defaults and fast mode over 1, 2, 4 ... GPUs.

Runs on the GPU machine, from the repository root, in one process tree:

    python bench/run.py                       # every GPU count the machine allows
    python bench/run.py --gpus 1,2 --configs default,fast
    # what the observability options cost in fast mode: the same runs with and without them,
    # interleaved three times so that drift of the machine falls on both alike
    python bench/run.py --gpus 4 --configs fast --repeat 3 \
        --experiment "fast-metrics:4:--fast --metrics-port 8000" \
        --experiment "fast-metrics-tensorboard:4:--fast --metrics-port 8000 --tensorboard"
    # a code change against the current code, in one call: the experiment runs from a copy of
    # the tree with the patch applied (git diff > change.patch, then undo it or stash it)
    python bench/run.py --gpus 2 --configs default --repeat 2 --experiment "change:2:" \
        --variant change=change.patch

Each run is a real `python train.py` (or bench/original_example.py for `original`)
on the first N GPUs; the figures come from its summary.json, and GPU utilisation
from NVML, sampled by this process over the second half of the run. Writes
bench/results/<date>-<gpu>-x<N>.json, which names this command and the commit it
ran, and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

import torch
from gpus import child_env, first_gpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = {
    # name: (train.py arguments, steps, warm-up steps). The warm-up covers start-up, cuDNN
    # autotuning and graph capture; the rest (7-13 s of steady state) is what is timed.
    "default": ([], 300, 60),
    "fast": (["--fast"], 250, 60),  # compiled where the machine can build kernels; its first step compiles
    "fast-eager": (["--fast", "--no-compile"], 250, 60),
}
# The baseline: the original example's step (bench/original_example.py). Results before the
# rename call it "seed-equivalent".
ORIGINAL = "original"
BASELINE_STEPS, BASELINE_WARMUP = 80, 20


class UtilisationSampler:
    """Samples NVML GPU utilisation for the chosen GPUs every 0.2 s in a thread."""

    def __init__(self, gpu_indices: List[int]):
        self.gpu_indices = gpu_indices
        self.samples: List[tuple] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            import pynvml
        except ImportError:
            return
        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in self.gpu_indices]
        while not self._stop.is_set():
            utils = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
            self.samples.append((time.time(), sum(utils) / len(utils)))
            self._stop.wait(0.2)
        pynvml.nvmlShutdown()

    def __enter__(self):
        self.started = time.time()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.ended = time.time()
        self._stop.set()
        self._thread.join()

    def mean_between(self, start: float, end: float) -> Optional[float]:
        inside = [u for t, u in self.samples if start <= t <= end]
        return sum(inside) / len(inside) if inside else None


def patched_tree(patch: str, into: str) -> str:
    """A copy of this repository's code in `into`, with `patch` (a unified diff against it) applied.

    An A/B of a code change then runs both sides in one call, on one machine.
    """
    tree = os.path.join(into, os.path.splitext(os.path.basename(patch))[0])
    shutil.copytree(REPO, tree, ignore=shutil.ignore_patterns(".git", ".venv", ".gpu", "results", "__pycache__"))
    applied = subprocess.run(["git", "apply", os.path.abspath(patch)], cwd=tree, capture_output=True, text=True)
    if applied.returncode != 0:
        raise SystemExit(f"bench: {patch} does not apply to this tree: {applied.stderr.strip().splitlines()[0]}")
    return tree


def run_window(name: str, extra_args: List[str]) -> Tuple[List[str], int, int]:
    """A run's own train.py arguments, steps and warm-up steps.

    An experiment with a configuration's own arguments (the same run from another tree)
    is timed like that configuration's row, and one on top of --fast like the fast row
    (its variant then meets as many epoch ends in as many steps); other experiments take
    400 steps with 100 of warm-up, room for a compiled fp32 step to settle.
    """
    if name in CONFIGS:
        return CONFIGS[name]
    for args, steps, warmup in CONFIGS.values():
        if extra_args == args:
            return [], steps, warmup
    if "--fast" in extra_args:
        return [], *CONFIGS["fast"][1:]
    return [], 400, 100


def _run_one(
    name: str, gpus: int, extra_args: List[str], log_dir: str, timeout_s: float, repeat: int = 0, tree: str = REPO
) -> Dict:
    env = child_env(gpus)
    workdir = tempfile.mkdtemp(prefix=f"bench-{name}-{gpus}-")
    if name == ORIGINAL:
        out = os.path.join(workdir, "summary.json")
        command = [
            sys.executable,
            "bench/original_example.py",
            "--gpus",
            str(gpus),
            "--steps",
            str(BASELINE_STEPS),
            "--warmup",
            str(BASELINE_WARMUP),
            "--out",
            out,
        ]
    else:
        args, steps, warmup = run_window(name, extra_args)
        out = os.path.join(workdir, "summary.json")
        command = [
            sys.executable,
            "train.py",
            *args,
            *extra_args,
            "--nproc-per-node",
            str(gpus),
            "--min-gpus",
            "1",
            "--max-steps",
            str(steps),
            "--warmup-steps",
            str(warmup),
            "--save-dir",
            workdir,
        ]
    log_path = os.path.join(log_dir, f"{name}-x{gpus}" + (f"-{repeat}" if repeat else "") + ".log")
    started = time.monotonic()
    with UtilisationSampler(first_gpus(gpus)) as sampler, open(log_path, "w") as log:
        try:
            code = subprocess.run(
                command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            code = f"none: still running after {timeout_s:.0f} s"
    result = {"name": name, "gpus": gpus, "command": " ".join(command[1:]), "wall_s": time.monotonic() - started}
    if repeat:
        result["repeat"] = repeat
    if code != 0 or not os.path.exists(out):
        result["error"] = f"exit code {code}; see {log_path}"
        return result
    with open(out) as f:
        summary = json.load(f)
    for key in (
        "time_to_first_step_s",
        "img_s",
        "img_s_per_gpu",
        "step_ms_p50",
        "step_ms_p95",
        "step_ms_p99",
        "data_wait_frac",
        "peak_mem_gib_per_rank",
        "mfu",
    ):
        result[key] = summary.get(key)
    # Over the steady window the job reports; the baseline reports none: its second half.
    start, end = summary.get("steady_window_unix", [(sampler.started + sampler.ended) / 2, sampler.ended])
    result["gpu_util_pct"] = sampler.mean_between(start, end)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    available = torch.cuda.device_count()
    counts = [n for n in (1, 2, 4, 8) if n <= available]
    parser.add_argument("--gpus", default=",".join(map(str, counts)), help="GPU counts to run")
    parser.add_argument("--configs", default=f"{ORIGINAL},default,fast")
    parser.add_argument(
        "--experiment",
        action="append",
        default=[],
        help="NAME:GPUS:ARGS, an extra train.py run recorded under experiments (e.g. "
        "'default-no-graphs:2:--no-cuda-graphs')",
    )
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=PATCH",
        help="run the experiment NAME from a copy of this tree with PATCH applied (e.g. 'change=change.patch'), "
        "or from another checkout if PATCH is a directory (e.g. 'before=../before', a git worktree of an earlier "
        "commit: the same runs before and after a change, in one call)",
    )
    parser.add_argument("--log-dir", default=os.environ.get("OUT", tempfile.gettempdir()))
    parser.add_argument("--results-dir", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--run-timeout", type=float, default=300, help="seconds one run may take")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the whole plan (configs and experiments) this many times, interleaved; "
        "each result records its repeat",
    )
    args = parser.parse_args()
    unknown = [name for name in args.configs.split(",") if name != ORIGINAL and name not in CONFIGS]
    if unknown:  # an unknown name would otherwise run as a plain train.py experiment, under that name
        print(
            f"bench: unknown --configs {','.join(unknown)}: choose from {', '.join([ORIGINAL, *CONFIGS])} "
            f"(seed-equivalent is now {ORIGINAL}; other train.py runs go in --experiment)",
            file=sys.stderr,
        )
        return 2
    if available == 0:
        print("bench: no GPU visible", file=sys.stderr)
        return 2

    card = torch.cuda.get_device_name(0)
    payload = results_header(sys.argv[1:], card, available)
    for directory in (args.results_dir, args.log_dir):
        os.makedirs(directory, exist_ok=True)
    slug = card.replace("NVIDIA ", "").replace(" ", "-").lower()
    path = _unused_path(os.path.join(args.results_dir, f"{payload['date']}-{slug}-x{available}"))
    plan = [("runs", name, int(gpus), []) for gpus in args.gpus.split(",") for name in args.configs.split(",")]
    for spec in args.experiment:
        name, gpus, extra = spec.split(":", 2)
        plan.append(("experiments", name, int(gpus), extra.split()))
    rounds = [
        (section, name, gpus, extra, repeat if args.repeat > 1 else 0)
        for repeat in range(1, max(1, args.repeat) + 1)
        for section, name, gpus, extra in plan
    ]
    patches = dict(spec.split("=", 1) for spec in args.variant)
    trees = {
        name: patch if os.path.isdir(patch) else patched_tree(patch, tempfile.mkdtemp(prefix="bench-variant-"))
        for name, patch in patches.items()
    }
    for section, name, gpus, extra, repeat in rounds:
        result = _run_one(name, gpus, extra, args.log_dir, args.run_timeout, repeat, trees.get(name, REPO))
        if name in patches:
            result["variant"] = patches[name]
        payload[section].append(result)
        _print_row(result)
        with open(path, "w") as f:  # after every run, so a cut-short session keeps what it measured
            json.dump(payload, f, indent=2)
            f.write("\n")
    print(f"wrote {path}")
    return 0


def results_header(argv: List[str], card: str, gpus_on_machine: int) -> Dict:
    """What a results file starts with: the command that makes it again, and what it measured."""
    return {
        "command": shlex.join(["python", "bench/run.py", *argv]),
        "commit": measured_commit(),
        "card": card,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "gpus_on_machine": gpus_on_machine,
        "runs": [],
        "experiments": [],
    }


def measured_commit() -> Optional[str]:
    """The commit the runs measure, "-dirty" if the tree has changes; None outside a git checkout."""
    try:
        described = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except OSError:
        return None
    return described.stdout.strip() or None


def _unused_path(stem: str) -> str:
    """stem.json, or stem-2.json, -3 ... if taken: a second run on the same day keeps the first one's results."""
    path, n = f"{stem}.json", 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}.json"
    return path


def _print_row(r: Dict) -> None:
    name = r["name"] + (f" #{r['repeat']}" if "repeat" in r else "")
    if "error" in r:
        print(f"{name:<28} x{r['gpus']}  ERROR {r['error']}", flush=True)
        return
    util = f"{r['gpu_util_pct']:.0f}%" if r.get("gpu_util_pct") is not None else "n/a"
    print(
        f"{name:<28} x{r['gpus']}  {r['img_s']:>9.1f} img/s  {r['img_s_per_gpu']:>8.1f}/gpu  "
        f"p50 {r['step_ms_p50']:.1f} ms  p95 {r['step_ms_p95']:.1f} ms  data wait {100 * r['data_wait_frac']:.1f}%  "
        f"util {util}  wall {r['wall_s']:.0f}s",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
