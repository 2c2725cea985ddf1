"""The Triton backend of ``ConvergentRSGD``: same iterates as the reference path, nothing
written after a non-finite gradient, and a launch count that does not grow with depth.

The kernels run in Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1`` is set here,
before :mod:`kernelgeo.optim._triton_kernels` is imported (Triton decides at decoration time
whether a ``@triton.jit`` function is interpreted).  Skipped when Triton cannot be imported or
when the kernels were already compiled for a GPU in this process.
"""

from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import kernelgeo  # noqa: E402
from kernelgeo.optim import ConvergentRSGD, NonFiniteGradientError  # noqa: E402
from kernelgeo.optim import triton_backend as tb  # noqa: E402

pytestmark = pytest.mark.skipif(not tb.available(),
                                reason=f"triton unavailable: {tb.unavailable_reason()}")


@pytest.fixture(autouse=True)
def _interpreted():
    from triton.runtime.interpreter import InterpretedFunction

    from kernelgeo.optim import _triton_kernels as k

    if not isinstance(k.sphere_short, InterpretedFunction):
        pytest.skip("the Triton kernels were compiled for a GPU in this process")
    os.environ["TRITON_INTERPRET"] = "1"


def _net(dtype=torch.float32, linear=False):
    """Kernels of every tile class: 3x3 (several of one class in one launch), 1x1, 7-entry
    rows and columns, rows of 1050 entries (the long kernel: three blocks of 512), and a
    Linear weight."""
    mods = [nn.Conv2d(3, 8, 3), nn.Conv2d(3, 5, 3), nn.Conv2d(8, 5, 1),
            nn.Conv2d(1, 6, (7, 1)), nn.Conv2d(70, 3, (5, 3)), nn.Conv2d(5, 4, 3)]
    if linear:
        mods.append(nn.Linear(7, 9))
    return nn.Sequential(*mods).to(dtype)


def _pair(spec, dtype=torch.float32, linear=False, seed=0):
    torch.manual_seed(seed)
    net = _net(dtype, linear)
    kernelgeo.constrain(net, spec, on_invalid="skip", include_linear=linear)
    return net, copy.deepcopy(net)


def _grads(nets, gen, scale=1.0, contiguous=False):
    for ps in zip(*(n.parameters() for n in nets), strict=True):
        g = torch.randn(ps[0].shape, generator=gen, dtype=torch.float64) * scale
        for p in ps:
            # autograd makes the gradient in the parameter's memory layout; a contiguous one
            # takes the backend's copy path for kernels stored otherwise
            p.grad = g.to(p.dtype).contiguous() if contiguous else \
                torch.empty_like(p.detach()).copy_(g)


def _assert_same(ref, tri, o_ref, o_tri, dtype):
    """Weights and optimizer state (every buffer, same shapes) of the two nets agree."""
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4,
                                                                         atol=2e-5)
    for (name, a), b in zip(ref.named_parameters(), tri.parameters(), strict=True):
        torch.testing.assert_close(b, a, **tol, msg=lambda m, n=name: f"{n}: {m}")
        sa, sb = o_ref.state[a], o_tri.state[b]
        assert sa.keys() == sb.keys(), name
        for key in sa:
            va, vb = sa[key], sb[key]
            for x, y in zip(va if isinstance(va, list) else [va],
                            vb if isinstance(vb, list) else [vb], strict=True):
                assert y.shape == x.shape
                torch.testing.assert_close(y, x, **tol, msg=lambda m, n=name: f"{n}: {m}")


def _step_both(ref, tri, dtype, steps, scale, contiguous, **kw):
    """``steps`` steps of the per-parameter reference path on ``ref`` and of the Triton
    backend on ``tri`` with the same gradients; weights and state compared; returns the
    Triton optimizer."""
    o_ref = ConvergentRSGD(ref.parameters(), batched=False, stabilize=None, **kw)
    o_tri = ConvergentRSGD(tri.parameters(), backend="triton", stabilize=None, **kw)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        _grads((ref, tri), gen, scale, contiguous)
        o_ref.step()
        o_tri.step()
    _assert_same(ref, tri, o_ref, o_tri, dtype)
    return o_tri


def _compare(spec, dtype, steps=2, linear=False, contiguous=False, scale=1.0, **kw):
    ref, tri = _pair(spec, dtype, linear)
    o_tri = _step_both(ref, tri, dtype, steps, scale, contiguous, **kw)
    assert isinstance(o_tri._plan, tb.TritonPlan)
    return o_tri


MOMENTA = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
           dict(momentum=0.5, dampening=0.3)]


#: every step rule with momentum, every momentum variant with the default rule
GRID = [("none", MOMENTA[1]), ("bounded", MOMENTA[1])] + [("gsgd", m) for m in MOMENTA]


@pytest.mark.parametrize("rule,mom", GRID, ids=["none", "bounded", "plain", "momentum",
                                                 "nesterov", "dampening"])
@pytest.mark.parametrize("spec", ["sphere", "oblique"])
def test_float32_matches_reference(spec, rule, mom):
    # lr 0.5 on unit-scale gradients: the gsgd/bounded caps are active on many components
    _compare(spec, torch.float32, lr=0.5, step_rule=rule, **mom)


@pytest.mark.parametrize("spec", ["centered-sphere", "po:sphere+oblique"])
@pytest.mark.parametrize("mom", MOMENTA[1:3], ids=["momentum", "nesterov"])
def test_centred_and_product_match_reference(spec, mom):
    _compare(spec, torch.float32, lr=0.5, **mom)


@pytest.mark.parametrize("spec", ["sphere", "centered-sphere", "oblique", "po:sphere+oblique"])
def test_float64_tight(spec):
    _compare(spec, torch.float64, lr=0.2, momentum=0.9, dampening=0.1, step_rule="gsgd")


def test_linear_weight_and_contiguous_gradients():
    _compare("sphere", torch.float64, linear=True, lr=0.3, momentum=0.9)
    _compare("oblique", torch.float64, contiguous=True, lr=0.3, momentum=0.9)


def test_small_steps_and_weight_decay():
    # tiny gradients: no cap is active; weight decay on the biases, and on the kernels (where
    # its tangent part is zero: the backend omits it, the reference computes it)
    _compare("sphere", torch.float64, scale=1e-3, lr=0.1, momentum=0.9, weight_decay=1e-2)
    _compare("centered-sphere", torch.float64, lr=0.1, momentum=0.9, weight_decay=0.1,
             decay_manifold=True)


def test_state_dict_round_trip():
    ref, tri = _pair("oblique", torch.float64)
    kw = dict(lr=0.3, momentum=0.9, stabilize=None)
    o_ref = ConvergentRSGD(ref.parameters(), batched=False, **kw)
    o_tri = ConvergentRSGD(tri.parameters(), backend="triton", **kw)
    gen = torch.Generator().manual_seed(3)
    for i in range(3):
        if i == 2:  # a fresh optimizer from the saved state
            sd = copy.deepcopy(o_tri.state_dict())
            o_tri = ConvergentRSGD(tri.parameters(), backend="triton", **kw)
            o_tri.load_state_dict(sd)
        _grads((ref, tri), gen)
        o_ref.step()
        o_tri.step()
    for a, b in zip(ref.parameters(), tri.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------ Stiefel kernels
def _stiefel_net(dtype=torch.float32):
    """Stiefel blocks of several classes: p = 8 (n = 27), p = 4 as 3 groups of a 1x1 conv
    (out > in: n = 4) and in n = 72 and 20 (one class, padded to 72), p = 7 (n = 15), and
    O(3) blocks (n = p = 3)."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(4, 12, 1), nn.Conv2d(8, 4, 3),
                         nn.Conv2d(5, 4, 2), nn.Conv2d(5, 7, (1, 3)),
                         nn.Conv2d(3, 9, 1)).to(dtype)


def _stiefel_pair(spec="stiefel", dtype=torch.float32, seed=0, small=False, mkw=None):
    torch.manual_seed(seed)
    # slices: few of them (the interpreter runs one program per block)
    net = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Conv2d(2, 2, (1, 3)),
                        nn.Conv2d(1, 2, (3, 2))).to(dtype) if small else _stiefel_net(dtype)
    kernelgeo.constrain(net, spec, on_invalid="skip", **(mkw or {}))
    return net, copy.deepcopy(net)


def _stiefel_compare(spec="stiefel", dtype=torch.float32, steps=3, scale=1.0,
                     contiguous=False, swapped=False, small=False, mkw=None, **kw):
    ref, tri = _stiefel_pair(spec, dtype, small=small, mkw=mkw)
    if swapped:  # kernels stored with the last two dimensions swapped (any strides work)
        for p in tri.parameters():
            if p.dim() == 4:
                p.data = p.data.transpose(2, 3).contiguous().transpose(2, 3)
    o_tri = _step_both(ref, tri, dtype, steps, scale, contiguous, **kw)
    dp = next(iter(o_tri._plan.devices.values()))
    assert dp.stiefel_items and not any(ch.kind == "stiefel" for gp in o_tri._plan.fallback
                                        for ch in gp.chunks)
    return o_tri


@pytest.mark.parametrize("rule,mom", GRID, ids=["none", "bounded", "plain", "momentum",
                                                 "nesterov", "dampening"])
def test_stiefel_float32_matches_reference(rule, mom):
    o = _stiefel_compare(lr=0.5, step_rule=rule, **mom)
    dp = next(iter(o._plan.devices.values()))
    classes = [(c.p, c.nmax, len(c.blocks)) for st in dp.stiefel for c in st.classes]
    assert sorted(classes) == [(3, 3, 3), (4, 4, 3), (4, 72, 2), (7, 15, 1), (8, 27, 1)]


def test_stiefel_slices_products_and_float64():
    _stiefel_compare("stiefel-slice", small=True, lr=0.5, momentum=0.9)
    # strided rows (blocks of input channels), swapped storage, gradients with other strides
    _stiefel_compare("pi:2:stiefel", lr=0.5, momentum=0.9)
    _stiefel_compare("stiefel-slice", torch.float64, small=True, swapped=True,
                     contiguous=True, lr=0.5, momentum=0.9)
    o = _stiefel_compare("po:sphere+stiefel", lr=0.5, momentum=0.9, nesterov=True)
    dp = next(iter(o._plan.devices.values()))
    assert dp.items and dp.stiefel_items  # sphere blocks by the sphere kernels
    _stiefel_compare("stiefel", torch.float64, lr=0.2, momentum=0.9, dampening=0.1)
    # radius r sqrt(n): one class per radius
    o = _stiefel_compare("stiefel", mkw=dict(radius=0.5, radius_scale="fan_in"), lr=0.5,
                         momentum=0.9)
    dp = next(iter(o._plan.devices.values()))
    assert sorted(c.nmax for st in dp.stiefel for c in st.classes) == [3, 4, 15, 20, 27, 72]


def test_stiefel_long_steps_and_weight_decay(monkeypatch):
    # rule "none" with a large lr: steps longer than 3r take the checked path (one
    # synchronisation; Householder QR for the flagged classes); weight decay on the
    # manifold has a zero tangent part (omitted here, computed by the reference)
    from kernelgeo.optim import stiefel_stack

    calls = []
    qf = stiefel_stack._qf
    monkeypatch.setattr(stiefel_stack, "_qf", lambda m: (calls.append(m.shape), qf(m))[1])
    _stiefel_compare("stiefel", torch.float64, lr=20.0, step_rule="none", momentum=0.9)
    assert len(calls) == 15  # every class at every step
    calls.clear()
    _stiefel_compare("stiefel", torch.float64, scale=1e-3, lr=0.1, momentum=0.9,
                     weight_decay=0.1, decay_manifold=True)
    assert not calls


def test_stiefel_state_dict_round_trip():
    ref, tri = _stiefel_pair("po:sphere+stiefel", torch.float64)
    kw = dict(lr=0.3, momentum=0.9, stabilize=None)
    o_ref = ConvergentRSGD(ref.parameters(), batched=False, **kw)
    o_tri = ConvergentRSGD(tri.parameters(), backend="triton", **kw)
    gen = torch.Generator().manual_seed(3)
    for i in range(3):
        if i == 2:  # a fresh optimizer from the saved state
            sd = o_tri.state_dict()
            for st in sd["state"].values():  # the blocks' own tensors, no shared storage
                for t in st.get("momentum_blocks", []):
                    assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
            sd = copy.deepcopy(sd)
            o_tri = ConvergentRSGD(tri.parameters(), backend="triton", **kw)
            o_tri.load_state_dict(sd)
        _grads((ref, tri), gen)
        o_ref.step()
        o_tri.step()
    for a, b in zip(ref.parameters(), tri.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
        for x, y in zip(o_ref.state[a].get("momentum_blocks", []),
                        o_tri.state[b].get("momentum_blocks", []), strict=True):
            torch.testing.assert_close(y, x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_stiefel_nonfinite_gradient_writes_nothing(bad):
    net, _ = _stiefel_pair()
    opt = ConvergentRSGD(net.named_parameters(), lr=0.5, momentum=0.9, backend="triton")
    gen = torch.Generator().manual_seed(0)
    _grads((net,), gen)
    opt.step()
    _grads((net,), gen)
    net[2].weight.grad.view(-1)[5] = bad
    before = [p.detach().clone() for p in net.parameters()]
    bufs = [t.clone() for st in opt.state.values() for t in st.get("momentum_blocks", [])]
    with pytest.raises(NonFiniteGradientError, match="2"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    after = [t for st in opt.state.values() for t in st.get("momentum_blocks", [])]
    assert len(after) == 6 and all(torch.equal(a, b) for a, b in zip(after, bufs,
                                                                      strict=True))


def test_stiefel_launch_count_does_not_grow_with_layers():
    # stacked classes: 3x or 1x the same layers give the same number of ops and launches
    def count(reps):
        torch.manual_seed(0)
        net = nn.Sequential(*[m for _ in range(reps) for m in (
            nn.Conv2d(4, 6, 3), nn.Conv2d(6, 6, 1), nn.Conv2d(4, 12, 1))])
        kernelgeo.constrain(net, "stiefel")
        opt = ConvergentRSGD(net.parameters(), lr=0.1, momentum=0.9, backend="triton")
        launches = _bench()
        return launches.count_step(opt, net)

    one, three = count(1), count(3)
    assert one == three
    # per class (p = 6: n = 36 and 6 apart; p = 4): 9 ATen ops, 4 Triton launches in all
    ops, n = one
    assert n == 5 and ops <= 3 * 9 + 12


def test_one_launch_per_tile_class():
    # rows of 27 (two kernels: one launch), 8 and 7 (one launch, blocks of 8), 45, 1050
    # (long rows): four launches, and one check launch
    net, _ = _pair("sphere")
    opt = ConvergentRSGD(net.parameters(), lr=0.1, momentum=0.9, backend="triton")
    _grads((net,), torch.Generator().manual_seed(0))
    with tb.counting() as c:
        opt.step()
    dp = next(iter(opt._plan.devices.values()))
    assert len(dp.items) == 6
    assert sorted((ln.kind, ln.ba) for ln in dp.launches) == [
        ("long", 512), ("short", 8), ("short", 32), ("short", 64)]
    assert c.launches == 5


@pytest.mark.parametrize("where", ["kernel", "bias", "product"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_writes_nothing(where, bad):
    spec = "po:sphere+oblique" if where == "product" else "sphere"
    net, _ = _pair(spec)
    opt = ConvergentRSGD(net.named_parameters(), lr=0.5, momentum=0.9, backend="triton")
    gen = torch.Generator().manual_seed(0)
    _grads((net,), gen)
    opt.step()  # momentum buffers exist
    _grads((net,), gen)
    target = net[4].bias if where == "bias" else net[4].weight
    target.grad.view(-1)[1] = bad
    before = [p.detach().clone() for p in net.parameters()]
    bufs = [t.clone() for st in opt.state.values() for t in st.get("momentum_blocks", [])]
    with pytest.raises(NonFiniteGradientError, match="4"):
        opt.step()
    for p, q in zip(net.parameters(), before, strict=True):
        assert torch.equal(p, q)
    after = [t for st in opt.state.values() for t in st.get("momentum_blocks", [])]
    assert all(torch.equal(a, b) for a, b in zip(after, bufs, strict=True))
    opt.nonfinite = "skip"
    opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


def test_backend_argument():
    p = [nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="backend must be one of"):
        ConvergentRSGD(p, lr=0.1, backend="cuda")
    with pytest.raises(ValueError, match="contradicts"):
        ConvergentRSGD(p, lr=0.1, native=True, backend="triton")
    assert ConvergentRSGD(p, lr=0.1, native=False).backend == "torch"
    assert ConvergentRSGD(p, lr=0.1, backend="native").native is True
    assert not ConvergentRSGD(p, lr=0.1)._use_triton()  # auto on the CPU: no Triton


def test_cpu_without_interpreter_is_refused(monkeypatch):
    net, _ = _pair("sphere")
    opt = ConvergentRSGD(net.parameters(), lr=0.1, backend="triton")
    _grads((net,), torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in net.parameters()]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))


def _bench():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import launches

    return launches


@pytest.mark.parametrize("spec", ["sphere", "centered-sphere", "oblique", "po:sphere+oblique"])
def test_launch_count_does_not_grow_with_depth(spec):
    launches = _bench()
    counts = {}
    for name in ("resnet20", "resnet110"):
        model = kernelgeo.models.get_model(name, num_classes=10, in_channels=3)
        kernelgeo.constrain(model, spec, on_invalid="skip")
        ops, n = launches.count_step(launches.make_optimizer("triton", model), model)
        counts[name] = ops + n
    assert counts["resnet20"] <= 40
    assert counts["resnet110"] <= 1.2 * counts["resnet20"]


def test_stiefel_launch_count_resnets():
    # Stiefel classes are the same for every CIFAR ResNet depth: equal counts
    launches = _bench()
    counts = {}
    for name in ("resnet20", "resnet110"):
        model = kernelgeo.models.get_model(name, num_classes=10, in_channels=3)
        kernelgeo.constrain(model, "stiefel", on_invalid="skip")
        ops, n = launches.count_step(launches.make_optimizer("triton", model), model)
        counts[name] = ops + n
    assert counts["resnet110"] == counts["resnet20"] <= 60


@pytest.mark.slow
def test_stiefel_launch_count_resnet50():
    pytest.importorskip("torchvision")
    launches = _bench()
    model = kernelgeo.models.get_model("torchvision:resnet50", num_classes=1000, in_channels=3)
    kernelgeo.constrain(model, "stiefel", on_invalid="skip")
    ops, n = launches.count_step(launches.make_optimizer("triton", model), model)
    assert ops + n <= 200


@pytest.mark.parametrize("spec", ["sphere", "oblique"])
def test_launch_count_resnet50(spec):
    pytest.importorskip("torchvision")
    launches = _bench()
    model = kernelgeo.models.get_model("torchvision:resnet50", num_classes=1000, in_channels=3)
    kernelgeo.constrain(model, spec, on_invalid="skip")
    ops, n = launches.count_step(launches.make_optimizer("triton", model), model)
    assert ops + n <= 40


@pytest.mark.parametrize("rule", ["none", "gsgd"])
def test_float32_sums_do_not_overflow(rule):
    # gradients of 1e30: their squares overflow float32.  The optimizer's overflow test
    # (fed by the check kernel's bound) sends such a step to the reference path, and the
    # kernels themselves sum in double: either way the iterate is finite and equals the
    # float64 reference on the same data, rounded to float32
    torch.manual_seed(0)
    tri = _net(torch.float32)
    kernelgeo.constrain(tri, "sphere", on_invalid="skip")
    ref = copy.deepcopy(tri).double()
    o_ref = ConvergentRSGD(ref.parameters(), batched=False, lr=0.5, momentum=0.9,
                           step_rule=rule)
    o_tri = ConvergentRSGD(tri.parameters(), backend="triton", lr=0.5, momentum=0.9,
                           step_rule=rule)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        _grads((ref, tri), gen, scale=1e30)
        for p in tri.parameters():  # the Euclidean biases would overflow in either path
            if not hasattr(p, "manifold"):
                p.grad = None
        for p in ref.parameters():
            if not hasattr(p, "manifold"):
                p.grad = None
        o_ref.step()
        o_tri.step()
    for a, b in zip(ref.parameters(), tri.parameters(), strict=True):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b.double(), a, rtol=1e-4, atol=1e-5)


_COMPILE = r"""
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from kernelgeo.optim import _triton_kernels as k
P, T = "*i64", {"tiles": "*i64", "itab": "*i64", "ftab": "*fp64", "tile0": "i32"}
cases = [(k.sphere_short, T, dict(BC=256, BA=8, IS64=False)),
         (k.sphere_short, T, dict(BC=2, BA=1024, IS64=True)),
         (k.sphere_long, T, dict(BA=512, IS64=False)),
         (k.sphere_long, T, dict(BA=512, IS64=True)),
         (k.check_finite, {"chunks": P, "ttab": P, "out": "*fp64", "out0": "i32",
                           "big": "fp32"}, dict(IS64=False, BLOCK=1024, NB=16)),
         (k.check_finite, {"chunks": P, "ttab": P, "out": "*fp64", "out0": "i32",
                           "big": "fp32"}, dict(IS64=True, BLOCK=1024, NB=16))]
for dt, is64 in (("*fp32", False), ("*fp64", True)):
    cases += [
        (k.stiefel_gather, {"tiles": P, "itab": P, "blocks": P, "X": dt, "G": dt, "B": dt},
         dict(IS64=is64, TILE=2048)),
        (k.stiefel_direction, {"tiles": P, "blocks": P, "ftab": "*fp64", "U": dt, "B": dt,
                               "partial": "*fp64"}, dict(TILE=2048)),
        (k.stiefel_displace, {"tiles": P, "blocks": P, "ftab": "*fp64", "X": dt, "U": dt,
                              "B": dt, "partial": "*fp64", "flags": "*i32"},
         dict(TILE=2048, PB=256)),
        (k.stiefel_scatter, {"tiles": P, "itab": P, "blocks": P, "ftab": "*fp64", "Q": dt,
                             "B": dt}, dict(IS64=is64, TILE=2048))]
for fn, sig, const in cases:
    sig = dict(sig, **{c: "constexpr" for c in const})
    out = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                         target=GPUTarget("cuda", 90, 32))
    assert out.asm["cubin"], fn
print("compiled")
"""


def test_kernels_compile_for_a_gpu(tmp_path):
    """The interpreter does not type-check like the compiler: compile every kernel variant
    for an sm_90 GPU (Triton's bundled ptxas; no GPU needed), in a process without
    TRITON_INTERPRET."""
    import shutil
    import subprocess

    nv = pytest.importorskip("triton.backends.nvidia.compiler")
    ptxas = Path(nv.__file__).parent / "bin" / "ptxas"
    if not ptxas.exists() and shutil.which("ptxas") is None:
        pytest.skip("no ptxas to compile for a GPU")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent)
    res = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "compiled" in res.stdout, res.stderr[-3000:]
