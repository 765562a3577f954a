"""A one-process compiled job: its model in two compiled parts, the second compiled by a helper beside the rank
(core/model.py TwoPartForward, entry/compile_prebuild.py). On CPU here; the GPU lane runs it on a GPU."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import run_train

from resnet_ddp.core.model import build_model
from resnet_ddp.entry import compile_prebuild
from resnet_ddp.entry.cli import parse_config
from resnet_ddp.layers.blocks import first_part, second_part, split_point

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
def test_the_two_parts_make_the_models_own_forward_and_backward(arch, fuse_bn_relu):
    torch.manual_seed(0)
    model = build_model(arch, 10, sync_bn=True, fuse_bn_relu=fuse_bn_relu)
    x = torch.randn(4, 3, 32, 32)
    whole = model(x)
    whole.square().sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    parts = second_part(model, first_part(model, x))
    parts.square().sum().backward()
    torch.testing.assert_close(parts, whole)
    for got, want in zip((p.grad for p in model.parameters()), expected):
        torch.testing.assert_close(got, want)
    assert (
        0 < split_point(model) < sum(len(layer) for layer in (model.layer1, model.layer2, model.layer3, model.layer4))
    )


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


def test_a_new_compiled_one_process_job_loads_the_second_part_its_helper_compiled(save_dir):
    result = run_train(*TINY_COMPILED, "--max-steps", "2", "--save-dir", str(save_dir), timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    log = (save_dir / "logs" / "rank0.log").read_text()
    assert "s for the helper compiling the model's second part" in log, log
    assert "the compiled model's second part: loaded from the compile cache" in log, log
    # A restart loads both parts from the save dir, and starts no helper.
    again = run_train(*TINY_COMPILED, "--max-steps", "4", "--save-dir", str(save_dir), timeout=600)
    assert again.returncode == 0, again.stdout + again.stderr
    log = (save_dir / "logs" / "rank0.log").read_text()
    assert "resuming from " in again.stdout and "helper" not in log.split("resuming from ")[-1], log


def test_the_rank_waits_for_its_helper_and_compiles_alone_once_it_failed(tmp_path, caplog):
    config = parse_config(["--save-dir", str(tmp_path), *TINY_COMPILED], environ={})
    compile_prebuild.start(config, device_index=0, environ={"PYTHONPATH": ""})
    (helper,) = compile_prebuild._helper
    helper.kill()  # a helper that died: the rank goes on at once, and compiles the part itself
    with caplog.at_level(logging.DEBUG, logger=compile_prebuild.__name__):
        compile_prebuild.wait(timeout_s=120)
    assert "the helper compiling the model's second part exited with -9" in caplog.text
    assert not compile_prebuild._helper


@pytest.fixture(autouse=True)
def _no_helper_left():
    yield
    compile_prebuild.wait()
