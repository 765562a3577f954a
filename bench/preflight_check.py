"""Check the preflight and the straggler detector on a GPU machine, in about 5 minutes.

Run from the repository root on a machine with 2 or more GPUs:

    python bench/preflight_check.py --out /path/to/results

Steps, each a real `python train.py` (or tool) on the first N GPUs, NVLink multicast off:

1. `--preflight-only` on 2 and 4 GPUs (those the machine has): the healthy figures.
2. `--preflight strict --preflight-only` on the largest count while bench/gpu_hog.py keeps
   GPU 1 busy (a noisy neighbour): expected exit 1 and a finding naming rank 1 / GPU 1.
3. A 120 s training run on the largest count with the detector's own 60 s window; the hog
   starts on GPU 1 once training has begun: the straggler detector should name rank 1.
4. The all-reduce reference on 2 and 4 GPUs: nccl-tests' all_reduce_perf if it is on PATH,
   else bench/allreduce_by_hand.py (nccl-tests' definitions through torch.distributed);
   each size set beside the preflight's busbw from step 1.

Writes two files into --out: preflight_check.json (every figure, verdict and comparison,
and whether each expectation held) and preflight_check_logs.tar.gz (each run's console log,
preflight.json, metrics.jsonl). Checkpoints and models stay in a temporary directory that
is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from typing import Dict, List, Optional

from gpus import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEP_LINE = re.compile(r"^\[Rank 0\] epoch \d+ step ", re.M)
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:6.1f} s] {message}", flush=True)


def gpu_env(gpus: int) -> Dict[str, str]:
    return child_env(gpus, PYTHONUNBUFFERED="1")


class Hog:
    """bench/gpu_hog.py on one GPU, started and stopped around a run."""

    def __init__(self, gpu: int, seconds: float, log_path: str):
        self.log = open(log_path, "w")
        self.process = subprocess.Popen(
            [sys.executable, "bench/gpu_hog.py", "--gpu", str(gpu), "--seconds", str(seconds)],
            cwd=REPO,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_busy(self, timeout_s: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                return False
            self.log.write(line)
            if "busy" in line:
                return True
        return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            rest, _ = self.process.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            rest, _ = self.process.communicate()
        self.log.write(rest or "")
        self.log.close()


def run_logged(name: str, command: List[str], env: Dict[str, str], work: str, timeout_s: float) -> Dict:
    log_path = os.path.join(work, f"{name}.log")
    started = time.monotonic()
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s
            ).returncode
        except subprocess.TimeoutExpired:
            code = None
    result = {
        "name": name,
        "command": " ".join(command[1:] if command[0] == sys.executable else command),
        "exit_code": code,
        "wall_s": round(time.monotonic() - started, 1),
        "log": f"{name}.log",
    }
    say(f"{name}: exit {code} in {result['wall_s']} s")
    return result


def read_json(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def preflight_run(name: str, gpus: int, work: str, extra: List[str], timeout_s: float = 150) -> Dict:
    save_dir = os.path.join(work, name)
    command = [
        sys.executable,
        "train.py",
        "--preflight-only",
        "--nproc-per-node",
        str(gpus),
        "--min-gpus",
        "1",
        "--save-dir",
        save_dir,
        *extra,
    ]
    result = run_logged(name, command, gpu_env(gpus), work, timeout_s)
    result["gpus"] = gpus
    result["preflight"] = read_json(os.path.join(save_dir, "preflight.json"))
    return result


def training_with_hog(gpus: int, hog_gpu: int, work: str, seconds: float, window_s: float, extra: List[str]) -> Dict:
    name = f"train-x{gpus}-hog-gpu{hog_gpu}"
    save_dir = os.path.join(work, name)
    log_path = os.path.join(work, f"{name}.log")
    command = [
        sys.executable,
        "train.py",
        "--nproc-per-node",
        str(gpus),
        "--min-gpus",
        "1",
        "--duration",
        f"{seconds:g}s",
        "--straggler-window",
        f"{window_s:g}s",
        "--log-interval",
        "50",
        "--save-dir",
        save_dir,
        *extra,
    ]
    started = time.monotonic()
    hog = None
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=REPO, env=gpu_env(gpus), stdout=log, stderr=subprocess.STDOUT)
        deadline = started + seconds + 150
        while process.poll() is None and time.monotonic() < deadline:
            if hog is None and STEP_LINE.search(open(log_path).read()):
                say(f"{name}: training has begun; starting the hog on GPU {hog_gpu}")
                hog = Hog(hog_gpu, seconds + 60, os.path.join(work, f"{name}-hog.log"))
                hog_ready = hog.wait_busy()
                say(f"{name}: hog busy: {hog_ready}")
            time.sleep(1.0)
        if process.poll() is None:
            process.kill()
        code = process.wait()
    if hog is not None:
        hog.stop()
    wall = round(time.monotonic() - started, 1)
    say(f"{name}: exit {code} in {wall} s")
    text = open(log_path).read()
    records = []
    try:
        with open(os.path.join(save_dir, "logs", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    except OSError:
        pass
    named = sorted({r for rec in records if rec.get("kind") == "step" for r in rec.get("straggler_ranks", [])})
    return {
        "name": name,
        "command": " ".join(command[1:]),
        "exit_code": code,
        "wall_s": wall,
        "log": f"{name}.log",
        "hog_started": hog is not None,
        "straggler_warnings": [l for l in text.splitlines() if "WARNING straggler" in l],
        "detector_off": [l for l in text.splitlines() if "straggler detection is off" in l],
        "straggler_ranks_in_metrics": named,
        "straggler_checks": [r for r in records if r.get("kind") == "straggler_check"],
        "summary": read_json(os.path.join(save_dir, "summary.json")),
    }


def parse_nccl_tests(text: str) -> List[Dict]:
    """Rows of all_reduce_perf's table: the last 8 columns are out-of-place and in-place (time, algbw, busbw,
    #wrong)."""
    rows = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 10 or not fields[0].isdigit():
            continue
        try:
            oop = [float(x) for x in fields[-8:-5]]
            inp = [float(x) for x in fields[-4:-1]]
        except ValueError:
            continue
        rows.append(
            {
                "bytes": int(fields[0]),
                "oop_time_us": oop[0],
                "oop_busbw_gb_s": oop[2],
                "time_us": inp[0],
                "algbw_gb_s": inp[1],
                "busbw_gb_s": inp[2],
            }
        )
    return rows


def reference(gpus: int, work: str) -> Dict:
    tool = shutil.which("all_reduce_perf")
    if tool:
        name = f"nccl-tests-x{gpus}"
        command = [tool, "-b", "1M", "-e", "1G", "-f", "4", "-g", str(gpus), "-w", "5", "-n", "20"]
        result = run_logged(name, command, gpu_env(gpus), work, 180)
        result["tool"] = "nccl-tests all_reduce_perf (in-place columns)"
        result["sizes"] = parse_nccl_tests(open(os.path.join(work, result["log"])).read())
        return result
    name = f"by-hand-x{gpus}"
    out = os.path.join(work, f"{name}.json")
    command = [sys.executable, "bench/allreduce_by_hand.py", "--gpus", str(gpus), "--out", out]
    result = run_logged(name, command, gpu_env(gpus), work, 180)
    result["tool"] = "bench/allreduce_by_hand.py (slowest rank's time)"
    payload = read_json(out) or {"sizes": []}
    result["sizes"] = [
        {
            "bytes": r["bytes"],
            "time_us": r["time_us_max"],
            "busbw_gb_s": r["busbw_gb_s_max"],
            "busbw_gb_s_mean_time": r["busbw_gb_s_mean"],
        }
        for r in payload["sizes"]
    ]
    return result


def compare(ours: Optional[dict], ref: Dict) -> List[Dict]:
    if not ours:
        return []
    by_size = {r["bytes"]: r for r in ref.get("sizes", [])}
    rows = []
    for s in ours["all_reduce"]["sizes"]:
        other = by_size.get(s["bytes"])
        rows.append(
            {
                "bytes": s["bytes"],
                "preflight_busbw_gb_s": round(s["busbw_gb_s"], 2),
                "reference_busbw_gb_s": round(other["busbw_gb_s"], 2) if other else None,
                "ratio": round(s["busbw_gb_s"] / other["busbw_gb_s"], 3) if other and other["busbw_gb_s"] else None,
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for preflight_check.json and the logs archive")
    parser.add_argument("--gpus", default=None, help="GPU counts for steps 1 and 4 (default: 2,4 as available)")
    parser.add_argument("--hog-gpu", type=int, default=1)
    parser.add_argument("--train-seconds", type=float, default=120.0)
    parser.add_argument("--window", type=float, default=60.0, help="--straggler-window for step 3, seconds")
    parser.add_argument("--train-args", default="", help="more train.py options for step 3, e.g. '--no-cuda-graphs'")
    args = parser.parse_args()
    import torch  # only for the GPU count: no CUDA context in this process

    available = torch.cuda.device_count()
    counts = [int(n) for n in args.gpus.split(",")] if args.gpus else [n for n in (2, 4) if n <= available]
    if not counts or max(counts) > available or args.hog_gpu >= max(counts):
        print(
            f"preflight_check: needs 2 or more GPUs (and the hog's GPU among them); {available} visible",
            file=sys.stderr,
        )
        return 2
    os.makedirs(args.out, exist_ok=True)
    work = tempfile.mkdtemp(prefix="preflight-check-")
    largest = max(counts)
    payload: Dict = {"gpus_on_machine": available, "torch": torch.__version__, "runs": [], "references": []}
    try:
        for n in counts:
            payload["runs"].append(preflight_run(f"preflight-x{n}", n, work, []))
        hog = Hog(args.hog_gpu, 150, os.path.join(work, "preflight-hog.log"))
        say(f"hog on GPU {args.hog_gpu} busy: {hog.wait_busy()}")
        try:
            hogged = preflight_run(
                f"preflight-strict-x{largest}-hog-gpu{args.hog_gpu}", largest, work, ["--preflight", "strict"]
            )
        finally:
            hog.stop()
        payload["runs"].append(hogged)
        training = training_with_hog(
            largest, args.hog_gpu, work, args.train_seconds, args.window, args.train_args.split()
        )
        payload["training"] = training
        for n in counts:
            ref = reference(n, work)
            ours = next((r["preflight"] for r in payload["runs"] if r["name"] == f"preflight-x{n}"), None)
            ref["comparison"] = compare(ours, ref)
            payload["references"].append(ref)
        first = next((r["preflight"] for r in payload["runs"] if r.get("preflight")), None)
        payload["card"] = first["ranks"][0]["device"] if first else None
        hog_findings = (hogged.get("preflight") or {}).get("findings", [])
        payload["expectations"] = {
            "healthy_preflights_exit_0": all(r["exit_code"] == 0 for r in payload["runs"][: len(counts)]),
            "healthy_preflights_have_no_findings": all(
                not (r.get("preflight") or {}).get("findings") for r in payload["runs"][: len(counts)]
            ),
            "hogged_strict_preflight_exits_1": hogged["exit_code"] == 1,
            "hogged_preflight_names_the_hogged_rank": any(
                f.get("rank") == args.hog_gpu for f in hog_findings if f["check"] == "matmul"
            ),
            "training_exits_0": training["exit_code"] == 0,
            "straggler_named_the_hogged_rank": (
                training["straggler_ranks_in_metrics"] == [args.hog_gpu] and len(training["straggler_warnings"]) == 1
            ),
        }
    finally:
        with open(os.path.join(args.out, "preflight_check.json"), "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
        archive = os.path.join(args.out, "preflight_check_logs.tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            for root, _, files in os.walk(work):
                for name in files:
                    if name.endswith((".log", ".json", ".jsonl")):
                        path = os.path.join(root, name)
                        tar.add(path, arcname=os.path.relpath(path, work))
        shutil.rmtree(work, ignore_errors=True)
    print_summary(payload)
    say(f"wrote {os.path.join(args.out, 'preflight_check.json')} and {archive}")
    return 0 if all(payload.get("expectations", {}).values()) else 1


def print_summary(payload: Dict) -> None:
    for run in payload["runs"]:
        found = [f["message"] for f in (run.get("preflight") or {}).get("findings", [])]
        print(f"{run['name']:<34} exit {run['exit_code']}  {len(found)} finding(s)", flush=True)
        for message in found:
            print(f"    {message}")
    training = payload.get("training", {})
    print(
        f"{training.get('name', 'training'):<34} exit {training.get('exit_code')}  straggler ranks in metrics: "
        f"{training.get('straggler_ranks_in_metrics')}"
    )
    for line in training.get("straggler_warnings", []):
        print(f"    {line}")
    for ref in payload.get("references", []):
        print(f"{ref['name']} ({ref.get('tool')}): size, preflight busbw, reference busbw, ratio")
        for row in ref.get("comparison", []):
            print(
                f"    {row['bytes']:>11d}  {row['preflight_busbw_gb_s']!s:>8}  {row['reference_busbw_gb_s']!s:>8}  "
                f"{row['ratio']!s:>6}"
            )
    for key, value in payload.get("expectations", {}).items():
        print(f"{'ok  ' if value else 'FAIL'} {key}")


if __name__ == "__main__":
    sys.exit(main())
