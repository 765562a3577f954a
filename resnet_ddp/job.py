"""One process's share of the job: join the group, build everything, train, export."""

from __future__ import annotations

import os
import time

import torch

from resnet_ddp import checkpoint, distributed, engine, telemetry
from resnet_ddp.config import Config
from resnet_ddp.data import LazyFakeDataset, ShardedPermutationSampler, build_loader
from resnet_ddp.model import build_model, export_state_dict, wrap_ddp
from resnet_ddp.scenarios import FaultInjector


def run_process(config: Config) -> int:
    rank = distributed.init_process_group(config.device_type, config.dist_timeout)
    train(config, rank)
    distributed.destroy_process_group()
    return 0


def train(config: Config, rank: distributed.RankInfo) -> None:
    if rank.device.type == "cpu":
        # Share the cores between the ranks of this node instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rank.local_world_size))
    torch.manual_seed(config.seed)

    dataset = LazyFakeDataset(config.dataset_size, config.image_size, config.num_classes, config.seed)
    sampler = ShardedPermutationSampler(len(dataset), rank.rank, rank.world_size, config.seed)
    loader = build_loader(dataset, sampler, config.batch_size, config.num_workers,
                          pin_memory=rank.device.type == "cuda")
    model = wrap_ddp(build_model(config.arch, config.num_classes, config.sync_bn), rank, config.sync_bn)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    criterion = torch.nn.CrossEntropyLoss()
    faults = FaultInjector(config, rank.rank)

    if rank.is_main:
        telemetry.log(rank.rank, (
            f"{config.arch} on {rank.world_size} x {rank.device.type}, batch {config.batch_size} per process, "
            f"{len(loader)} steps per epoch, {config.epochs} epochs, "
            f"SyncBatchNorm {'on' if config.sync_bn else 'off'}, save dir {config.save_dir}"
        ))
    start = time.perf_counter()
    global_step = 1
    for epoch in range(1, config.epochs + 1):
        sampler.set_epoch(epoch)
        loss_sum, steps = engine.train_epoch(model, loader, criterion, optimizer, rank.device, faults, global_step)
        global_step += steps
        totals = torch.stack([loss_sum, torch.tensor(float(steps), device=rank.device)])
        telemetry.epoch_line(rank.rank, epoch, (totals[0] / totals[1]).item())
        distributed.all_reduce_sum(totals)
        if rank.is_main:
            telemetry.global_epoch_line(rank.rank, epoch, (totals[0] / totals[1]).item(), rank.world_size)
    elapsed = time.perf_counter() - start

    if rank.is_main:
        path = checkpoint.export_final_model(export_state_dict(model), config.save_dir)
        telemetry.log(rank.rank, f"Saved the final model to {path}")
    telemetry.completed_line(rank.rank, elapsed)
