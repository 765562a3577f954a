"""One process's share of the job: join the group, build everything, resume, train, export."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Optional

import torch
import torch.distributed as dist

from resnet_ddp import checkpoint, distributed, engine, preflight, straggler, syncbn, syncbn_symm, telemetry
from resnet_ddp.config import Config
from resnet_ddp.data import (SHM_MARGIN, DeviceBatches, HostBatches, LazyFakeDataset, ShardedPermutationSampler,
                             fit_workers_to_shm, host_batch_bytes, shm_free_bytes)
from resnet_ddp.faults import FaultInjector, NonFiniteWatch
from resnet_ddp.load import GpuMemoryBallast, LoadPacer
from resnet_ddp.model import build_model, compile_model, export_state_dict, train_flops_per_image, unwrap, wrap_ddp
from resnet_ddp.nvml import GpuMonitor
from resnet_ddp.profiling import StepProfiler
from resnet_ddp.prometheus import PrometheusExporter
from resnet_ddp.stopping import NONFINITE, TIME_UP, StopAgreement
from resnet_ddp.watchdog import ProgressWatchdog

SUMMARY_NAME = "summary.json"
METRICS_PATH = os.path.join("logs", "metrics.jsonl")
LOG_EVERY_S = 10.0


@dataclass
class Progress:
    """Where training stands: what a checkpoint records besides the weights."""

    epoch: int = 1  # the epoch in progress, from 1
    step_in_epoch: int = 0  # steps of that epoch already done
    global_step: int = 0  # steps done in all
    epoch_loss_sum: float = 0.0  # this rank's, so that a resumed epoch's line reports the whole epoch


@dataclass
class RunFacts:
    """What rank 0 can still report when training fails: train() fills it in as it goes."""

    started: float = field(default_factory=time.perf_counter)
    epochs_done: int = 0
    timer: Optional[telemetry.StepTimer] = None
    logger: Optional[telemetry.StepLogger] = None


def run_process(config: Config) -> int:
    rank = distributed.init_process_group(config.device_type, config.dist_timeout)
    code = _run_preflight(config, rank) if config.preflight != "off" else None
    if code is None:
        facts = RunFacts()
        try:
            code = train(config, rank, facts)
        except Exception as exc:
            # Its own error, or a collective broken by a failed peer: say so in summary.json, then fail as before.
            _close_after_failure(facts)
            if rank.is_main:
                _write_failure_summary(config, rank, facts, exc)
            raise
    distributed.destroy_process_group()
    return code


def _close_after_failure(facts: RunFacts) -> None:
    telemetry.stop_console()
    if facts.logger is not None:
        with contextlib.suppress(Exception):  # flush what TensorBoard holds; the first error is the one to report
            facts.logger.close()


def _write_failure_summary(config: Config, rank: distributed.RankInfo, facts: RunFacts, exc: Exception) -> None:
    error = (str(exc).strip().splitlines() or [""])[0][:500]
    summary = {
        "exit_reason": "failed", "error": f"{type(exc).__name__}: {error}" if error else type(exc).__name__,
        "wall_s": time.perf_counter() - facts.started, "epochs_done": facts.epochs_done,
        "steps": facts.timer.steps if facts.timer is not None else 0, "world_size": rank.world_size,
        "torch": torch.__version__,
    }
    with contextlib.suppress(Exception):  # a broken device may not even answer its name
        summary["device"] = _device_name(rank.device)
    with contextlib.suppress(OSError):
        telemetry.write_json(os.path.join(config.save_dir, SUMMARY_NAME), summary)


def _run_preflight(config: Config, rank: distributed.RankInfo) -> Optional[int]:
    """The checks, on every rank; the exit code if the job ends here (strict findings, --preflight-only), else None."""
    findings = preflight.run(config, rank)
    if findings and config.preflight == "strict":
        return 1
    return 0 if config.preflight_only else None


def _build_batches(config: Config, rank: distributed.RankInfo):
    dataset = LazyFakeDataset(config.dataset_size, config.image_size, config.num_classes, config.seed)
    sampler = ShardedPermutationSampler(len(dataset), rank.rank, rank.world_size, config.seed, config.batch_size)
    if config.data == "gpu":
        return DeviceBatches(dataset, sampler, config.batch_size, rank.device)
    batch_bytes = host_batch_bytes(config.batch_size, config.image_size)
    free = shm_free_bytes()
    workers, prefetch = fit_workers_to_shm(config.num_workers, batch_bytes, rank.local_world_size, free)
    if workers < config.num_workers and rank.local_rank == 0:
        need = rank.local_world_size * (config.num_workers * 2 + 1) * batch_bytes * SHM_MARGIN
        telemetry.log(rank.rank, (
            f"/dev/shm has {free / 2**20:.0f} MiB free; {config.num_workers} DataLoader workers in each of "
            f"{rank.local_world_size} processes need about {need / 2**20:.0f} MiB: using {workers} worker(s) "
            f"with {prefetch} batch(es) prefetched (mount a larger memory-backed /dev/shm for more)"
        ))
    return HostBatches(dataset, sampler, config.batch_size, workers, rank.device, prefetch=prefetch)


def _syncbn_description(config: Config, rank: distributed.RankInfo) -> str:
    """The start-up line's word on SyncBatchNorm: where its collectives run, and whether its kernel fuses."""
    if not config.sync_bn:
        return "off"
    parts = ["symmetric memory"] if config.syncbn_symm_mem else []
    if config.fuse_bn_relu:
        one_kernel = syncbn.fuses_in_one_kernel(rank.device, config.amp, config.compile)
        parts.append("add and ReLU in its jitted kernel" if one_kernel else "add and ReLU handed over")
    return f"on ({', '.join(parts)})" if parts else "on"


def _build_model_and_optimizer(config: Config, rank: distributed.RankInfo):
    model = build_model(config.arch, config.num_classes, config.sync_bn, config.fuse_bn_relu)
    if config.use_channels_last:
        model = model.to(memory_format=torch.channels_last)
    side_stream = torch.cuda.Stream(rank.device) if config.use_cuda_graphs else None
    model = wrap_ddp(model, rank, config.sync_bn, stream=side_stream)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    return model, optimizer, side_stream


def _data_layout(config: Config, rank: distributed.RankInfo) -> dict:
    """What fixes which samples a step sees: a resume keeps the exact step only if this is unchanged."""
    return {"world_size": rank.world_size, "batch_size": config.batch_size, "dataset_size": config.dataset_size,
            "seed": config.seed, "data": config.data}


def _resume(config: Config, rank: distributed.RankInfo, model, optimizer, scaler) -> Progress:
    """Rank 0 picks and loads the checkpoint; every rank gets its state by broadcast (save dirs may be node-local)."""
    found = checkpoint.find_resume_point(config) if rank.is_main else None
    box = [found]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return Progress()
    path, state = box[0]
    unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if rank.device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], rank.device)
    same_layout = state["layout"] == _data_layout(config, rank)
    loss_sum = state["epoch_loss_sums"][rank.rank] if same_layout else 0.0
    progress = Progress(state["epoch"], state["step_in_epoch"], state["global_step"], loss_sum)
    if not same_layout and progress.step_in_epoch:
        # Another world size or batch size maps steps to other samples: redo the epoch from its start.
        progress.global_step -= progress.step_in_epoch
        progress.step_in_epoch, progress.epoch_loss_sum = 0, 0.0
    if rank.is_main and not config.quiet:
        telemetry.log(rank.rank, f"resuming from {path}: epoch {progress.epoch}, step {progress.step_in_epoch} "
                                 f"of the epoch, {progress.global_step} steps done")
    return progress


def _checkpoint_state(config, rank, model, optimizer, scaler, progress: Progress, loss_sums) -> dict:
    return {
        # References to the live tensors: the writer makes the one host copy (CheckpointWriter.submit).
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "epoch": progress.epoch,
        "step_in_epoch": progress.step_in_epoch,
        "global_step": progress.global_step,
        "epoch_loss_sums": loss_sums,  # one per rank
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(rank.device) if rank.device.type == "cuda" else None},
        "fingerprint": config.fingerprint(),
        "layout": _data_layout(config, rank),
    }


def _build_reporting(config: Config, rank: distributed.RankInfo, timer: telemetry.StepTimer, stop: StopAgreement,
                     total_steps: int, steps_done: int, flops_per_image: float, peak):
    """The step logger with its sinks (Prometheus on every rank, TensorBoard on rank 0), NVML and the bar."""
    sinks = []
    exporter = None
    if config.metrics_port is not None:
        exporter = PrometheusExporter(config.metrics_port, rank.rank, rank.local_rank, config.batch_size,
                                      total_steps, barrier=stop.barrier)
        exporter.starting_at(steps_done)
        sinks.append(exporter)
    if config.tensorboard and rank.is_main:
        sinks.append(telemetry.TensorBoardWriter(config.save_dir, steps_done))
    gpu = GpuMonitor.start(rank.device, counting=lambda: timer.steady,
                           on_sample=exporter.gpu_sample if exporter is not None else None)
    logger = telemetry.StepLogger(
        rank.rank, rank.world_size, rank.device, config.batch_size, total_steps,
        os.path.join(config.save_dir, METRICS_PATH), config.log_interval, LOG_EVERY_S, config.quiet,
        flops_per_image, peak, sinks=sinks, gpu=gpu,
        bar=telemetry.start_console(rank.rank, config.quiet, total_steps, steps_done),
    )
    return logger, gpu


def train(config: Config, rank: distributed.RankInfo, facts: Optional[RunFacts] = None) -> int:
    """Train to the end or to an agreed stop; return the exit code (0, or 128 + the signal)."""
    facts = facts if facts is not None else RunFacts()
    if rank.device.type == "cpu":
        distributed.share_host_cores(rank)
    else:
        torch.backends.cudnn.benchmark = True  # shapes are fixed: autotune each convolution once
    torch.manual_seed(config.seed)

    stop = StopAgreement(rank.rank)
    ballast = GpuMemoryBallast(config.gpu_memory_ballast, rank, stop.group) if config.gpu_memory_ballast else None
    if ballast is not None:
        ballast.check_before_training()
    batches = _build_batches(config, rank)
    model, optimizer, side_stream = _build_model_and_optimizer(config, rank)
    faults = FaultInjector(config, rank.rank, rank.device)
    # fp16's gradient scaler already skips updates whose gradients are not finite.
    undo_updates = config.nan_policy == "skip" and config.amp != "fp16"
    nonfinite = NonFiniteWatch(rank.device, optimizer, undo_updates)
    if config.syncbn_symm_mem and config.compile:  # before the compiler traces the model
        syncbn.use_symmetric_memory(dist.group.WORLD)
    elif config.syncbn_symm_mem:  # settled at start-up: GPUs of one node with peer access
        why = syncbn_symm.share_statistics_everywhere_or_nowhere(model, dist.group.WORLD, rank.device)
        if why is not None:
            config = replace(config, syncbn_symm_mem=False)
            if rank.is_main:
                telemetry.log(rank.rank, f"SyncBatchNorm's collectives stay on NCCL: symmetric memory failed ({why})")
    step = engine.EagerStep(model if not config.compile else compile_model(model), torch.nn.CrossEntropyLoss(),
                            optimizer, rank.device, amp=config.amp, channels_last=config.use_channels_last,
                            nonfinite=nonfinite, loss_poison=faults.loss_poison)
    scaler = step.scaler
    progress = _resume(config, rank, model, optimizer, scaler)
    nonfinite.start_at(progress.global_step)
    if side_stream is not None:
        step = engine.GraphedStep(step, side_stream)
    # The job's own peak is in the allocator's pool once the first steps (and graph capture) have run.
    ballast_step = progress.global_step + (engine.GraphedStep.WARMUP_STEPS + 1 if config.use_cuda_graphs else 2)
    timer = facts.timer = telemetry.StepTimer(rank.device, config.warmup_steps)
    total_steps = config.epochs * len(batches)  # no resume offset is set yet: a whole epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    device_name = _device_name(rank.device)
    flops_per_image = train_flops_per_image(config.arch, config.num_classes, config.image_size)
    peak = telemetry.assumed_peak_tflops(device_name, config.amp) if rank.device.type == "cuda" else None
    logger, gpu = _build_reporting(config, rank, timer, stop, total_steps, progress.global_step, flops_per_image, peak)
    facts.logger = logger

    straggler.TestSlowdown(config, rank).install(model)
    # The first check samples a steady step: after the warm-up and, with CUDA graphs, a replay.
    first_check = max(config.warmup_steps, engine.GraphedStep.WARMUP_STEPS + 1 if config.use_cuda_graphs else 1)
    stragglers = straggler.StragglerDetector.start(config, rank, model, logger.record, first_check)
    if stragglers is not None:
        logger.extra["straggler_ranks"] = stragglers.straggler_ranks  # the same list, kept up to date
    profiler = (StepProfiler(config.profile_steps, rank, config.save_dir, first_steady_step=ballast_step + 1,
                             quiet=config.quiet) if config.profile_steps else None)
    # Pacing starts two steps after the start-up steps, so that the busy time it sleeps on is a steady step's.
    pacer = LoadPacer(config, rank, stop, logger.record, config.log_interval, LOG_EVERY_S,
                      paced_from_step=ballast_step + 2)

    if rank.is_main and not config.quiet:
        telemetry.log(rank.rank, (
            f"{config.arch} on {rank.world_size} x {rank.device.type}, batch {config.batch_size} per process, "
            f"{len(batches)} steps per epoch, {config.epochs} epochs, "
            f"SyncBatchNorm {_syncbn_description(config, rank)}, "
            f"amp {config.amp}, "
            f"channels_last {'on' if config.use_channels_last else 'off'}, "
            f"compile {'on' if config.compile else 'off'}, data {config.data}, "
            f"CUDA graphs {'on' if config.use_cuda_graphs else 'off'}, save dir {config.save_dir}"
            + (f", scenario {config.scenario}" if config.scenario else "")
        ))
    diverged = None  # (step, rank) of the first non-finite loss, under --nan-policy stop
    saved_step = None  # the global step of the newest checkpoint submitted

    def save(state_progress: Progress) -> None:
        """Called by every rank at the same step: gathers each rank's epoch loss, then rank 0 writes.

        Not under --nan-policy stop once a loss was not finite: a restart would resume
        from those weights, so the newest checkpoint stays the last good one.
        """
        nonlocal diverged, saved_step
        if state_progress.global_step == saved_step:
            return  # --max-steps ending on a --checkpoint-every step: that checkpoint is already written
        # One small collective read from the device, no pickling: at every epoch end all ranks wait for it.
        loss = torch.full((), state_progress.epoch_loss_sum, dtype=torch.float64, device=rank.device)
        gathered = distributed.gather_rows(torch.stack([loss, nonfinite.first_bad_step_on_device.double()]))
        bad = sorted((int(bad_step), r) for r, (_, bad_step) in enumerate(gathered) if bad_step)
        if bad and config.nan_policy == "stop":
            diverged = diverged or bad[0]
            return
        loss_sums = [loss for loss, _ in gathered]
        saved_step = state_progress.global_step
        if rank.is_main:
            held_since = time.perf_counter()
            writer.submit(_checkpoint_state(config, rank, model, optimizer, scaler, state_progress, loss_sums),
                          held_since)

    def checkpoint_written(figures: dict) -> None:
        """Once a checkpoint is on disk: its write time is what a preemption's grace period must cover."""
        logger.record({"kind": "checkpoint", **figures})
        if not config.quiet:
            on_gpu = f" + {figures['gpu_copy_s'] * 1000:.1f} ms of copy on the GPU" if "gpu_copy_s" in figures else ""
            telemetry.log(rank.rank, f"saved {figures['path']} ({figures['bytes'] / 2**20:.0f} MiB in "
                                     f"{figures['write_s']:.2f} s, training held {figures['training_held_s']:.3f} s"
                                     f"{on_gpu})")

    writer = checkpoint.CheckpointWriter(config.save_dir, config.keep_checkpoints, checkpoint_written)
    if rank.is_main:
        writer.reserve({"model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict()})
    faults.before_failing = writer.wait

    stopped_by = 0
    watchdog = ProgressWatchdog(rank.rank, config.dist_timeout)
    start = facts.started = time.perf_counter()
    epochs_done = facts.epochs_done = progress.epoch - 1

    def check_duration() -> None:
        watchdog.beat()  # also called while a load phase sleeps or idles: alive, not stuck
        if config.duration_s is not None and time.perf_counter() - start >= config.duration_s:
            stop.time_is_up()

    pacer.start()
    if profiler is not None:
        profiler.steps_done(progress.global_step)
    while progress.epoch <= config.epochs and not stopped_by:
        if config.max_steps is not None and progress.global_step >= config.max_steps:
            break
        batches.set_epoch(progress.epoch, progress.step_in_epoch)
        loss_sum = torch.full((), progress.epoch_loss_sum, device=rank.device)
        epoch_start_step = progress.step_in_epoch
        logger.epoch_started(progress.epoch_loss_sum, progress.global_step)
        pacer.epoch_started()

        def after_step(global_step: int, steps_done: int) -> bool:
            nonlocal stopped_by
            pacer.step_finished(timer.data_wait_s)
            if ballast is not None and global_step == ballast_step:
                ballast.allocate()
            check_duration()
            if profiler is not None:
                profiler.steps_done(global_step)
            if stragglers is not None:
                stragglers.after_step(global_step)
            logger.after_step(global_step, progress.epoch, epoch_start_step + steps_done, len_epoch, loss_sum,
                              timer.data_wait_s)
            nonfinite.publish()
            nonfinite.report(rank.rank, config.nan_policy, stop)
            stopped_by = stop.poll()
            every = config.checkpoint_every
            in_epoch = epoch_start_step + steps_done
            if not stopped_by and every and global_step % every == 0 and in_epoch < len_epoch:
                save(Progress(progress.epoch, in_epoch, global_step, loss_sum.item()))
            last = global_step == config.max_steps or (progress.epoch == config.epochs and in_epoch == len_epoch)
            if not stopped_by and not last:  # the duty cycle's sleep or an idle phase, before the next step
                stopped_by = pacer.after_agreement(global_step, check_duration)
            if stopped_by:
                if not config.quiet:
                    stop.announce(stopped_by, global_step)
                save(Progress(progress.epoch, in_epoch, global_step, loss_sum.item()))
            return bool(stopped_by)

        len_epoch = len(batches) + epoch_start_step
        steps, stopped = engine.train_epoch(step, batches, faults, timer, loss_sum, progress.global_step + 1,
                                            config.max_steps, after_step)
        progress.global_step += steps
        if stopped:
            break
        steps_in_epoch = epoch_start_step + steps  # the same on every rank
        loss_sums = [row[0] for row in distributed.gather_rows(loss_sum.double().view(1))]
        avg_loss = loss_sums[rank.rank] / steps_in_epoch
        telemetry.epoch_line(rank.rank, progress.epoch, avg_loss)
        global_loss = sum(loss_sums) / (steps_in_epoch * rank.world_size)
        logger.record({"kind": "epoch", "epoch": progress.epoch, "global_step": progress.global_step,
                       "avg_loss": avg_loss, "global_avg_loss": global_loss})
        if rank.is_main and not config.quiet:
            telemetry.global_epoch_line(rank.rank, progress.epoch, global_loss, rank.world_size)
        finished_epoch = steps_in_epoch == len_epoch
        if finished_epoch:
            epochs_done = facts.epochs_done = progress.epoch
            progress = Progress(progress.epoch + 1, 0, progress.global_step, 0.0)
        else:  # --max-steps ended the run inside the epoch
            progress = Progress(progress.epoch, steps_in_epoch, progress.global_step, loss_sum.item())
        save(progress)
    watchdog.stop()
    if profiler is not None:
        profiler.finish()  # a run that ended inside the chosen steps keeps what was recorded
    writer.wait()  # the last checkpoint is on disk (or its error raised) before anyone reports the end
    stop.settle()  # a signal that comes with the last step is too late: the run is complete
    time_up = stopped_by == TIME_UP
    if time_up or stopped_by == NONFINITE:
        stopped_by = 0  # ends as a finished run, or as a failed one (diverged)
    timer.finish()
    if gpu is not None:
        gpu.stop()
    pacer.finish(progress.global_step)
    nonfinite.flush()
    nonfinite.report(rank.rank, config.nan_policy, stop)  # what the last steps did
    elapsed = time.perf_counter() - start
    stop.barrier()  # every rank leaves after rank 0's last checkpoint is on disk
    telemetry.stop_console()  # the bar's last state stays; what follows goes below it

    stats = timer.stats(config.batch_size)
    if gpu is not None:
        stats["gpu_util_pct"] = gpu.mean_utilisation_pct()
    rank_stats = [None] * rank.world_size
    dist.all_gather_object(rank_stats, stats)
    if rank.is_main:
        if not stopped_by and not diverged:
            path = checkpoint.export_final_model(export_state_dict(model), config.save_dir)
            if not config.quiet:
                telemetry.log(rank.rank, f"Saved the final model to {path}")
        summary = telemetry.summarise(rank_stats, rank.world_size)
        reason = ("loss not finite" if diverged else "stopped by signal" if stopped_by
                  else "duration reached" if time_up else "finished")
        summary.update(exit_reason=reason, wall_s=elapsed,
                       epochs_done=epochs_done, world_size=rank.world_size, device=device_name,
                       torch=torch.__version__, skipped_updates=nonfinite.seen[NonFiniteWatch.SKIPPED],
                       first_nonfinite_loss={"step": diverged[0], "rank": diverged[1]} if diverged else None)
        telemetry.add_mfu(summary, flops_per_image, peak)
        telemetry.write_json(os.path.join(config.save_dir, SUMMARY_NAME), summary)
        if not config.quiet:
            telemetry.summary_table(rank.rank, summary)
    logger.close()
    telemetry.completed_line(rank.rank, elapsed)
    if diverged:
        if rank.is_main:
            print(f"[Rank {rank.rank}] error: the loss was not finite at step {diverged[0]} on rank {diverged[1]} "
                  "(--nan-policy stop); no checkpoint was written after it", file=sys.stderr, flush=True)
        return 1
    return 128 + stopped_by if stopped_by else 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
