"""The training step. No host sync inside it.

A step takes a batch of uint8 images (on the host or the device) and labels and
returns the loss as a device tensor. `EagerStep` runs it op by op;
`GraphedStep` captures the whole step (normalisation, forward, backward with
DDP's and SyncBatchNorm's collectives, optimizer) in one CUDA graph and replays
it, which removes the per-kernel and per-collective launch cost that otherwise
leaves the GPUs waiting on Python.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
import torch.nn as nn

from resnet_ddp.core.data import normalise
from resnet_ddp.core.nonfinite import NonFiniteWatch

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class EagerStep:
    def __init__(
        self,
        model: nn.Module,
        criterion: nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        amp: str = "off",
        channels_last: bool = False,
        nonfinite: Optional[NonFiniteWatch] = None,
        loss_poison: Optional[torch.Tensor] = None,
        scaler=None,
    ):
        """`scaler`: fp16's gradient scaler (one is made for --amp fp16 if none is given)."""
        self.model = model
        self.criterion = criterion
        self.optimizer = optimizer
        self.device = device
        self.channels_last = channels_last
        self.amp_dtype = AMP_DTYPES.get(amp)
        self.scaler = scaler if scaler is not None else make_scaler(amp, device)
        self.nonfinite = nonfinite  # counts non-finite losses; with --nan-policy skip, undoes their updates
        self.loss_poison = loss_poison  # --fail-mode nan: multiplies the loss (NaN at the chosen step)

    def compute(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The step on device tensors: everything here can be captured in a CUDA graph (but the scaler)."""
        x = normalise(images, self.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        )
        with autocast:
            loss = self.criterion(self.model(x), labels)
        if self.loss_poison is not None:
            loss = loss * self.loss_poison
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
        if self.nonfinite is None:
            self._update()
        else:
            self.nonfinite.observe_loss(loss.detach())
            self.nonfinite.update(self._update)
        return loss.detach()

    def _update(self) -> None:
        if self.scaler is None:
            self.optimizer.step()
        else:  # the scaler skips an update whose gradients are not finite by itself
            self.scaler.step(self.optimizer)
            self.scaler.update()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.compute(images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True))


def make_scaler(amp: str, device: torch.device):
    """fp16's gradient scaler, or None for the other precisions."""
    if amp != "fp16":
        return None
    if hasattr(torch, "amp") and hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device.type)
    return torch.cuda.amp.GradScaler()  # torch < 2.3


class GraphedStep:
    """Runs the first steps eagerly on a side stream, then captures one step and replays it.

    The warm-up steps are real training steps on real batches (DDP needs about
    ten before its buckets settle and capture is safe), so the arithmetic is
    exactly that of eager training. Every batch has the same shape (the sampler
    pads epochs to whole batches), so one graph serves the whole run.
    """

    WARMUP_STEPS = 11

    def __init__(self, eager: EagerStep, side_stream: torch.cuda.Stream):
        """`side_stream` is the stream DDP was built on (see model.wrap_ddp)."""
        self.eager = eager
        self.device = eager.device
        self.side_stream = side_stream
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.eager_steps = 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.graph is not None:
            self.static_images.copy_(images, non_blocking=True)
            self.static_labels.copy_(labels, non_blocking=True)
            self.graph.replay()
            return self.static_loss
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        if self.eager_steps >= self.WARMUP_STEPS:
            return self._capture(images, labels)
        self.eager_steps += 1
        current = torch.cuda.current_stream(self.device)
        self.side_stream.wait_stream(current)
        with torch.cuda.stream(self.side_stream):
            loss = self.eager.compute(images, labels)
        current.wait_stream(self.side_stream)
        return loss

    def _capture(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # Own copies: the caller may reuse its buffers for the next batch.
        self.static_images, self.static_labels = images.clone(), labels.clone()
        self.graph = torch.cuda.CUDAGraph()
        # Gradients are then allocated inside the graph's memory pool, and rewritten by every replay.
        self.eager.optimizer.zero_grad(set_to_none=True)
        # Captured on the side stream DDP was built on and the warm-up ran on: autograd's
        # gradient-accumulation nodes keep that stream, and any other would make them
        # synchronise between streams (torch warns of it). thread_local: the DataLoader's
        # pin-memory thread may allocate while we capture.
        with torch.cuda.graph(self.graph, stream=self.side_stream, capture_error_mode="thread_local"):
            self.static_loss = self.eager.compute(self.static_images, self.static_labels)
        self.graph.replay()  # capturing does not run the step: run it for this batch
        return self.static_loss
