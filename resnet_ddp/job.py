"""One process's share of the job: join the group, build everything, train, export."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist

from resnet_ddp import checkpoint, distributed, engine, telemetry
from resnet_ddp.config import Config
from resnet_ddp.data import DeviceBatches, HostBatches, LazyFakeDataset, ShardedPermutationSampler
from resnet_ddp.model import build_model, compile_model, export_state_dict, wrap_ddp
from resnet_ddp.scenarios import FaultInjector

SUMMARY_NAME = "summary.json"


def run_process(config: Config) -> int:
    rank = distributed.init_process_group(config.device_type, config.dist_timeout)
    train(config, rank)
    distributed.destroy_process_group()
    return 0


def _build_batches(config: Config, rank: distributed.RankInfo):
    dataset = LazyFakeDataset(config.dataset_size, config.image_size, config.num_classes, config.seed)
    sampler = ShardedPermutationSampler(len(dataset), rank.rank, rank.world_size, config.seed, config.batch_size)
    if config.data == "gpu":
        return DeviceBatches(dataset, sampler, config.batch_size, rank.device)
    return HostBatches(dataset, sampler, config.batch_size, config.num_workers,
                       pin_memory=rank.device.type == "cuda")


def _build_step(config: Config, rank: distributed.RankInfo):
    model = build_model(config.arch, config.num_classes, config.sync_bn)
    if config.use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    side_stream = torch.cuda.Stream(rank.device) if config.use_cuda_graphs else None
    model = wrap_ddp(model, rank, config.sync_bn, stream=side_stream)
    if config.compile:
        model = compile_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    step = engine.EagerStep(model, torch.nn.CrossEntropyLoss(), optimizer, rank.device,
                            amp=config.amp, channels_last=config.use_channels_last)
    return model, (engine.GraphedStep(step, side_stream) if side_stream is not None else step)


def train(config: Config, rank: distributed.RankInfo) -> None:
    if rank.device.type == "cpu":
        # Share the cores between the ranks of this node instead of oversubscribing them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // rank.local_world_size))
    else:
        torch.backends.cudnn.benchmark = True  # shapes are fixed: autotune each convolution once
    torch.manual_seed(config.seed)

    batches = _build_batches(config, rank)
    model, step = _build_step(config, rank)
    faults = FaultInjector(config, rank.rank)
    timer = telemetry.StepTimer(rank.device, config.warmup_steps)

    if rank.is_main:
        telemetry.log(rank.rank, (
            f"{config.arch} on {rank.world_size} x {rank.device.type}, batch {config.batch_size} per process, "
            f"{len(batches)} steps per epoch, {config.epochs} epochs, "
            f"SyncBatchNorm {'on' if config.sync_bn else 'off'}, amp {config.amp}, "
            f"channels_last {'on' if config.use_channels_last else 'off'}, "
            f"compile {'on' if config.compile else 'off'}, data {config.data}, "
            f"CUDA graphs {'on' if config.use_cuda_graphs else 'off'}, save dir {config.save_dir}"
        ))
    start = time.perf_counter()
    global_step = 1
    epochs_done = 0
    for epoch in range(1, config.epochs + 1):
        if config.max_steps is not None and global_step > config.max_steps:
            break
        batches.set_epoch(epoch)
        loss_sum, steps = engine.train_epoch(step, batches, faults, timer, rank.device, global_step, config.max_steps)
        global_step += steps
        epochs_done = epoch
        totals = torch.stack([loss_sum, torch.tensor(float(steps), device=rank.device)])
        telemetry.epoch_line(rank.rank, epoch, (totals[0] / totals[1]).item())
        distributed.all_reduce_sum(totals)
        if rank.is_main:
            telemetry.global_epoch_line(rank.rank, epoch, (totals[0] / totals[1]).item(), rank.world_size)
    timer.finish()
    elapsed = time.perf_counter() - start

    rank_stats = [None] * rank.world_size
    dist.all_gather_object(rank_stats, timer.stats(config.batch_size))
    if rank.is_main:
        path = checkpoint.export_final_model(export_state_dict(model), config.save_dir)
        telemetry.log(rank.rank, f"Saved the final model to {path}")
        summary = telemetry.summarise(rank_stats, rank.world_size)
        summary.update(exit_reason="finished", wall_s=elapsed, epochs_done=epochs_done,
                       world_size=rank.world_size, device=_device_name(rank.device), torch=torch.__version__)
        telemetry.write_json(os.path.join(config.save_dir, SUMMARY_NAME), summary)
        telemetry.log(rank.rank, (
            f"{summary['img_s']:.1f} img/s ({summary['img_s_per_gpu']:.1f} per process), "
            f"step p50 {summary['step_ms_p50']:.1f} ms, waiting on data {100 * summary['data_wait_frac']:.1f}%"
        ))
    telemetry.completed_line(rank.rank, elapsed)


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
