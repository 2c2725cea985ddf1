"""Networks without normalisation layers: plain CNNs of any depth and a ResNet without batch norm.

``plain-<D>`` (or ``plain-<D>-<W>``) is a stack of :math:`D` 3x3 convolutions with ``W``
channels (16 by default), each followed by a ReLU, no batch norm and no residual connections,
then global average pooling and a linear classifier.  The resolution is kept (stride 1,
padding 1), so the depth is the only thing that changes between ``plain-8`` and ``plain-32``.
Convolutions are initialised Kaiming-normal with fan-in (He et al. 2015), which keeps the
second moment of the activations constant through the ReLU stack at initialisation; biases
start at zero.

``resnet-digits-nobn`` is :func:`kernelgeo.models.resnet_digits` with every batch norm
replaced by the identity (and convolution biases added, which batch norm made redundant).
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from .resnet_cifar import CifarResNet

__all__ = ["PlainCNN", "plain_cnn", "resnet_digits_nobn", "check_plain_name", "PLAIN_NAME"]

#: ``plain-<depth>`` or ``plain-<depth>-<width>``
PLAIN_NAME = re.compile(r"^plain-(\d+)(?:-(\d+))?$")


class PlainCNN(nn.Module):
    """``depth`` 3x3 conv + ReLU layers of ``width`` channels, average pooling, linear.

    Parameters
    ----------
    depth : int
        Number of convolutions (>= 1).
    width : int
        Channels of every convolution.
    num_classes, in_channels : int

    Notes
    -----
    Input ``(N, in_channels, H, W)``, output logits ``(N, num_classes)``.  Module names are
    ``features.<i>`` (``i = 0 .. depth - 1``, the convolutions) and ``fc``.
    """

    def __init__(self, depth: int, width: int = 16, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 1 or width < 1:
            raise ValueError(f"plain CNN needs depth >= 1 and width >= 1, got depth {depth}, "
                             f"width {width}")
        convs = [nn.Conv2d(in_channels if i == 0 else width, width, 3, 1, 1, bias=True)
                 for i in range(depth)]
        self.features = nn.ModuleList(convs)
        self.fc = nn.Linear(width, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self.features:
            x = F.relu(conv(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def check_plain_name(name: str) -> str | None:
    """``name`` normalised if it is a plain-CNN name (``None`` if it is not one).

    Raises
    ------
    ValueError
        ``plain-0`` or a zero width.
    """
    m = PLAIN_NAME.match(name.strip().lower())
    if not m:
        return None
    if int(m.group(1)) < 1 or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ValueError(f"plain CNN {name!r}: depth and width must be >= 1 "
                         "(e.g. plain-20 or plain-20-32)")
    return name.strip().lower()


def plain_cnn(name: str, num_classes: int = 10, in_channels: int = 3) -> PlainCNN:
    """Build ``plain-<D>`` / ``plain-<D>-<W>``."""
    key = check_plain_name(name)
    if key is None:
        raise ValueError(f"not a plain CNN name: {name!r} (plain-<depth> or plain-<depth>-<width>)")
    m = PLAIN_NAME.match(key)
    return PlainCNN(int(m.group(1)), int(m.group(2) or 16), num_classes, in_channels)


def resnet_digits_nobn(num_classes: int = 10, in_channels: int = 1) -> CifarResNet:
    """``resnet-digits`` without batch norm: every ``BatchNorm2d`` is an identity and the
    convolutions get zero-initialised biases."""
    model = CifarResNet(1, num_classes, in_channels, widths=(16, 32))
    for parent in list(model.modules()):
        for cname, child in list(parent.named_children()):
            if isinstance(child, nn.BatchNorm2d):
                setattr(parent, cname, nn.Identity())
            elif isinstance(child, nn.Conv2d) and child.bias is None:
                child.bias = nn.Parameter(torch.zeros(child.out_channels))
    return model
