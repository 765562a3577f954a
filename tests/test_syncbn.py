"""Our SyncBatchNorm over 2 gloo ranks equals BatchNorm over the concatenated batch."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from conftest import free_port

from resnet_ddp.entry.resolve import compiler_missing
from resnet_ddp.layers import syncbn
from resnet_ddp.layers.syncbn import SyncBatchNorm, convert_sync_batchnorm

WORLD = 2
CHANNELS = 5


def _reference(full_x, full_dy, full_r):
    bn = nn.BatchNorm2d(CHANNELS).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
        bn.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
    x = full_x.clone().requires_grad_(True)
    r = full_r.clone().requires_grad_(True) if full_r is not None else None
    out = bn(x) if r is None else torch.relu(bn(x) + r)
    out.backward(full_dy)
    return (
        out.detach(),
        x.grad,
        bn.weight.grad,
        bn.bias.grad,
        bn.running_mean,
        bn.running_var,
        r.grad if r is not None else None,
    )


def _rank_main(rank, port, full_x, full_dy, full_r, channels_last, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        bn = SyncBatchNorm(CHANNELS).double()
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
            bn.bias.uniform_(-0.5, 0.5, generator=torch.Generator().manual_seed(2))
        # Unequal shares, as a padded last batch could give.
        split = [3, 5][rank]
        start = 0 if rank == 0 else 3

        def share(full):
            part = full[start : start + split].clone()
            if channels_last:
                part = part.contiguous(memory_format=torch.channels_last)
            return part.requires_grad_(True)

        x = share(full_x)
        r = share(full_r) if full_r is not None else None
        out = bn(x) if r is None else bn(x, residual=r, relu=True)
        out.backward(full_dy[start : start + split])
        grads = torch.stack([bn.weight.grad, bn.bias.grad])
        dist.all_reduce(grads)  # what DDP does with parameter gradients (as a sum here)
        results[rank] = (
            out.detach(),
            x.grad,
            grads[0],
            grads[1],
            bn.running_mean,
            bn.running_var,
            r.grad if r is not None else None,
        )
    finally:
        dist.destroy_process_group()


def _run(channels_last, residual_and_relu=False):
    full_x = torch.randn(8, CHANNELS, 4, 3, dtype=torch.float64) * 3 + 1
    full_dy = torch.randn(8, CHANNELS, 4, 3, dtype=torch.float64)
    full_r = torch.randn(8, CHANNELS, 4, 3, dtype=torch.float64) if residual_and_relu else None
    manager = mp.get_context("spawn").Manager()
    results = manager.dict()
    mp.start_processes(
        _rank_main,
        args=(free_port(), full_x, full_dy, full_r, channels_last, results),
        nprocs=WORLD,
        start_method="spawn",
    )
    out_ref, dx_ref, dw_ref, db_ref, rm_ref, rv_ref, dr_ref = _reference(full_x, full_dy, full_r)
    out = torch.cat([results[0][0], results[1][0]])
    dx = torch.cat([results[0][1], results[1][1]])
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(dx, dx_ref)
    if residual_and_relu:
        assert 0 < (out == 0).sum() < out.numel()  # the ReLU cut some values and kept others
        torch.testing.assert_close(torch.cat([results[0][6], results[1][6]]), dr_ref)
    for rank in range(WORLD):
        _, _, dw, db, rm, rv, _ = results[rank]
        torch.testing.assert_close(dw, dw_ref)
        torch.testing.assert_close(db, db_ref)
        torch.testing.assert_close(rm, rm_ref)
        torch.testing.assert_close(rv, rv_ref)


def test_syncbn_matches_batchnorm_over_the_whole_batch():
    _run(channels_last=False)


def test_syncbn_matches_batchnorm_in_channels_last():
    _run(channels_last=True)


def test_syncbn_with_the_residual_add_and_relu_matches_batchnorm_then_add_then_relu():
    """What ResNet's blocks hand the layer (blocks.py): output, and gradients of input, residual and weights."""
    _run(channels_last=True, residual_and_relu=True)


def test_conversion_keeps_state_and_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    with torch.no_grad():
        model[1].running_mean.fill_(0.25)
    keys = list(model.state_dict())
    converted = convert_sync_batchnorm(model)
    assert isinstance(converted[1], SyncBatchNorm) and isinstance(converted[2][0], SyncBatchNorm)
    assert list(converted.state_dict()) == keys
    assert torch.all(converted[1].running_mean == 0.25)


def _traceable_rank(rank, port, x, dy, stats_by_all_reduce, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    syncbn.STATS_BY_ALL_REDUCE = stats_by_all_reduce  # what use_symmetric_memory sets on GPUs
    try:
        layer = syncbn.SyncBatchNorm(CHANNELS).double()
        # What --compile makes of the layer: one graph (fullgraph: a graph break fails the test), traced with
        # inductor's decompositions and partitioner, which once let the backward read a buffer the forward
        # updates. Its CPU kernels are not built (slow C++ builds); the GPU tests run inductor itself.
        compiled = torch.compile(layer, fullgraph=True, backend="aot_eager_decomp_partition")
        outs = []
        for path in (syncbn._SyncBatchNormFunction.apply, syncbn._traceable_sync_batch_norm, "compiled"):
            w = torch.linspace(0.5, 1.5, CHANNELS, dtype=torch.float64, requires_grad=True)
            b = torch.linspace(-1, 1, CHANNELS, dtype=torch.float64, requires_grad=True)
            rm, rv = torch.zeros(CHANNELS, dtype=torch.float64), torch.ones(CHANNELS, dtype=torch.float64)
            xi = x.chunk(WORLD)[rank].clone().requires_grad_(True)
            if path == "compiled":
                with torch.no_grad():
                    layer.weight.copy_(w)
                    layer.bias.copy_(b)
                w, b, rm, rv = layer.weight, layer.bias, layer.running_mean, layer.running_var
                y = compiled(xi)
            else:
                y = path(xi, w, b, rm, rv, 1e-5, 0.1, dist.group.WORLD, WORLD)
            y.backward(dy.chunk(WORLD)[rank])
            outs.append([y.detach(), xi.grad, w.grad, b.grad, rm, rv])
        results[rank] = outs
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("stats_by_all_reduce", [False, True], ids=["all-gather", "all-reduce"])
def test_the_compiler_friendly_path_computes_the_same_as_the_fused_one(stats_by_all_reduce):
    """torch.compile runs SyncBatchNorm through plain ops and functional collectives: same numbers, one graph.

    Also with the statistics gathered by one all-reduce (the symmetric-memory form), here on ranks whose
    means lie far apart."""
    if syncbn._FC is None:
        pytest.skip("this torch has no functional collectives")
    missing = compiler_missing("cpu")
    if missing is not None:
        pytest.skip(f"torch.compile {missing}")
    x = torch.randn(8, CHANNELS, 4, 3, dtype=torch.float64) * 2 + 1
    x[4:] += 50  # the second rank's half
    dy = torch.randn(8, CHANNELS, 4, 3, dtype=torch.float64)
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(
        _traceable_rank, args=(free_port(), x, dy, stats_by_all_reduce, results), nprocs=WORLD, start_method="spawn"
    )
    for rank in range(WORLD):
        fused, traceable, compiled = results[rank]
        for a, b, c in zip(fused, traceable, compiled):
            torch.testing.assert_close(b, a)
            torch.testing.assert_close(c.detach(), a)


@pytest.fixture
def kernel_cache_env(monkeypatch, tmp_path):
    for name in ("PYTORCH_KERNEL_CACHE_PATH", "XDG_CACHE_HOME", "USE_PYTORCH_KERNEL_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    return monkeypatch


def test_jitted_kernels_are_cached_in_the_temp_dir_where_the_home_cannot_hold_them(kernel_cache_env, tmp_path):
    """A container's home that is a file, read-only or unset: torch would warn on every rank and recompile."""
    home = tmp_path / "home"
    home.write_text("not a directory")
    kernel_cache_env.setenv("HOME", str(home))
    syncbn.use_a_writable_kernel_cache()
    cache = os.environ["PYTORCH_KERNEL_CACHE_PATH"]
    assert cache.startswith(str(tmp_path / "tmp")) and os.path.isdir(cache) and os.access(cache, os.W_OK)
    kernel_cache_env.delenv("PYTORCH_KERNEL_CACHE_PATH")
    kernel_cache_env.delenv("HOME")
    syncbn.use_a_writable_kernel_cache()
    assert os.environ["PYTORCH_KERNEL_CACHE_PATH"] == cache


def test_a_usable_home_is_left_alone_and_a_chosen_kernel_cache_kept_and_made(kernel_cache_env, tmp_path):
    kernel_cache_env.setenv("HOME", str(tmp_path / "home"))
    syncbn.use_a_writable_kernel_cache()
    assert "PYTORCH_KERNEL_CACHE_PATH" not in os.environ  # torch uses ~/.cache/torch/kernels, which now exists
    assert (tmp_path / "home" / ".cache" / "torch" / "kernels").is_dir()
    kernel_cache_env.setenv("HOME", str(tmp_path / "home-is-a-file"))
    (tmp_path / "home-is-a-file").write_text("")
    # The user's choice is kept, and made where missing (torch would warn in every rank and cache nothing).
    chosen = tmp_path / "volume" / "kernels"
    kernel_cache_env.setenv("PYTORCH_KERNEL_CACHE_PATH", str(chosen))
    syncbn.use_a_writable_kernel_cache()
    assert os.environ["PYTORCH_KERNEL_CACHE_PATH"] == str(chosen) and chosen.is_dir()
    unmakeable = tmp_path / "home-is-a-file" / "kernels"
    kernel_cache_env.setenv("PYTORCH_KERNEL_CACHE_PATH", str(unmakeable))
    syncbn.use_a_writable_kernel_cache()
    assert os.environ["PYTORCH_KERNEL_CACHE_PATH"] == str(unmakeable)


def _symmetric_setup_rank(rank, port, failing_ranks, results):
    from resnet_ddp.layers import syncbn_symm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:

        def share(model, group, device):  # as the real one, but the driver of `failing_ranks` refuses the mapping
            if rank in failing_ranks:
                raise RuntimeError("CUDA driver error: operation not permitted\n(more lines of detail)")
            for layer in model:
                layer.symmetric_slots = f"slices for rank {rank}"

        syncbn_symm.share_statistics = share
        model = nn.Sequential(SyncBatchNorm(4), SyncBatchNorm(8))
        why = syncbn_symm.share_statistics_everywhere_or_nowhere(model, dist.group.WORLD, torch.device("cpu"))
        results[rank] = (why, [layer.symmetric_slots for layer in model])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("failing_ranks", [(), (1,)], ids=["none-fails", "rank-1-fails"])
def test_symmetric_memory_is_set_up_on_every_rank_or_on_none(failing_ranks):
    """A rank whose symmetric memory cannot be mapped takes every rank back to NCCL: one left on it alone
    would wait in its collectives for peers that never come."""
    results = mp.get_context("spawn").Manager().dict()
    mp.start_processes(
        _symmetric_setup_rank, args=(free_port(), failing_ranks, results), nprocs=WORLD, start_method="spawn"
    )
    if not failing_ranks:
        assert results[0] == (None, ["slices for rank 0"] * 2) and results[1] == (None, ["slices for rank 1"] * 2)
        return
    assert results[0] == ("another rank could not set it up", [None, None])
    assert results[1] == ("RuntimeError: CUDA driver error: operation not permitted", [None, None])
