"""Checkpoints, resume, stops and failures: what survives what (CPU ranks over gloo)."""

from __future__ import annotations

import os
import re
import signal
import sys
import time

import pytest
import torch

from conftest import TINY, Job, run_train, train_command, wait_for_no_leftovers
from test_training import GLOBAL_LINE

STOP_LINE = re.compile(r"^\[Rank (\d+)\] stopping after step (\d+) \((SIG\w+)\)$", re.M)


def checkpoints(save_dir):
    return sorted(p.name for p in save_dir.glob("checkpoint-*.pt"))


def final_weights(save_dir):
    return torch.load(save_dir / "model_final.pth")


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_checkpoints_at_epoch_ends_are_pruned_and_hold_the_training_state(save_dir):
    result = run_train(*TINY, "--epochs", "3", "--keep-checkpoints", "2", "--save-dir", str(save_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert checkpoints(save_dir) == ["checkpoint-000000008.pt", "checkpoint-000000012.pt"]
    state = torch.load(save_dir / "checkpoint-000000012.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (4, 0, 12)
    assert state["fingerprint"] == {"arch": "resnet18", "num_classes": 10, "image_size": 32, "amp": "off"}
    assert {"model", "optimizer", "rng", "scaler"} <= state.keys()
    assert not list(save_dir.glob(".*.tmp"))  # no temporary file left behind


def test_resume_mid_epoch_ends_with_the_same_weights_bitwise(tmp_path):
    common = [*TINY, "--epochs", "3", "--momentum", "0.9", "--seed", "5", "--checkpoint-every", "3"]
    whole = run_train(*common, "--save-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    # Interrupted: the process exits with 3 as step 7 starts; the newest checkpoint is step 6,
    # the middle of epoch 2 (4 steps an epoch).
    cut = run_train(*common, "--fail-at-step", "7", "--fail-mode", "exit", "--save-dir", str(tmp_path / "cut"))
    assert cut.returncode == 3
    assert checkpoints(tmp_path / "cut")[-1] == "checkpoint-000000006.pt"
    resumed = run_train(*common, "--save-dir", str(tmp_path / "cut"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "epoch 2, step 2 of the epoch, 6 steps done" in resumed.stdout
    assert_same_weights(final_weights(tmp_path / "whole"), final_weights(tmp_path / "cut"))
    # the resumed epoch's line covers the whole epoch, as in the uninterrupted run
    assert GLOBAL_LINE.findall(resumed.stdout) == GLOBAL_LINE.findall(whole.stdout)[1:]


def test_a_checkpoint_made_with_other_arithmetic_is_refused_and_kept(save_dir):
    assert run_train(*TINY, "--epochs", "1", "--save-dir", str(save_dir)).returncode == 0
    before = {p.name: p.read_bytes() for p in save_dir.glob("checkpoint-*.pt")}
    result = run_train(*TINY, "--epochs", "2", "--image-size", "64", "--save-dir", str(save_dir), timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "image_size 32 (now 64)" in line and "--resume never" in line
    assert {p.name: p.read_bytes() for p in save_dir.glob("checkpoint-*.pt")} == before
    assert run_train(*TINY, "--epochs", "1", "--image-size", "64", "--resume", "never",
                     "--save-dir", str(save_dir)).returncode == 0  # the way out the message names


def test_a_truncated_newest_checkpoint_is_reported_and_the_previous_used(save_dir):
    assert run_train(*TINY, "--epochs", "2", "--save-dir", str(save_dir)).returncode == 0
    newest = save_dir / "checkpoint-000000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])
    result = run_train(*TINY, "--epochs", "3", "--save-dir", str(save_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "checkpoint-000000008.pt is unreadable" in result.stderr
    assert "resuming from" in result.stdout and "checkpoint-000000004.pt" in result.stdout


def _wait_for_line(job: Job, text: str, within_s: float = 120) -> None:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        line = job.process.stdout.readline()
        if text in line:
            return
    raise AssertionError(f"no line with {text!r} within {within_s} s")


def _spawned_workers(launcher_pid: int):
    workers = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == launcher_pid and b"spawn_main" in cmdline:
            workers.append(int(entry))
    return workers


@pytest.mark.parametrize("target", ["launcher", "one worker"])
def test_sigterm_stops_every_rank_at_the_same_step_with_a_checkpoint(target, save_dir):
    job = Job(train_command(*TINY, "--epochs", "500", "--save-dir", str(save_dir)))
    _wait_for_line(job, "Epoch   1 - Avg Loss")
    pid = job.process.pid if target == "launcher" else _spawned_workers(job.process.pid)[-1]
    os.kill(pid, signal.SIGTERM)
    result = job.wait(timeout=60)
    assert result.returncode == 143, result.stderr[-2000:]
    stops = STOP_LINE.findall(result.stdout)
    assert sorted(rank for rank, _, _ in stops) == ["0", "1"]
    (step,) = {step for _, step, _ in stops}  # the same step on every rank
    assert {name for _, _, name in stops} == {"SIGTERM"}
    assert f"checkpoint-{int(step):09d}.pt" in checkpoints(save_dir)
    assert not (save_dir / "model_final.pth").exists()
    assert wait_for_no_leftovers(job) == []
    resumed = run_train(*TINY, "--epochs", "3", "--save-dir", str(save_dir))
    assert resumed.returncode == 0 and f"{step} steps done" in resumed.stdout


def test_sigterm_to_torchrun_stops_its_workers_with_a_checkpoint(save_dir):
    job = Job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "train.py", *TINY, "--epochs", "500", "--save-dir", str(save_dir)])
    _wait_for_line(job, "Epoch   1 - Avg Loss")
    job.process.send_signal(signal.SIGTERM)
    result = job.wait(timeout=90)
    assert result.returncode != 0
    stops = STOP_LINE.findall(result.stdout)
    assert sorted(rank for rank, _, _ in stops) == ["0", "1"] and len({s for _, s, _ in stops}) == 1
    assert checkpoints(save_dir)
    assert wait_for_no_leftovers(job) == []
