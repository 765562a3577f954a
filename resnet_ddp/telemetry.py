"""What the job tells people: per-rank console lines in the seed's format."""

from __future__ import annotations

import sys


def log(rank: int, message: str) -> None:
    # One write per line, so that lines from ranks sharing a terminal do not interleave.
    sys.stdout.write(f"[Rank {rank}] {message}\n")
    sys.stdout.flush()


def epoch_line(rank: int, epoch: int, avg_loss: float) -> None:
    # The seed's format, kept exactly: log parsers depend on it.
    log(rank, f"Epoch {epoch:3d} - Avg Loss: {avg_loss:.4f}")


def global_epoch_line(rank: int, epoch: int, avg_loss: float, world_size: int) -> None:
    log(rank, f"Epoch {epoch:3d} - Global Avg Loss: {avg_loss:.4f} ({world_size} ranks)")


def completed_line(rank: int, seconds: float) -> None:
    log(rank, f"Training completed in {seconds:.2f} seconds")
