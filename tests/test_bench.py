"""The benchmark tools in bench/ that PERFORMANCE.md's figures come from, on CPU (no GPU, no timing)."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import pytest
from conftest import REPO


def test_trace_summary_adds_kernel_time_by_kind_and_counts_overlap_once(tmp_path):
    """bench/trace_summary.py, which PERFORMANCE.md's profile figures come from, on a made-up two-step trace."""

    def kernel(name, ts, dur, stream=7):
        return {"ph": "X", "cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    events = [
        kernel("sm90_xmma_fprop_implicit_gemm_bf16", 0, 1000),
        kernel("triton_poi_fused_add_relu_3", 1000, 500),
        kernel("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 1200, 800, stream=9),  # overlaps the one before
        kernel("triton_red_fused_var_mean_7", 2000, 1000),
        kernel("bn_add_relu_kernel", 4000, 600),
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy HtoD", "ts": 3000, "dur": 1000, "args": {}},
        {"ph": "X", "cat": "cpu_op", "name": "aten::add", "ts": 0, "dur": 9999, "args": {}},
    ]
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    one.write_text(json.dumps({"traceEvents": events}))
    two.write_text(json.dumps({"traceEvents": events[:1] + [kernel("triton_poi_fused_add_relu_9", 1000, 1500)]}))
    result = subprocess.run(
        [sys.executable, "bench/trace_summary.py", str(one), str(two), "--steps", "2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    first_trace = lines[1 : lines.index(next(line for line in lines if line.startswith(str(two))))]
    rows = {line.split("  ")[1].strip(): line for line in first_trace}
    assert "2.30 ms/step" in rows["busy (any kernel running)"]  # 4.6 ms of GPU time in all, over 2 steps
    assert "0.30 ms/step" in rows["jitted BatchNorm"]  # SyncBatchNorm's own kernels (--fuse-bn-relu)
    assert "0.50 ms/step" in rows["convolution/GEMM"] and "0.40 ms/step" in rows["NCCL"]
    assert "0.25 ms/step" in rows["Triton elementwise"] and "0.50 ms/step" in rows["copies"]
    # The same fused kernel under another Triton number is one family: +0.50 ms/step, not a new kernel.
    assert any(line.split()[:3] == ["+0.50", "0.25", "->"] and "triton_poi_fused_add_relu" in line for line in lines)


def _bench_module(monkeypatch, script: str = "run"):
    import importlib.util

    monkeypatch.syspath_prepend(os.path.join(REPO, "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{script}", os.path.join(REPO, "bench", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_second_benchmark_run_on_the_same_day_keeps_the_first_ones_results(tmp_path, monkeypatch):
    """bench/run.py names its file by date, card and GPU count: a second run must not overwrite the first."""
    bench_run = _bench_module(monkeypatch)
    stem = str(tmp_path / "2026-11-27-h100-80gb-hbm3-x4")
    assert bench_run._unused_path(stem) == stem + ".json"
    (tmp_path / "2026-11-27-h100-80gb-hbm3-x4.json").write_text("{}")
    (tmp_path / "2026-11-27-h100-80gb-hbm3-x4-2.json").write_text("{}")
    assert bench_run._unused_path(stem) == stem + "-3.json"


def test_a_benchmark_experiment_on_top_of_fast_is_timed_like_the_fast_row(monkeypatch):
    """A variant's figure is set against the fast row's of the same call: both run the same steps with the same
    warm-up, so that they meet as many epoch ends (variants once ran 400 steps against the fast row's 250)."""
    bench_run = _bench_module(monkeypatch)
    fast = bench_run.run_window("fast", [])
    assert fast[0] == ["--fast"]
    assert bench_run.run_window("symm-mem", ["--fast"]) == ([], *fast[1:])
    assert bench_run.run_window("fast-metrics", ["--fast", "--metrics-port", "8000"]) == ([], *fast[1:])
    assert bench_run.run_window("default-compile", ["--compile"]) == ([], 400, 100)
    # the same run from another tree (--variant NAME=DIR) is timed like its configuration
    assert bench_run.run_window("default-before", []) == ([], *bench_run.CONFIGS["default"][1:])
    assert bench_run.run_window("fast-before", ["--fast"]) == ([], *fast[1:])  # room to compile and settle


def test_a_benchmark_variant_runs_from_a_patched_copy_and_a_stale_patch_stops_the_harness(tmp_path, monkeypatch):
    """bench/run.py --variant NAME=PATCH: the A/B of a code change in one call; the tree itself stays as it was."""
    bench_run = _bench_module(monkeypatch)
    readme = open(os.path.join(REPO, "README.en.md")).read().splitlines()
    patch = tmp_path / "title.patch"
    context = "".join(f" {line}\n" for line in readme[1:3])
    patch.write_text(
        "A made-up variant.\n\n--- a/README.en.md\n+++ b/README.en.md\n@@ -1,3 +1,3 @@\n"
        f"-{readme[0]}\n+# patched\n{context}"
    )
    tree = bench_run.patched_tree(str(patch), str(tmp_path / "variants"))
    assert open(os.path.join(tree, "README.en.md")).read().splitlines()[0] == "# patched"
    assert os.path.exists(os.path.join(tree, "train.py")) and not os.path.exists(os.path.join(tree, ".git"))
    assert open(os.path.join(REPO, "README.en.md")).read().splitlines()[0] == readme[0]
    stale = tmp_path / "stale.patch"
    stale.write_text(
        f"--- a/README.en.md\n+++ b/README.en.md\n@@ -1,3 +1,3 @@\n-# not the title\n+# patched\n{context}"
    )
    with pytest.raises(SystemExit, match="stale.patch does not apply to this tree"):
        bench_run.patched_tree(str(stale), str(tmp_path / "variants"))


def test_a_results_file_names_the_command_that_makes_it_again_and_the_commit_it_measured(monkeypatch):
    bench_run = _bench_module(monkeypatch)
    argv = ["--gpus", "1,4", "--configs", "original,default", "--experiment", "nccl:4:--fast --no-syncbn-symm-mem"]
    header = bench_run.results_header(argv, "NVIDIA H100 80GB HBM3", 4)
    assert header["command"] == (
        "python bench/run.py --gpus 1,4 --configs original,default --experiment 'nccl:4:--fast --no-syncbn-symm-mem'"
    )
    assert shlex.split(header["command"])[2:] == argv  # pasted into a shell, it runs the same plan
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert head.stdout.startswith(header["commit"].removesuffix("-dirty"))
    assert header["card"] == "NVIDIA H100 80GB HBM3" and header["gpus_on_machine"] == 4


def test_a_startup_results_file_names_the_command_and_the_commit_it_measured(monkeypatch):
    startup = _bench_module(monkeypatch, "startup")
    argv = ["--gpus", "1", "--configs", "default,fast", "--image-bytecode", "/tmp/pyc"]
    header = startup.results_header(argv, "NVIDIA H200", 1)
    assert shlex.split(header["command"])[:2] == ["python", "bench/startup.py"]
    assert shlex.split(header["command"])[2:] == argv
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode == 0:
        assert head.stdout.startswith(header["commit"].removesuffix("-dirty"))
    assert (header["card"], header["gpus"], header["runs"]) == ("NVIDIA H200", 1, [])


def test_an_unknown_configuration_is_refused_before_anything_runs():
    """--configs seed-equivalent (the baseline's old name) must not run as a train.py experiment under that name."""
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--configs", "seed-equivalent,default"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("bench: unknown --configs seed-equivalent:") and "original" in line
