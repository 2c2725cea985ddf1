"""Classification models by name: CIFAR ResNets, wide ResNets, a small ResNet for 8x8 digits,
and any torchvision classifier.

================================  ===========================================================
``resnet20`` ... ``resnet110``    CIFAR ResNet-(6n+2) of He et al. 2016, option-A shortcuts
``resnet20-b`` ...                the same with option-B (1x1 conv) shortcuts
``wrn-<d>-<k>``                   wide ResNet WRN-d-k (e.g. ``wrn-16-4``, ``wrn-28-10``)
``resnet-digits``                 8-layer ResNet for 8x8 images (digits): 16/32 channels
``resnet-digits-nobn``            the same without batch norm
``plain-<D>[-<W>]``               plain CNN: D 3x3 conv + ReLU, W channels, no batch norm
``torchvision:<name>``            ``torchvision.models.get_model(name)``, random init
================================  ===========================================================

Geometry is applied afterwards with :func:`kernelgeo.constrain`.
"""

from __future__ import annotations

import re

from torch import nn

from .plain import PlainCNN, check_plain_name, plain_cnn, resnet_digits_nobn
from .resnet_cifar import BasicBlock, CifarResNet, ZeroPadShortcut, resnet_cifar
from .wide_resnet import WideResNet, wide_resnet

__all__ = ["get_model", "available_models", "check_model_name", "resnet_cifar", "wide_resnet",
           "resnet_digits", "resnet_digits_nobn", "plain_cnn", "PlainCNN",
           "CifarResNet", "WideResNet", "BasicBlock", "ZeroPadShortcut"]

_RESNET = re.compile(r"^resnet(\d+)(?:-([ab]))?$")
_WRN = re.compile(r"^wrn-(\d+)-(\d+)$")
_EXAMPLES = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet20-b",
             "wrn-16-4", "wrn-28-10", "resnet-digits", "resnet-digits-nobn", "plain-<D>[-<W>]",
             "torchvision:<name>"]


def available_models() -> list[str]:
    """Model names (and patterns) accepted by :func:`get_model`."""
    return list(_EXAMPLES)


def resnet_digits(num_classes: int = 10, in_channels: int = 1, shortcut: str = "A"
                  ) -> CifarResNet:
    """Small ResNet for 8x8 images: stem (16), one block at 16 and one at 32 channels (4x4).

    Five 3x3 convolutions, 19k parameters; a digits epoch takes well under a second on a CPU.
    """
    return CifarResNet(1, num_classes, in_channels, widths=(16, 32), shortcut=shortcut)


def _torchvision_names() -> list[str]:
    import torchvision.models as tvm

    return sorted(tvm.list_models(module=tvm))


def _bad_name(name: str, extra: str = "") -> ValueError:
    return ValueError(f"unknown model {name!r}{extra}; valid: {', '.join(_EXAMPLES)} "
                      "(resnetN with N = 6n+2, wrn-D-K with D = 6n+4)")


def check_model_name(name: str) -> str:
    """Return ``name`` normalised, or raise ``ValueError`` listing the valid names."""
    key = name.strip()
    low = key.lower()
    if low.startswith("torchvision:"):
        tv = key.split(":", 1)[1]
        names = _torchvision_names()
        if tv not in names:
            raise ValueError(f"unknown torchvision model {tv!r}; torchvision classification "
                             f"models: {', '.join(names)}")
        return f"torchvision:{tv}"
    if low in ("resnet-digits", "resnet-digits-nobn"):
        return low
    plain = check_plain_name(low)
    if plain is not None:
        return plain
    m = _RESNET.match(low)
    if m:
        d = int(m.group(1))
        if d < 8 or (d - 2) % 6:
            raise _bad_name(name, f" (CIFAR ResNet depth must be 6n+2, got {d})")
        return low
    m = _WRN.match(low)
    if m:
        d = int(m.group(1))
        if d < 10 or (d - 4) % 6 or int(m.group(2)) < 1:
            raise _bad_name(name, f" (WRN depth must be 6n+4 and k >= 1, got {d})")
        return low
    raise _bad_name(name)


def _replace_stem(model: nn.Module, in_channels: int) -> None:
    for parent in model.modules():
        for cname, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                if child.in_channels == in_channels:
                    return
                new = nn.Conv2d(in_channels, child.out_channels, child.kernel_size,
                                child.stride, child.padding, child.dilation, child.groups,
                                child.bias is not None, child.padding_mode)
                setattr(parent, cname, new)
                return
    raise ValueError("no Conv2d found to adapt to the input channels")


def get_model(name: str, num_classes: int = 10, in_channels: int = 3, **kwargs) -> nn.Module:
    """Build a model by name.

    Parameters
    ----------
    name : str
        See the module docstring / :func:`available_models`.
    num_classes : int
        Size of the output layer.
    in_channels : int
        Channels of the input images (1 for digits/MNIST); for torchvision models the stem
        convolution is replaced if it differs from 3.
    **kwargs
        ``dropout`` for WRNs; anything else is passed to ``torchvision.models.get_model``.

    Returns
    -------
    torch.nn.Module
        Maps ``(N, in_channels, H, W)`` float images to ``(N, num_classes)`` logits.

    Raises
    ------
    ValueError
        Unknown name, with the list of valid names.
    """
    key = check_model_name(name)
    if key.startswith("torchvision:"):
        import torchvision.models as tvm

        model = tvm.get_model(key.split(":", 1)[1], weights=None, num_classes=num_classes,
                              **kwargs)
        if in_channels != 3:
            _replace_stem(model, in_channels)
        return model
    if key == "resnet-digits":
        return resnet_digits(num_classes, in_channels)
    if key == "resnet-digits-nobn":
        return resnet_digits_nobn(num_classes, in_channels)
    if key.startswith("plain-"):
        return plain_cnn(key, num_classes, in_channels)
    m = _RESNET.match(key)
    if m:
        return resnet_cifar(int(m.group(1)), num_classes, in_channels,
                            shortcut=(m.group(2) or "a").upper())
    m = _WRN.match(key)
    return wide_resnet(int(m.group(1)), int(m.group(2)), num_classes, in_channels,
                       dropout=float(kwargs.get("dropout", 0.0)))
