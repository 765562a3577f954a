"""Scenarios: presets, load shaping and the oom/nan faults, on CPU ranks over gloo (the real launcher)."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    Job,
    assert_records_follow_the_schema,
    clean_env,
    run_train,
    train_command,
    wait_for_no_leftovers,
)

from resnet_ddp.config import LoadPhase, MemorySize
from resnet_ddp.entry.cli import build_parser, parse_config
from resnet_ddp.entry.values import parse_load_profile, parse_memory_size
from resnet_ddp.errors import UsageError
from resnet_ddp.scenarios import presets as scenarios

STOP_LINE = re.compile(r"^\[Rank (\d+)\] stopping after step (\d+) \((.+)\)$", re.M)
PHASE_LINE = re.compile(r"^\[Rank (\d+)\] load phase (\d+) of (\d+) after step (\d+): (.+)$", re.M)


def records(save_dir, kind):
    lines = (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def checkpoint_at(save_dir, step):
    return torch.load(save_dir / f"checkpoint-{step:09d}.pt", weights_only=True)


# Options, presets and refusals: no training process needed.


def test_a_preset_sets_defaults_and_given_options_win():
    smoke = parse_config(["--scenario", "smoke"], environ={})
    assert (
        smoke.scenario.name,
        smoke.model.arch,
        smoke.length.duration_s,
        smoke.model.image_size,
        smoke.process.min_gpus,
    ) == ("smoke", "resnet18", 45, 64, 1)
    given = parse_config(
        ["--scenario", "smoke", "--arch", "resnet34", "--duration", "10s"], environ={"RESNET_DDP_IMAGE_SIZE": "32"}
    )
    assert (given.model.arch, given.length.duration_s, given.model.image_size, given.training.batch_size) == (
        "resnet34",
        10,
        32,
        32,
    )
    from_env = parse_config([], environ={"RESNET_DDP_SCENARIO": "crash", "RESNET_DDP_FAIL_MODE": "oom"})
    assert (from_env.scenario.fail_at_step, from_env.scenario.fail_mode, from_env.checkpoint.every) == (
        2000,
        "oom",
        1000,
    )
    # A preset's load profile gives way to a duty cycle given, and the other way round.
    burst = parse_config(["--scenario", "burst", "--duty-cycle", "0.5"], environ={})
    assert burst.scenario.load_profile is None and burst.scenario.load_phases == (LoadPhase(float("inf"), 0.5),)
    with pytest.raises(UsageError, match="--duty-cycle and --load-profile"):
        parse_config(["--duty-cycle", "0.5", "--load-profile", "1m@0"], environ={})


def test_every_preset_parses_to_the_options_it_lists():
    from resnet_ddp.entry.cli import config_from_args

    plain = build_parser({}).parse_args([])
    for scenario in scenarios.SCENARIOS:
        expected = config_from_args(build_parser({}).parse_args(list(scenario.options)), environ={})
        config = parse_config(["--scenario", scenario.name], environ={})
        for section in ("training", "model", "speed", "length", "reporting", "checkpoint", "process", "health"):
            assert getattr(config, section) == getattr(expected, section), (scenario.name, section)
        assert dataclasses.replace(config.scenario, name=None) == expected.scenario, scenario.name
        assert config != config_from_args(plain, environ={}), scenario.name
    names = {s.name for s in scenarios.SCENARIOS}
    assert {"smoke", "soak", "burst", "crash", "hang", "preempt-resume", "memory"} <= names


def test_scenario_list_and_help_show_the_presets():
    listed = subprocess.run(
        train_command("--scenario", "list"), cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0 and listed.stderr == ""
    for scenario in scenarios.SCENARIOS:
        assert re.search(rf"^{re.escape(scenario.name)}$", listed.stdout, re.M)
        assert " ".join(scenario.options[:2]) in listed.stdout
    help_text = build_parser({}).format_help()
    for option in ("--scenario", "--duty-cycle", "--load-profile", "--gpu-memory-ballast", "--nan-policy"):
        assert option in help_text
    assert "preempt-resume" in help_text and "oom" in help_text


def test_sizes_profiles_and_duty_cycles_read_as_people_write_them():
    assert parse_memory_size("20GiB") == MemorySize(bytes=20 * 2**30)
    assert parse_memory_size("512MiB") == MemorySize(bytes=512 * 2**20)
    assert parse_memory_size("16G") == MemorySize(bytes=16 * 10**9)  # decimal, as in Kubernetes
    assert parse_memory_size("0.5") == MemorySize(fraction=0.5)
    assert MemorySize(fraction=0.5).resolve(80 * 2**30) == 40 * 2**30
    assert parse_load_profile("2m@100,1m@0, 30s@50%") == (LoadPhase(120, 1.0), LoadPhase(60, 0.0), LoadPhase(30, 0.5))
    assert [parse_config(["--duty-cycle", d], environ={}).scenario.duty_cycle for d in ("0.25", "50%", "1")] == [
        0.25,
        0.5,
        1,
    ]


@pytest.mark.parametrize(
    "args,expected",
    [
        (["--duty-cycle", "0"], "--duty-cycle"),
        (["--duty-cycle", "1.5"], "--duty-cycle"),
        (["--load-profile", "2m@120"], "--load-profile"),
        (["--load-profile", "2m@50,soon"], "'soon'"),
        (["--gpu-memory-ballast", "20"], "needs a unit"),
        (["--gpu-memory-ballast", "lots"], "--gpu-memory-ballast"),
        (TINY + ["--gpu-memory-ballast", "1GiB"], "a --cpu run has none"),
        (["--scenario", "nope"], "--scenario"),
        (["--nan-policy", "maybe"], "--nan-policy"),
    ],
)
def test_bad_scenario_input_is_one_line_and_exit_2(args, expected, save_dir):
    result = run_train(*args, "--save-dir", str(save_dir), timeout=60)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("resnet-ddp: error:") and expected in line
    assert "[Rank" not in result.stdout


# Real jobs.


def test_oom_fault_raises_the_allocators_own_error_and_ends_the_job(save_dir):
    job = Job(
        train_command(
            *TINY,
            "--epochs",
            "50",
            "--fail-at-step",
            "2",
            "--fail-rank",
            "1",
            "--fail-mode",
            "oom",
            "--save-dir",
            str(save_dir),
        )
    )
    result = job.wait(timeout=150)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "[Rank 1] injecting fault 'oom' at step 2" in result.stdout
    # What a failed CPU allocation raises in torch 2.2 to 2.14 (a RuntimeError from the allocator), in one line;
    # the traceback goes to the rank's log file.
    (line,) = [l for l in result.stderr.splitlines() if l.startswith("[Rank 1]")]
    assert line.startswith("[Rank 1] error: out of memory: RuntimeError: ")
    assert "DefaultCPUAllocator: can't allocate memory" in line and "Traceback" not in result.stderr
    assert "Traceback" in (save_dir / "logs" / "rank1.log").read_text()
    assert "rank 1 exited with code 1" in result.stderr
    assert wait_for_no_leftovers(job) == []
    assert not (save_dir / "model_final.pth").exists()


def test_nan_policy_stop_fails_the_job_naming_step_and_rank_and_keeps_the_last_good_checkpoint(save_dir):
    job = Job(
        train_command(
            *TINY,
            "--epochs",
            "3",
            "--checkpoint-every",
            "2",
            "--fail-at-step",
            "3",
            "--fail-rank",
            "1",
            "--fail-mode",
            "nan",
            "--save-dir",
            str(save_dir),
        )
    )
    result = job.wait(timeout=150)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "[Rank 1] loss is not finite at step 3 (--nan-policy stop: stopping the job)" in result.stdout
    stops = STOP_LINE.findall(result.stdout)
    assert sorted(r for r, _, _ in stops) == ["0", "1"] and len({s for _, s, _ in stops}) == 1
    assert {why for _, _, why in stops} == {"loss not finite at step 3 on rank 1, --nan-policy stop"}
    assert (
        "[Rank 0] error: the loss was not finite at step 3 on rank 1 (--nan-policy stop); "
        "no checkpoint was written after it"
    ) in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in save_dir.glob("checkpoint-*.pt")) == ["checkpoint-000000002.pt"]
    assert not (save_dir / "model_final.pth").exists()
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["exit_reason"] == "loss not finite" and summary["first_nonfinite_loss"] == {"step": 3, "rank": 1}
    assert wait_for_no_leftovers(job) == []


def test_nan_policy_skip_leaves_the_weights_of_that_step_unchanged_on_every_rank_and_trains_on(save_dir):
    result = run_train(
        *TINY,
        "--max-steps",
        "4",
        "--momentum",
        "0.9",
        "--seed",
        "3",
        "--checkpoint-every",
        "1",
        "--keep-checkpoints",
        "10",
        "--fail-at-step",
        "3",
        "--fail-rank",
        "1",
        "--fail-mode",
        "nan",
        "--nan-policy",
        "skip",
        "--save-dir",
        str(save_dir),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    for rank in (0, 1):  # every rank skipped the same update
        assert (
            f"[Rank {rank}] skipped the update of step 3: gradients not finite (1 skipped so far, --nan-policy skip)"
        ) in result.stdout
    before, nan_step, after = (checkpoint_at(save_dir, step) for step in (2, 3, 4))
    params = [
        name for name, value in before["model"].items() if "running_" not in name and "num_batches_tracked" not in name
    ]
    for name in params:  # bitwise: the weights as they were before step 3
        assert torch.equal(before["model"][name], nan_step["model"][name]), name
    for index, state in before["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], nan_step["optimizer"]["state"][index]["momentum_buffer"])
    assert not torch.equal(nan_step["model"]["fc.weight"], after["model"]["fc.weight"])  # step 4 trained
    final = torch.load(save_dir / "model_final.pth")
    assert all(torch.isfinite(value).all() for value in final.values() if value.is_floating_point())
    assert json.loads((save_dir / "summary.json").read_text())["skipped_updates"] == 1


def test_load_phases_switch_at_the_same_step_and_sleeps_are_agreed(save_dir):
    # Two phases shorter than the first step (which must not be skipped), then half load to the end: what is
    # checked depends on steps, not on how fast this machine runs them. (The idle phase: test_trainer.py.)
    result = run_train(
        *TINY,
        "--load-profile",
        "0.001s@100,0.001s@0,1h@50",
        "--max-steps",
        "8",
        "--log-interval",
        "1",
        "--save-dir",
        str(save_dir),
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    switches = {}
    for rank, index, _, step, what in PHASE_LINE.findall(result.stdout):
        switches.setdefault(index, []).append((rank, step, what))
    assert sorted(switches) == ["2", "3"]
    for lines in switches.values():
        assert sorted(rank for rank, _, _ in lines) == ["0", "1"]
        assert len({(step, what) for _, step, what in lines}) == 1  # the same step on every rank
    # the agreement reaches ranks a step late: both short phases began after step 2
    assert switches["2"][0][1] == switches["3"][0][1] == "2"
    assert switches["3"][0][2] == "duty cycle 50% for 1h00m00s"
    assert (save_dir / "model_final.pth").exists()

    paced = [r for r in records(save_dir, "load") if r["duty_cycle"] == 0.5]
    by_step = {}
    for r in paced:
        assert r["steps"] == 1 and r["busy_ms"] > 0
        assert r["sleep_target_ms"] == pytest.approx(r["sleep_basis_ms"], abs=0.002)  # busy * (1 - F) / F at F = 0.5
        assert r["slept_ms"] >= r["sleep_target_ms"] - 1
        by_step.setdefault(r["global_step"], {})[r["rank"]] = r
    # Start-up steps run unpaced (their busy time is autotuning and capture): without CUDA graphs the first
    # steady step is 2, whose busy time sizes the sleep after step 3; the run's last step sleeps no more.
    assert sorted(by_step) == [3, 4, 5, 6, 7]
    for step in (4, 5, 6, 7):  # every rank slept on the slowest rank's busy time of the step before
        assert by_step[step][0]["agreed_steps"] == by_step[step][1]["agreed_steps"] == 1
        slowest = max(by_step[step - 1][rank]["busy_ms"] for rank in (0, 1))
        assert (
            by_step[step][0]["sleep_basis_ms"] == by_step[step][1]["sleep_basis_ms"] == pytest.approx(slowest, abs=0.01)
        )
    assert sorted((r["phase"], r["rank"], r["global_step"]) for r in records(save_dir, "load_phase")) == [
        (phase, rank, 2) for phase in (2, 3) for rank in (0, 1)
    ]
    lines = (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()
    assert_records_follow_the_schema([json.loads(line) for line in lines])  # load and load_phase too


def test_the_smoke_preset_runs_with_the_options_given_and_ignore_trains_on_through_a_nan(save_dir):
    result = run_train(
        "--scenario",
        "smoke",
        "--cpu",
        "--nproc-per-node",
        "2",
        "--image-size",
        "32",
        "--batch-size",
        "8",
        "--num-workers",
        "0",
        "--num-classes",
        "10",
        "--max-steps",
        "3",
        "--fail-at-step",
        "2",
        "--fail-mode",
        "nan",
        "--nan-policy",
        "ignore",
        "--save-dir",
        str(save_dir),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resnet18 on 2 x cpu, batch 8 per process" in result.stdout and "scenario smoke" in result.stdout
    assert json.loads((save_dir / "summary.json").read_text())["steps"] == 3
    assert "[Rank 0] loss is not finite at step 2 (--nan-policy ignore: training on)" in result.stdout
    final = torch.load(save_dir / "model_final.pth")
    assert not torch.isfinite(final["fc.weight"]).all()  # trained on into the NaN, as told
