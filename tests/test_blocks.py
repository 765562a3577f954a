"""ResNet blocks that hand BatchNorm its residual add and ReLU train as torchvision's own (CPU ranks over gloo)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from steps import compare_steps

from resnet_ddp.core.model import build_model
from resnet_ddp.layers.blocks import FusedBasicBlock, FusedBottleneck, FusedResNet


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_blocks_that_hand_batchnorm_its_relu_train_as_torchvisions(arch):
    """Same losses and weights over two SGD steps of DDP with SyncBatchNorm: basic blocks and bottlenecks."""
    eager, fused = compare_steps("gloo", "fuse_bn_relu", steps=2, arch=arch)
    for rank in range(2):
        torch.testing.assert_close(fused[rank][0], eager[rank][0])
        for a, b in zip(fused[rank][1], eager[rank][1]):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch,block", [("resnet18", FusedBasicBlock), ("resnet50", FusedBottleneck)])
def test_the_fused_model_is_torchvisions_model_with_other_forward_passes(arch, block):
    torch.manual_seed(0)
    stock = torchvision.models.get_model(arch, num_classes=10)
    torch.manual_seed(0)
    fused = build_model(arch, 10, sync_bn=True, fuse_bn_relu=True)
    assert type(fused) is FusedResNet
    assert sum(type(m) is block for m in fused.modules()) == sum(
        len(layer) for layer in (fused.layer1, fused.layer2, fused.layer3, fused.layer4)
    )
    # The same initial weights, under the same names: checkpoints and exports move between the two.
    stock.load_state_dict(fused.state_dict())
    for (name, a), (_, b) in zip(stock.state_dict().items(), fused.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(type(m) is not block for m in build_model(arch, 10, sync_bn=True, fuse_bn_relu=False).modules())
