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
        x = self.maxpool(self.bn1(self.conv1(x), relu=True))
        # Each block's output feeds the next block twice, its main path and its residual. The block hands it
        # over as two aliases of one tensor, so that their gradients reach its BatchNorm's backward apart and
        # are summed there with the ReLU's mask in one pass (syncbn.py), not first by autograd.
        blocks = [block for layer in (self.layer1, self.layer2, self.layer3, self.layer4) for block in layer]
        residual_x = x
        for block, after in zip(blocks, blocks[1:] + [None]):
            fork = hasattr(block, "forward_pair") and hasattr(after, "forward_pair")
            out = block.forward_pair(x, residual_x, fork) if hasattr(block, "forward_pair") else block(x)
            x, residual_x = out if fork else (out, out)
        return self.fc(torch.flatten(self.avgpool(x), 1))


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
