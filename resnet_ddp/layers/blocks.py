"""torchvision's ResNets with each BatchNorm handed the residual add and ReLU that follow it.

The same modules, parameters, initialisation and maths as torchvision's; only the
forward passes change, so that SyncBatchNorm can apply BatchNorm, add and ReLU in
one pass over the activation on fp32 GPUs (syncbn.py) instead of three. A
state_dict moves freely between the two, and exported models are plain
torchvision ones. The downsample branch now runs before the block's last
BatchNorm instead of after it, since that BatchNorm adds its output, and each
block hands its output to the next as two aliases (main path and residual), so
that the backward sums their gradients inside the ReLU's backward.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import resnet

from resnet_ddp.layers.syncbn import SyncBatchNorm


class FusedBasicBlock(resnet.BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pair(x, x, fork=False)

    def forward_pair(self, x: torch.Tensor, residual_x: torch.Tensor, fork: bool):
        """`x` feeds the main path, `residual_x` (the same values) the residual; `fork`: return the output twice."""
        out = self.conv2(self.bn1(self.conv1(x), relu=True))
        identity = residual_x if self.downsample is None else self.downsample(residual_x)
        return self.bn2(out, residual=identity, relu=True, fork=fork)


class FusedBottleneck(resnet.Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_pair(x, x, fork=False)

    def forward_pair(self, x: torch.Tensor, residual_x: torch.Tensor, fork: bool):
        """`x` feeds the main path, `residual_x` (the same values) the residual; `fork`: return the output twice."""
        out = self.bn1(self.conv1(x), relu=True)
        out = self.conv3(self.bn2(self.conv2(out), relu=True))
        identity = residual_x if self.downsample is None else self.downsample(residual_x)
        return self.bn3(out, residual=identity, relu=True, fork=fork)


class FusedResNet(resnet.ResNet):
    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        return forward_span(self, x, 0, None)


def residual_blocks(model: resnet.ResNet) -> list:
    """A torchvision ResNet's residual blocks in the order they run."""
    return [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]


def forward_span(model: resnet.ResNet, x: torch.Tensor, start: int, stop) -> torch.Tensor:
    """A ResNet's forward over its residual blocks [start, stop): from block 0 the stem first, to the last block
    (stop None) the pooling and classifier after. Consecutive spans make the whole forward, on torchvision's
    ResNets and on ours (compiled in parts: core/model.py)."""
    blocks = residual_blocks(model)
    if start == 0:
        x = model.conv1(x)
        x = model.bn1(x, relu=True) if isinstance(model, FusedResNet) else model.relu(model.bn1(x))
        x = model.maxpool(x)
    span = blocks[start:stop]
    # Each block's output feeds the next block twice, its main path and its residual. Within a span the block
    # hands it over as two aliases of one tensor, so that their gradients reach its BatchNorm's backward apart
    # and are summed there with the ReLU's mask in one pass (syncbn.py), not first by autograd.
    residual_x = x
    for block, after in zip(span, span[1:] + [None]):
        fork = hasattr(block, "forward_pair") and hasattr(after, "forward_pair")
        out = block.forward_pair(x, residual_x, fork) if hasattr(block, "forward_pair") else block(x)
        x, residual_x = out if fork else (out, out)
    if stop is None:
        x = model.fc(torch.flatten(model.avgpool(x), 1))
    return x


# Where a compiled one-process model's parts (core/model.py, CompiledInParts) begin, as shares of the residual
# blocks: ResNet-50's 16 in four parts of 4. A helper process compiles each part (entry/compile_prebuild.py).
PART_STARTS = (0.25, 0.5, 0.75)


def split_points(model: resnet.ResNet) -> tuple:
    """The first residual block of each part after the first."""
    blocks = len(residual_blocks(model))
    return tuple(round(blocks * share) for share in PART_STARTS)


def _part(model: resnet.ResNet, x: torch.Tensor, index: int) -> torch.Tensor:
    bounds = (0, *split_points(model), None)
    return forward_span(model, x, bounds[index], bounds[index + 1])


# One function per part, so that torch.compile keeps a graph of each apart (one function called with its bounds
# as arguments would be compiled again for each part, and then for sizes that vary).
def first_part(model: resnet.ResNet, x: torch.Tensor) -> torch.Tensor:
    return _part(model, x, 0)


def second_part(model: resnet.ResNet, x: torch.Tensor) -> torch.Tensor:
    return _part(model, x, 1)


def third_part(model: resnet.ResNet, x: torch.Tensor) -> torch.Tensor:
    return _part(model, x, 2)


def fourth_part(model: resnet.ResNet, x: torch.Tensor) -> torch.Tensor:
    return _part(model, x, 3)


PARTS = (first_part, second_part, third_part, fourth_part)


_FUSED = {resnet.BasicBlock: FusedBasicBlock, resnet.Bottleneck: FusedBottleneck, resnet.ResNet: FusedResNet}


def hand_relu_to_batchnorm(model: nn.Module) -> nn.Module:
    """Switch a converted torchvision ResNet's blocks to the forward passes above, in place.

    Only modules of exactly torchvision's classes whose BatchNorms are all
    SyncBatchNorm (convert_sync_batchnorm) switch; anything else keeps its own
    forward.
    """
    for module in model.modules():
        fused = _FUSED.get(type(module))
        norms = [child for name, child in module.named_children() if name.startswith("bn")]
        if fused is not None and norms and all(isinstance(norm, SyncBatchNorm) for norm in norms):
            module.__class__ = fused
    return model
