"""CIFAR ResNets of He et al. (2016), "Deep Residual Learning for Image Recognition", sec. 4.2.

Depth :math:`6n + 2`: a 3x3 stem convolution with 16 channels, three stages of :math:`n` basic
blocks with 16, 32 and 64 channels (the first block of stages 2 and 3 halves the resolution),
global average pooling and a linear classifier.  ResNet-20/32/44/56/110 have
:math:`n = 3, 5, 7, 9, 18` and 0.27M / 0.46M / 0.66M / 0.85M / 1.7M parameters.

Shortcuts that change the shape use option A of the paper (identity on a strided
sub-sampling, new channels zero-padded: no parameters, as the paper's CIFAR models) or option B
(a strided 1x1 convolution followed by batch norm).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BasicBlock", "CifarResNet", "resnet_cifar", "ZeroPadShortcut"]


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut: ``x[:, :, ::s, ::s]`` with zero channels appended.

    Input ``(N, C_in, H, W)``, output ``(N, C_out, ceil(H/s), ceil(W/s))``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        if planes < in_planes:
            raise ValueError("option-A shortcut cannot reduce the number of channels")
        self.stride, self.extra = stride, planes - in_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        if self.extra:
            x = F.pad(x, (0, 0, 0, 0, 0, self.extra))
        return x

    def extra_repr(self) -> str:
        return f"stride={self.stride}, extra_channels={self.extra}"


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (post-activation, as in the paper).

    Parameters
    ----------
    in_planes, planes : int
        Input and output channels.
    stride : int
        Stride of the first convolution (2 halves the resolution).
    shortcut : {"A", "B"}
        Shortcut type when the shape changes.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut.upper() == "A":
            self.shortcut = ZeroPadShortcut(in_planes, planes, stride)
        elif shortcut.upper() == "B":
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
        else:
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _init(model: nn.Module, *, linear_weight: bool = True) -> None:
    """Kaiming-normal convolutions (fan-out), unit/zero batch norm, zero linear bias; the
    linear weight Kaiming-normal too unless ``linear_weight=False`` (torch's default kept)."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_weight:
                nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)


class CifarResNet(nn.Module):
    """ResNet for small images: stem conv, ``len(widths)`` stages of ``blocks`` basic blocks.

    Parameters
    ----------
    blocks : int
        Basic blocks per stage (:math:`n`; depth is :math:`6n + 2` with three stages).
    num_classes : int
    in_channels : int
    widths : sequence of int
        Channels of each stage (the stem has ``widths[0]``); every stage after the first
        starts with stride 2.
    shortcut : {"A", "B"}

    Notes
    -----
    Input ``(N, in_channels, H, W)``, output logits ``(N, num_classes)``.  Module names are
    ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.conv{1,2}``, ``fc``, the same as torchvision's
    ResNets, so geometry rules like ``layer1.*=sphere`` read the same on both.
    """

    def __init__(self, blocks: int, num_classes: int = 10, in_channels: int = 3,
                 widths=(16, 32, 64), shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        for i, w in enumerate(widths):
            layers = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(in_planes, w, stride, shortcut))
                in_planes = w
            self.add_module(f"layer{i + 1}", nn.Sequential(*layers))
        self.num_stages = len(widths)
        self.fc = nn.Linear(in_planes, num_classes)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


def resnet_cifar(depth: int, num_classes: int = 10, in_channels: int = 3,
                 shortcut: str = "A") -> CifarResNet:
    """ResNet-``depth`` for CIFAR (depth = 6n + 2, e.g. 20, 32, 44, 56, 110)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
    return CifarResNet((depth - 2) // 6, num_classes, in_channels, shortcut=shortcut)
