"""Building the torchvision model, SyncBatchNorm, DDP wrapping, and unwrapping for export."""

from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Callable, Optional

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from resnet_ddp.config import Config
from resnet_ddp.core.distributed import RankInfo
from resnet_ddp.layers.syncbn import convert_sync_batchnorm

log = logging.getLogger(__name__)

_DDP_PARAMETERS = inspect.signature(DistributedDataParallel.__init__).parameters


def build_model(arch: str, num_classes: int, sync_bn: bool, fuse_bn_relu: bool = False) -> nn.Module:
    """A randomly initialised torchvision model: weights=None, so never a download.

    fuse_bn_relu: SyncBatchNorm applies the residual add and ReLU after it (blocks.py).
    """
    model = _torchvision_model(arch, num_classes)
    if sync_bn:
        model = convert_sync_batchnorm(model)
        if fuse_bn_relu:
            from resnet_ddp.layers.blocks import (
                hand_relu_to_batchnorm,  # imports torchvision, as _torchvision_model did
            )

            model = hand_relu_to_batchnorm(model)
    return model


def job_model(config: Config) -> nn.Module:
    """The model a job trains, in its memory layout, on the host: its ranks and its compile helpers
    (entry/compile_prebuild.py) build it here alike, so that their compiled graphs match."""
    model = build_model(config.model.arch, config.training.num_classes, config.model.sync_bn, config.model.fuse_bn_relu)
    return model.to(memory_format=torch.channels_last) if config.speed.channels_last else model


def _torchvision_model(arch: str, num_classes: int) -> nn.Module:
    # Imported here: torchvision takes over a second to import, and the launcher never builds a model.
    import torchvision

    return getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)


def wrap_ddp(
    model: nn.Module, rank: RankInfo, sync_bn: bool, stream: Optional[torch.cuda.Stream] = None
) -> DistributedDataParallel:
    """DDP over the job's process group, built on `stream` when the step will be graph-captured.

    DDP keeps the gradient-accumulation nodes it makes here; the warm-up steps
    before capture must run on this same stream, or autograd synchronises
    between streams (and warns that capture may break).
    """
    model = model.to(rank.device)
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        ddp = _ddp(model, rank, sync_bn)
    if stream is not None:
        torch.cuda.current_stream(rank.device).wait_stream(stream)
    return ddp


def compile_model(model: nn.Module, processes: int, before_part: Callable[[int], None]) -> nn.Module:
    """`model` compiled; what the step calls.

    One process compiles a ResNet in parts (CompiledInParts), so that helper processes can compile the parts
    while the process starts (entry/compile_prebuild.py); `before_part(index)` runs once, before that part's
    first call.
    """
    if processes == 1:
        # dynamo splits a DDP model's graph at its gradient buckets so that their all-reduces overlap the
        # backward; one process has nothing to overlap. Whole, a graph is one that AOTAutograd's cache keeps
        # (it never keeps split ones), and a restart loads the compiled step instead of tracing it again.
        settle_compile_for_one_process()
        module = unwrap(model)
        if CompiledInParts.fits(module):
            module.forward = CompiledInParts(module, before_part)
            return model  # DDP's forward calls the module's, now the compiled parts
    return torch.compile(model)


def settle_compile_for_one_process() -> None:
    """What a compile of a one-process job sets, in its rank and in the helpers that compile beside it alike."""
    import torch._dynamo

    torch._dynamo.config.optimize_ddp = False


class CompiledInParts:
    """A torchvision ResNet's forward as consecutive parts (layers/blocks.py, PARTS), each compiled on its own.

    Compiling takes tens of seconds of one thread. In parts, helper processes compile them beside the rank while
    it starts (entry/compile_prebuild.py), and the rank loads theirs from the compile cache. A boundary costs
    only the fusion of one block's output into the next block's first kernels.
    """

    def __init__(self, module: nn.Module, before_part: Callable[[int], None] = lambda index: None):
        from resnet_ddp.layers import blocks  # imports torchvision, as build_model did

        self.module = module
        self.parts = [torch.compile(part) for part in blocks.PARTS]
        self._before_part: Optional[Callable[[int], None]] = before_part

    @staticmethod
    def fits(module: nn.Module) -> bool:
        from torchvision.models import ResNet

        return isinstance(module, ResNet)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._before_part is not None:
            return self._first_call(x)
        for part in self.parts:
            x = part(self.module, x)
        return x

    def _first_call(self, x: torch.Tensor) -> torch.Tensor:
        before_part, self._before_part = self._before_part, None
        loaded_before = _compiled_graphs_loaded()
        for index, part in enumerate(self.parts):
            before_part(index)
            x = part(self.module, x)
        loaded = _compiled_graphs_loaded() - loaded_before
        log.debug(f"the compiled model's parts: {loaded} of {len(self.parts)} loaded from the cache")
        return x

    def compiling_one_part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Part `index`'s output, compiled, from the parts before it run without autograd: what a helper runs.
        None of those parts' activations stay on the GPU the rank is starting on; the part's input requires
        grad, as the rank's does."""
        from resnet_ddp.layers import blocks

        with torch.no_grad():
            for part in blocks.PARTS[:index]:
                x = part(self.module, x)
        return self.parts[index](self.module, x.requires_grad_(index > 0))


def _compiled_graphs_loaded() -> int:
    """How many compiled graphs this process has loaded from AOTAutograd's cache (torch's own count)."""
    from torch._dynamo.utils import counters

    return counters["aot_autograd"]["autograd_cache_hit"]


def _ddp(model: nn.Module, rank: RankInfo, sync_bn: bool) -> DistributedDataParallel:
    device_ids = [rank.device.index] if rank.device.type == "cuda" else None
    # With SyncBN the running statistics are already identical on every rank,
    # so DDP's per-step broadcast of buffers from rank 0 would only cost time.
    # Newer torch renamed the option (the old name warns); both sync once at start.
    name = "forward_sync_buffers" if "forward_sync_buffers" in _DDP_PARAMETERS else "broadcast_buffers"
    # Gradients as views into DDP's all-reduce buckets: DDP then does not copy every gradient back out of
    # its bucket after each all-reduce (161 copies a ResNet-50 step).
    return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True, **{name: not sync_bn})


def unwrap(model: nn.Module) -> nn.Module:
    """The bare torchvision module under DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def export_state_dict(model: nn.Module) -> dict:
    """A plain state_dict that torchvision.models.<arch>(num_classes=N) loads as is."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in unwrap(model).state_dict().items()}


def train_flops_per_image(arch: str, num_classes: int, image_size: int) -> Optional[float]:
    """Forward FLOPs of one image, counted on a meta-device copy, times 3 for forward and backward."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):
            model = _torchvision_model(arch, num_classes).eval()
            with FlopCounterMode(display=False) as counter:
                model(torch.empty(1, 3, image_size, image_size))
        return 3.0 * counter.get_total_flops()
    except Exception:  # an old torch without the counter or meta support: no MFU, training goes on
        return None
