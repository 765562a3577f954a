"""Start-up benchmark: time to the first step, cold and warm, and a restart's time to its first step.

Runs on the GPU machine, from the repository root:

    python bench/startup.py --gpus 1 --configs default,fast

For each configuration, three runs of `python train.py`, each timed from the launcher's start to the end
of its first step (summary.json's time_to_first_step_s, and the whole run's wall time):

- cold:    a fresh save dir, and a new pod's empty home and /tmp (where the CUDA driver's, torch's,
           inductor's and Triton's caches live unless the job keeps them in its save dir). The machine's
           first run also reads every library from disk: the results say which run came first.
- restart: the cold run's save dir again, resumed as a restarted pod is, with a new empty home and /tmp
           (a new pod has lost them; the save dir, on its volume, is kept).
- warm:    a fresh save dir, with the cold run's home and /tmp (the same image has run here before).

With --image-bytecode DIR the jobs run as from an image built with Python's bytecode (as deploy/Dockerfile
builds it): before the runs, and untimed, every module on the interpreter's path is compiled into DIR, and
each job runs with PYTHONPYCACHEPREFIX=DIR. Without it the jobs run with the image as it is; an image
without bytecode compiles torch's Python source in every new process.

With --repeat N the three runs of every configuration are repeated N times, in rounds, each round with
a new save dir, home and /tmp: a goal is met when every round meets it.

Writes bench/results/<gpu>-x<N>-startup[-image-bytecode].json, which names this command, the commit, card and
torch it measured, and prints a table.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch
from gpus import child_env
from run import measured_commit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"default": [], "fast": ["--fast"]}
STEPS, RESTART_STEPS = 40, 80  # the first run's steps, then the restart's total (it resumes at 40)
_CACHE_VARIABLES = ("PYTORCH_KERNEL_CACHE_PATH", "CUDA_CACHE_PATH", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


def _fresh_caches(root: str) -> Dict[str, str]:
    """The environment of a new pod: an empty home and /tmp, where every per-machine cache lives by default
    (the CUDA driver's, torch's kernels, inductor's, Triton's)."""
    home = tempfile.mkdtemp(prefix="home-", dir=root)
    return {"HOME": home, "TMPDIR": tempfile.mkdtemp(prefix="tmp-", dir=root), "XDG_CACHE_HOME": ""}


def _compile_bytecode(prefix: str, log_dir: str) -> float:
    """What building an image with bytecode does: compile every module this interpreter can import. Under a
    prefix Python looks for all bytecode there, the standard library's too, so all of it goes there."""
    skip = {os.path.realpath(REPO), os.path.realpath(os.path.dirname(__file__))}  # our code: compiled below
    paths = [p for p in sys.path if os.path.isdir(p) and os.path.realpath(p) not in skip]
    env = {**os.environ, "PYTHONPYCACHEPREFIX": prefix}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    started = time.monotonic()
    with open(os.path.join(log_dir, "startup-compileall.log"), "w") as log:
        # some packages ship files that do not compile (templates, other Pythons' code): reported, not fatal
        command = [sys.executable, "-m", "compileall", "-q", "-j", "0", *paths, os.path.join(REPO, "resnet_ddp")]
        subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    return time.monotonic() - started


def _run(
    name: str, args: List[str], gpus: int, save_dir: str, steps: int, caches: Dict[str, str], log_dir: str
) -> Dict:
    env = {**child_env(gpus), **caches}
    for variable in _CACHE_VARIABLES:  # the defaults of a pod: nothing pointed elsewhere
        env.pop(variable, None)
    if not env["XDG_CACHE_HOME"]:
        env.pop("XDG_CACHE_HOME")
    command = [
        sys.executable,
        "train.py",
        *args,
        "--nproc-per-node",
        str(gpus),
        "--min-gpus",
        "1",
        "--max-steps",
        str(steps),
        "--warmup-steps",
        "5",
        "--save-dir",
        save_dir,
    ]
    started = time.monotonic()
    with open(os.path.join(log_dir, f"startup-{name}.log"), "w") as log:
        code = subprocess.run(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    result = {"name": name, "command": shlex.join(command[1:]), "exit_code": code, "wall_s": time.monotonic() - started}
    try:
        with open(os.path.join(save_dir, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return result
    for key in ("time_to_first_step_s", "startup_s", "img_s", "steps"):
        result[key] = summary.get(key)
    return result


def _planned_runs(configs: List[str], repeat: int, root: str) -> List[tuple]:
    """(name, train.py options, save dir, steps, caches) of every run, in order: each round runs every
    configuration cold, restarted and warm, with a home and /tmp of its own."""
    runs = []
    for round_ in range(1, repeat + 1):
        warm = _fresh_caches(root)  # filled by this round's cold runs, then used warm
        tag = f"-{round_}" if repeat > 1 else ""
        for config in configs:
            save_dir = os.path.join(root, f"{config}-save{tag}")
            runs += [
                (f"{config}-cold{tag}", CONFIGS[config], save_dir, STEPS, warm),
                (f"{config}-restart{tag}", CONFIGS[config], save_dir, RESTART_STEPS, _fresh_caches(root)),
                (f"{config}-warm{tag}", CONFIGS[config], os.path.join(root, f"{config}-warm-save{tag}"), STEPS, warm),
            ]
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=1)
    parser.add_argument("--configs", default="default,fast")
    parser.add_argument("--log-dir", default=os.environ.get("OUT", tempfile.gettempdir()))
    parser.add_argument("--results-dir", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument(
        "--image-bytecode",
        metavar="DIR",
        help="run the jobs as from an image built with bytecode, compiled into DIR before the runs",
    )
    parser.add_argument("--repeat", type=int, default=1, help="rounds of every configuration's three runs")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat takes a whole number of 1 or more")
    card = torch.cuda.get_device_name(0)
    root = tempfile.mkdtemp(prefix="bench-startup-")
    payload = results_header(sys.argv[1:], card, args.gpus)
    slug = card.replace("NVIDIA ", "").replace(" ", "-").lower()
    suffix = "-image-bytecode" if args.image_bytecode else ""
    path = os.path.join(args.results_dir, f"{slug}-x{args.gpus}-startup{suffix}.json")
    for directory in (args.results_dir, args.log_dir):
        os.makedirs(directory, exist_ok=True)
    image_env = {}
    if args.image_bytecode:
        prefix = os.path.abspath(args.image_bytecode)
        seconds = _compile_bytecode(prefix, args.log_dir)
        payload["image_bytecode"] = f"compiled into a prefix before the runs, in {seconds:.1f} s"
        print(f"bytecode compiled in {seconds:.1f} s", flush=True)
        image_env = {"PYTHONPYCACHEPREFIX": prefix}
    for name, extra, run_dir, steps, caches in _planned_runs(args.configs.split(","), args.repeat, root):
        result = _run(name, extra, args.gpus, run_dir, steps, {**caches, **image_env}, args.log_dir)
        result["machines_first_run"] = not payload["runs"]
        payload["runs"].append(result)
        first = result.get("time_to_first_step_s")
        print(
            f"{name:<18} first step {first if first is None else f'{first:.1f}'} s  "
            f"wall {result['wall_s']:.1f} s  exit {result['exit_code']}",
            flush=True,
        )
        with open(path, "w") as f:
            json.dump(payload, f, indent=2)
            f.write("\n")
    print(f"wrote {path}")
    return 0


def results_header(argv: List[str], card: str, gpus: int) -> Dict:
    """What a results file starts with: the command that makes it again, and what it measured."""
    return {
        "command": shlex.join(["python", "bench/startup.py", *argv]),
        "commit": measured_commit(),
        "card": card,
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "gpus": gpus,
        "image_bytecode": "as installed",
        "runs": [],
    }


if __name__ == "__main__":
    sys.exit(main())
