"""How long a preemption takes on GPUs: SIGTERM to the launcher -> checkpoint -> exit, then the resume.

Runs on the GPU machine, from the repository root:

    python bench/stop_timing.py --gpus 2 --out $OUT/stop-timing.json

For each configuration it starts a real `python train.py` job, lets it train for
--train-s seconds, sends SIGTERM to the launcher (what Kubernetes does to PID 1)
and times the way out: until every rank has agreed on the stop, until the
checkpoint is written (the job reports each write's size and time in
metrics.jsonl), until the launcher exits. Then it starts the same command again
and times how long the resumed job takes to reach its first step. A platform's
grace period (terminationGracePeriodSeconds) must cover the first figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Dict, List

from gpus import child_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"default": [], "fast": ["--fast"]}
STOP_LINE = re.compile(r"stopping after step (\d+)")
RESUME_LINE = re.compile(r"resuming from .*: epoch (\d+), step (\d+) of the epoch, (\d+) steps done")


class TimedLog:
    """Reads a child's output line by line and remembers when each line arrived."""

    def __init__(self, process: subprocess.Popen, log_path: str):
        self.lines: List[tuple] = []
        self._process, self._log_path = process, log_path
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self):
        with open(self._log_path, "w") as log:
            for line in self._process.stdout:
                self.lines.append((time.monotonic(), line))
                log.write(line)

    def first(self, pattern: re.Pattern, after: float = 0.0):
        for t, line in self.lines:
            match = pattern.search(line)
            if t >= after and match:
                return t, match
        return None, None

    def join(self):
        self._thread.join()


def _start(args: List[str], env: Dict[str, str], log_path: str):
    process = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, TimedLog(process, log_path)


def measure(name: str, extra: List[str], gpus: int, train_s: float, log_dir: str) -> Dict:
    env = child_env(gpus, PYTHONUNBUFFERED="1")
    save_dir = tempfile.mkdtemp(prefix=f"stop-{name}-")
    args = [
        *extra,
        "--nproc-per-node",
        str(gpus),
        "--min-gpus",
        "1",
        "--epochs",
        "100",
        "--log-interval",
        "50",
        "--save-dir",
        save_dir,
    ]
    result: Dict = {"name": name, "gpus": gpus, "command": "train.py " + " ".join(args)}

    started = time.monotonic()
    process, log = _start(args, env, os.path.join(log_dir, f"stop-{name}-x{gpus}.log"))
    time.sleep(train_s)
    signalled = time.monotonic()
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=300)
    exited = time.monotonic()
    log.join()
    stop_t, stop = log.first(STOP_LINE, after=signalled)
    records = [json.loads(line) for line in open(os.path.join(save_dir, "logs", "metrics.jsonl"))]
    written = [r for r in records if r["kind"] == "checkpoint"]
    result.update(
        exit_code=code,
        trained_s=signalled - started,
        signal_to_agreed_stop_s=(stop_t - signalled) if stop_t else None,
        stopped_after_step=int(stop.group(1)) if stop else None,
        checkpoint_write_s=written[-1]["write_s"] if written else None,
        checkpoint_mib=written[-1]["bytes"] / 2**20 if written else None,
        checkpoint_training_held_s=written[-1].get("training_held_s") if written else None,
        signal_to_exit_s=exited - signalled,
    )

    # The restart a platform makes: same command, same save dir; stop it once it has trained a little.
    restarted = time.monotonic()
    process, log = _start(
        [*args, "--max-steps", str((result["stopped_after_step"] or 0) + 30)],
        env,
        os.path.join(log_dir, f"resume-{name}-x{gpus}.log"),
    )
    code = process.wait(timeout=300)
    log.join()
    resume_t, resume = log.first(RESUME_LINE)
    result.update(
        resume_exit_code=code,
        resumed_at_step=int(resume.group(3)) if resume else None,
        start_to_resumed_s=(resume_t - restarted) if resume_t else None,
        resume_run_wall_s=time.monotonic() - restarted,
    )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--configs", default="default,fast")
    parser.add_argument("--train-s", type=float, default=45.0, help="seconds of training before SIGTERM")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", tempfile.gettempdir()), "stop-timing.json"))
    args = parser.parse_args()
    import torch

    payload = {"card": torch.cuda.get_device_name(0), "torch": torch.__version__, "runs": []}
    for name in args.configs.split(","):
        result = measure(name, CONFIGS[name], args.gpus, args.train_s, os.path.dirname(args.out))
        payload["runs"].append(result)
        print(json.dumps(result), flush=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
