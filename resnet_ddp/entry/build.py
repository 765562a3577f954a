"""Building one process's Trainer from the configuration: every part, in the order they depend on each other.

The order of the callback list built here is part of the contract (core/callbacks.py):

 1. StepTimer           records each step's end on the device first, before any other work is queued
 2. GpuMonitor          NVML sampling (stopped first at the end, so that it measures training only)
 3. LoadPacer           a duty cycle's wait and busy time after each step (before anything else syncs or
                        sleeps); its sleep or idle phase between steps
 4. GpuMemoryBallast    taken after the last start-up step
 5. StepProfiler        starts and stops torch.profiler around the chosen steps
 6. StragglerDetector   samples and compares compute times every few steps
 7. NonFiniteReport     says what the step's non-finite watch saw, and offers it to the stop agreement,
                        which every callback above and below runs before
 8. FaultInjector       strikes before the chosen step
 9. StepLogger          step lines and records (after the figures above are fresh), epoch lines, the last record
10. ProgressWatchdog    stops at the end, before the final checkpoint's write and the export (both may take long)
11. CheckpointManager   at the end: waits for the last write, then exports model_final.pth
12. StopAgreement end   settles the last agreement and waits for every rank (after rank 0's last write)
13. RunSummary          the `end` record, summary.json, the table and the last line

Components get the configuration section they need, not the whole tree.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from typing import List, Optional

import torch
import torch.distributed as dist

from resnet_ddp import __version__
from resnet_ddp.config import Config
from resnet_ddp.core import checkpoint, compile_cache, distributed, phases
from resnet_ddp.core.callbacks import Callback, Callbacks
from resnet_ddp.core.checkpoint import CheckpointManager
from resnet_ddp.core.data import (
    SHM_MARGIN,
    DeviceBatches,
    HostBatches,
    LazyFakeDataset,
    ShardedPermutationSampler,
    fit_workers_to_shm,
    host_batch_bytes,
    shm_free_bytes,
)
from resnet_ddp.core.model import compile_model, export_state_dict, job_model, train_flops_per_image, wrap_ddp
from resnet_ddp.core.nonfinite import NonFiniteReport, NonFiniteWatch
from resnet_ddp.core.progress import TrainState
from resnet_ddp.core.step import EagerStep, GraphedStep, make_scaler
from resnet_ddp.core.stopping import RunLength, StopAgreement, signal_received
from resnet_ddp.core.trainer import Trainer
from resnet_ddp.entry import compile_prebuild, kernel_prebuild
from resnet_ddp.health.slowdown import TestSlowdown
from resnet_ddp.health.straggler import StragglerDetector
from resnet_ddp.health.watchdog import ProgressWatchdog
from resnet_ddp.layers import syncbn, syncbn_symm
from resnet_ddp.observe.console import Console
from resnet_ddp.observe.metrics import LOG_EVERY_S, MetricsLog, StepLogger, StepTimer, assumed_peak_tflops
from resnet_ddp.observe.nvml import GpuMonitor
from resnet_ddp.observe.profiling import StepProfiler
from resnet_ddp.observe.summary import RunFacts, RunSummary
from resnet_ddp.scenarios.faults import FaultInjector
from resnet_ddp.scenarios.load import GpuMemoryBallast, LoadPacer

log = logging.getLogger(__name__)


class _AgreementEnd(Callback):
    """The stop agreement's part of the end (12 above)."""

    def __init__(self, stop: StopAgreement):
        self.stop = stop

    def on_end(self, state, outcome) -> None:
        self.stop.close()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def build_trainer(
    config: Config,
    rank: distributed.RankInfo,
    console: Console,
    metrics: MetricsLog,
    facts: RunFacts,
    stack: contextlib.ExitStack,
) -> Trainer:
    """Every part of this process's training; what must be closed on any ending is registered on `stack`."""
    if rank.device.type == "cpu":
        distributed.share_host_cores(rank)
    else:
        # cuDNN's heuristics pick each convolution's algorithm at once; timing them all (benchmark) compiles
        # many runtime-compiled candidates on a new machine, and chose no faster ones for these shapes.
        torch.backends.cudnn.benchmark = config.speed.cudnn_benchmark
    torch.manual_seed(config.training.seed)
    control = dist.new_group(backend="gloo")  # the stop agreement's and the start-up agreements' collectives
    ballast_size = config.scenario.gpu_memory_ballast
    if ballast_size is not None:
        GpuMemoryBallast.check_before_training(ballast_size, rank, control)
    batches = _build_batches(config, rank)
    stack.callback(batches.close)  # closed after everything registered later (the endpoint's linger among them)
    facts.mark("data_ready")
    phases.reached("model build")
    model, optimizer, side_stream = _build_model_and_optimizer(config, rank)
    facts.mark("model_built")
    config = _settle_symmetric_memory(config, rank, model)  # the last value settled: never rewritten after this
    module = model.module
    speed, training = config.speed, config.training
    scaler = make_scaler(speed.amp, rank.device)
    layout = {
        "world_size": rank.world_size,
        "batch_size": training.batch_size,
        "dataset_size": training.dataset_size,
        "seed": training.seed,
        "data": training.data,
    }
    resumed = checkpoint.resume(
        config.checkpoint, config.save_dir, rank, config.fingerprint(), layout, module, optimizer, scaler
    )
    progress = resumed.progress
    facts.mark("checkpoint_loaded")
    state = TrainState(progress, batches.steps_per_epoch, rank.device)
    length = RunLength.of(
        training.epochs,
        config.length.max_steps,
        config.length.duration_s,
        progress.global_step,
        progress.epoch,
        progress.step_in_epoch,
        batches.steps_per_epoch,
    )
    # The first step that runs as every later one will: after cuDNN's autotuning and, with CUDA graphs, the eager
    # warm-up and the capture.
    first_steady_step = progress.global_step + (GraphedStep.WARMUP_STEPS + 2 if speed.cuda_graphs else 2)

    timer = StepTimer(rank.device, config.length.warmup_steps, lambda: batches.data_wait_s)
    for sink in _sinks(config, rank, control, progress.global_step, length, facts, timer):
        metrics.add_sink(sink)
    exporter = next((s for s in metrics.sinks if hasattr(s, "gpu_sample")), None)

    watch = NonFiniteWatch(
        rank.device, optimizer, undo_updates=config.scenario.nan_policy == "skip" and speed.amp != "fp16"
    )  # fp16's scaler already skips non-finite updates
    watch.start_at(progress.global_step)
    checkpoints = CheckpointManager(
        config.checkpoint,
        config.save_dir,
        rank,
        resumed,
        config.fingerprint(),
        layout,
        module,
        optimizer,
        scaler,
        lambda: export_state_dict(model),
        watch.first_bad_step_on_device,
        config.scenario.nan_policy == "stop",
        metrics.record,
    )
    stack.callback(_quietly, checkpoints.wait_for_writes)  # a failing run still finishes the write under way
    faults = FaultInjector(config.scenario, rank.rank, rank.device, before_failing=checkpoints.wait_for_writes)
    if speed.compile:  # before anything is compiled: a restarted job reuses what an earlier one compiled
        _use_compile_cache(config, rank, control)
    step = EagerStep(
        compile_model(model, rank.world_size, compile_prebuild.wait) if speed.compile else model,
        torch.nn.CrossEntropyLoss(),
        optimizer,
        rank.device,
        amp=speed.amp,
        channels_last=speed.channels_last,
        nonfinite=watch,
        loss_poison=faults.loss_poison,
        scaler=scaler,
    )
    if speed.cuda_graphs:
        step = GraphedStep(step, side_stream)

    watchdog = ProgressWatchdog(rank.rank, config.process.dist_timeout)
    stack.callback(watchdog.stop)
    stop = StopAgreement(rank.rank, length, control, heartbeat=watchdog.beat)
    gpu = GpuMonitor.start(
        rank.device, counting=lambda: timer.steady, on_sample=exporter.gpu_sample if exporter is not None else None
    )
    if gpu is not None:
        stack.callback(gpu.stop)
    flops = train_flops_per_image(config.model.arch, training.num_classes, config.model.image_size)
    peak = assumed_peak_tflops(facts.device_name, speed.amp) if rank.device.type == "cuda" else None
    TestSlowdown(config.health.test_slow_rank, rank.rank, rank.device).install(module)
    stragglers = _straggler_detector(config, rank, module, metrics, first_steady_step, progress.global_step)

    reporting = config.reporting
    bar = console.start_bar(length.last_step, progress.global_step) if rank.is_main else None
    logger = StepLogger(
        metrics,
        rank.rank,
        rank.world_size,
        rank.device,
        training.batch_size,
        length,
        reporting.log_interval,
        LOG_EVERY_S,
        flops,
        peak,
        lambda: batches.data_wait_s,
        fields=[f.fields for f in (gpu, stragglers) if f is not None],
        bar=bar,
    )
    summary = RunSummary(
        facts,
        config.save_dir,
        rank,
        metrics,
        timer,
        training.batch_size,
        lambda: state.epoch - 1,
        flops,
        peak,
        gpu.mean_utilisation_pct if gpu is not None else lambda: None,
        lambda: watch.seen[NonFiniteWatch.SKIPPED],
    )
    callbacks: List[Optional[Callback]] = [
        timer,
        gpu,
        LoadPacer(
            config.scenario,
            rank,
            stop,
            metrics.record,
            reporting.log_interval,
            LOG_EVERY_S,
            first_steady_step,
            lambda: batches.data_wait_s,
        ),
        GpuMemoryBallast(ballast_size, rank, control, first_steady_step) if ballast_size is not None else None,
        StepProfiler(reporting.profile_steps, rank, config.save_dir, first_steady_step)
        if reporting.profile_steps
        else None,
        stragglers,
        NonFiniteReport(watch, config.scenario.nan_policy, stop),
        faults,
        logger,
        phases.TrainingPhases(lambda: bool(stop.requested)) if phases.pausing() else None,  # tests only
        watchdog,
        checkpoints,
        _AgreementEnd(stop),
        summary,
    ]
    if _runs_jitted_kernels(config, rank.device):  # their helper may still be compiling them
        kernel_prebuild.wait(os.environ.get("PYTORCH_KERNEL_CACHE_PATH"))
    if rank.is_main:
        log.info(_start_line(config, rank, batches.steps_per_epoch))
    return Trainer(
        step, batches, state, stop, checkpoints, Callbacks([c for c in callbacks if c is not None]), rank.rank
    )


def _use_compile_cache(config: Config, rank: distributed.RankInfo, control) -> None:
    """Inductor's and Triton's caches in the save dir, under a key of everything that shapes what they hold."""
    fields = compile_cache.job_fields(config, rank.device, rank.world_size)
    if rank.local_rank == 0:  # one process of the node checks and makes it
        compile_cache.prepare(config.save_dir, fields)
    dist.barrier(group=control)
    compile_cache.use(compile_cache.directory(config.save_dir, fields))


def _quietly(close) -> None:
    """For the teardown of a failing run: the first error is the one to report."""
    with contextlib.suppress(Exception):
        close()


def _build_batches(config: Config, rank: distributed.RankInfo):
    training, image_size = config.training, config.model.image_size
    dataset = LazyFakeDataset(training.dataset_size, image_size, training.num_classes, training.seed)
    sampler = ShardedPermutationSampler(len(dataset), rank.rank, rank.world_size, training.seed, training.batch_size)
    if training.data == "gpu":
        return DeviceBatches(dataset, sampler, training.batch_size, rank.device)
    batch_bytes = host_batch_bytes(training.batch_size, image_size)
    free = shm_free_bytes()
    workers, prefetch = fit_workers_to_shm(training.num_workers, batch_bytes, rank.local_world_size, free)
    if workers < training.num_workers and rank.local_rank == 0:
        need = rank.local_world_size * (training.num_workers * 2 + 1) * batch_bytes * SHM_MARGIN
        log.warning(
            f"/dev/shm has {free / 2**20:.0f} MiB free; {training.num_workers} DataLoader workers in each of "
            f"{rank.local_world_size} processes need about {need / 2**20:.0f} MiB: using {workers} worker(s) "
            f"with {prefetch} batch(es) prefetched (mount a larger memory-backed /dev/shm for more)"
        )
    return HostBatches(dataset, sampler, training.batch_size, workers, rank.device, prefetch=prefetch)


def _build_model_and_optimizer(config: Config, rank: distributed.RankInfo):
    model = job_model(config)
    side_stream = torch.cuda.Stream(rank.device) if config.speed.cuda_graphs else None
    model = wrap_ddp(model, rank, config.model.sync_bn, stream=side_stream)
    training = config.training
    optimizer = torch.optim.SGD(
        model.parameters(), lr=training.lr, momentum=training.momentum, weight_decay=training.weight_decay
    )
    return model, optimizer, side_stream


def _settle_symmetric_memory(config: Config, rank: distributed.RankInfo, model) -> Config:
    """Map SyncBatchNorm's statistics into symmetric memory where the launcher chose it; every rank falls back to
    NCCL together where mapping fails on any (a driver or container that refuses the shared handles)."""
    if not config.speed.syncbn_symm_mem:
        return config
    if config.speed.compile:  # inductor lowers the compiled layer's all-reduces; set before it traces the model
        syncbn.use_symmetric_memory(dist.group.WORLD)
        return config
    why = syncbn_symm.share_statistics_everywhere_or_nowhere(model, dist.group.WORLD, rank.device)
    if why is None:
        return config
    if rank.is_main:
        log.warning(f"SyncBatchNorm's collectives stay on NCCL: symmetric memory failed ({why})")
    return replace(config, speed=replace(config.speed, syncbn_symm_mem=False))


def _sinks(
    config: Config,
    rank: distributed.RankInfo,
    control,
    steps_done: int,
    length: RunLength,
    facts: RunFacts,
    timer: StepTimer,
) -> list:
    """Where records go besides metrics.jsonl: the Prometheus endpoint (every rank), TensorBoard (rank 0)."""
    sinks = []
    if config.reporting.metrics_port is not None:
        from resnet_ddp.observe.prometheus import PrometheusExporter

        info = {
            "version": __version__,
            "arch": config.model.arch,
            "world_size": str(rank.world_size),
            "amp": config.speed.amp,
            "data": config.training.data,
            "compile": str(config.speed.compile).lower(),
            "batch_size": str(config.training.batch_size),
            "scenario": config.scenario.name or "",
            "device": facts.device_name,
        }
        exporter = PrometheusExporter(
            config.reporting.metrics_port,
            rank.rank,
            rank.local_rank,
            config.training.batch_size,
            barrier=lambda: dist.barrier(group=control),
            info=info,
            step_times_ms=lambda: timer.step_ms,
            linger_s=config.reporting.metrics_linger_s,
            signalled=signal_received,
        )
        exporter.starting_at(steps_done, length.fraction_done(steps_done))
        sinks.append(exporter)
    if config.reporting.tensorboard and rank.is_main:
        from resnet_ddp.observe.tensorboard import TensorBoardWriter

        sinks.append(TensorBoardWriter(config.save_dir, steps_done))
    return sinks


def _straggler_detector(
    config: Config, rank: distributed.RankInfo, module, metrics: MetricsLog, first_steady_step: int, start_step: int
) -> Optional[StragglerDetector]:
    """The detector, or None (with a line saying why, where the user could expect one)."""
    window_s = config.health.straggler_window_s
    why = StragglerDetector.unavailable(window_s, rank.world_size, config.speed.compile, config.speed.cuda_graphs)
    if why is not None:
        if why and rank.is_main:
            log.info(f"straggler detection is off: {why}")
        return None
    waiting = [m for m in module.modules() if isinstance(m, syncbn.SyncBatchNorm)]
    first_check = max(first_steady_step, start_step + config.length.warmup_steps + 1)
    return StragglerDetector(window_s, rank, module, waiting, config.speed.cuda_graphs, metrics.record, first_check)


def _runs_jitted_kernels(config: Config, device: torch.device) -> bool:
    """Whether SyncBatchNorm's training steps run its jitted kernel (fp32 on a GPU, the add and ReLU handed over)."""
    model = config.model
    return (
        model.sync_bn
        and model.fuse_bn_relu
        and syncbn.fuses_in_one_kernel(device, config.speed.amp, config.speed.compile)
    )


def _syncbn_description(config: Config, device: torch.device) -> str:
    """The start-up line's word on SyncBatchNorm: where its collectives run, and whether its kernel fuses."""
    if not config.model.sync_bn:
        return "off"
    parts = ["symmetric memory"] if config.speed.syncbn_symm_mem else []
    if config.model.fuse_bn_relu:
        one_kernel = _runs_jitted_kernels(config, device)
        parts.append("add and ReLU in its jitted kernel" if one_kernel else "add and ReLU handed over")
    return f"on ({', '.join(parts)})" if parts else "on"


def _start_line(config: Config, rank: distributed.RankInfo, steps: int) -> str:
    speed, training = config.speed, config.training
    return (
        f"{config.model.arch} on {rank.world_size} x {rank.device.type}, batch {training.batch_size} per process, "
        f"{steps} steps per epoch, {training.epochs} epochs, "
        f"SyncBatchNorm {_syncbn_description(config, rank.device)}, amp {speed.amp}, "
        f"channels_last {'on' if speed.channels_last else 'off'}, compile {'on' if speed.compile else 'off'}, "
        f"data {training.data}, CUDA graphs {'on' if speed.cuda_graphs else 'off'}, save dir {config.save_dir}"
        + (f", scenario {config.scenario.name}" if config.scenario.name else "")
    )
