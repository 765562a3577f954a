"""--tensorboard: the step and epoch records as scalars in <save-dir>/tensorboard, written by rank 0."""

from __future__ import annotations

import os

from resnet_ddp.errors import UsageError

TENSORBOARD_DIR = "tensorboard"


def require_tensorboard() -> None:
    """--tensorboard without TensorBoard installed: refused at start-up rather than failing in rank 0."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UsageError(
            "--tensorboard needs TensorBoard, which is not installed: "
            "pip install 'resnet-ddp[tensorboard]' (or pip install tensorboard)"
        ) from None


# (record key, TensorBoard tag) for step records
_TENSORBOARD_STEP_SCALARS = (
    ("loss", "train/loss"),
    ("job_img_s", "train/img_s"),
    ("img_s", "train/img_s_rank0"),
    ("step_ms", "train/step_ms"),
    ("data_wait_frac", "train/data_wait_frac"),
    ("epoch", "train/epoch"),
    ("mfu", "train/mfu"),
    ("mem_gib", "memory/gpu_allocated_gib"),
    ("peak_mem_gib", "memory/gpu_peak_gib"),
    ("rss_gib", "memory/host_rss_gib"),
    ("gpu_util_pct", "gpu/util_pct"),
    ("gpu_mem_used_gib", "gpu/mem_used_gib"),
    ("gpu_power_w", "gpu/power_w"),
    ("gpu_temp_c", "gpu/temp_c"),
)


class TensorBoardWriter:
    """A StepLogger sink on rank 0: the step and epoch records as scalars in <save-dir>/tensorboard."""

    def __init__(self, save_dir: str, steps_done: int):
        from torch.utils.tensorboard import SummaryWriter

        # After a resume, purge_step makes TensorBoard drop what the interrupted run logged past the checkpoint:
        # from the first step this run will log again, not the checkpoint's own, which it never logs again.
        purge_step = steps_done + 1 if steps_done else None
        self._writer = SummaryWriter(os.path.join(save_dir, TENSORBOARD_DIR), purge_step=purge_step)

    def write(self, record: dict) -> None:
        step, when = record["global_step"], record["time"]
        if record["kind"] == "step":
            pairs = _TENSORBOARD_STEP_SCALARS
        else:
            pairs = (("avg_loss", "epoch/avg_loss_rank0"), ("global_avg_loss", "epoch/global_avg_loss"))
        for key, tag in pairs:
            value = record.get(key)
            if value is not None:
                self._writer.add_scalar(tag, value, step, walltime=when)

    def close(self) -> None:
        self._writer.close()
