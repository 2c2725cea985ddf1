"""Model zoo (kernelgeo.models): shapes, parameter counts of the paper's models, names."""

from __future__ import annotations

import pytest
import torch

import kernelgeo
from kernelgeo.models import ZeroPadShortcut, get_model

# He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters (option A)
PAPER_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586,
                "resnet56": 853_018, "resnet110": 1_727_962}


@pytest.mark.parametrize("name", list(PAPER_PARAMS))
def test_cifar_resnet_sizes(name):
    m = get_model(name, num_classes=10, in_channels=3)
    assert sum(p.numel() for p in m.parameters()) == PAPER_PARAMS[name]
    depth = int(name[6:])
    convs = [mod for mod in m.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == depth - 1  # + the linear layer = depth weighted layers
    assert sum(isinstance(mod, ZeroPadShortcut) for mod in m.modules()) == 2


def test_resnet_forward_and_option_b():
    m = get_model("resnet20-b", num_classes=100, in_channels=3)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    one_by_one = [c for c in m.modules() if isinstance(c, torch.nn.Conv2d) and
                  c.kernel_size == (1, 1)]
    assert len(one_by_one) == 2 and all(c.stride == (2, 2) for c in one_by_one)


def test_option_a_shortcut_zero_pads():
    s = ZeroPadShortcut(2, 5, 2)
    x = torch.randn(1, 2, 4, 4)
    y = s(x)
    assert y.shape == (1, 5, 2, 2)
    assert torch.equal(y[:, :2], x[:, :, ::2, ::2]) and not y[:, 2:].any()


def test_wide_resnet_and_digits_and_torchvision():
    w = get_model("wrn-10-2", num_classes=10, in_channels=3)
    assert w(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    assert max(c.out_channels for c in w.modules() if isinstance(c, torch.nn.Conv2d)) == 128
    d = get_model("resnet-digits", num_classes=10, in_channels=1)
    assert d(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert sum(p.numel() for p in d.parameters()) < 30_000
    tv = get_model("torchvision:resnet18", num_classes=7, in_channels=1)
    assert tv(torch.randn(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("bad,match", [
    ("resnet21", "6n\\+2"), ("vgg", "valid: resnet20"), ("wrn-27-2", "6n\\+4"),
    ("torchvision:nope", "resnet18"),
])
def test_bad_model_names(bad, match):
    with pytest.raises(ValueError, match=match):
        get_model(bad)


def test_rules_constrain_cifar_resnet():
    m = get_model("resnet20", 10, 3)
    rep = kernelgeo.constrain(m, {"layer1.*": "sphere", "layer3.*": "stiefel",
                                  "*": "euclidean"}, on_invalid="skip")
    by = {e.name: e.status for e in rep.entries}
    assert by["layer1.0.conv1"] == "manifold" and by["layer3.2.conv2"] == "manifold"
    assert by["layer2.0.conv1"] == "euclidean" and by["conv1"] == "euclidean"
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert kernelgeo.constraint_error(m) < 1e-5
