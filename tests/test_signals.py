"""Stop signals at every phase of a job's life, dying with the launcher, and one job per save dir (CPU ranks).

Each test stops a job at a known phase: RESNET_DDP_TEST_PAUSE_AT makes every process that reaches the
phase say so and wait there (resnet_ddp/core/phases.py), so the signal never depends on a guessed delay.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, TINY, Job, clean_env, run_train, wait_for_no_leftovers

PAUSED = "resnet-ddp: paused at"
LONG = [*TINY, "--epochs", "500"]
# How soon a stopped job must have ended: the contract is 10 s (RELIABILITY.md); the bound leaves room for a
# loaded machine, and is far from what the faults this guards against took (a compile's 30 s, a rendezvous'
# --dist-timeout, or never).
STOPPED_WITHIN_S = 25


def _paused_job(phase, *args, processes=2, launcher=None, new_session=False):
    command = (launcher or [sys.executable, "train.py"]) + list(args)
    job = Job(command, {"RESNET_DDP_TEST_PAUSE_AT": phase}, new_session=new_session)
    job.wait_for_stderr(f"{PAUSED} {phase}", count=processes)
    return job


def _stop(job, sig=signal.SIGTERM, pid=None):
    sent = time.monotonic()
    os.kill(pid or job.process.pid, sig)
    result = job.wait(timeout=120)
    return result, time.monotonic() - sent


@pytest.mark.parametrize(
    "phase,processes",
    [
        ("imports", 1),
        ("checks", 1),
        ("spawning", 1),
        ("rank start", 2),
        ("rendezvous", 2),
        ("model build", 2),
        ("first step", 2),
        ("steady training", 2),
        ("epoch end", 2),
        ("final export", 2),
    ],
)
def test_sigterm_ends_the_job_with_143_at_every_phase(phase, processes, save_dir):
    args = [*TINY, "--epochs", "1"] if phase == "final export" else LONG
    job = _paused_job(phase, *args, "--save-dir", str(save_dir), processes=processes)
    result, took = _stop(job)
    assert result.returncode == 143, result.stderr[-3000:]
    assert took < STOPPED_WITHIN_S
    assert "Traceback" not in result.stderr
    assert wait_for_no_leftovers(job) == []
    if phase in ("steady training", "epoch end"):  # training had begun: a checkpoint of the step it stopped at
        stops = {
            line.split("stopping after step ")[1].split()[0]
            for line in result.stdout.splitlines()
            if "stopping after step" in line
        }
        (step,) = stops
        assert (save_dir / f"checkpoint-{int(step):09d}.pt").exists()
        assert json.loads((save_dir / "summary.json").read_text())["exit_reason"] == "stopped by signal"
    if phase == "final export":  # the run was complete: its model is there, and the job says it was stopped
        assert (save_dir / "model_final.pth").exists()


def test_a_stop_while_the_launcher_starts_its_ranks_starts_no_more(save_dir):
    """Rank 0 waits at its start and the launcher before starting rank 1: after the signal, no rank 1 starts
    (it would sit in the rendezvous until the launcher's grace ran out)."""
    job = Job(
        [sys.executable, "train.py", *LONG, "--save-dir", str(save_dir)],
        {"RESNET_DDP_TEST_PAUSE_AT": "spawning,rank start"},
    )
    job.wait_for_stderr(PAUSED, count=2)  # the launcher at spawning, rank 0 at its start
    result, took = _stop(job)
    assert result.returncode == 143 and took < STOPPED_WITHIN_S, result.stderr[-3000:]
    assert result.stderr.count(f"{PAUSED} rank start") == 1
    assert wait_for_no_leftovers(job) == []


def test_sigint_while_the_ranks_start_ends_the_job_with_130_without_a_traceback(save_dir):
    """A rank that Python is still starting has Python's own SIGINT handler (a KeyboardInterrupt traceback)
    until ours: the launcher starts it with the stop signals held, and it takes them once it can."""
    job = _paused_job("rank start", *LONG, "--save-dir", str(save_dir))
    result, took = _stop(job, signal.SIGINT)
    assert result.returncode == 130 and took < STOPPED_WITHIN_S, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr
    assert wait_for_no_leftovers(job) == []


def test_sigint_while_the_ranks_wait_for_each_other_ends_the_job_with_130(save_dir):
    job = _paused_job("rendezvous", *LONG, "--save-dir", str(save_dir))
    result, took = _stop(job, signal.SIGINT)
    assert result.returncode == 130 and took < STOPPED_WITHIN_S, result.stderr[-3000:]
    assert wait_for_no_leftovers(job) == []


@pytest.mark.parametrize("in_it,past_it", [(1, 0), (0, 1)], ids=["rank 1 in it", "rank 0 in it"])
def test_sigterm_as_the_ranks_finish_their_first_step_is_a_stop_not_a_failure(in_it, past_it, save_dir):
    """A rank that has not finished its first step ends on the signal at once (nothing to save, and a compile
    could outlast a pod's grace period); one that has finished it waits to agree on a step and meets a peer that
    is gone. One rank is paused just before its first step counts, the other just after. Where rank 0 ended,
    the job's store went with it, and rank 1 cannot tell a stop from a failure: the launcher can."""
    phases = f"first step ending@{in_it},first step ended@{past_it}"
    job = Job([sys.executable, "train.py", *LONG, "--save-dir", str(save_dir)], {"RESNET_DDP_TEST_PAUSE_AT": phases})
    job.wait_for_stderr(PAUSED, count=2)
    result, took = _stop(job)
    assert result.returncode == 143 and took < STOPPED_WITHIN_S, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    if past_it == 0:  # rank 0 learns from the store that rank 1 stopped, and writes summary.json
        assert "failed" not in result.stdout + result.stderr
        assert "[Rank 0] stopped by SIGTERM before the ranks agreed on a step: " in result.stdout
        summary = json.loads((save_dir / "summary.json").read_text())
        assert (summary["exit_reason"], summary["exit_code"], summary["signal"]) == (
            "stopped by signal",
            143,
            "SIGTERM",
        )
    else:
        (line,) = [line for line in result.stderr.splitlines() if line.startswith("[Rank 1]")]
        assert "failed because rank 0 ended first: " in line
        # rank 0 ended at once and wrote no summary.json: its launcher writes how the job ended
        summary = json.loads((save_dir / "summary.json").read_text())
        assert (summary["exit_reason"], summary["exit_code"], summary["signal"]) == (
            "stopped by signal",
            143,
            "SIGTERM",
        )
        assert "steps" not in summary and summary["world_size"] == 2
    assert wait_for_no_leftovers(job) == []


def test_a_sigterm_to_the_whole_process_group_stops_at_one_step_with_a_checkpoint(save_dir):
    """`timeout`, a terminal's Ctrl-C and some process managers signal every process of the group, DataLoader
    workers included: the ranks still stop together after one step, with their workers until then."""
    job = _paused_job("steady training", *LONG, "--num-workers", "1", "--save-dir", str(save_dir), new_session=True)
    result, took = _stop(job, pid=-job.process.pid)  # the process group
    assert result.returncode == 143 and took < STOPPED_WITHIN_S, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and list(save_dir.glob("checkpoint-*.pt"))
    assert wait_for_no_leftovers(job) == []


def test_a_launcher_that_is_pid_1_of_its_container_answers_sigterm_from_its_first_line(save_dir):
    if os.geteuid() != 0:
        pytest.skip("needs root for a private PID namespace")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid is not allowed here: {probe.stderr.decode().strip()}")
    launcher = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "train.py"]
    job = _paused_job("imports", *LONG, "--save-dir", str(save_dir), processes=1, launcher=launcher)
    (pid_1,) = _children(job.process.pid)  # PID 1 inside the namespace: a handler or nothing reaches it
    result, took = _stop(job, pid=pid_1)
    assert result.returncode == 143 and took < STOPPED_WITHIN_S, result.stderr[-3000:]


def _children(pid):
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_a_killed_launcher_leaves_no_process_behind_and_its_save_dir_to_the_next_job(save_dir):
    """SIGKILL gives the launcher no chance to stop its ranks: the kernel must (PR_SET_PDEATHSIG), ranks and
    DataLoader workers alike, or a restarted job would train beside them in the same save dir. Meanwhile, a
    second job on the same save dir is refused, naming the one that holds it."""
    job = _paused_job("steady training", *LONG, "--num-workers", "1", "--save-dir", str(save_dir))
    second = run_train(*TINY, "--save-dir", str(save_dir), timeout=120)
    assert second.returncode == 2, second.stderr[-2000:]
    (line,) = second.stderr.strip().splitlines()
    assert line.startswith(f"resnet-ddp: error: save dir {save_dir} is in use by another job (host ")
    assert f"pid {job.process.pid}," in line
    job.process.kill()
    job.wait(timeout=60)
    assert wait_for_no_leftovers(job, within_s=60) == []
    # An interrupted write's temporary file (as a kill leaves): removed when the next job takes the save dir.
    stale = save_dir / ".checkpoint-000000003.pt.x1y2z3.tmp"
    stale.write_bytes(b"partial")
    assert run_train(*TINY, "--save-dir", str(save_dir)).returncode == 0
    assert not stale.exists()


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "train.py"]


@pytest.mark.parametrize("phase", ["imports", "steady training"])
def test_a_killed_torchrun_leaves_no_worker_behind(phase, save_dir):
    """From a worker's first line on: one that torchrun's death left behind would otherwise hold the save dir
    while it waits on the dead torchrun's store."""
    job = _paused_job(phase, *LONG, "--num-workers", "1", "--save-dir", str(save_dir), launcher=TORCHRUN)
    job.process.kill()
    job.wait(timeout=60)
    assert wait_for_no_leftovers(job, within_s=60) == []


def test_a_broken_pipe_ends_the_scenario_list_without_a_traceback(tmp_path):
    listed = subprocess.run(
        f"{sys.executable} train.py --scenario list | head -1",
        shell=True,
        cwd=REPO,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0 and listed.stdout.strip() == "smoke" and "Traceback" not in listed.stderr


def test_a_torchrun_worker_tells_a_reaper_from_an_agent_by_pid_1s_command_line():
    """A worker torchrun left before it could ask for its death finds PID 1 as its parent; PID 1 is torchrun
    itself where torchrun is a container's first process, and then the worker must go on."""
    from resnet_ddp.entry.process import may_be_an_agent

    agents = [b"/usr/bin/python3\0/usr/local/bin/torchrun\0--nproc-per-node\0008\0train.py\0", b"torchrun\0train.py\0"]
    reapers = [b"/sbin/tini\0--\0torchrun\0train.py\0", b"/pause\0", b"/sbin/init\0", b"/bin/sh\0-c\0torchrun x\0"]
    assert all(may_be_an_agent(line) for line in agents)
    assert not any(may_be_an_agent(line) for line in reapers)
    assert may_be_an_agent(None)  # PID 1 unreadable: the worker cannot tell, and goes on
