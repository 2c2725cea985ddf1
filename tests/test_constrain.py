"""kernelgeo.constrain, kernelgeo.nn and checkpoint loading into constrained models."""

import subprocess
import sys
import warnings

import pytest
import torch
import torchvision
from torch import nn

import kernelgeo
from kernelgeo._compat import ManifoldParameter
from kernelgeo.manifolds import available

GEOMETRIES = available() + ["po:sphere+stiefel", "pio:2x2:sphere+oblique"]
ARCHS = {
    "resnet18": (torchvision.models.resnet18, (2, 3, 32, 32)),
    "vgg11_bn": (torchvision.models.vgg11_bn, (2, 3, 32, 32)),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, (2, 3, 32, 32)),
}


def _build(arch):
    torch.manual_seed(0)
    return ARCHS[arch][0](num_classes=10).eval()


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_torchvision_models_convert(arch, geometry):
    model = _build(arch)
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    report = kernelgeo.constrain(model, geometry, on_invalid="skip")
    after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert list(before) == list(after) and before == after

    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(report) == len(convs)
    for entry in report.constrained:
        w = model.get_submodule(entry.name).weight
        assert isinstance(w, ManifoldParameter)
        assert w.manifold.constraint_error(w) < 1e-5
        assert entry.dim == w.manifold.dim(w.shape) > 0
    for entry in report.euclidean:
        w = model.get_submodule(entry.name).weight
        assert not isinstance(w, ManifoldParameter)
        assert entry.reason  # every unconstrained layer says why
    if geometry != "euclidean":
        assert report.constrained
    with torch.no_grad():
        out = model(torch.randn(ARCHS[arch][1]))
    assert out.shape == (2, 10)


@pytest.mark.parametrize("geometry", ["sphere", "stiefel", "oblique"])
def test_plain_state_dict_loads_projected_with_warning(geometry):
    model = _build("resnet18")
    kernelgeo.constrain(model, geometry, on_invalid="skip")
    plain = _build("resnet18").state_dict()
    with pytest.warns(kernelgeo.KernelProjectionWarning, match="off their manifolds"):
        model.load_state_dict(plain)
    assert kernelgeo.constraint_error(model) < 1e-5
    # the projection is the nearest point: loading the same kernels again is a no-op
    for name, p in kernelgeo.manifold_parameters(model):
        torch.testing.assert_close(p.detach(), p.manifold.projx(plain[name]))


def test_constrained_checkpoint_reloads_exactly_and_silently():
    model = _build("resnet18")
    kernelgeo.constrain(model, "stiefel")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    other = _build("resnet18")
    kernelgeo.constrain(other, "stiefel")
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernelgeo.KernelProjectionWarning)
        other.load_state_dict(sd)
    for k, v in other.state_dict().items():
        assert torch.equal(v, sd[k]), k


def test_explicit_load_state_dict_on_hand_declared_model():
    from kernelgeo.manifolds import Sphere

    conv = nn.Conv2d(3, 8, 3)
    m = Sphere()
    conv.weight = ManifoldParameter(m.projx(conv.weight.detach()), manifold=m)
    plain = nn.Conv2d(3, 8, 3).state_dict()
    with pytest.warns(kernelgeo.KernelProjectionWarning):
        kernelgeo.load_state_dict(conv, plain)
    assert kernelgeo.constraint_error(conv) < 1e-6
    bad = dict(plain, weight=torch.full_like(plain["weight"], float("nan")))
    keep = conv.weight.detach().clone()
    with pytest.raises(ValueError, match="NaN"):
        kernelgeo.load_state_dict(conv, bad)
    assert torch.equal(conv.weight.detach(), keep)
    with pytest.raises(ValueError, match="shape"):
        kernelgeo.load_state_dict(conv, dict(plain, weight=torch.zeros(8, 3, 5, 5)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.layer1 = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 32, 1))
        self.dw = nn.Conv2d(32, 32, 3, groups=32)
        self.c1d = nn.Conv1d(4, 6, 5)
        self.c3d = nn.Conv3d(2, 4, (3, 3, 3))
        self.fc = nn.Linear(32, 10)


def test_rule_mapping_first_match_wins_and_reports_reasons():
    net = Net()
    report = kernelgeo.constrain(net, {"layer1.0": "stiefel", "layer1.*": "sphere",
                                       "dw": "oblique", "c3d": "centered-sphere"})
    by = {e.name: e for e in report}
    assert by["layer1.0"].geometry.startswith("1 x St(144,16)")
    assert by["layer1.1"].geometry.startswith("32 x S^15")
    assert by["dw"].geometry.startswith("96 x S^2")  # 32 slices x 3 columns of length 3
    assert by["stem"].status == "euclidean" and by["stem"].reason == "no rule matched"
    assert "fc" not in by  # linear layers only with include_linear=True
    assert "layer1.0" in str(report) and "layer1.0" in report.to_markdown()


def test_callable_spec_and_linear_layers():
    net = Net()
    report = kernelgeo.constrain(
        net, lambda name, mod: "sphere" if mod.weight.shape[0] >= 10 else None,
        include_linear=True)
    names = {e.name for e in report.constrained}
    assert names == {"stem", "layer1.0", "layer1.1", "dw", "fc"}
    assert isinstance(net.fc.weight, ManifoldParameter)


def _assert_untouched(net):
    assert not any(isinstance(p, ManifoldParameter) for p in net.parameters())


def test_unknown_name_lists_valid_choices():
    net = Net()
    with pytest.raises(ValueError, match="valid names: euclidean, sphere"):
        kernelgeo.constrain(net, "spheer")
    _assert_untouched(net)


def test_glob_matching_nothing_is_an_error():
    net = Net()
    with pytest.raises(ValueError, match=r"match no convolution layer.*layer1\.0"):
        kernelgeo.constrain(net, {"layer9.*": "sphere"})
    _assert_untouched(net)


def test_kernel_that_cannot_hold_manifold_names_layer_and_shape():
    net = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(1, 4, 1))
    with pytest.raises(ValueError) as err:
        kernelgeo.constrain(net, "oblique")
    msg = str(err.value)
    assert "'1' (Conv2d, kernel shape (8, 8, 1, 1))" in msg
    assert "'2' (Conv2d, kernel shape (4, 1, 1, 1))" in msg
    assert "on_invalid='skip'" in msg and "nothing was converted" in msg
    _assert_untouched(net)
    for geometry in ("sphere", "stiefel"):  # a single-entry filter holds neither
        with pytest.raises(ValueError, match=r"kernel shape \(4, 1, 1, 1\)"):
            kernelgeo.constrain(nn.Sequential(nn.Conv2d(1, 4, 1)), geometry)
    report = kernelgeo.constrain(net, "oblique", on_invalid="skip")
    assert [e.status for e in report] == ["manifold", "euclidean", "euclidean"]
    assert "cannot hold" in report.entries[1].reason


def test_nn_layers():
    from kernelgeo.nn import Conv1d, Conv2d, Conv3d

    for conv, x in ((Conv1d(3, 5, 3, manifold="sphere"), torch.randn(2, 3, 9)),
                    (Conv2d(3, 16, 3, manifold="stiefel"), torch.randn(2, 3, 8, 8)),
                    (Conv3d(2, 4, 3, manifold="oblique-slice"), torch.randn(1, 2, 5, 5, 5))):
        assert isinstance(conv.weight, ManifoldParameter)
        assert conv.weight.manifold.constraint_error(conv.weight) < 1e-5
        conv.reset_parameters()
        assert conv.weight.manifold.constraint_error(conv.weight) < 1e-5
        conv(x).sum().backward()
        assert conv.weight.grad is not None
        assert "manifold=" in repr(conv)
    assert list(Conv2d(3, 4, 3).state_dict()) == ["weight", "bias"]
    with pytest.raises(ValueError, match=r"kernel shape \(4, 1, 1, 1\)"):
        Conv2d(1, 4, 1, manifold="sphere")


def test_import_is_quiet_and_keeps_dtype():
    code = ("import sys, warnings; warnings.simplefilter('error'); import torch, kernelgeo; "
            "assert torch.get_default_dtype() == torch.float32; "
            "assert 'geomstats' not in sys.modules; print('ok')")
    res = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                         text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr
    assert res.stderr == ""


def test_module_does_not_shadow_the_function():
    import importlib

    mod = importlib.import_module("kernelgeo.constraints")
    assert mod.constrain is kernelgeo.constrain and callable(kernelgeo.constrain)
    assert kernelgeo.constrain.__module__ == "kernelgeo.constraints"
    assert not hasattr(importlib.import_module("kernelgeo"), "constraints") or \
        kernelgeo.constraints is mod
