"""Networks for the deep-learning problems, written here (no torchvision).

Registry ``NETWORKS``: name -> constructor(num_classes, in_channels). The CIFAR variants follow the
layouts of kuangliu/pytorch-cifar (ResNet-18, VGG-16 with batch norm) and Zagoruyko & Komodakis (WRN-16-4).
"""

from __future__ import annotations

from torch import nn

from .cifar import ResNet18, SmallCNN, VGG16, WideResNet


def wrn16_4(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WideResNet(depth=16, widen=4, num_classes=num_classes, in_channels=in_channels)


NETWORKS = {
    "resnet18": ResNet18,
    "vgg16": VGG16,
    "wrn16_4": wrn16_4,
    "small_cnn": SmallCNN,
}


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
