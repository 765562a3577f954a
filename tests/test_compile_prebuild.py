"""A one-process compiled job: its model in compiled parts, each compiled by a helper beside the rank
(core/model.py CompiledInParts, entry/compile_prebuild.py). On CPU here; the GPU lane runs it on a GPU."""

from __future__ import annotations

import logging
import os
import signal
import time

import pytest
import torch
from conftest import Job, run_train, train_command, wait_for_no_leftovers

from resnet_ddp.core.model import build_model
from resnet_ddp.entry import compile_prebuild
from resnet_ddp.entry.cli import parse_config
from resnet_ddp.layers.blocks import PARTS, residual_blocks, split_points

PARTS_LOADED = f"{compile_prebuild.PARTS} of {compile_prebuild.PARTS}"
TINY_COMPILED = [
    "--cpu",
    "--compile",
    "--nproc-per-node",
    "1",
    "--arch",
    "resnet18",
    "--image-size",
    "32",
    "--batch-size",
    "4",
    "--num-workers",
    "0",
]


@pytest.mark.parametrize("fuse_bn_relu", [True, False], ids=["fused-blocks", "torchvision-blocks"])
@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_the_parts_make_the_models_own_forward_and_backward(arch, fuse_bn_relu):
    torch.manual_seed(0)
    model = build_model(arch, 10, sync_bn=True, fuse_bn_relu=fuse_bn_relu)
    x = torch.randn(4, 3, 32, 32)
    whole = model(x)
    whole.square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    parts = x
    for part in PARTS:
        parts = part(model, parts)
    parts.square().sum().backward()
    torch.testing.assert_close(parts, whole)
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want)
    # every part has residual blocks; the rank's helpers compile one part each
    starts = (0, *split_points(model), len(residual_blocks(model)))
    assert all(start < stop for start, stop in zip(starts, starts[1:])), starts
    assert len(PARTS) == compile_prebuild.PARTS


def test_the_helper_is_wanted_for_a_compiled_one_process_job_that_has_compiled_nothing_yet(tmp_path):
    def wanted(*args, world_size=1, shared=True):
        config = parse_config(["--save-dir", str(tmp_path), *args], environ={})
        return compile_prebuild.wanted(config, world_size, shared)

    assert wanted("--compile") and wanted("--cpu", "--compile", shared=None)
    assert not wanted()  # nothing compiled
    assert not wanted("--compile", world_size=2)  # every rank compiles graphs of its own
    # A second CUDA context beside the rank: refused by the GPU, or skewing what the job measures.
    assert not wanted("--compile", shared=False) and not wanted("--compile", shared=None)
    assert not wanted("--compile", "--preflight", "warn")
    assert not wanted("--compile", "--gpu-memory-ballast", "10GiB")
    # A restart: the save dir holds what an earlier start compiled, and the rank loads it.
    (tmp_path / "compile-cache" / "0123456789abcdef" / "inductor").mkdir(parents=True)
    assert not wanted("--compile")


def test_a_new_compiled_one_process_job_loads_the_parts_its_helpers_compiled(save_dir):
    result = run_train(*TINY_COMPILED, "--max-steps", "2", "--save-dir", str(save_dir), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (save_dir / "logs" / "rank0.log").read_text()
    for part in range(1, compile_prebuild.PARTS + 1):
        assert f"s for the helper compiling part {part} of the model" in log, log
    assert f"the compiled model's parts: {PARTS_LOADED} loaded from the cache" in log, log
    # A restart loads every part from the save dir, and starts no helper.
    again = run_train(*TINY_COMPILED, "--max-steps", "4", "--save-dir", str(save_dir), timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    log = (save_dir / "logs" / "rank0.log").read_text()
    restarted = log.split("resuming from ")[-1]
    assert "resuming from " in again.stdout and "helper" not in restarted, log
    assert f"the compiled model's parts: {PARTS_LOADED} loaded from the cache" in restarted, log


def test_the_rank_goes_on_at_once_where_its_helpers_died(tmp_path, caplog):
    config = parse_config(["--save-dir", str(tmp_path), *TINY_COMPILED], environ={})
    compile_prebuild.start(config, device_index=0, environ={"PYTHONPATH": ""})
    assert sorted(compile_prebuild._helpers) == list(range(compile_prebuild.PARTS))
    for helper, _ in compile_prebuild._helpers.values():
        helper.kill()  # the rank then compiles their parts itself
    with caplog.at_level(logging.DEBUG, logger=compile_prebuild.__name__):
        for part in range(compile_prebuild.PARTS):
            compile_prebuild.wait(part)
    for part in range(1, compile_prebuild.PARTS + 1):
        assert f"the helper compiling part {part} of the model exited with -9" in caplog.text, caplog.text
    assert not compile_prebuild._helpers


def test_the_helpers_share_out_the_compile_workers_one_process_would_start(tmp_path):
    def environ_of(pid: int) -> dict:
        # Popen returns once the helper's exec has begun: its arguments and environment show a moment later
        deadline = time.monotonic() + 60
        while b"resnet_ddp.entry.compile_prebuild" not in _read(f"/proc/{pid}/cmdline"):
            assert time.monotonic() < deadline, "the helper never started"
            time.sleep(0.01)
        return dict(v.split(b"=", 1) for v in _read(f"/proc/{pid}/environ").split(b"\0") if v)

    def helpers_setting(environ: dict) -> list:
        compile_prebuild.start(config, device_index=0, environ=environ)
        settings = []
        for helper, _ in compile_prebuild._helpers.values():
            settings.append(environ_of(helper.pid).get(b"TORCHINDUCTOR_COMPILE_THREADS"))
            helper.kill()
        for part in range(compile_prebuild.PARTS):
            compile_prebuild.wait(part)
        return settings

    config = parse_config(["--save-dir", str(tmp_path), *TINY_COMPILED], environ={})
    share = str(compile_prebuild.compile_threads_each(len(os.sched_getaffinity(0)))).encode()
    assert helpers_setting({"PYTHONPATH": ""}) == [share] * compile_prebuild.PARTS
    # the job's own setting is every helper's
    assert helpers_setting({"PYTHONPATH": "", "TORCHINDUCTOR_COMPILE_THREADS": "3"}) == [b"3"] * compile_prebuild.PARTS
    # inductor starts one worker a CPU, at most 32, in each process that compiles
    assert [compile_prebuild.compile_threads_each(cpus) for cpus in (2, 4, 16, 64, 128)] == [1, 1, 4, 8, 8]


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # the process has gone
        return b""


def _helpers_of(job: Job) -> list:
    return [pid for pid in job.leftover_pids() if b"resnet_ddp.entry.compile_prebuild" in _read(f"/proc/{pid}/cmdline")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_job_stopped_or_killed_while_its_helpers_compile_leaves_no_process(save_dir, sig):
    # ResNet-50's parts take the helpers minutes to compile on a CPU: one that outlived its rank would be seen
    job = Job(train_command(*TINY_COMPILED, "--arch", "resnet50", "--max-steps", "2", "--save-dir", str(save_dir)))
    try:
        deadline = time.monotonic() + 180
        # the compile cache is made once torch is imported: a helper there is past its own start
        while len(_helpers_of(job)) < compile_prebuild.PARTS or not list(save_dir.glob("compile-cache/*/key.json")):
            assert job.process.poll() is None and time.monotonic() < deadline, "the helpers never started compiling"
            time.sleep(0.05)
        os.kill(job.process.pid, sig)  # the launcher, as a pod's deletion or the node's OOM killer reaches it
        result = job.wait(timeout=240)
        assert result.returncode == (128 + sig if sig == signal.SIGTERM else -sig), result.stdout + result.stderr
        assert wait_for_no_leftovers(job) == []
    finally:
        job.kill()


@pytest.fixture(autouse=True)
def _no_helper_left():
    yield
    for part in list(compile_prebuild._helpers):
        compile_prebuild.wait(part)
