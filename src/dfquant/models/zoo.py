"""The Fashion-MNIST classifier zoo: small 32x32 networks built from library blocks.

Each architecture reuses the block classes of torchvision/timm (``BasicBlock``,
``InvertedResidual``, timm ``VisionTransformer``) so that the PTQ code sees exactly
the module types it meets on ImageNet models; only widths, depths and strides are
adapted to 32x32 inputs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2
from torchvision.models.resnet import BasicBlock


class CifarResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, sec. 4.2): 3 stages of ``n`` BasicBlocks, 16/32/64 channels."""

    def __init__(self, depth: int = 20, num_classes: int = 10, width: int = 16):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError("CIFAR ResNet depth must be 6n+2")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.inplanes = width
        self.layer1 = self._stage(width, n, 1)
        self.layer2 = self._stage(width * 2, n, 2)
        self.layer3 = self._stage(width * 4, n, 2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width * 4, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        for m in self.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _stage(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(num_classes: int = 10) -> nn.Module:
    return CifarResNet(20, num_classes)


def mobilenetv2(num_classes: int = 10) -> nn.Module:
    """torchvision MobileNetV2 at width 0.5 for 32x32 inputs: stride-2 stem, then 16->8->4 (CPU-trainable)."""
    setting = [[1, 16, 1, 1], [6, 24, 2, 1], [6, 32, 3, 2], [6, 64, 4, 2], [6, 96, 3, 1], [6, 160, 3, 1], [6, 320, 1, 1]]
    return MobileNetV2(num_classes=num_classes, width_mult=0.5, inverted_residual_setting=setting)


def vit(num_classes: int = 10) -> nn.Module:
    """DeiT-tiny-style ViT for 32x32 inputs: patch 4 (64 tokens + cls), dim 96, 6 blocks, 3 heads."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, num_classes=num_classes, embed_dim=96, depth=6, num_heads=3, mlp_ratio=2.0)


ARCHS: dict[str, Callable[..., nn.Module]] = {"resnet20": resnet20, "mobilenetv2": mobilenetv2, "vit": vit}
