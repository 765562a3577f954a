"""Everything that can be refused before a training process starts, checked before anything is created.

A refusal is a UsageError: one line on stderr, exit 2. The save dir is made only
once every check has passed, so a refused job leaves nothing behind.
"""

from __future__ import annotations

import os
import socket

from resnet_ddp.config import Config
from resnet_ddp.core.lineage import (
    FINAL_MODEL_NAME,
    LINEAGE_NAME,
    continued_lineage,
    other_arithmetic,
    recorded_fingerprint,
    resume_candidates,
    would_overwrite,
)
from resnet_ddp.entry import savedir
from resnet_ddp.errors import UsageError


def refuse_what_cannot_run(config: Config, plan) -> None:
    """Every start-up check of this process's share of the job, then the save dir."""
    check_save_dir_can_be_made(config.save_dir)
    check_outputs_can_be_written(config.save_dir)
    if plan.holds_rank_zero:
        check_resume_point(config)
    if plan.holds_rank_zero and config.reporting.tensorboard:
        from resnet_ddp.observe.tensorboard import require_tensorboard

        require_tensorboard()
    if config.reporting.metrics_port is not None and plan.holds_local_rank_zero:
        from resnet_ddp.observe.prometheus import check_can_serve

        check_can_serve(config.reporting.metrics_port)
    if plan.hosts_rendezvous:
        check_port_is_free(plan.master_port, "--master-port" if config.process.master_port else "MASTER_PORT")
    check_memory_fits(config, plan)
    make_save_dir(config.save_dir)
    if plan.holds_rank_zero:  # the process that lives as long as the job's writer
        savedir.lock(config.save_dir)
        savedir.remove_stale_files(config.save_dir)


def check_save_dir_can_be_made(path: str) -> None:
    """The save dir exists and is writable, or can be made: without making it."""
    if os.path.islink(path) and not os.path.exists(path):
        raise UsageError(f"save dir {path!r} is a symbolic link to {os.readlink(path)!r}, which does not exist")
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise UsageError(f"save dir {path!r} cannot be made: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        what = "is not writable" if existing == os.path.abspath(path) else f"cannot be made in {existing}"
        raise UsageError(f"save dir {path!r} {what}: permission denied")


# The files the job writes at the top of the save dir (named here as their torch-importing modules name them).
_OUTPUT_FILES = (LINEAGE_NAME, FINAL_MODEL_NAME, "summary.json", "preflight.json", savedir.LOCK_NAME)


def check_outputs_can_be_written(save_dir: str) -> None:
    """A directory left where the job writes a file (or a file where it keeps its logs) would fail the run late."""
    for name in _OUTPUT_FILES:
        if os.path.isdir(os.path.join(save_dir, name)):
            raise UsageError(f"save dir {save_dir} holds a directory {name}, where the job writes a file: remove it")
    logs = os.path.join(save_dir, "logs")
    if os.path.exists(logs) and not os.path.isdir(logs):
        raise UsageError(f"save dir {save_dir} holds a file logs, where the job keeps its log directory: remove it")


def make_save_dir(path: str) -> None:
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"save dir {path!r} is not writable: {exc.strerror or exc}") from None


def check_port_is_free(port: int, option: str) -> None:
    """The rendezvous port this launcher's rank 0 will listen on: taken now, the job would fail in every rank."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as torch's store binds it
        try:
            sock.bind(("", port))
        except OSError as exc:
            raise UsageError(
                f"{option} {port} cannot be used for the rendezvous on this node "
                f"({exc.strerror or exc}): choose a free port, or leave it out for one"
            ) from None


# Parameters of each architecture without its classifier, and the width of the features the classifier takes.
_BACKBONE_PARAMS = {
    "resnet18": 11_176_512,
    "resnet34": 21_284_672,
    "resnet50": 23_508_032,
    "resnet101": 42_500_160,
    "resnet152": 58_143_808,
    "wide_resnet50_2": 66_834_240,
    "resnext50_32x4d": 22_979_904,
}
_FEATURES = {"resnet18": 512, "resnet34": 512}  # 2048 for the others


def memory_floor_bytes(config: Config) -> int:
    """Bytes a training process needs at the very least: weights and gradients (and momentum), one batch of
    uint8 images and their float copy, and the first convolution's output. The true need is several times
    more; only a job that cannot run even so is refused."""
    arch, classes = config.model.arch, config.training.num_classes
    params = _BACKBONE_PARAMS[arch] + _FEATURES.get(arch, 2048) * classes + classes
    copies = 3 if config.training.momentum else 2
    batch, side = config.training.batch_size, config.model.image_size
    images = batch * 3 * side * side * (1 + 4)
    first_conv = batch * 64 * (side // 2) ** 2 * 4
    return params * 4 * copies + images + first_conv


def check_resume_point(config: Config) -> None:
    """A checkpoint that cannot be resumed is refused here, not found out by a training process.

    A restarted job's save dir says in checkpoints.json what arithmetic its lineage was made with: that is
    read here, and the training process loads the checkpoint. Only an explicit --resume, or a save dir
    without that record, has the checkpoint loaded here, and torch's import with it.
    """
    resume = config.checkpoint.resume
    if resume == "never":
        check_nothing_is_overwritten(config, 0, None)
        return
    if resume == "auto":
        candidates = resume_candidates(config.save_dir)
        if not candidates:
            return
        recorded = recorded_fingerprint(config.save_dir, candidates[0])
        if recorded is not None:
            if recorded != config.fingerprint():
                raise other_arithmetic(candidates[0], recorded, config.fingerprint())
            return
    from resnet_ddp.core import checkpoint

    found = checkpoint.find_resume_point(config.save_dir, resume, config.fingerprint(), report=False)
    if resume != "auto" and found is not None:
        check_nothing_is_overwritten(config, found[1]["global_step"], found[0])


def check_nothing_is_overwritten(config: Config, start_step: int, resumed) -> None:
    """A run that starts afresh, or from a checkpoint other than its line's newest, writes its checkpoints under
    names that earlier runs may have used in the save dir: refused while such files are there."""
    names = would_overwrite(config.save_dir, start_step, continued_lineage(config.save_dir, resumed))
    if names:
        what = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        start = "starts afresh" if resumed is None else f"starts at step {start_step}"
        raise UsageError(
            f"--resume {config.checkpoint.resume} {start}, and the save dir holds {what} of an earlier line that "
            "this run would write over: move them, or use another --save-dir (a restarted job continues with "
            "--resume auto)"
        )


def check_memory_fits(config: Config, plan) -> None:
    """Refuse sizes that cannot fit in this node's memory (CPU processes) or a GPU's (GPU processes)."""
    need = memory_floor_bytes(config)
    if plan.device_type == "cuda":
        smallest = min(plan.own_gpus, key=lambda gpu: gpu.total_memory, default=None)
        if smallest is None:
            return
        have = smallest.total_memory
        where = f"the {_gib(have)} of {smallest.name}"
    else:
        have = _host_memory_bytes() // max(1, plan.nproc)
        where = f"this node's {_gib(have * plan.nproc)} shared by {plan.nproc} processes"
    if have and need > have:
        raise UsageError(
            f"--arch {config.model.arch} with --batch-size {config.training.batch_size}, --image-size "
            f"{config.model.image_size} and --num-classes {config.training.num_classes} needs at least "
            f"{_gib(need)} per process, more than {where}: make them smaller"
        )


def _host_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 0


def _gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"
