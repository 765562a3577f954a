"""The real job, launched every way our users launch it, on CPU ranks over gloo."""

from __future__ import annotations

import json
import re
import socket
import sys

import pytest
import torch
import torchvision
from conftest import (
    TINY,
    Job,
    assert_records_follow_the_schema,
    free_port,
    run_train,
    train_command,
    wait_for_no_leftovers,
)

from resnet_ddp.observe import report

EPOCH_LINE = re.compile(r"^\[Rank (\d+)\] Epoch +(\d+) - Avg Loss: (\d+\.\d{4})$", re.M)
GLOBAL_LINE = re.compile(r"^\[Rank 0\] Epoch +(\d+) - Global Avg Loss: (\d+\.\d{4}) \((\d+) ranks\)$", re.M)
DONE_LINE = re.compile(r"^\[Rank (\d+)\] Training completed in \d+\.\d\d seconds$", re.M)


def assert_trained(result, save_dir, ranks, epochs, arch="resnet18", num_classes=10):
    assert result.returncode == 0, result.stderr[-3000:]
    epoch_lines = EPOCH_LINE.findall(result.stdout)
    assert sorted({int(r) for r, _, _ in epoch_lines}) == list(range(ranks))
    assert len(epoch_lines) == ranks * epochs
    assert [int(e) for e, _, n in GLOBAL_LINE.findall(result.stdout)] == list(range(1, epochs + 1))
    assert all(int(n) == ranks for _, _, n in GLOBAL_LINE.findall(result.stdout))
    assert sorted(int(r) for r in DONE_LINE.findall(result.stdout)) == list(range(ranks))
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    model.load_state_dict(torch.load(save_dir / "model_final.pth"))  # plain keys, strict
    return [float(loss) for _, loss, _ in GLOBAL_LINE.findall(result.stdout)]


def test_standalone_spawn_trains_learns_checkpoints_and_exports(save_dir):
    result = run_train(*TINY, "--dataset-size", "128", "--epochs", "4", "--save-dir", str(save_dir))
    losses = assert_trained(result, save_dir, ranks=2, epochs=4)
    assert losses[-1] < losses[0] * 0.8, losses  # the model learns the fake classes
    names = sorted(p.name for p in save_dir.iterdir())
    assert names == [
        ".lock",
        "checkpoint-000000024.pt",
        "checkpoint-000000032.pt",
        "checkpoints.json",
        "logs",
        "model_final.pth",
        "summary.json",
    ]  # a checkpoint every epoch end, the newest two kept
    assert json.loads((save_dir / "checkpoints.json").read_text()) == {
        "newest_first": ["checkpoint-000000032.pt", "checkpoint-000000024.pt"],
        "fingerprint": {"arch": "resnet18", "num_classes": 10, "image_size": 32, "amp": "off"},
    }
    assert sorted(p.name for p in (save_dir / "logs").iterdir()) == ["metrics.jsonl", "rank0.log", "rank1.log"]
    assert not list(save_dir.glob(".*.tmp"))  # no temporary file left behind
    state = torch.load(save_dir / "checkpoint-000000032.pt", weights_only=True)
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (5, 0, 32)
    assert state["fingerprint"] == {"arch": "resnet18", "num_classes": 10, "image_size": 32, "amp": "off"}
    assert {"model", "optimizer", "rng", "scaler"} <= state.keys()
    # each write is reported with its size and time, the figure a preemption grace period must cover
    records = [json.loads(line) for line in (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    written = [r for r in records if r["kind"] == "checkpoint"]
    assert [r["global_step"] for r in written] == [8, 16, 24, 32] and all(r["rank"] == 0 for r in written)
    assert written[-1]["bytes"] == (save_dir / "checkpoint-000000032.pt").stat().st_size
    assert f"saved {save_dir / 'checkpoint-000000032.pt'} (" in result.stdout
    # how long the job took to train, from its launcher's start: the figure a restart test watches
    summary = json.loads((save_dir / "summary.json").read_text())
    assert 0 < summary["time_to_first_step_s"] < summary["wall_s"] + 120
    # where it went, in the order a process gets there
    moments = ["joined", "data_ready", "model_built", "checkpoint_loaded", "training_ready", "first_step_done"]
    assert sorted(summary["startup_s"]) == sorted(moments)
    times = [summary["startup_s"][moment] for moment in moments]
    assert times == sorted(times) and times[-1] == summary["time_to_first_step_s"]
    assert "[Rank 0] first step done " in result.stdout


def test_torchrun_launch(save_dir):
    job = Job(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "train.py",
            *TINY,
            "--save-dir",
            str(save_dir),
        ]
    )
    assert_trained(job.wait(), save_dir, ranks=2, epochs=2)


def test_node_level_environment_spawns_a_process_per_device(save_dir):
    env = {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    assert_trained(run_train(*TINY, "--save-dir", str(save_dir), env=env), save_dir, ranks=2, epochs=2)


def test_node_level_environment_over_two_nodes_numbers_ranks_across_them(tmp_path):
    port = str(free_port())
    nodes = []
    for node in range(2):
        env = {"RANK": str(node), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
        args = [*TINY, "--nproc-per-node", "1", "--save-dir", str(tmp_path / f"node{node}")]
        nodes.append(Job(train_command(*args), env))
    first, second = (job.wait() for job in nodes)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert set(EPOCH_LINE.findall(first.stdout)) and {r for r, _, _ in EPOCH_LINE.findall(first.stdout)} == {"0"}
    assert {r for r, _, _ in EPOCH_LINE.findall(second.stdout)} == {"1"}
    assert "(2 ranks)" in first.stdout
    assert (tmp_path / "node0" / "model_final.pth").exists()
    assert not (tmp_path / "node1" / "model_final.pth").exists()  # only global rank 0 saves


def test_resnet50_smoke(save_dir):
    result = run_train(
        "--cpu",
        "--nproc-per-node",
        "2",
        "--image-size",
        "64",
        "--dataset-size",
        "8",
        "--batch-size",
        "2",
        "--epochs",
        "1",
        "--num-workers",
        "1",
        "--save-dir",
        str(save_dir),
    )
    assert_trained(result, save_dir, ranks=2, epochs=1, arch="resnet50", num_classes=100)


def test_the_standalone_rendezvous_port_lies_outside_the_ports_outgoing_connections_take():
    """A port of the ephemeral range can be handed to some connection between the launcher's pick and rank 0's
    listen (the job then fails with EADDRINUSE, as one CI run did under parallel tests)."""
    from resnet_ddp.entry.launch import ephemeral_ports, free_port

    low, high = ephemeral_ports()
    for _ in range(20):
        port = free_port()
        assert not low <= port <= high and 1024 <= port <= 65535


def test_two_standalone_jobs_on_one_node_do_not_collide(tmp_path):
    jobs = [Job(train_command(*TINY, "--epochs", "1", "--save-dir", str(tmp_path / name))) for name in "ab"]
    for job in jobs:
        assert job.wait().returncode == 0


@pytest.mark.parametrize(
    "mode,code,says",
    [
        ("exception", 1, "rank 1 exited with code 1"),
        ("exit", 3, "rank 1 exited with code 3"),
        ("kill", 1, "rank 1 was killed by SIGKILL"),
    ],
)
def test_a_failing_rank_ends_the_whole_job(mode, code, says, save_dir):
    job = Job(
        train_command(
            *TINY,
            "--epochs",
            "50",
            "--fail-at-step",
            "3",
            "--fail-rank",
            "1",
            "--fail-mode",
            mode,
            "--save-dir",
            str(save_dir),
        )
    )
    result = job.wait(timeout=120)
    assert result.returncode == code, result.stderr[-2000:]
    assert says in result.stderr
    assert wait_for_no_leftovers(job) == []
    assert not (save_dir / "model_final.pth").exists()
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["exit_reason"] == "failed" and summary["exit_code"] == 1
    if mode == "exception":
        # The root cause first and alone: rank 1's traceback; rank 0, failing because of it, in one line that
        # names it (its own traceback goes to its log file); summary.json names rank 1's error, not rank 0's.
        assert summary["first_failure"]["rank"] == 1 and summary["error"].startswith("InjectedFault")
        assert result.stderr.count("Traceback") == 1 and "[Rank 1] failed:\n[Rank 1] Traceback" in result.stderr
        (line,) = [l for l in result.stderr.splitlines() if l.startswith("[Rank 0]")]
        assert "failed because rank 1 (host " in line and str(save_dir / "logs" / "rank0.log") in line
        assert "Traceback" in (save_dir / "logs" / "rank0.log").read_text()
        # each rank's last record says the run failed, naming the first failure (docs/metrics.md)
        records = [json.loads(line) for line in (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        ends = [r for r in records if r["kind"] == "end"]
        assert sorted(r["rank"] for r in ends) == [0, 1]
        assert all(r["exit_reason"] == "failed" and r["first_failure"]["rank"] == 1 for r in ends)
        assert_records_follow_the_schema(records)
    else:
        # Rank 1 ended without an error of its own: rank 0, on its host, finds its process gone and names it.
        assert summary["first_failure"] == {"rank": 1, "host": socket.gethostname(), "error": None}
        (line,) = [l for l in result.stderr.splitlines() if l.startswith("[Rank 0]")]
        assert "failed because rank 1 (host " in line and "ended first, without an error" in line


def test_when_rank_0_fails_first_the_others_say_so_in_one_line(save_dir):
    # Rank 0's process holds the job's key-value store: once it is gone, the others cannot learn its error
    # there. They name rank 0 and stop. (They no longer ask a store that does not listen, which made torch
    # print a C++ stack trace; one that dies while asked still does, so the test leaves torch's lines out.)
    job = Job(
        train_command(*TINY, "--epochs", "50", "--fail-at-step", "3", "--fail-rank", "0", "--save-dir", str(save_dir))
    )
    result = job.wait(timeout=120)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "rank 0 exited with code 1" in result.stderr
    rank1 = [line for line in result.stderr.splitlines() if line.startswith("[Rank 1]")]
    assert len(rank1) == 1 and "failed because rank 0 ended first: " in rank1[0], rank1
    records = [json.loads(line) for line in (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    (end,) = [r for r in records if r["kind"] == "end" and r["rank"] == 1]
    # rank 0's error is not rank 1's to tell: its own stays in `error`
    assert end["first_failure"] == {"rank": 0, "host": None, "error": None}
    assert wait_for_no_leftovers(job) == []


@pytest.mark.parametrize(
    "mode,code,says", [("kill", 1, "rank 0 was killed by SIGKILL"), ("exit", 3, "rank 0 exited with code 3")]
)
def test_a_killed_rank_0s_launcher_writes_summary_json_in_place_of_an_earlier_runs(mode, code, says, save_dir):
    save_dir.mkdir()
    earlier = {"exit_reason": "finished", "exit_code": 0, "ended_utc": "2026-01-01T00:00:00.000Z"}
    (save_dir / "summary.json").write_text(json.dumps(earlier))
    fault = ["--fail-at-step", "3", "--fail-rank", "0", "--fail-mode", mode]
    job = Job(train_command(*TINY, "--epochs", "50", *fault, "--save-dir", str(save_dir)))
    result = job.wait(timeout=120)
    assert result.returncode == code and says in result.stderr, result.stderr[-2000:]
    assert wait_for_no_leftovers(job) == []
    summary = json.loads((save_dir / "summary.json").read_text())
    assert (summary["exit_reason"], summary["exit_code"], summary["error"]) == ("failed", code, says)
    assert summary["first_failure"] == {"rank": 0, "host": socket.gethostname(), "error": None}
    assert summary["world_size"] == 2 and summary["device"] == "cpu" and summary["config"]["scenario"]["fail_rank"] == 0
    assert summary["ended_utc"] > earlier["ended_utc"] and "steps" not in summary  # the ranks had the figures


def test_a_killed_rank_0_under_torchrun_leaves_a_summary_json_of_this_run_saying_it_never_ended(save_dir):
    """torchrun's agent, not our launcher, is rank 0's parent: the summary rank 0 wrote as training started stays,
    never an earlier run's end."""
    save_dir.mkdir()
    earlier = {"exit_reason": "finished", "exit_code": 0, "ended_utc": "2026-01-01T00:00:00.000Z", "img_s": 1.0}
    (save_dir / "summary.json").write_text(json.dumps(earlier))
    fault = ["--fail-at-step", "3", "--fail-rank", "0", "--fail-mode", "kill"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    job = Job([*torchrun, "train.py", *TINY, "--epochs", "50", *fault, "--save-dir", str(save_dir)])
    result = job.wait(timeout=120)
    assert result.returncode == 1 and "Signal 9 (SIGKILL)" in result.stderr, result.stderr[-2000:]
    assert wait_for_no_leftovers(job) == []
    summary = json.loads((save_dir / "summary.json").read_text())
    assert (summary["exit_reason"], summary["exit_code"]) == ("running", None)
    assert summary["started_utc"] > earlier["ended_utc"]
    assert summary["world_size"] == 2 and summary["config"]["scenario"]["fail_mode"] == "kill"
    assert "ended_utc" not in summary and "img_s" not in summary
    assert report.read_summary(str(save_dir)) is None  # the report draws the last log point's figures instead


def test_a_failing_rank_ends_a_torchrun_job(save_dir):
    job = Job(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "train.py",
            *TINY,
            "--epochs",
            "50",
            "--fail-at-step",
            "2",
            "--fail-rank",
            "0",
            "--save-dir",
            str(save_dir),
        ]
    )
    result = job.wait(timeout=120)
    assert result.returncode != 0
    # torchrun's failure report (a TrainJob's too) carries the root cause from the rank's error file
    root_cause = result.stderr.split("Root Cause (first observed failure):")[1]
    assert "rank      : 0" in root_cause and "InjectedFault: fault injected" in root_cause
    assert "error_file: <N/A>" not in result.stderr
    assert wait_for_no_leftovers(job) == []
    # the failing rank 0 still says how the run ended
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["exit_reason"] == "failed" and summary["error"].startswith("InjectedFault")


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="this machine has enough GPUs")
def test_too_few_gpus_is_refused_with_exit_2(save_dir):
    result = run_train("--save-dir", str(save_dir), timeout=60)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"found {torch.cuda.device_count()} GPU" in line and "--min-gpus 1" in line and "--cpu" in line
    assert "[Rank" not in result.stdout


def test_speed_options_train_on_cpu_and_summary_is_written_with_json_logs(save_dir):
    result = run_train(
        *TINY,
        "--amp",
        "bf16",
        "--channels-last",
        "--data",
        "gpu",
        "--max-steps",
        "6",
        "--warmup-steps",
        "2",
        "--epochs",
        "5",
        "--log-format",
        "json",
        "--log-interval",
        "2",
        "--save-dir",
        str(save_dir),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    # --log-format json: every line on stdout and stderr is one JSON object, as a log agent reads it
    lines = [json.loads(line) for line in (result.stdout + result.stderr).splitlines() if line]
    for line in lines:
        assert {"time", "level", "rank", "host", "message"} <= line.keys()
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    steps = [line for line in lines if line.get("kind") == "step"]
    assert sorted((line["rank"], line["global_step"]) for line in steps) == [(r, s) for r in (0, 1) for s in (2, 4, 6)]
    assert all(line["level"] == "INFO" and line["loss"] > 0 and "img/s" in line["message"] for line in steps)
    (summary_line,) = [line for line in lines if "summary" in line]
    assert summary_line["rank"] == 0 and summary_line["summary"]["exit_reason"] == "finished"
    epoch_lines = [line for line in lines if line["message"].startswith("Epoch") and "avg_loss" in line]
    assert sorted((line["rank"], line["epoch"]) for line in epoch_lines) == [(0, 1), (0, 2), (1, 1), (1, 2)]
    result.stdout = "\n".join(line["message"] for line in lines)
    assert "amp bf16" in result.stdout and "channels_last on" in result.stdout and "data gpu" in result.stdout
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["exit_reason"] == "finished" and summary["world_size"] == 2
    assert summary["epochs_done"] == 1  # 4 steps per epoch: the limit falls inside the second
    for key in ("img_s", "img_s_per_gpu", "step_ms_p50", "step_ms_p90", "step_ms_p99", "data_wait_frac"):
        assert summary[key] >= 0
    assert summary["img_s"] == pytest.approx(2 * summary["img_s_per_gpu"])
