"""GPU behaviour (run on the GPU machine: python -m pytest -m gpu). CI has no GPU and skips these."""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import pytest
import torch

from conftest import Job, free_port, run_train, train_command, wait_for_no_leftovers
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


def test_channels_last_keeps_the_arithmetic():
    """channels_last gives the eager NCHW step's losses and weights over NCCL."""
    os.environ.update(SAFE)
    eager, changed = compare_steps("nccl", "channels_last", steps=3)
    for rank in range(2):
        torch.testing.assert_close(changed[rank][0], eager[rank][0], rtol=1e-3, atol=1e-4)
        for a, b in zip(changed[rank][1], eager[rank][1]):
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_cuda_graphs_keep_the_arithmetic(tmp_path):
    """The graphed job gives the eager job's losses and weights, past its warm-up into the replays."""
    # --data gpu: the same batches in both runs; a small lr keeps rounding differences from growing.
    common = [*GPU_TINY, "--data", "gpu", "--max-steps", "16", "--lr", "0.0001", "--seed", "3", "--log-interval", "1"]
    runs = {}
    for name, flag in (("eager", "--no-cuda-graphs"), ("graphed", "--cuda-graphs")):
        save_dir = tmp_path / name
        result = run_train(*common, flag, "--save-dir", str(save_dir), env=SAFE, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        records = [json.loads(line) for line in (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
        losses = [r["loss"] for r in records if r["kind"] == "step" and r["rank"] == 0]
        runs[name] = (torch.tensor(losses), torch.load(save_dir / "model_final.pth"))
    assert len(runs["graphed"][0]) == 16
    torch.testing.assert_close(runs["graphed"][0], runs["eager"][0], rtol=1e-3, atol=1e-4)
    for key, value in runs["eager"][1].items():
        torch.testing.assert_close(runs["graphed"][1][key].float(), value.float(), rtol=1e-3, atol=1e-4)


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


def test_two_torchrun_agents_over_nccl_one_gpu_each(tmp_path):
    """Two 'nodes' (torchrun agents, one GPU each, as two pods would have) make one job over NCCL."""
    port = free_port()
    agents = [
        Job([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "gpu-nodes",
             "train.py", *GPU_TINY, "--nproc-per-node", "1", "--min-gpus", "1", "--save-dir", str(tmp_path / f"node{i}")],
            dict(SAFE, CUDA_VISIBLE_DEVICES=str(i)))
        for i in range(2)
    ]
    results = [agent.wait(timeout=400) for agent in agents]
    assert all(r.returncode == 0 for r in results), [r.stderr[-1500:] for r in results]
    assert any("on 2 x cuda" in r.stdout for r in results)
    main = next(i for i, r in enumerate(results) if "(2 ranks)" in r.stdout)
    assert (tmp_path / f"node{main}" / "model_final.pth").exists()
    assert not (tmp_path / f"node{1 - main}" / "model_final.pth").exists()


@pytest.mark.parametrize("launcher", ["standalone", "torchrun"])
def test_a_hung_rank_ends_a_graphed_gpu_job_through_the_dist_timeout(launcher, save_dir):
    """Past capture, collectives replay from a CUDA graph where NCCL's watchdog does not see them, and
    --log-interval 1 blocks the host reading each loss: the job must still end within --dist-timeout."""
    args = [*GPU_TINY, "--epochs", "50", "--fail-at-step", "30", "--fail-rank", "1", "--fail-mode", "hang",
            "--dist-timeout", "30", "--log-interval", "1", "--save-dir", str(save_dir)]
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    job = Job([*prefix, "train.py", *args] if launcher == "torchrun" else [sys.executable, "train.py", *args], SAFE)
    started = time.monotonic()
    result = job.wait(timeout=300)
    assert result.returncode != 0
    assert time.monotonic() - started < 200
    assert "injecting fault 'hang'" in result.stdout
    assert wait_for_no_leftovers(job) == []
