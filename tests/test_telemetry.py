"""What the job reports while it runs: step lines, metrics.jsonl, --quiet, MFU's FLOP count."""

from __future__ import annotations

import json
import math
import re

from conftest import TINY, run_train
from test_training import DONE_LINE, EPOCH_LINE

STEP_LINE = re.compile(r"^\[Rank (\d)\] epoch (\d+) step (\d+)/4 \((\d+)/8\) \| loss (\d+\.\d{4}) \| (\d+) img/s", re.M)


def test_step_lines_and_metrics_file(save_dir):
    result = run_train(*TINY, "--log-interval", "2", "--save-dir", str(save_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = STEP_LINE.findall(result.stdout)
    assert sorted((rank, int(g)) for rank, _, _, g, _, _ in lines) == [(r, g) for r in "01" for g in (2, 4, 6, 8)]
    assert "(job " in result.stdout and "ETA " in result.stdout
    records = [json.loads(line) for line in (save_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert len(steps) == 8 and len(epochs) == 4  # 2 ranks x (4 step records, 2 epochs)
    for record in steps:
        assert {"time", "rank", "epoch", "step", "global_step", "loss", "img_s", "job_img_s", "step_ms",
                "data_wait_frac", "eta_s"} <= record.keys()
        assert math.isfinite(record["loss"]) and record["img_s"] > 0 and 0 <= record["data_wait_frac"] <= 1
    # each epoch record carries the value of the seed's line for that rank
    printed = {(rank, int(epoch)): float(loss) for rank, epoch, loss in EPOCH_LINE.findall(result.stdout)}
    assert {(str(r["rank"]), r["epoch"]): round(r["avg_loss"], 4) for r in epochs} == printed


def test_quiet_prints_only_the_seeds_lines(save_dir):
    result = run_train(*TINY, "--quiet", "--log-interval", "1", "--save-dir", str(save_dir))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines and all(EPOCH_LINE.match(line) or DONE_LINE.match(line) for line in lines), lines
    assert (save_dir / "logs" / "metrics.jsonl").stat().st_size > 0  # the file is still written


def test_mfu_counts_the_flops_of_a_training_image():
    from resnet_ddp.model import train_flops_per_image
    from resnet_ddp.telemetry import assumed_peak_tflops

    # ResNet-50 at 224 px: 4.1 GMAC forward, so about 24.5 GFLOP forward and backward
    assert abs(train_flops_per_image("resnet50", 100, 224) / 24.5e9 - 1) < 0.02
    assert assumed_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == (989.4, "bf16")
    assert assumed_peak_tflops("NVIDIA H100 80GB HBM3", "off") == (494.7, "tf32")
    assert assumed_peak_tflops("Some Future GPU", "bf16") is None


def test_a_nan_loss_is_written_as_null(tmp_path):
    from resnet_ddp.telemetry import StepLogger
    import torch

    path = tmp_path / "logs" / "metrics.jsonl"
    logger = StepLogger(0, 1, torch.device("cpu"), 8, 10, str(path), 1, 10.0, True, None, None)
    logger.after_step(1, 1, 1, 10, torch.tensor(float("nan")), 0.0)
    logger.close()
    (record,) = [json.loads(line) for line in path.read_text().splitlines()]
    assert record["loss"] is None and record["global_step"] == 1
