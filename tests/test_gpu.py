"""GPU behaviour (run on the GPU machine: python -m pytest -m gpu). CI has no GPU and skips these."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import torch

from conftest import Job, free_port, run_train, train_command
from steps import compare_steps
from test_training import GLOBAL_LINE, assert_trained

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs"),
]

GPU_TINY = ["--nproc-per-node", "2", "--arch", "resnet18", "--image-size", "64", "--dataset-size", "404",
            "--batch-size", "8", "--epochs", "2", "--num-workers", "2", "--num-classes", "10", "--lr", "0.01"]
# Keep NVLink multicast off on shared machines.
SAFE = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _losses(result):
    return [float(loss) for _, loss, _ in GLOBAL_LINE.findall(result.stdout)]


def test_standalone_spawn_with_syncbn_over_nccl(save_dir):
    result = run_train(*GPU_TINY, "--save-dir", str(save_dir), env=SAFE)
    assert_trained(result, save_dir, ranks=2, epochs=2)
    assert "SyncBatchNorm on" in result.stdout and "CUDA graphs on" in result.stdout
    summary = json.loads((save_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["img_s"] > 0


def test_torchrun_launch_on_gpus(save_dir):
    job = Job([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "train.py", *GPU_TINY, "--save-dir", str(save_dir)], SAFE)
    assert_trained(job.wait(), save_dir, ranks=2, epochs=2)


def test_node_level_environment_on_gpus(save_dir):
    env = dict(SAFE, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    assert_trained(run_train(*GPU_TINY, "--save-dir", str(save_dir), env=env), save_dir, ranks=2, epochs=2)


@pytest.mark.timeout(300)  # pytest-timeout, where installed: this test once hung on the device (see steps.py)
@pytest.mark.parametrize("variant", ["graphed", "channels_last"])
def test_speed_changes_keep_the_arithmetic(variant):
    """A CUDA-graphed step, or channels_last, gives the eager NCHW step's losses and weights."""
    os.environ.update(SAFE)
    eager, changed = compare_steps("nccl", variant, steps=14 if variant == "graphed" else 3)
    for rank in range(2):
        torch.testing.assert_close(changed[rank][0], eager[rank][0], rtol=1e-3, atol=1e-4)
        for a, b in zip(changed[rank][1], eager[rank][1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("options", [
    ["--amp", "bf16"], ["--amp", "fp16"], ["--data", "gpu"], ["--fast", "--batch-size", "8"],
    ["--compile", "--no-cuda-graphs"], ["--compile"], ["--no-sync-bn"],
], ids=" ".join)
def test_every_speed_option_trains(options, save_dir):
    result = run_train(*GPU_TINY, *options, "--save-dir", str(save_dir), env=SAFE, timeout=600)
    losses = assert_trained(result, save_dir, ranks=2, epochs=2)
    assert all(loss == loss and loss < 10 for loss in losses)


def test_metrics_endpoint_has_nvml_gauges_for_both_gpus(save_dir):
    from test_telemetry import scrape_samples, scrape_until

    port = free_port()
    job = Job(train_command(*GPU_TINY, "--epochs", "400", "--log-interval", "5", "--warmup-steps", "5",
                            "--metrics-port", str(port), "--save-dir", str(save_dir)), SAFE)
    scrape_until(job, port, lambda m: all(("resnet_ddp_gpu_utilization_ratio", r) in m
                                          and m.get(("resnet_ddp_steps_total", r), 0) >= 20 for r in (0, 1)))
    time.sleep(2)  # a few more NVML samples inside the steady window, for the summary's mean
    samples = scrape_samples(port)
    job.process.send_signal(signal.SIGTERM)
    result = job.wait(timeout=180)
    assert result.returncode == 143, result.stderr[-2000:]

    gpu = {}
    for s in samples:
        if s.name.startswith("resnet_ddp_gpu_"):
            gpu.setdefault(s.labels["rank"], {})[s.name] = s.value
            gpu[s.labels["rank"]]["ids"] = (s.labels["gpu"], s.labels["uuid"])
    assert sorted(gpu) == ["0", "1"]
    assert gpu["0"]["ids"] != gpu["1"]["ids"] and all(g["ids"][1].startswith("GPU-") for g in gpu.values())
    for g in gpu.values():
        assert 0 <= g["resnet_ddp_gpu_utilization_ratio"] <= 1
        assert 0 < g["resnet_ddp_gpu_memory_used_bytes"] <= g["resnet_ddp_gpu_memory_total_bytes"]
        assert 0 < g["resnet_ddp_gpu_power_watts"] < 2000 and 0 < g["resnet_ddp_gpu_temperature_celsius"] < 120
    per_rank = {(s.name, s.labels["rank"]): s.value for s in samples}
    for rank in "01":
        assert per_rank["resnet_ddp_memory_allocated_bytes", rank] > 0
        assert per_rank["resnet_ddp_memory_peak_bytes", rank] >= per_rank["resnet_ddp_memory_allocated_bytes", rank]
    summary = json.loads((save_dir / "summary.json").read_text())
    assert 0 <= summary["gpu_util_pct"] <= 100 and len(summary["gpu_util_pct_per_rank"]) == 2
    assert len(summary["peak_mem_gib_per_rank"]) == 2
    records = [json.loads(line) for line in (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert all("gpu_util_pct" in r and "gpu_temp_c" in r for r in records if r["kind"] == "step")


def _syncbn_rank(rank, port, x_full, dy_full, channels_last, out):
    import torch.distributed as dist

    from resnet_ddp.syncbn import SyncBatchNorm

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=2)
    torch.cuda.set_device(rank)
    results = {}
    for name, layer in (("ours", SyncBatchNorm(8)), ("stock", torch.nn.SyncBatchNorm(8))):
        layer = layer.cuda()
        x = x_full.chunk(2)[rank].cuda()
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        y = layer(x)
        y.backward(dy_full.chunk(2)[rank].cuda())
        results[name] = [t.detach().cpu() for t in (y, x.grad, layer.weight.grad, layer.running_mean, layer.running_var)]
    out[rank] = results
    dist.destroy_process_group()


@pytest.mark.parametrize("channels_last", [False, True])
def test_our_syncbn_matches_torch_syncbn_on_cuda(channels_last):
    import torch.multiprocessing as mp

    os.environ.update(SAFE)
    x = torch.randn(16, 8, 7, 7) * 2 + 0.5
    dy = torch.randn(16, 8, 7, 7)
    out = mp.get_context("spawn").Manager().dict()
    mp.start_processes(_syncbn_rank, args=(free_port(), x, dy, channels_last, out), nprocs=2, start_method="spawn")
    for rank in range(2):
        for ours, stock in zip(out[rank]["ours"], out[rank]["stock"]):
            torch.testing.assert_close(ours, stock, rtol=1e-4, atol=1e-5)
