"""torchvision's ResNets with each BatchNorm handed the residual add and ReLU that follow it.

The same modules, parameters, initialisation and maths as torchvision's; only the
forward passes change, so that SyncBatchNorm can apply BatchNorm, add and ReLU in
one pass over the activation on fp32 GPUs (syncbn.py) instead of three. A
state_dict moves freely between the two, and exported models are plain
torchvision ones. The downsample branch now runs before the block's last
BatchNorm instead of after it, since that BatchNorm adds its output.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torchvision.models import resnet

from resnet_ddp.syncbn import SyncBatchNorm


class FusedBasicBlock(resnet.BasicBlock):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.bn1(self.conv1(x), relu=True))
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn2(out, residual=identity, relu=True)


class FusedBottleneck(resnet.Bottleneck):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn1(self.conv1(x), relu=True)
        out = self.conv3(self.bn2(self.conv2(out), relu=True))
        identity = x if self.downsample is None else self.downsample(x)
        return self.bn3(out, residual=identity, relu=True)


class FusedResNet(resnet.ResNet):
    def _forward_impl(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.bn1(self.conv1(x), relu=True))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
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
