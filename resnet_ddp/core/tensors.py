"""Helpers over lists of tensors, shared by the training step and the checkpoint writer."""

from __future__ import annotations

from typing import List

import torch


def copy_all(destinations: List[torch.Tensor], sources: List[torch.Tensor]) -> None:
    """destination.copy_(source) for each pair, in one fused launch where this torch has one."""
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(destinations, sources)
    else:
        for destination, source in zip(destinations, sources):
            destination.copy_(source)
