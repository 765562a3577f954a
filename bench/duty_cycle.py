"""Duty cycle, load profile and memory ballast measured with NVML, for SCENARIOS.md.

Runs on the GPU machine, from the repository root (about 5.5 minutes on 2 GPUs; on H100 each
run took 50-64 s, start-up included):

    python bench/duty_cycle.py                 # every visible GPU
    python bench/duty_cycle.py --gpus 2 --log-dir /tmp/duty-logs

Each run is a real `python train.py` (ResNet-50 defaults, batches made on the GPU,
so host data loading plays no part) on the first N GPUs for a fixed --duration:
full load (the reference), --duty-cycle 0.25, 0.5 and 0.75, a short
--load-profile with an idle phase, and full load with --gpu-memory-ballast.
This process samples NVML (nvidia-ml-py) every 0.1 s for every GPU: utilisation
('percent of time a kernel was running') and used memory. A run's figures are
averaged over its steady window (summary.json's, after the warm-up steps), each
phase of the profile over its own window (from the job's load_phase records).
Writes bench/results/<date>-<gpu>-x<N>-duty-cycle.json and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List, Optional, Tuple

from gpus import child_env, first_gpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMON = ["--data", "gpu", "--epochs", "100000", "--min-gpus", "1", "--warmup-steps", "20"]
BALLAST = "20GiB"
PROFILE = "8s@100,6s@0,8s@50"
# name, extra options, --duration in seconds, target duty cycle (None: per phase)
RUNS = (
    ("full", [], 40, 1.0),  # long enough for a steady window past the ~20 s start-up (25 s gave 8 samples)
    ("duty-0.25", ["--duty-cycle", "0.25"], 30, 0.25),
    ("duty-0.5", ["--duty-cycle", "0.5"], 30, 0.5),
    ("duty-0.75", ["--duty-cycle", "0.75"], 30, 0.75),
    ("profile", ["--load-profile", PROFILE], 44, None),
    ("ballast", ["--gpu-memory-ballast", BALLAST], 30, 1.0),
)
PHASE_SETTLE_S = 1.5  # left out at the start of each phase window: the switch itself and the ramp


class NvmlSampler:
    """Utilisation (percent) and used memory (bytes) of each chosen GPU, every 0.1 s, in a thread."""

    def __init__(self, pynvml, indices: List[int]):
        self.pynvml = pynvml
        self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self.samples: List[Tuple[float, List[int], List[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            utils = [self.pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles]
            used = [self.pynvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles]
            self.samples.append((time.time(), utils, used))
            self._stop.wait(0.1)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def window(self, start: float, end: float) -> Optional[Dict[str, list]]:
        inside = [(u, m) for t, u, m in self.samples if start <= t <= end]
        if not inside:
            return None
        gpus = range(len(self.handles))
        return {
            "util_pct": [round(statistics.fmean(u[g] for u, _ in inside), 1) for g in gpus],
            "used_gib": [round(statistics.median(m[g] for _, m in inside) / 2**30, 2) for g in gpus],
            "samples": len(inside),
        }


def _records(save_dir: str, kind: str) -> List[dict]:
    path = os.path.join(save_dir, "logs", "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in map(json.loads, f) if r.get("kind") == kind]


def _run_one(pynvml, name: str, extra: List[str], duration_s: int, gpus: int, log_dir: str) -> Dict:
    save_dir = tempfile.mkdtemp(prefix=f"duty-{name}-")
    command = [
        sys.executable,
        "train.py",
        *COMMON,
        *extra,
        "--nproc-per-node",
        str(gpus),
        "--duration",
        f"{duration_s}s",
        "--save-dir",
        save_dir,
    ]
    env = child_env(gpus)
    log_path = os.path.join(log_dir, f"duty-cycle-{name}-x{gpus}.log")
    started = time.monotonic()
    with NvmlSampler(pynvml, first_gpus(gpus)) as sampler, open(log_path, "w") as log:
        try:
            code = subprocess.run(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=duration_s + 180
            ).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    result = {"name": name, "command": " ".join(command[1:]), "wall_s": round(time.monotonic() - started, 1)}
    summary_path = os.path.join(save_dir, "summary.json")
    if code != 0 or not os.path.exists(summary_path):
        result["error"] = f"exit code {code}; see {log_path}"
        return result
    with open(summary_path) as f:
        summary = json.load(f)
    result.update(
        torch=summary.get("torch"), step_ms_p50=summary.get("step_ms_p50"), img_s_per_gpu=summary.get("img_s_per_gpu")
    )
    start, end = summary["steady_window_unix"]
    result["steady"] = sampler.window(start, end)
    busy = [r["busy_frac"] for r in _records(save_dir, "load") if r.get("busy_frac") is not None and r["rank"] == 0]
    result["job_busy_frac"] = round(statistics.fmean(busy), 3) if busy else None
    if name == "profile":
        result["phases"] = _phase_windows(sampler, save_dir, start, end)
    with open(log_path) as f:
        result["ballast_lines"] = [line.strip() for line in f if "memory ballast" in line]
    return result


def _phase_windows(sampler: NvmlSampler, save_dir: str, start: float, end: float) -> List[Dict]:
    """Each phase as rank 0 saw it switch, with its target and what NVML measured inside it."""
    phases = [line.split("@") for line in PROFILE.split(",")]
    switches = [(r["time"], r["phase"]) for r in _records(save_dir, "load_phase") if r["rank"] == 0]
    bounds = [(start, 1)] + switches + [(end, None)]
    out = []
    for (t0, phase), (t1, _) in zip(bounds, bounds[1:]):
        window = sampler.window(t0 + PHASE_SETTLE_S, t1)
        target = float(phases[phase - 1][1]) / 100
        out.append(
            {
                "phase": phase,
                "target": target,
                "from_unix": t0,
                "to_unix": t1,
                "util_pct": window["util_pct"] if window else None,
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=None, help="GPUs to use (default: every visible one)")
    parser.add_argument("--log-dir", default=os.environ.get("OUT", tempfile.gettempdir()))
    parser.add_argument("--results-dir", default=os.path.join(REPO, "bench", "results"))
    args = parser.parse_args()
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        print("bench: needs nvidia-ml-py (pip install nvidia-ml-py)", file=sys.stderr)
        return 2
    pynvml.nvmlInit()
    available = pynvml.nvmlDeviceGetCount()
    gpus = args.gpus or available
    if not 1 <= gpus <= available:
        print(f"bench: {gpus} GPU(s) asked for, {available} visible", file=sys.stderr)
        return 2
    card = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
    card = card.decode() if isinstance(card, bytes) else card
    os.makedirs(args.log_dir, exist_ok=True)
    os.makedirs(args.results_dir, exist_ok=True)
    date = datetime.date.today().isoformat()
    slug = card.replace("NVIDIA ", "").replace(" ", "-").lower()
    path = os.path.join(args.results_dir, f"{date}-{slug}-x{gpus}-duty-cycle.json")
    payload = {
        "card": card,
        "gpus": gpus,
        "date": date,
        "common_options": " ".join(COMMON),
        "ballast": BALLAST,
        "profile": PROFILE,
        "runs": [],
    }
    for name, extra, duration_s, target in RUNS:
        result = _run_one(pynvml, name, extra, duration_s, gpus, args.log_dir)
        result["target"] = target
        payload["runs"].append(result)
        _judge(payload)
        with open(path, "w") as f:  # after every run, so a cut-short session keeps what it measured
            json.dump(payload, f, indent=2)
            f.write("\n")
        print(
            f"{name}: {'ERROR ' + result['error'] if 'error' in result else 'done'} ({result['wall_s']} s)", flush=True
        )
    pynvml.nvmlShutdown()
    print(_table(payload))
    print(f"wrote {path}")
    return 0


def _judge(payload: dict) -> None:
    """Measured against target, in points of utilisation; also relative to the full-load run's utilisation."""
    runs = {r["name"]: r for r in payload["runs"]}
    full = runs.get("full", {}).get("steady")
    for run in payload["runs"]:
        if run.get("target") is not None and run.get("steady"):
            util = run["steady"]["util_pct"]
            run["points_off_target"] = [round(u - 100 * run["target"], 1) for u in util]
            run["within_10_points"] = all(abs(p) <= 10 for p in run["points_off_target"])
            if full:
                run["relative_to_full"] = [round(u / f, 3) if f else None for u, f in zip(util, full["util_pct"])]
    if full and runs.get("ballast", {}).get("steady"):
        ballast = runs["ballast"]
        ballast["used_gib_without"] = full["used_gib"]
        ballast["used_gib_with"] = ballast["steady"]["used_gib"]
        ballast["extra_gib"] = [round(w - wo, 2) for w, wo in zip(ballast["used_gib_with"], full["used_gib"])]


def _table(payload: dict) -> str:
    lines = [
        f"{payload['card']} x{payload['gpus']}: NVML utilisation over each run's steady window",
        f"{'run':<12} {'target':>7}  {'GPU util % (each GPU)':<28} {'job busy':>8}  {'step p50':>9}",
    ]
    for run in payload["runs"]:
        if "error" in run:
            lines.append(f"{run['name']:<12} ERROR {run['error']}")
            continue
        target = f"{100 * run['target']:.0f}%" if run.get("target") is not None else "phases"
        util = " ".join(f"{u:5.1f}" for u in run["steady"]["util_pct"]) if run.get("steady") else "n/a"
        busy = f"{run['job_busy_frac']:.2f}" if run.get("job_busy_frac") is not None else "-"
        lines.append(f"{run['name']:<12} {target:>7}  {util:<28} {busy:>8}  {run.get('step_ms_p50') or 0:7.1f} ms")
        for phase in run.get("phases", []):
            util = " ".join(f"{u:5.1f}" for u in phase["util_pct"]) if phase["util_pct"] else "n/a"
            lines.append(f"  phase {phase['phase']:<4} {100 * phase['target']:>6.0f}%  {util}")
    ballast = next((r for r in payload["runs"] if r["name"] == "ballast" and "extra_gib" in r), None)
    if ballast:
        lines.append(
            f"ballast {payload['ballast']}: NVML used memory {ballast['used_gib_without']} GiB without, "
            f"{ballast['used_gib_with']} GiB with: +{ballast['extra_gib']} GiB"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
