"""Preflight checks, their verdicts and the straggler detector (PREFLIGHT.md), on CPU ranks over gloo.

A rank is slowed with the test-only knob RESNET_DDP_TEST_SLOW_RANK=RANK:SECONDS,
which really adds that much work to its preflight matmuls and training steps.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import TINY, run_train

from resnet_ddp.entry.cli import build_parser, parse_config
from resnet_ddp.errors import UsageError
from resnet_ddp.health import preflight
from resnet_ddp.health.straggler import StragglerTracker

SLOW_RANK_1 = {"RESNET_DDP_TEST_SLOW_RANK": "1:0.1"}


def warnings(stdout: str, kind: str):
    return [line for line in stdout.splitlines() if f"WARNING {kind}:" in line]


def test_preflight_only_measures_reports_names_the_slow_rank_and_exits_0(save_dir):
    result = run_train(*TINY, "--preflight-only", "--save-dir", str(save_dir), env=SLOW_RANK_1)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((save_dir / "preflight.json").read_text())
    assert report["mode"] == "warn" and report["world_size"] == 2 and report["backend"] == "gloo"
    assert [(f["check"], f["rank"]) for f in report["findings"]] == [("matmul", 1)]
    (line,) = warnings(result.stdout, "preflight")
    assert line.startswith("[Rank 0] WARNING preflight: rank 1 (host ") and "matmul" in line and "below" in line
    ranks = report["ranks"]
    assert [r["place"]["rank"] for r in ranks] == [0, 1] and all(r["matmul"]["tflops"] > 0 for r in ranks)
    sizes = report["all_reduce"]["sizes"]
    assert [s["bytes"] for s in sizes] == [2**20, 2**22, 2**24]
    for s in sizes:  # nccl-tests' definitions; with 2 ranks busbw = algbw * 2 * 1/2
        assert s["algbw_gb_s"] == pytest.approx(s["bytes"] / (s["time_us"] * 1e-6) / 1e9)
        assert s["busbw_gb_s"] == pytest.approx(s["algbw_gb_s"])
    assert report["all_reduce"]["latency"]["bytes"] == 8 and report["all_reduce"]["latency"]["time_us"] > 0
    assert ranks[0]["shm"]["total_bytes"] > 0 and "shm" not in ranks[1]  # once per host
    assert report["save_dir_write"]["mb_s"] > 0 and report["save_dir_write"]["bytes"] == 16 * 2**20
    assert "CPU run: no GPU links to judge" in report["notes"]
    assert "preflight: rank  host" in result.stdout and "busbw GB/s" in result.stdout
    # nothing trained, and the write test's file is gone
    assert sorted(p.name for p in save_dir.iterdir()) == [".lock", "logs", "preflight.json"]
    assert sorted(p.name for p in (save_dir / "logs").iterdir()) == ["rank0.log", "rank1.log"]  # each rank's lines
    assert "Epoch" not in result.stdout


def test_strict_preflight_with_a_finding_exits_1_before_training(save_dir):
    env = dict(SLOW_RANK_1, RESNET_DDP_PREFLIGHT="strict")
    result = run_train(*TINY, "--quiet", "--save-dir", str(save_dir), env=env)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "preflight: 1 finding with --preflight strict: not training" in result.stderr
    assert "Traceback" not in result.stderr
    assert len(warnings(result.stdout, "preflight")) == 1  # the report is printed even with --quiet
    assert "Epoch" not in result.stdout
    assert sorted(p.name for p in save_dir.iterdir()) == [".lock", "logs", "preflight.json", "summary.json"]
    assert sorted(p.name for p in (save_dir / "logs").iterdir()) == ["rank0.log", "rank1.log"]  # each rank's lines
    # the job failed, and summary.json says why, as for any failed run
    summary = json.loads((save_dir / "summary.json").read_text())
    assert (summary["exit_reason"], summary["exit_code"], summary["steps"]) == ("failed", 1, 0)
    assert (
        summary["error"]
        == f"preflight: 1 finding with --preflight strict: not training (see {save_dir / 'preflight.json'})"
    )


def test_a_slow_rank_is_named_by_the_preflight_then_as_a_straggler_once(save_dir):
    env = {"RESNET_DDP_TEST_SLOW_RANK": "1:0.15", "RESNET_DDP_STRAGGLER_WINDOW": "1.5s"}
    result = run_train(
        *TINY,
        "--preflight",
        "--epochs",
        "10",
        "--max-steps",
        "12",
        "--warmup-steps",
        "1",
        "--log-interval",
        "1",
        "--save-dir",
        str(save_dir),
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1 (host" in warnings(result.stdout, "preflight")[0]  # warn: named, then trained anyway
    assert (save_dir / "model_final.pth").exists()
    (line,) = warnings(result.stdout, "straggler")
    assert line.startswith("[Rank 0] WARNING straggler: rank 1 (host ") and "forward compute" in line
    records = [json.loads(r) for r in (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    checks = [r for r in records if r["kind"] == "straggler_check"]
    assert checks and all(r["forward_compute_ms"][1] > r["forward_compute_ms"][0] for r in checks)
    for rank in (0, 1):
        steps = [r for r in records if r["kind"] == "step" and r["rank"] == rank]
        assert steps[-1]["straggler_ranks"] == [1]
        assert all(r["straggler_ranks"] in ([], [1]) for r in steps)


@pytest.mark.parametrize(
    "args,env,expected",
    [
        (["--preflight", "loud"], {}, "--preflight"),
        ([], {"RESNET_DDP_TEST_SLOW_RANK": "2:0.1"}, "RESNET_DDP_TEST_SLOW_RANK: rank 2 is not a rank"),
    ],
)
def test_bad_preflight_input_is_one_line_and_exit_2(args, env, expected, save_dir):
    result = run_train(*TINY, *args, "--save-dir", str(save_dir), env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("resnet-ddp: error:") and expected in line
    assert "[Rank" not in result.stdout


def test_preflight_options_and_their_environment():
    assert parse_config([], environ={}).health.preflight == "off"
    assert parse_config(["--preflight"], environ={}).health.preflight == "warn"
    assert parse_config(["--preflight", "strict"], environ={}).health.preflight == "strict"
    assert parse_config([], environ={"RESNET_DDP_PREFLIGHT": "1"}).health.preflight == "warn"
    assert parse_config([], environ={"RESNET_DDP_PREFLIGHT": "strict"}).health.preflight == "strict"
    assert parse_config(["--preflight", "off"], environ={"RESNET_DDP_PREFLIGHT": "strict"}).health.preflight == "off"
    only = parse_config(["--preflight-only"], environ={})
    assert only.health.preflight_only and only.health.preflight == "warn"
    assert parse_config(["--preflight-only", "--preflight", "strict"], environ={}).health.preflight == "strict"
    assert parse_config([], environ={}).health.straggler_window_s == 60
    assert parse_config([], environ={"RESNET_DDP_STRAGGLER_WINDOW": "0"}).health.straggler_window_s == 0
    assert parse_config([], environ={"RESNET_DDP_TEST_SLOW_RANK": "1:0.05"}).health.test_slow_rank == (1, 0.05)
    for env in (
        {"RESNET_DDP_PREFLIGHT": "maybe"},
        {"RESNET_DDP_TEST_SLOW_RANK": "1"},
        {"RESNET_DDP_TEST_SLOW_RANK": "1:-2"},
        {"RESNET_DDP_STRAGGLER_WINDOW": "soon"},
    ):
        with pytest.raises(UsageError, match=next(iter(env))):
            parse_config([], environ=env)
    text = build_parser({}).format_help()
    assert "--preflight" in text and "--preflight-only" in text
    assert "--test-slow-rank" not in text and "--straggler-window" not in text  # for tests: PREFLIGHT.md


def test_bus_bandwidth_is_nccl_tests():
    algbw, busbw = preflight.bus_bandwidth(10**9, 0.01, 8)
    assert algbw == pytest.approx(100.0) and busbw == pytest.approx(175.0)


def _rank(rank, tflops, device="NVIDIA H100 80GB HBM3", host="a", links=None):
    return {
        "place": {"rank": rank, "host": host, "local_rank": rank, "gpu": str(rank)},
        "device": device,
        "capability": [9, 0],
        "matmul": {"tflops": tflops, "precision": "bf16"},
        "links": links,
    }


def _nvlinks(active=18, p2p=True):
    return {"available": True, "nvlinks_active": active, "nvlink_p2p": {"x": p2p}, "pcie_max": [5, 16]}


def _report(ranks, busbw):
    report = {"ranks": ranks, "all_reduce": {"sizes": [{"bytes": 2**30, "busbw_gb_s": busbw}]}}
    report["link_expectation"] = preflight.link_expectation(ranks)
    return report


def test_matmul_verdict_compares_a_device_with_the_median_of_its_peers():
    ranks = [_rank(0, 700.0), _rank(1, 690.0), _rank(2, 600.0), _rank(3, 705.0), _rank(4, 300.0, device="L40S")]
    findings = preflight.judge({"ranks": ranks, "all_reduce": {"sizes": []}, "link_expectation": {}})
    assert [(f["check"], f["rank"]) for f in findings] == [("matmul", 2)]  # 600 < 0.9 * 700; L40S has no peer
    assert findings[0]["expected_at_least"] == pytest.approx(0.9 * 700.0)
    assert "rank 2 (host a, GPU 2)" in findings[0]["message"] and "14% below" in findings[0]["message"]


def test_bus_bandwidth_verdict_follows_the_links_nvml_reports():
    nvlink = [_rank(r, 700.0, links=_nvlinks()) for r in range(4)]
    expected = preflight.link_expectation(nvlink)
    assert expected["link"] == "NVLink" and expected["nominal_gb_s"] == 18 * 25.0
    assert expected["expected_busbw_gb_s"] == pytest.approx(450.0 / 3)
    assert preflight.judge(_report(nvlink, 200.0)) == []
    (finding,) = preflight.judge(_report(nvlink, 40.0))
    assert finding["check"] == "all_reduce_busbw" and "far below what NVLink allows" in finding["message"]

    # one GPU with links down is named; the pairs without NVLink P2P make it a PCIe job
    degraded = [_rank(r, 700.0, links=_nvlinks(active=18 if r else 12, p2p=bool(r))) for r in range(4)]
    expected = preflight.link_expectation(degraded)
    assert expected["link"] == "PCIe" and expected["nominal_gb_s"] == pytest.approx(16 * 3.938)
    findings = preflight.judge(_report(degraded, 10.0))
    assert [(f["check"], f.get("rank")) for f in findings] == [("nvlinks", 0), ("all_reduce_busbw", None)]

    # no verdict across hosts (the network decides) or without NVML: a note instead
    two_hosts = [_rank(r, 700.0, host="ab"[r % 2], links=_nvlinks()) for r in range(4)]
    assert "note" in preflight.link_expectation(two_hosts) and preflight.judge(_report(two_hosts, 1.0)) == []
    no_nvml = [
        _rank(r, 700.0, links={"available": False, "note": "NVML unavailable (x): link check skipped"})
        for r in range(2)
    ]
    assert "skipped" in preflight.link_expectation(no_nvml)["note"] and preflight.judge(_report(no_nvml, 1.0)) == []


def test_without_pynvml_the_link_check_is_skipped_not_an_error(monkeypatch):
    import sys

    import torch

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    facts = preflight.gpu_links(torch.device("cuda", 0), _rank(0, 1.0), [])
    assert facts["available"] is False and "link check skipped" in facts["note"]


def test_straggler_is_named_after_a_window_slow_at_most_checks_and_once():
    tracker = StragglerTracker(world_size=3, window_s=60)
    slow, fast = [10.0, 10.0, 12.0], [10.0, 10.0, 10.5]  # rank 2: 20% above the median, or within 10%
    for now in (0, 10):
        assert tracker.update(now, fast) == ([], [])  # healthy checks before the spell do not count against it
    # A GPU time-sliced with another process: slow at most sampled steps, not all (measured on H100s).
    for now, figures in ((20, slow), (30, slow), (40, fast), (50, slow), (60, slow), (70, slow)):
        assert tracker.update(now, figures) == ([], [])  # the spell began at 20: not yet a window
    assert tracker.update(80, fast) == ([2], []) and tracker.named == [2]  # 60 s on, 5 of 7 checks slow
    assert tracker.window_figures(2) == (5, 7, 12.0)
    assert tracker.update(90, slow) == ([], [])  # named once
    for now in (100, 110, 120):
        assert tracker.update(now, fast) == ([], [])  # 3 of 7 slow at 120 s: no flapping on a fast check or three
    assert tracker.update(130, fast) == ([], [2]) and tracker.named == []  # 2 of 7, under a third: back
    # Slow at only half the checks: never named, however long.
    for now in range(200, 400, 10):
        assert tracker.update(now, slow if now % 20 else fast) == ([], [])
    assert tracker.update(400, [10.0, 10.0, math.nan]) == ([], []) and tracker.named == []  # no figure: no change


def test_the_save_dir_write_test_leaves_no_file_even_when_stopped(tmp_path, monkeypatch):
    import os
    import signal
    import time

    assert preflight.save_dir_write_rate(str(tmp_path), 2**20)["mb_s"] > 0
    assert preflight.save_dir_write_rate(str(tmp_path / "missing"), 2**20)["error"]
    received = []
    previous = signal.signal(signal.SIGTERM, lambda signum, _frame: received.append(signum))
    write = os.write

    def slow_write(fd, data):  # SIGTERM arrives while the file exists
        if not received and len(os.listdir(tmp_path)) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        return write(fd, data)

    monkeypatch.setattr(os, "write", slow_write)
    try:
        result = preflight.save_dir_write_rate(str(tmp_path), 2**20)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert result["error"] == "stopped by SIGTERM" and received == [signal.SIGTERM]  # the signal goes on
    assert os.listdir(tmp_path) == []
