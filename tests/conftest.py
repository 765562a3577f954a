"""Helpers for running the real job in subprocesses, as users and platforms do."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

pytest_plugins = ["pytester"]  # for the test of --lane below

REPO = Path(__file__).resolve().parent.parent

# Tiny settings: resnet18 at 32 px, a few steps on 2 CPU ranks over gloo.
TINY = [
    "--cpu",
    "--nproc-per-node",
    "2",
    "--arch",
    "resnet18",
    "--image-size",
    "32",
    "--dataset-size",
    "64",
    "--batch-size",
    "8",
    "--epochs",
    "2",
    "--num-workers",
    "0",
    "--num-classes",
    "10",
    "--lr",
    "0.01",
]

# Variables that would change the launch mode or options if the caller's shell had them.
_LAUNCH_VARIABLES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "OUTPUT_DIR",
)


def pytest_addoption(parser):
    parser.addoption(
        "--lane",
        default=None,
        metavar="I/N",
        help="run only every N-th selected test, from the I-th (1-based): N lanes of the GPU suite "
        "side by side, each on its own GPUs (CUDA_VISIBLE_DEVICES)",
    )


@pytest.hookimpl(trylast=True)  # after -m and -k: the lanes split what would have run
def pytest_collection_modifyitems(config, items):
    lane = config.getoption("--lane")
    if lane is None:
        return
    try:
        index, count = (int(part) for part in lane.split("/"))
        assert 1 <= index <= count
    except (ValueError, AssertionError):
        raise pytest.UsageError(f"--lane {lane}: expected I/N with 1 <= I <= N, such as 1/2") from None
    keep = set(items[index - 1 :: count])
    config.hook.pytest_deselected(items=[item for item in items if item not in keep])
    items[:] = [item for item in items if item in keep]


def clean_env(extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARIABLES and not k.startswith("RESNET_DDP_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def free_port() -> int:
    """As the launcher picks one: outside the ephemeral range, which other tests' connections draw from."""
    from resnet_ddp.entry.launch import free_port as launcher_free_port

    return launcher_free_port()


class Job:
    """A job started in the background, tagged so that every process it made can be found."""

    def __init__(self, command: Sequence[str], env: Optional[Dict[str, str]] = None, new_session: bool = False):
        """`new_session`: the job gets a process group of its own, as a terminal or a process manager gives it."""
        self.marker = uuid.uuid4().hex
        full_env = clean_env(env)
        full_env["RESNET_DDP_TEST_MARKER"] = self.marker
        self.process = subprocess.Popen(
            list(command),
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,
        )
        self.stderr_seen: List[str] = []

    def wait_for_stderr(self, text: str, count: int = 1, within_s: float = 180) -> None:
        """Read stderr until `text` has come `count` times (what is read is kept in stderr_seen)."""
        fd = self.process.stderr.fileno()  # raw reads: nothing is held in a buffer select cannot see
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if not select.select([fd], [], [], 1.0)[0]:
                continue  # nothing yet: look at the clock again
            chunk = os.read(fd, 65536).decode(errors="replace")
            if not chunk:
                break  # the job has closed its stderr
            self.stderr_seen.append(chunk)
            if "".join(self.stderr_seen).count(text) >= count:
                return
        raise AssertionError(
            f"{text!r} not {count} time(s) on stderr within {within_s} s: {''.join(self.stderr_seen)[-2000:]}"
        )

    def wait(self, timeout: float = 240) -> subprocess.CompletedProcess:
        try:
            out, err = self.process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()  # a hung job must not outlive its test, holding ports and cores for the ones after it
            raise
        return subprocess.CompletedProcess(
            self.process.args, self.process.returncode, out, "".join(self.stderr_seen) + err
        )

    def kill(self) -> None:
        """SIGKILL every process the job made, its launcher, ranks and workers alike."""
        for pid in self.leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def leftover_pids(self) -> List[int]:
        return processes_with_marker(self.marker)


def processes_with_marker(marker: str) -> List[int]:
    """PIDs whose environment carries the marker (children inherit it, whatever their command line)."""
    found = []
    needle = f"RESNET_DDP_TEST_MARKER={marker}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if needle in f.read():
                    found.append(int(entry))
        except OSError:
            continue
    return found


def wait_for_no_leftovers(job: Job, within_s: float = 15.0) -> List[int]:
    deadline = time.monotonic() + within_s
    while True:
        left = job.leftover_pids()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def train_command(*args: str) -> List[str]:
    return [sys.executable, "train.py", *args]


def run_train(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return Job(train_command(*args), env).wait(timeout)


@pytest.fixture
def save_dir(tmp_path: Path) -> Path:
    return tmp_path / "out"


def metrics_schema() -> Dict[str, Dict[str, tuple]]:
    """docs/metrics.md as {kind: {field: (type, required)}}; the fields of every record under "*"."""
    schema: Dict[str, Dict[str, tuple]] = {}
    kinds: List[str] = []
    tables_seen = 0
    in_table = False
    for line in (REPO / "docs" / "metrics.md").read_text().splitlines():
        if line.startswith("## "):
            kinds = ["*"] if "Every record" in line else line.split(":")[0].split("`")[1::2]
            tables_seen, in_table = 0, False
        elif line.startswith("| `") and kinds:
            if not in_table:
                in_table, tables_seen = True, tables_seen + 1
            kind = kinds[min(tables_seen, len(kinds)) - 1]
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            schema.setdefault(kind, {})[cells[0].strip("`")] = (cells[1], not cells[3].startswith("*"))
        elif not line.startswith("|"):
            in_table = False
    return schema


_JSON_TYPES = {"int": (int,), "float": (float, int), "str": (str,), "bool": (bool,), "list": (list,), "object": (dict,)}


def assert_records_follow_the_schema(records: List[dict]) -> None:
    """Every record of a real run is of a documented kind, has every field it must, and no other; types match."""
    schema = metrics_schema()
    for record in records:
        fields = {**schema["*"], **schema[record["kind"]]}
        assert set(record) <= set(fields), (record["kind"], set(record) - set(fields))
        for name, (kind_of_value, required) in fields.items():
            if name not in record:
                assert not required, (record["kind"], name, "missing")
                continue
            value = record[name]
            if value is None:
                assert kind_of_value.endswith("?"), (record["kind"], name, "null")
            else:
                types = _JSON_TYPES[kind_of_value.rstrip("?")]
                assert isinstance(value, types) and not (isinstance(value, bool) and bool not in types), (
                    record["kind"],
                    name,
                    value,
                )
