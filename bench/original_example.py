"""The original example's training step: the baseline this project is measured against.

train.py began as a single-file example; this script re-creates its step from that
example's description: fp32, NCHW, batch 64 per GPU, torch.nn.SyncBatchNorm,
DistributedDataParallel, a dataset that makes every sample with torch.randn in 4
DataLoader workers, and loss.item() after every step. Not part of the product: it
exists to be beaten.

    python bench/original_example.py --gpus 2 --steps 80 --warmup 20 --out result.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler


class RandnDataset(Dataset):
    def __init__(self, length: int, num_classes: int):
        self.length = length
        self.num_classes = num_classes

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return torch.randn(3, 224, 224), int(torch.randint(0, self.num_classes, (1,)))


def _worker(rank: int, args, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("nccl", rank=rank, world_size=args.gpus)
    torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    model = torchvision.models.resnet50(weights=None, num_classes=100)
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
    model = DistributedDataParallel(model, device_ids=[rank])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    criterion = torch.nn.CrossEntropyLoss()
    dataset = RandnDataset(100_000, 100)
    sampler = DistributedSampler(dataset, num_replicas=args.gpus, rank=rank)
    loader = DataLoader(dataset, batch_size=64, sampler=sampler, num_workers=4)
    step_s, wait_s = [], []
    batches = iter(loader)
    last = time.perf_counter()
    for _ in range(args.steps):
        t0 = time.perf_counter()
        images, labels = next(batches)
        wait_s.append(time.perf_counter() - t0)
        images, labels = images.to(device), labels.to(device)
        loss = criterion(model(images), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # the old example read the loss every step: a host sync
        now = time.perf_counter()
        step_s.append(now - last)
        last = now
    steady = step_s[args.warmup :]
    steady_wait = wait_s[args.warmup :]
    results[rank] = {
        "img_s": 64 * len(steady) / sum(steady),
        "step_ms": [s * 1000 for s in steady],
        "data_wait_frac": sum(steady_wait) / sum(steady),
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30,
    }
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_worker, args=(args, port, results), nprocs=args.gpus)
    ranks = [results[r] for r in range(args.gpus)]
    steps = sorted(t for r in ranks for t in r["step_ms"])
    img_s = sum(r["img_s"] for r in ranks)
    summary = {
        "img_s": img_s,
        "img_s_per_gpu": img_s / args.gpus,
        "step_ms_p50": statistics.median(steps),
        "step_ms_p95": steps[int(0.95 * (len(steps) - 1))],
        "data_wait_frac": max(r["data_wait_frac"] for r in ranks),
        "peak_mem_gib_per_rank": [r["peak_mem_gib"] for r in ranks],
    }
    with open(args.out, "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
