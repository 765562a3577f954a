"""resnet-ddp: a distributed ResNet training workload for testing GPU clusters."""

__version__ = "0.1.0"
