"""Small CIFAR-style ResNets written as users write them (not torchvision's classes), for the plan tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LambdaLayer(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class ResBlock(nn.Module):
    """Post-activation block; shortcut "A" (strided identity + zero channel padding in a lambda) or "B" (1x1 conv + BN)."""

    def __init__(self, cin: int, cout: int, stride: int = 1, option: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            if option == "A":
                pad = (cout - cin) // 2
                self.shortcut = LambdaLayer(lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, pad, pad)))
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation block: BN and ReLU come before each conv, the shortcut conv reads the pre-activated input."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class CifarResNet(nn.Module):
    def __init__(self, block=ResBlock, num_blocks=(1, 1, 1), num_classes: int = 10, **block_kw):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers, cin = [], 16
        for i, (n, cout) in enumerate(zip(num_blocks, (16, 32, 64))):
            for j in range(n):
                layers.append(block(cin, cout, 2 if (j == 0 and i > 0) else 1, **block_kw))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet_a(num_classes: int = 10) -> nn.Module:
    return CifarResNet(ResBlock, (2, 1, 1), num_classes, option="A")


def resnet_b(num_classes: int = 10) -> nn.Module:
    return CifarResNet(ResBlock, (2, 1, 1), num_classes, option="B")


def preact_resnet(num_classes: int = 10) -> nn.Module:
    return CifarResNet(PreActBlock, (2, 1, 1), num_classes)


class Renamed(ResBlock):
    """The same block under another class name: units must not depend on names."""


def resnet_renamed(num_classes: int = 10) -> nn.Module:
    return CifarResNet(Renamed, (2, 1, 1), num_classes, option="A")
