"""SyncBatchNorm's jitted kernels compiled by a helper beside the ranks' start (entry/kernel_prebuild.py).

What it compiles, and that a job's first step then compiles nothing, needs a GPU (test_gpu.py). Here: when
the helper is started, and how the ranks wait for it.
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from resnet_ddp.entry import kernel_prebuild
from resnet_ddp.entry.cli import parse_config

CACHE = {"PYTORCH_KERNEL_CACHE_PATH": "/save/compile-cache/kernels"}


def test_the_helper_is_wanted_only_where_the_ranks_run_the_kernels_and_a_second_context_disturbs_nothing():
    def wanted(*args, shared=True, environ=CACHE):
        return kernel_prebuild.wanted(parse_config(list(args), environ={}), shared, environ)

    assert wanted()
    assert wanted("--cuda-graphs")
    # The ranks do not run the jitted kernels.
    for args in (["--amp", "bf16"], ["--compile"], ["--cpu"], ["--no-sync-bn"], ["--no-fuse-bn-relu"]):
        assert not wanted(*args), args
    # A second CUDA context beside the ranks: refused by the GPU, or skewing what the job measures.
    assert not wanted(shared=False) and not wanted(shared=None)
    assert not wanted("--preflight", "warn")
    assert not wanted("--gpu-memory-ballast", "10GiB")
    # No cache to fill.
    assert not wanted(environ={}) and not wanted(environ={**CACHE, "USE_PYTORCH_KERNEL_CACHE": "0"})


def _holder(lock_path):
    """A process that holds the helper's lock until told to end (a line on its stdin)."""
    script = (
        "import fcntl, os, sys\n"
        f"fd = os.open({str(lock_path)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "locked\n"
    return holder


def test_the_ranks_wait_while_a_helper_holds_the_kernel_cache_and_go_on_once_it_ends(tmp_path):
    assert kernel_prebuild.wait(None) and kernel_prebuild.wait(str(tmp_path))  # no helper ran here
    holder = _holder(tmp_path / kernel_prebuild.LOCK_NAME)
    try:
        assert not kernel_prebuild.wait(str(tmp_path), timeout_s=0.2)  # still compiling: given up, compile alone
    finally:
        holder.communicate("end\n", timeout=60)
    assert kernel_prebuild.wait(str(tmp_path), timeout_s=60)


def test_local_rank_zero_starts_the_helper_for_an_empty_kernel_cache_only(tmp_path, caplog):
    cache = tmp_path / "kernels"
    environ = {"PYTORCH_KERNEL_CACHE_PATH": str(cache), "PYTHONPATH": ""}
    kernel_prebuild.start(device_index=0, environ=environ)
    assert len(kernel_prebuild._helper) == 1 and cache.is_dir()
    # This machine has no GPU: the helper takes the lock, fails, and the ranks would compile the kernels themselves.
    with caplog.at_level(logging.DEBUG, logger=kernel_prebuild.__name__):
        assert kernel_prebuild.wait(str(cache), timeout_s=120)
    assert "the helper prebuilding SyncBatchNorm's kernels exited with 1" in caplog.text
    assert (cache / kernel_prebuild.LOCK_NAME).exists() and not kernel_prebuild._helper
    # A cache that an earlier start filled: loading takes no time, and no helper starts.
    (cache / "bn_relu_kernel_arch90_nvrtc12_cubin").write_bytes(b"compiled")
    kernel_prebuild.start(device_index=0, environ=environ)
    assert not kernel_prebuild._helper


@pytest.fixture(autouse=True)
def _no_helper_left():
    yield
    kernel_prebuild.wait(None)
