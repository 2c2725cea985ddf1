"""Wide residual networks WRN-d-k of Zagoruyko & Komodakis (2016), for CIFAR-sized images.

Depth :math:`d = 6n + 4`, widening factor :math:`k`: a 3x3 stem with 16 channels and three
stages of :math:`n` pre-activation blocks (BN-ReLU-conv, optional dropout between the two
convolutions) with :math:`16k`, :math:`32k`, :math:`64k` channels; 1x1 convolution shortcuts
where the shape changes.  WRN-28-10 has 36.5M parameters, WRN-16-4 2.7M.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .resnet_cifar import _init

__all__ = ["WideResNet", "wide_resnet"]


class WideBlock(nn.Module):
    """Pre-activation wide basic block; input ``(N, in, H, W)``, output ``(N, out, H/s, W/s)``."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (None if stride == 1 and in_planes == planes
                         else nn.Conv2d(in_planes, planes, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        # the shortcut of a shape-changing block sees the pre-activated input, as in the paper
        sc = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = F.relu(self.bn2(o))
        if self.dropout > 0:
            o = F.dropout(o, p=self.dropout, training=self.training)
        return self.conv2(o) + sc


class WideResNet(nn.Module):
    """WRN-``depth``-``k``; input ``(N, in_channels, H, W)``, logits ``(N, num_classes)``."""

    def __init__(self, depth: int, k: int, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0):
        super().__init__()
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        if k < 1:
            raise ValueError(f"WRN widening factor must be >= 1, got {k}")
        n = (depth - 4) // 6
        widths = [16, 16 * k, 32 * k, 64 * k]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        in_planes = widths[0]
        for i in range(3):
            blocks = []
            for j in range(n):
                blocks.append(WideBlock(in_planes, widths[i + 1],
                                        2 if (i > 0 and j == 0) else 1, dropout))
                in_planes = widths[i + 1]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        _init(self, linear_weight=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def wide_resnet(depth: int, k: int, num_classes: int = 10, in_channels: int = 3,
                dropout: float = 0.0) -> WideResNet:
    """WRN-``depth``-``k`` (e.g. ``wide_resnet(28, 10)``)."""
    return WideResNet(depth, k, num_classes, in_channels, dropout)
