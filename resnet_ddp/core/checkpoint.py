"""Checkpoints and the final model: when to save, what a checkpoint holds, which one to resume from, pruning.

A checkpoint is <save-dir>/checkpoint-<global step>.pt, written atomically by
rank 0 in the background (core/checkpoint_writer.py). <save-dir>/checkpoints.json
names the run's lineage, newest first: the checkpoints this run and the runs it
resumed from wrote, in the order they were written. Resuming and pruning follow the
lineage, not the step numbers, because step numbers do not grow along it when a run
resumes with another world size or batch size (it redoes the interrupted epoch) or
from an older checkpoint named by --resume: a checkpoint of another lineage is
never resumed from by `auto` while the lineage has one, and never pruned.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist

from resnet_ddp.config import CheckpointConfig
from resnet_ddp.core import distributed, phases
from resnet_ddp.core.callbacks import Callback
from resnet_ddp.core.checkpoint_writer import CheckpointWriter
from resnet_ddp.core.files import root_cause, save_atomically, write_json
from resnet_ddp.core.lineage import (
    FINAL_MODEL_NAME,
    LINEAGE_NAME,
    checkpoint_path,
    continued_lineage,
    other_arithmetic,
    resume_candidates,
)
from resnet_ddp.core.progress import Progress, TrainState
from resnet_ddp.errors import CheckpointWriteError, UsageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

# Why the loop asks for a checkpoint.
INTERVAL = "interval"  # after a step: saved if --checkpoint-every says so
EPOCH_END = "epoch end"  # after an epoch (or after the run's last step, inside an epoch)
STOP = "stop"  # an agreed stop: a signal, --duration, a non-finite loss


def load_checkpoint(path: str) -> dict:
    with warnings.catch_warnings():  # torch's remarks on a file that is no checkpoint: the caller says it in one line
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except TypeError:  # torch < 1.13 has no weights_only
            return torch.load(path, map_location="cpu")


def find_resume_point(save_dir: str, resume: str, fingerprint: dict, report: bool = True) -> Optional[Tuple[str, dict]]:
    """The checkpoint to continue from, loaded, or None to start afresh.

    auto: the newest checkpoint of the lineage that loads; an unreadable one is
    reported and the one before it tried. A checkpoint made with other arithmetic
    options is refused (UsageError), not loaded and not overwritten.
    """
    if resume == "never":
        return None
    candidates = [resume] if resume != "auto" else resume_candidates(save_dir)
    for path in candidates:
        try:
            state = load_checkpoint(path)
            state["global_step"]  # a file torch can read but that is no checkpoint of ours
        except Exception as exc:  # truncated, corrupt, or not ours
            if resume != "auto":
                raise UsageError(
                    f"--resume {path}: not a readable checkpoint of this program ({type(exc).__name__})"
                ) from None
            if report:
                log.warning(f"checkpoint {path} is unreadable ({type(exc).__name__}); trying the one before it")
            continue
        if state.get("fingerprint") != fingerprint:
            raise other_arithmetic(path, state.get("fingerprint") or {}, fingerprint)
        return path, state
    return None


def export_final_model(state_dict: dict, save_dir: str) -> str:
    """model_final.pth: a plain state_dict that torchvision's model loads as is."""
    path = os.path.join(save_dir, FINAL_MODEL_NAME)
    try:
        save_atomically(state_dict, path)
    except Exception as exc:  # torch.save wraps the disk's OSError in a RuntimeError
        raise CheckpointWriteError(f"could not write the final model {path}: {root_cause(exc)}") from exc
    return path


class Resumed(NamedTuple):
    """Where a run continues: its progress, the lineage it continues (names, newest first; rank 0 only), and the
    step whose checkpoint is already on disk as it is (None where the resumed one is of another layout)."""

    progress: Progress
    lineage: List[str]
    saved_step: Optional[int]


def resume(
    config: CheckpointConfig,
    save_dir: str,
    rank: distributed.RankInfo,
    fingerprint: dict,
    layout: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler,
) -> Resumed:
    """Rank 0 picks and loads the checkpoint; every rank gets its state by broadcast (save dirs may be
    node-local) and loads it into `model` (the bare module), `optimizer`, `scaler` and the RNGs."""
    found = find_resume_point(save_dir, config.resume, fingerprint) if rank.is_main else None
    lineage = continued_lineage(save_dir, found[0] if found else None) if rank.is_main else []
    box = [found]
    dist.broadcast_object_list(box, src=0)
    if box[0] is None:
        return Resumed(Progress(), lineage, None)
    path, state = box[0]
    model.load_state_dict(state["model"])
    changed = _load_optimizer(optimizer, state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["torch"])
    if rank.device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"], rank.device)
    same_layout = state["layout"] == layout
    loss_sum = state["epoch_loss_sums"][rank.rank] if same_layout else 0.0
    progress = Progress(state["epoch"], state["step_in_epoch"], state["global_step"], loss_sum)
    if not same_layout and progress.step_in_epoch:
        # Another world size or batch size maps steps to other samples: redo the epoch from its start.
        progress.global_step -= progress.step_in_epoch
        progress.step_in_epoch, progress.epoch_loss_sum = 0, 0.0
    if rank.is_main:
        log.info(
            f"resuming from {path}: epoch {progress.epoch}, step {progress.step_in_epoch} of the epoch, "
            f"{progress.global_step} steps done"
        )
        if changed:
            log.warning(f"resuming with {changed}: this run's options apply")
    return Resumed(progress, lineage, state["global_step"] if same_layout else None)


def _load_optimizer(optimizer: torch.optim.Optimizer, saved: dict) -> str:
    """Load the optimizer's state, keeping this run's --lr, --momentum and --weight-decay; returns what differs
    from the checkpoint's, in words ('' if nothing)."""
    wanted = [{key: group[key] for key in ("lr", "momentum", "weight_decay")} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved)
    changes = []
    for group, values in zip(optimizer.param_groups, wanted):
        for key, value in values.items():
            if group[key] != value:
                changes.append(f"--{key.replace('_', '-')} {value:g} (the checkpoint trained with {group[key]:g})")
                group[key] = value
    return ", ".join(dict.fromkeys(changes))


class CheckpointManager(Callback):
    """Every checkpoint decision after the resume: the interval rule, saving on stop and at epoch ends, not saving
    twice, nothing saved after a non-finite loss under --nan-policy stop, pruning along the lineage, the background
    writer's life and the final model.

    Every rank calls `maybe_save` at the same steps (it gathers each rank's epoch loss); rank 0 writes.
    """

    def __init__(
        self,
        config: CheckpointConfig,
        save_dir: str,
        rank: distributed.RankInfo,
        resumed: Resumed,
        fingerprint: dict,
        layout: dict,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scaler,
        export_model: Callable[[], dict],
        first_bad_step: torch.Tensor,
        stop_on_nonfinite: bool,
        record: Callable[[dict], None],
    ):
        """`model` is the bare module; `export_model()` gives model_final.pth's state_dict; `first_bad_step` is
        the device tensor where the step notes this rank's first non-finite loss (0: none)."""
        self.config, self.save_dir, self.rank = config, save_dir, rank
        self.fingerprint, self.layout = fingerprint, layout
        self.model, self.optimizer, self.scaler, self.export_model = model, optimizer, scaler, export_model
        self.first_bad_step, self.stop_on_nonfinite = first_bad_step, stop_on_nonfinite
        self.record = record
        self.diverged: Optional[Tuple[int, int]] = None  # (step, rank) of the first non-finite loss, under stop
        self.lineage = list(resumed.lineage)  # names, newest first (rank 0)
        self._saved_step = resumed.saved_step
        self._writer = CheckpointWriter(self._write, self._written) if rank.is_main else None
        if self._writer is not None:
            self._writer.reserve({"model": model.state_dict(), "optimizer": optimizer.state_dict()})

    # Saving

    def maybe_save(self, state: TrainState, why: str) -> None:
        """Called by every rank at the same step. INTERVAL saves only on a --checkpoint-every step inside an
        epoch (an epoch's last step is saved as its end); EPOCH_END and STOP always save, once per step."""
        if why == INTERVAL:
            every = self.config.every
            if not every or state.global_step % every or state.epoch_complete:
                return
        if state.global_step == self._saved_step:
            return  # --max-steps ending on a --checkpoint-every step, or a stop before any step: already written
        # One small collective read from the device: each rank's epoch loss and first non-finite step.
        row = torch.stack([state.loss_sum.double(), self.first_bad_step.double()])
        gathered = distributed.gather_rows(row)
        bad = sorted((int(bad_step), r) for r, (_, bad_step) in enumerate(gathered) if bad_step)
        if bad and self.stop_on_nonfinite:
            # A restart would resume from those weights: the newest checkpoint stays the last good one.
            self.diverged = self.diverged or bad[0]
            return
        self._saved_step = state.global_step
        if self._writer is not None:
            progress = state.progress()
            self._writer.submit(self._state(progress, [loss for loss, _ in gathered]), time.perf_counter())

    def _state(self, progress: Progress, loss_sums: List[float]) -> dict:
        device = self.rank.device
        return {
            # References to the live tensors: the writer makes the one host copy (CheckpointWriter.submit).
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": progress.epoch,
            "step_in_epoch": progress.step_in_epoch,
            "global_step": progress.global_step,
            "epoch_loss_sums": loss_sums,  # one per rank
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            },
            "fingerprint": self.fingerprint,
            "layout": self.layout,
            "format": FORMAT_VERSION,
        }

    def _write(self, state: dict) -> dict:
        """In the writer's thread: the file, the lineage, then pruning. A failed write leaves the previous
        checkpoints as they were.

        A kill at any instant leaves checkpoints.json naming every checkpoint of the line on disk: it names the
        new one before the file takes its name, and drops the pruned ones only once they are gone. It may name
        a file that is not there (a resume passes over it); a checkpoint it does not name is another line's,
        which a restart would neither resume from nor write over.
        """
        path = checkpoint_path(self.save_dir, state["global_step"])
        name = os.path.basename(path)
        lineage = [name] + [n for n in self.lineage if n != name]

        def record_before_naming() -> None:
            self._record_lineage(lineage)
            phases.reached("checkpoint recorded")

        try:
            save_atomically(state, path, before_rename=record_before_naming)
        except Exception as exc:  # torch.save wraps the disk's OSError in a RuntimeError
            kept = "the previous checkpoints are intact" if self.lineage else "no checkpoint was written before it"
            raise CheckpointWriteError(f"could not write checkpoint {path}: {root_cause(exc)}; {kept}") from exc
        phases.reached("checkpoint written")
        self.lineage, pruned = lineage[: self.config.keep], lineage[self.config.keep :]
        for old in pruned:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.save_dir, old))
        if pruned:
            with contextlib.suppress(OSError):  # a record still naming a pruned file is harmless; the next corrects it
                self._record_lineage(self.lineage)
        return {"global_step": state["global_step"], "path": path, "bytes": os.path.getsize(path)}

    def _record_lineage(self, newest_first: List[str]) -> None:
        write_json(
            os.path.join(self.save_dir, LINEAGE_NAME), {"newest_first": newest_first, "fingerprint": self.fingerprint}
        )

    def _written(self, figures: dict) -> None:
        """Once a checkpoint is on disk: its write time is what a preemption's grace period must cover."""
        self.record({"kind": "checkpoint", **figures})
        on_gpu = f" + {figures['gpu_copy_s'] * 1000:.1f} ms of copy on the GPU" if "gpu_copy_s" in figures else ""
        log.info(
            f"saved {figures['path']} ({figures['bytes'] / 2**20:.0f} MiB in {figures['write_s']:.2f} s, "
            f"training held {figures['training_held_s']:.3f} s{on_gpu})"
        )

    def wait_for_writes(self) -> None:
        """The checkpoint under way is on disk (or its error raised)."""
        if self._writer is not None:
            self._writer.wait()

    def on_end(self, state, outcome) -> None:
        """The last checkpoint on disk before anyone reports the end; then, rank 0, the final model."""
        self.wait_for_writes()
        if outcome.exports_model and self.rank.is_main:
            path = export_final_model(self.export_model(), self.save_dir)
            log.info(f"Saved the final model to {path}")
