"""kernelgeo.constrain / unconstrain against careless or hostile models and inputs.

Every refusal is checked for its message (layer, shape or key, what to do) and for leaving the
model exactly as it was (same parameter objects, classes, values and state_dict keys).
"""

import copy
import io
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as P

import kernelgeo
from kernelgeo._compat import ManifoldParameter, RiemannianSGD
from kernelgeo.optim import ConvergentRSGD


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1)).to(dtype)


def _snapshot(model):
    params = [(k, p, type(p), p.detach().clone(), p.requires_grad)
              for k, p in model.named_parameters(remove_duplicate=False)]
    return params, list(model.state_dict())


def _assert_unchanged(model, snap):
    params, keys = snap
    now = list(model.named_parameters(remove_duplicate=False))
    assert [k for k, _ in now] == [k for k, *_ in params]
    for (k, p), (_, p0, cls, v0, rg) in zip(now, params, strict=True):
        assert p is p0 and type(p) is cls and p.requires_grad == rg, k
        now_v = p.detach().to_dense() if p.layout != torch.strided else p.detach()
        v0 = v0.to_dense() if v0.layout != torch.strided else v0
        torch.testing.assert_close(now_v, v0, rtol=0, atol=0, equal_nan=True, msg=k)
    assert list(model.state_dict()) == keys


def _x(c=3):
    return torch.randn(2, c, 6, 6, generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------ parametrizations

PARAMETRIZE = {
    "weight_norm": P.weight_norm,
    "orthogonal": P.orthogonal,
    "spectral_norm": P.spectral_norm,
}


@pytest.mark.parametrize("kind", list(PARAMETRIZE))
def test_parametrized_layer_refused_by_default(kind):
    model = _net()
    PARAMETRIZE[kind](model[0])
    snap = _snapshot(model)
    with pytest.raises(ValueError) as err:
        kernelgeo.constrain(model, "sphere")
    msg = str(err.value)
    assert "layer '0'" in msg and "(8, 3, 3, 3)" in msg and kind in msg
    assert "remove_parametrizations(module, 'weight', leave_parametrized=True)" in msg
    assert "parametrized='remove'" in msg and "nothing was converted" in msg
    _assert_unchanged(model, snap)
    assert not isinstance(model[2].weight, ManifoldParameter)  # the valid layer too


@pytest.mark.parametrize("kind", list(PARAMETRIZE))
def test_parametrized_remove_constrains_the_weight_the_layer_uses(kind):
    model = _net()
    PARAMETRIZE[kind](model[0])
    with torch.no_grad():
        used = model[0].weight.detach().clone()  # what the forward pass used so far
    report = kernelgeo.constrain(model, "sphere", parametrized="remove")
    w = model[0].weight
    assert isinstance(w, ManifoldParameter) and "0.weight" in model.state_dict()
    assert not any("parametrizations" in k for k in model.state_dict())
    assert "removed" in report.entries[0].reason
    # the kernel is the projection of the weight the layer used: each filter normalised
    expect = used.double() / used.double().flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(w.detach().double(), expect, rtol=1e-5, atol=1e-6)
    # and it is the tensor the convolution uses, with a gradient
    x = _x()
    out = model[0](x)
    torch.testing.assert_close(out, F.conv2d(x, w, model[0].bias, padding=1))
    out.square().sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


@pytest.mark.parametrize("old", ["weight_norm", "spectral_norm"])
def test_old_style_weight_hooks_refused_or_removed(old):
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        getattr(torch.nn.utils, old)(model[2])
    snap = _snapshot(model)
    with pytest.raises(ValueError) as err:
        kernelgeo.constrain(model, "stiefel")
    msg = str(err.value)
    assert "layer '2'" in msg and f"torch.nn.utils.{old}" in msg
    assert f"torch.nn.utils.remove_{old}(module)" in msg
    _assert_unchanged(model, snap)
    kernelgeo.constrain(model, "stiefel", parametrized="remove")
    w = model[2].weight
    assert isinstance(w, ManifoldParameter) and w.manifold.constraint_error(w) < 1e-5
    model(_x()).sum().backward()  # the old hook is gone: the forward pass works and trains w
    assert w.grad is not None


def test_parametrized_skip_and_euclidean_leave_the_layer_alone():
    model = _net()
    P.weight_norm(model[0])
    report = kernelgeo.constrain(model, "sphere", parametrized="skip")
    assert report.entries[0].status == "euclidean" and "weight_norm" in report.entries[0].reason
    assert report.entries[1].status == "manifold"
    assert torch.nn.utils.parametrize.is_parametrized(model[0], "weight")
    report = kernelgeo.constrain(model, {"0": "euclidean", "2": "stiefel"})
    assert torch.nn.utils.parametrize.is_parametrized(model[0], "weight")
    assert [e.status for e in report] == ["euclidean", "manifold"]


# ----------------------------------------------------------------------- tied weights


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.c2.weight = self.c1.weight

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def test_tied_weights_stay_one_manifold_parameter():
    net = Tied()
    w = net.c1.weight
    report = kernelgeo.constrain(net, "sphere")
    assert net.c1.weight is w and net.c2.weight is w and isinstance(w, ManifoldParameter)
    assert len(report) == 1 and report.entries[0].aliases == ("c2.weight",)
    assert "tied with c2.weight" in str(report)
    assert report.entries[0].dim == 4 * 35  # counted once
    assert list(net.state_dict()) == ["c1.weight", "c1.bias", "c2.weight", "c2.bias"]
    opt = ConvergentRSGD(net.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(_x(4)).square().mean().backward()
        opt.step()
    assert net.c1.weight is net.c2.weight
    assert w.manifold.constraint_error(w) < 1e-5
    # a load keeps the tie: the second key writes the same tensor
    sd = {k: v.clone() for k, v in net.state_dict().items()}
    net.load_state_dict(sd)
    assert net.c1.weight is net.c2.weight


def test_tied_weights_with_conflicting_rules_refused():
    net = Tied()
    snap = _snapshot(net)
    with pytest.raises(ValueError) as err:
        kernelgeo.constrain(net, {"c1": "sphere", "c2": "stiefel"})
    msg = str(err.value)
    assert "'c1', 'c2' share one weight tensor" in msg and "(4, 4, 3, 3)" in msg
    assert "S^35" in msg and "St(36,4)" in msg and "same geometry" in msg
    _assert_unchanged(net, snap)
    with pytest.raises(ValueError, match="share one weight"):
        kernelgeo.constrain(net, {"c1": "sphere", "c2": "euclidean"})
    _assert_unchanged(net, snap)
    # equal geometries from two rules, or one rule and no opinion, are fine
    assert len(kernelgeo.constrain(net, {"c1": "sphere", "c2": "sphere"}).constrained) == 1
    assert len(kernelgeo.constrain(Tied(), {"c2": "oblique"}).constrained) == 1


def test_linear_tied_to_embedding_is_one_parameter():
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.head = nn.Linear(6, 10, bias=False)
            self.head.weight = self.emb.weight

    lm = LM()
    report = kernelgeo.constrain(lm, "sphere", include_linear=True)
    assert report.entries[0].name == "head" and report.entries[0].aliases == ("emb.weight",)
    assert lm.emb.weight is lm.head.weight and isinstance(lm.emb.weight, ManifoldParameter)
    norms = lm.emb.weight.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


# ------------------------------------------------------- optimizer built before constrain


@pytest.mark.parametrize("stepped", [False, True])
def test_optimizer_built_before_constrain_keeps_training_the_kernels(stepped):
    model = _net()
    w0 = model[0].weight
    opt = ConvergentRSGD(model.parameters(), lr=0.05, momentum=0.9)
    x = _x()
    if stepped:  # the optimizer has cached its plan and Euclidean momentum
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        # that momentum is not tangent to the manifolds: dropped, with a warning
        with pytest.warns(kernelgeo.OptimizerStateResetWarning, match=r"0\.weight, 2\.weight"):
            kernelgeo.constrain(model, {"0": "sphere", "2": "stiefel"})
        assert not opt.state[w0] and opt.state[model[0].bias]  # Euclidean state kept
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", kernelgeo.OptimizerStateResetWarning)
            kernelgeo.constrain(model, {"0": "sphere", "2": "stiefel"})
    assert model[0].weight is w0 and opt.param_groups[0]["params"][0] is w0
    before = [model[i].weight.detach().clone() for i in (0, 2)]
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for i, b in zip((0, 2), before, strict=True):
        w = model[i].weight
        assert (w.detach() - b).norm() > 1e-4  # trained
        assert w.manifold.constraint_error(w) < 1e-5  # on the manifold


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("first,then", [("sphere", "po:sphere+stiefel"),
                                        ("po:sphere+stiefel", "sphere"),
                                        ("stiefel", "euclidean"), ("euclidean", "oblique")])
def test_geometry_change_after_momentum_steps_resets_that_state(first, then, batched):
    model = _net()
    kernelgeo.constrain(model, first)
    opt = ConvergentRSGD(model.parameters(), lr=0.05, momentum=0.9, batched=batched)
    x = _x()

    def step():
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()

    step()
    step()
    # momentum built for the old blocks would be indexed by the new ones: it is dropped,
    # with a warning naming the kernels
    with pytest.warns(kernelgeo.OptimizerStateResetWarning, match=r"0\.weight, 2\.weight"):
        kernelgeo.constrain(model, then)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernelgeo.OptimizerStateResetWarning)
        step()
        step()
        step()
    assert kernelgeo.constraint_error(model) < 1e-5
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # re-projecting onto the same geometry keeps the momentum
    kernelgeo.constrain(model, then)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernelgeo.OptimizerStateResetWarning)
        step()


def test_resumed_optimizer_state_loaded_after_constrain_is_kept():
    model = _net()
    kernelgeo.constrain(model, "po:sphere+stiefel")
    opt = ConvergentRSGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(2):
        opt.zero_grad()
        model(_x()).square().mean().backward()
        opt.step()
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict()})
    # a resumed run: fresh model, constrain, fresh optimizer, then the loads
    model2 = _net()
    kernelgeo.constrain(model2, "po:sphere+stiefel")
    opt2 = ConvergentRSGD(model2.parameters(), lr=0.05, momentum=0.9)
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernelgeo.OptimizerStateResetWarning)
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            m(_x()).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=0)


def test_optimizer_built_after_the_change_keeps_its_state():
    model = _net()
    kernelgeo.constrain(model, "sphere")
    kernelgeo.constrain(model, "stiefel")
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernelgeo.OptimizerStateResetWarning)
        for _ in range(2):
            opt.zero_grad()
            model(_x()).square().mean().backward()
            opt.step()
    assert "momentum_buffer" in opt.state[model[0].weight]


def test_riemannian_sgd_built_before_constrain():
    model = _net()
    opt = RiemannianSGD(model.parameters(), lr=0.05)
    kernelgeo.constrain(model, "sphere")
    model(_x()).square().mean().backward()
    opt.step()
    assert kernelgeo.constraint_error(model) < 1e-5


def test_unconstrain_after_optimizer_gives_plain_sgd_steps():
    model = _net()
    kernelgeo.constrain(model, "sphere")
    opt = ConvergentRSGD(model.parameters(), lr=0.05)
    model(_x()).square().mean().backward()
    opt.step()
    opt.zero_grad()
    kernelgeo.unconstrain(model)
    model(_x()).square().mean().backward()
    w = model[0].weight
    expect = w.detach() - 0.05 * w.grad  # plain SGD, the oracle
    opt.step()
    torch.testing.assert_close(w.detach(), expect)


# ------------------------------------------------------------------ meta, dtype, layout


def test_meta_model_refused_with_what_to_do():
    with torch.device("meta"):
        model = _net()
    snap_types = [type(p) for p in model.parameters()]
    with pytest.raises(ValueError) as err:
        kernelgeo.constrain(model, "sphere")
    msg = str(err.value)
    assert "layer '0'" in msg and "(8, 3, 3, 3)" in msg and "meta device" in msg
    assert "to_empty" in msg and "assign=True" in msg
    assert [type(p) for p in model.parameters()] == snap_types
    with pytest.raises(ValueError, match=r"meta device.*build it on a real device"):
        kernelgeo.nn.Conv2d(3, 8, 3, device="meta")


def test_meta_model_materialised_by_assign_load():
    src = _net()
    kernelgeo.constrain(src, "sphere")
    sd = src.state_dict()
    with torch.device("meta"):
        model = _net()
    model.load_state_dict(sd, assign=True)
    kernelgeo.constrain(model, "sphere")
    # and a constrained model loaded with assign=True keeps its manifold parameters
    with warnings.catch_warnings():
        warnings.simplefilter("error", kernelgeo.KernelProjectionWarning)
        model.load_state_dict({k: v.clone() for k, v in sd.items()}, assign=True)
    assert isinstance(model[0].weight, ManifoldParameter)
    with pytest.warns(kernelgeo.KernelProjectionWarning):
        model.load_state_dict(_net().state_dict(), assign=True)
    assert isinstance(model[2].weight, ManifoldParameter)
    assert kernelgeo.constraint_error(model) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("geometry", ["sphere", "stiefel", "oblique", "po:sphere+stiefel"])
def test_half_precision_kernels_on_manifold_to_their_rounding(dtype, geometry):
    model = _net(dtype)
    kernelgeo.constrain(model, geometry)
    u = torch.finfo(dtype).eps / 2  # unit round-off
    for i in (0, 2):
        w = model[i].weight
        assert w.dtype == dtype
        # rounding the exact projection y moves it by at most u*||y||: that bounds the
        # distance to the manifold (measured in float64 by constraint_error)
        bound = u * float(w.detach().double().norm()) * 1.01
        assert w.manifold.constraint_error(w) <= bound


def test_half_precision_radius_range_refused():
    model = _net(torch.float16)
    snap = _snapshot(model)
    with pytest.raises(ValueError) as err:
        kernelgeo.constrain(model, "sphere", radius=300.0)  # r^2 = 9e4 > float16 max
    msg = str(err.value)
    assert "layer '0'" in msg and "radius 300" in msg and "float16" in msg
    assert "r in [" in msg
    _assert_unchanged(model, snap)
    # radius_scale multiplies by sqrt(fan-in): 20 * sqrt(27) = 103.9 fits layer 0, but
    # 20 * sqrt(72) = 169.7 is too large for layer 2
    with pytest.raises(ValueError, match=r"layer '2'.*radius 169\.7") as err:
        kernelgeo.constrain(model, "sphere", radius=20.0, radius_scale="fan_in")
    assert "layer '0'" not in str(err.value)
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("radius", [1e-20, 1e-19, 1e19, 1e30])
def test_radius_whose_square_is_not_a_normal_float_refused(radius):
    model = _net()
    snap = _snapshot(model)
    with pytest.raises(ValueError) as err:
        kernelgeo.constrain(model, "sphere", radius=radius)
    msg = str(err.value)
    assert "layer '0' (Conv2d, kernel shape (8, 3, 3, 3))" in msg and "float32" in msg
    assert "r^2 and 1/r^2" in msg and "choose a radius" in msg
    _assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="r\\^2 and 1/r\\^2"):
        kernelgeo.nn.Conv2d(3, 8, 3, manifold_kwargs={"radius": radius})


def test_radius_edges_accepted():
    for radius in (2e-19, 1e18):
        model = _net()
        kernelgeo.constrain(model, "sphere", radius=radius)
        norms = model[0].weight.detach().double().flatten(1).norm(dim=1)
        torch.testing.assert_close(norms, torch.full_like(norms, radius), rtol=1e-5, atol=0)


def _with_weight(w, requires_grad=False):
    model = _net()
    model[0].weight = nn.Parameter(w, requires_grad=requires_grad)
    return model


@pytest.mark.parametrize("case", ["int", "complex", "sparse", "nan", "inf", "lazy", "subclass"])
def test_unusable_weights_refused(case):
    w = torch.randn(8, 3, 3, 3)
    if case == "int":
        model, expect = _with_weight(w.to(torch.int64)), "dtype torch.int64"
    elif case == "complex":
        model, expect = _with_weight(w.to(torch.complex64)), "dtype torch.complex64"
    elif case == "sparse":
        model, expect = _with_weight(w.to_sparse()), "to_dense"
    elif case == "nan":
        w[1, 0, 0, 0] = float("nan")
        model, expect = _with_weight(w, True), "holds 1 NaN/Inf"
    elif case == "inf":
        w[:2] = float("inf")
        model, expect = _with_weight(w, True), "holds 54 NaN/Inf"
    elif case == "lazy":
        model = _net()
        model[0] = nn.LazyConv2d(8, 3)
        expect = "forward pass"
    else:
        class Tagged(nn.Parameter):
            pass

        model = _net()
        model[0].weight = Tagged(w)
        expect = "Tagged"
    snap = _snapshot(model) if case != "lazy" else None
    with pytest.raises(ValueError) as err:
        kernelgeo.constrain(model, "sphere")
    msg = str(err.value)
    assert "layer '0'" in msg and expect in msg, msg
    assert "nothing was converted" in msg
    if snap is not None:
        _assert_unchanged(model, snap)
    assert not isinstance(model[2].weight, ManifoldParameter)


def test_not_a_module_refused():
    sd = _net().state_dict()
    with pytest.raises(TypeError, match="must be a torch.nn.Module, got OrderedDict.*load_state"):
        kernelgeo.constrain(sd, "sphere")
    with pytest.raises(TypeError, match="unconstrain: model must be a torch.nn.Module"):
        kernelgeo.unconstrain([nn.Conv2d(3, 4, 3)])


def test_double_precision_kernels():
    model = _net(torch.float64)
    kernelgeo.constrain(model, "stiefel")
    assert model[0].weight.dtype == torch.float64
    assert kernelgeo.constraint_error(model) < 1e-12


# ------------------------------------------------------------------------ rule mappings


def test_shadowed_rule_warns_naming_it():
    model = _net()
    with pytest.warns(kernelgeo.UnusedRuleWarning) as rec:
        report = kernelgeo.constrain(model, {"*": "sphere", "2": "stiefel"})
    msg = str(rec[0].message)
    assert "rule '2' matches 2" in msg and "earlier rule(s) '*'" in msg
    assert rec[0].filename == __file__
    assert [e.geometry.split(" x ")[1][:2] for e in report] == ["S^", "S^"]


def test_shadowed_rule_refused_with_strict():
    model = _net()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"rule '2' matches 2.*nothing was converted"):
        kernelgeo.constrain(model, {"*": "sphere", "2": "stiefel"}, strict=True)
    _assert_unchanged(model, snap)


def test_rule_matching_only_a_linear_layer_says_include_linear():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match=r"Linear layer\(s\) 2 need include_linear=True"):
        kernelgeo.constrain(model, {"2": "sphere"})
    assert kernelgeo.constrain(model, {"2": "sphere"}, include_linear=True).constrained


def test_rules_that_decide_a_layer_do_not_warn():
    model = _net()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernelgeo.constrain(model, {"2": "stiefel", "*": "sphere"}, strict=True)
    assert model[2].weight.manifold.name == "stiefel"


# --------------------------------------------------------------------- load_state_dict


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_load_refuses_non_finite_kernel_before_loading_anything(bad):
    model = _net()
    kernelgeo.constrain(model, "sphere")
    keep = _state(model)
    sd = _state(_net())
    sd["0.bias"] += 1.0  # would be loaded first
    sd["2.weight"][3, 1, 0, 0] = bad
    with pytest.raises(ValueError) as err:
        model.load_state_dict(sd)
    msg = str(err.value)
    assert "'2.weight'" in msg and "(8, 8, 3, 3)" in msg and "NaN/Inf" in msg
    assert "nothing was loaded" in msg
    for k, v in model.state_dict().items():
        assert torch.equal(v, keep[k]), k
    # through the submodule too, with the submodule's key
    with pytest.raises(ValueError, match="entry 'weight'"):
        model[2].load_state_dict({"weight": sd["2.weight"], "bias": sd["2.bias"]})
    for k, v in model.state_dict().items():
        assert torch.equal(v, keep[k]), k


def test_load_refuses_wrong_shape_and_dtype_naming_the_key():
    model = _net()
    kernelgeo.constrain(model, "sphere")
    keep = _state(model)
    sd = _state(_net())
    sd["2.weight"] = torch.zeros(8, 8, 5, 5)
    with pytest.raises(ValueError, match=r"'2\.weight' has shape \(8, 8, 5, 5\).*8 x S\^71"):
        model.load_state_dict(sd)
    sd["2.weight"] = torch.ones(8, 8, 3, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"'2\.weight'.*dtype torch\.int32"):
        model.load_state_dict(sd)
    for k, v in model.state_dict().items():
        assert torch.equal(v, keep[k]), k


def test_load_projects_off_manifold_kernels_with_warning_at_the_caller():
    model = _net()
    kernelgeo.constrain(model, {"0": "sphere", "2": "stiefel"})
    plain = _state(_net())
    w0 = model[0].weight
    with pytest.warns(kernelgeo.KernelProjectionWarning, match=r"2 loaded kernel") as rec:
        model.load_state_dict(plain)
    assert rec[0].filename == __file__
    assert model[0].weight is w0 and kernelgeo.constraint_error(model) < 1e-5
    torch.testing.assert_close(w0.detach(), w0.manifold.projx(plain["0.weight"]))
    # the user's dict is not modified
    torch.testing.assert_close(plain["0.weight"], _net().state_dict()["0.weight"])


def test_hooks_survive_deepcopy_and_pickle():
    model = _net()
    kernelgeo.constrain(model, "sphere")
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        assert isinstance(other[0].weight, ManifoldParameter)
        sd = _state(other)
        sd["0.weight"][0] = float("nan")
        with pytest.raises(ValueError, match="'0.weight'"):
            other.load_state_dict(sd)


def test_hand_declared_load_state_dict_validates_first():
    from kernelgeo.manifolds import Sphere

    conv = nn.Conv2d(3, 8, 3)
    conv.weight = ManifoldParameter(Sphere().projx(conv.weight.detach()), manifold=Sphere())
    bad = dict(nn.Conv2d(3, 8, 3).state_dict())
    bad["bias"] = bad["bias"] + 5
    bad["weight"] = bad["weight"].clone()
    bad["weight"][0, 0, 0, 0] = float("nan")
    keep = _state(conv)
    with pytest.raises(ValueError, match="'weight'.*nothing was loaded"):
        kernelgeo.load_state_dict(conv, bad)
    for k, v in conv.state_dict().items():
        assert torch.equal(v, keep[k]), k


# -------------------------------------------------------------------------- unconstrain


def test_unconstrain_keeps_identity_values_and_keys():
    model = _net()
    kernelgeo.constrain(model, {"0": "sphere", "2": "stiefel"})
    model[2].weight.requires_grad_(False)
    ps = [model[0].weight, model[2].weight]
    vals = [p.detach().clone() for p in ps]
    keys = list(model.state_dict())
    report = kernelgeo.unconstrain(model)
    assert [p is q for p, q in zip(ps, (model[0].weight, model[2].weight), strict=True)] == \
        [True, True]
    for p, v in zip(ps, vals, strict=True):
        assert type(p) is nn.Parameter and not hasattr(p, "manifold")
        assert torch.equal(p.detach(), v)
    assert [p.requires_grad for p in ps] == [True, False]
    assert list(model.state_dict()) == keys
    assert [e.reason for e in report] == ["was 8 x S^26(r=1)", "was 1 x St(72,8)(r=1)"]
    assert "0 of 2 kernels on manifolds" in str(report)
    assert not list(kernelgeo.manifold_parameters(model))
    kernelgeo.constrain(model, "oblique")  # and back again
    assert kernelgeo.constraint_error(model) < 1e-5


def test_unconstrain_selected_layers_and_unknown_glob():
    model = _net()
    kernelgeo.constrain(model, "sphere")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=r"glob\(s\) \['9\*'\] match no module.*0, 2"):
        kernelgeo.unconstrain(model, "9*")
    _assert_unchanged(model, snap)
    report = kernelgeo.unconstrain(model, ["2"])
    assert [e.name for e in report] == ["2"]
    assert isinstance(model[0].weight, ManifoldParameter)
    assert type(model[2].weight) is nn.Parameter


def test_unconstrain_tied_reports_aliases():
    net = Tied()
    kernelgeo.constrain(net, "sphere")
    report = kernelgeo.unconstrain(net, "c2")
    assert type(net.c1.weight) is nn.Parameter and net.c1.weight is net.c2.weight
    assert report.entries[0].aliases == ("c1.weight",)


def test_euclidean_spec_reverts_with_a_truthful_report():
    model = _net()
    kernelgeo.constrain(model, "stiefel")
    report = kernelgeo.constrain(model, "euclidean")
    assert all(type(model[i].weight) is nn.Parameter for i in (0, 2))
    assert "0 of 2 kernels on manifolds" in str(report)
    assert "was 1 x St(27,8)(r=1)" in report.entries[0].reason
    # a rule mapping reverts only what it names; unmatched layers are left as they are
    kernelgeo.constrain(model, "sphere")
    report = kernelgeo.constrain(model, {"0": "euclidean"})
    assert type(model[0].weight) is nn.Parameter
    assert isinstance(model[2].weight, ManifoldParameter)
    assert [e.status for e in report] == ["euclidean", "manifold"]
    assert "left as it is" in report.entries[1].reason
    assert "1 of 2 kernels on manifolds" in str(report)


def test_euclidean_spec_reverts_a_hand_declared_geoopt_manifold():
    import geoopt

    model = _net()
    model[0].weight = ManifoldParameter(model[0].weight.detach(), manifold=geoopt.Sphere())
    report = kernelgeo.constrain(model, "euclidean")
    assert type(model[0].weight) is nn.Parameter
    assert "was geoopt Sphere" in report.entries[0].reason


def test_unconstrain_nn_layer_stops_projecting_on_reset():
    conv = kernelgeo.nn.Conv2d(3, 8, 3, manifold="sphere")
    w = conv.weight
    kernelgeo.unconstrain(conv)
    assert conv.manifold is None and conv.weight is w and "manifold=" not in repr(conv)
    torch.manual_seed(3)
    conv.reset_parameters()
    norms = w.detach().flatten(1).norm(dim=1)
    assert not torch.allclose(norms, torch.ones_like(norms))
    kernelgeo.constrain(conv, "stiefel")
    assert conv.manifold.name == "stiefel"


def test_nn_layer_half_precision_and_load_checks():
    conv = kernelgeo.nn.Conv2d(3, 8, 3, manifold="sphere", dtype=torch.bfloat16)
    w = conv.weight
    assert w.dtype == torch.bfloat16
    assert w.manifold.constraint_error(w) <= torch.finfo(torch.bfloat16).eps * 3
    sd = {k: v.clone() for k, v in conv.state_dict().items()}
    sd["weight"][0] = float("nan")
    with pytest.raises(ValueError, match="'weight'.*NaN"):
        conv.load_state_dict(sd)


# ------------------------------------------------------------------ package attributes


def test_subpackages_are_attributes_and_import_stays_light():
    code = (
        "import sys, torch, kernelgeo\n"
        "assert 'geomstats' not in sys.modules\n"
        "lazy = [m for m in ('kernelgeo.optim', 'kernelgeo.analysis') if m in sys.modules]\n"
        "assert not lazy, lazy\n"
        "assert kernelgeo.nn.Conv2d and kernelgeo.manifolds.Sphere\n"
        "assert kernelgeo.optim.ConvergentRSGD and kernelgeo.analysis.kernel_dist\n"
        "assert 'optim' in dir(kernelgeo)\n"
        "assert 'geomstats' not in sys.modules\n"
        "assert torch.get_default_dtype() == torch.float32\n"
        "try:\n    kernelgeo.nope\nexcept AttributeError as e:\n    print(e)\n")
    res = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                         text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "module 'kernelgeo' has no attribute 'nope'"
