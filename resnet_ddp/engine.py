"""The training loop: one step, one epoch. No host sync inside either."""

from __future__ import annotations

from typing import Iterable, Tuple

import torch
import torch.nn as nn

from resnet_ddp.data import to_model_input
from resnet_ddp.scenarios import FaultInjector


def train_step(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
               images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    loss = criterion(model(images), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def train_epoch(model: nn.Module, loader: Iterable, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                device: torch.device, faults: FaultInjector, first_step: int) -> Tuple[torch.Tensor, int]:
    """Run one epoch; return the summed loss (still on the device) and the number of steps."""
    loss_sum = torch.zeros((), device=device)
    steps = 0
    for images, labels in loader:
        faults.before_step(first_step + steps)
        images = to_model_input(images, device)
        labels = labels.to(device, non_blocking=True)
        loss_sum += train_step(model, criterion, optimizer, images, labels)
        steps += 1
    return loss_sum, steps
