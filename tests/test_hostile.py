"""Hostile inputs to the optimizer and the constraint checks: every case ends in a correct
result or a clear error that names the parameter, with nothing changed.

Optimizer part: huge finite gradients on every backend (reference, torch ops, fused C
kernels), huge learning rates, out-of-range hyper-parameters, half precision with Stiefel
kernels, sparse gradients, optimizer states of another geometry; ``constraint_error`` over
several layers and product blocks; a long float32 soak (``slow``).
"""

from __future__ import annotations

import math
import os
import time

import pytest
import torch

import kernelgeo
from kernelgeo._compat import geoopt
from kernelgeo.manifolds import Stiefel, get_manifold
from kernelgeo.optim import ConvergentRSGD, NonFiniteGradientError, StepOverflowError, native

GEOMS = {"sphere": "sphere", "centered-sphere": "centered-sphere", "oblique": "oblique",
         "oblique-slice": "oblique-slice", "stiefel": "stiefel",
         "stiefel-polar": Stiefel(retraction="polar"), "stiefel-slice": "stiefel-slice",
         "product": "po:sphere+stiefel"}
PATHS = {"reference": dict(batched=False), "torch": dict(native=False),
         "native": dict(native=True)}
SHAPE = (8, 4, 3, 3)


def _needs(path):
    if path == "native" and not native.available():
        pytest.skip(f"fused CPU kernels unavailable: {native.unavailable_reason()}")


def _param(geom, shape=SHAPE, dtype=torch.float32, seed=0):
    m = get_manifold(GEOMS[geom])
    gen = torch.Generator().manual_seed(seed)
    return m, geoopt.ManifoldParameter(m.random(shape, dtype=dtype, generator=gen), manifold=m)


def _grad(shape, scale, gen, dtype=torch.float32):
    """A gradient whose largest entry is exactly ``scale`` (finite for any float)."""
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    return (g / g.abs().max() * scale).to(dtype)


def _moved_over_cap(m, x0, x1) -> float:
    """Largest per-component Euclidean distance moved, over half the component's
    injectivity radius (the cap of rule "bounded", ``max_step=0.5``)."""
    blocks = m.blocks(x0.shape) if hasattr(m, "blocks") else [(m, None)]
    worst = 0.0
    for bm, idx in blocks:
        a = x0 if idx is None or len(blocks) == 1 else x0[idx]
        b = x1 if idx is None or len(blocks) == 1 else x1[idx]
        d = (bm.to_batch(b.double()) - bm.to_batch(a.double())).flatten(1)
        worst = max(worst, float(d.norm(dim=1).max()) / (0.5 * bm.injectivity_radius(a.shape)))
    return worst


# ------------------------------------------------------------------------ the sweep
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("geom", list(GEOMS))
def test_sweep_huge_gradients_end_clean_or_refused_unchanged(geom, path):
    """Gradient scale x rule x momentum on one small kernel: after a normal step and two
    steps whose gradients' largest entry is ``scale``, the kernel is finite and on its
    manifold, and with ``bounded`` each component moved at most the rule's cap; or an
    exception was raised and neither the kernel nor its momentum changed."""
    _needs(path)
    for scale in (1.0, 1e19, 1e30, 3e38):
        for rule in ("gsgd", "bounded", "none"):
            for mu in (0.0, 0.9):
                m, p = _param(geom)
                gen = torch.Generator().manual_seed(1)
                opt = ConvergentRSGD([p], lr=0.1, momentum=mu, step_rule=rule, **PATHS[path])
                case = f"{geom}/{path}/scale={scale:g}/{rule}/mu={mu}"
                for k in range(3):
                    x0 = p.detach().clone()
                    st0 = [t.clone() for t in opt.state[p].get("momentum_blocks", [])] \
                        if p in opt.state else []
                    p.grad = _grad(SHAPE, scale if k else 1.0, gen)
                    try:
                        opt.step()
                    except (StepOverflowError, NonFiniteGradientError, ValueError) as e:
                        assert "param_groups[0]['params'][0]" in str(e), case
                        assert torch.equal(p.detach(), x0), case
                        st1 = opt.state[p].get("momentum_blocks", []) if p in opt.state else []
                        assert all(torch.equal(a, b) for a, b in zip(st0, st1, strict=True))
                        break
                    x = p.detach()
                    assert torch.isfinite(x).all(), case
                    err = m.constraint_error(x)
                    assert err < 1e-4, (case, err)
                    if rule == "bounded":
                        # a retraction moves a point at most as far as the tangent step (spheres:
                        # chord <= arc; QR/polar: to first order), with slack for Stiefel
                        assert _moved_over_cap(m, x0, x) <= 1.5, case
                    for t in opt.state[p].get("momentum_blocks", []) if p in opt.state else []:
                        assert torch.isfinite(t).all(), case


@pytest.mark.parametrize("path", list(PATHS))
def test_huge_gradient_matches_reference_on_scaled_down_gradient(path):
    """The direction of a huge gradient is kept: with ``bounded`` and a step above the cap,
    the step equals the step on the same gradient divided by 1e30 (also above the cap)."""
    _needs(path)
    for geom in ("sphere", "oblique", "stiefel", "product"):
        m, p = _param(geom, dtype=torch.float64)
        q = geoopt.ManifoldParameter(p.detach().clone(), manifold=m)
        gen = torch.Generator().manual_seed(3)
        g = _grad(SHAPE, 1e3, gen, torch.float64)
        a = ConvergentRSGD([p], lr=0.5, step_rule="bounded", **PATHS[path])
        b = ConvergentRSGD([q], lr=0.5, step_rule="bounded", batched=False)
        p.grad, q.grad = g * 1e30, g.clone()
        a.step()
        b.step()
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("path", list(PATHS))
def test_momentum_overflow_refused_atomically(path):
    """A float32 buffer that would exceed the largest float: StepOverflowError naming the
    parameter; no parameter (the other kernel and a Euclidean one included) changed."""
    _needs(path)
    _, p = _param("sphere")
    _, q = _param("oblique", seed=1)
    e = torch.nn.Parameter(torch.randn(5))
    opt = ConvergentRSGD([("conv1.weight", p), ("conv2.weight", q), ("fc.bias", e)], lr=0.1,
                         momentum=0.9, dampening=0.0, **PATHS[path])
    gen = torch.Generator().manual_seed(0)
    raised = False
    for _ in range(6):
        for t in (p, q, e):
            t.grad = _grad(t.shape, 3e38, gen)
        before = [t.detach().clone() for t in (p, q, e)]
        bufs = [b.clone() for t in (p, q) if t in opt.state
                for b in opt.state[t].get("momentum_blocks", [])]
        try:
            opt.step()
        except StepOverflowError as err:
            raised = True
            msg = str(err)
            assert "'conv1.weight'" in msg or "'conv2.weight'" in msg or "'fc.bias'" in msg
            assert "learning rate" in msg
            for t, b in zip((p, q, e), before, strict=True):
                assert torch.equal(t.detach(), b)
            after = [b for t in (p, q) for b in opt.state[t].get("momentum_blocks", [])]
            assert all(torch.equal(a, b) for a, b in zip(bufs, after, strict=True))
            break
        for t in (p, q, e):
            assert torch.isfinite(t).all()
    assert raised, "a float32 momentum buffer beyond 3.4e38 must be refused"


@pytest.mark.parametrize("path", list(PATHS))
def test_skip_mode_skips_an_overflowing_step(path):
    _needs(path)
    _, p = _param("sphere")
    opt = ConvergentRSGD([p], lr=float(torch.finfo(torch.float32).max) / 2,
                         step_rule="none", nonfinite="skip", **PATHS[path])
    e = torch.nn.Parameter(torch.full((3,), 3e38))
    opt.add_param_group({"params": [e]})
    p.grad = torch.ones(SHAPE)
    e.grad = torch.full((3,), -1.0)  # e + lr * 1 overflows
    x0 = p.detach().clone()
    opt.step()
    assert opt.skipped_steps == 1
    assert torch.equal(p.detach(), x0)


# ----------------------------------------------------------------- huge learning rates
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("geom", ["stiefel-slice", "stiefel", "stiefel-polar", "sphere"])
def test_huge_learning_rate_gives_finite_on_manifold_kernels(geom, path):
    """lr = 1e4 (and 1e30) with rule "none": Cholesky-QR would fail or lose orthogonality;
    the retraction falls back to Householder QR and the kernel stays on its manifold."""
    _needs(path)
    for lr in (1e4, 1e30):
        for mu in (0.0, 0.9):
            m, p = _param(geom)
            gen = torch.Generator().manual_seed(2)
            opt = ConvergentRSGD([p], lr=lr, momentum=mu, step_rule="none", **PATHS[path])
            for _ in range(3):
                p.grad = _grad(SHAPE, 1.0, gen)
                opt.step()
                assert torch.isfinite(p).all()
                assert m.constraint_error(p) < 1e-5, (geom, path, lr, mu)


# ------------------------------------------------------------ constructor validation
@pytest.mark.parametrize("kw", [dict(lr=math.inf), dict(lr=math.nan), dict(lr=-1.0),
                                dict(momentum=math.inf), dict(momentum=5.0),
                                dict(momentum=1.0), dict(momentum=-0.1),
                                dict(momentum=math.nan), dict(dampening=2.0),
                                dict(dampening=math.nan), dict(weight_decay=-1e-4),
                                dict(weight_decay=math.inf), dict(weight_decay=math.nan),
                                dict(rho=-1.0), dict(rho=math.nan), dict(max_step=1.5)])
def test_constructor_refuses_out_of_range_hyperparameters(kw):
    _, p = _param("sphere")
    args = dict(lr=0.1) | kw
    key = next(iter(kw))
    with pytest.raises(ValueError, match=key):
        ConvergentRSGD([p], **args)
    opt = ConvergentRSGD([p], lr=0.1)
    with pytest.raises(ValueError, match=key):  # per-group overrides too
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], **args})


def test_scheduler_setting_infinite_lr_is_refused_before_any_change():
    _, p = _param("sphere")
    opt = ConvergentRSGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: math.inf if t else 1.0)
    p.grad = torch.ones(SHAPE)
    opt.step()
    sched.step()
    x0 = p.detach().clone()
    with pytest.raises(ValueError, match=r"param_groups\[0\]: lr=inf"):
        opt.step()
    assert torch.equal(p.detach(), x0)


def test_unnamed_parameters_are_described_in_errors():
    _, p = _param("product")
    e = torch.nn.Parameter(torch.zeros(3))
    opt = ConvergentRSGD([e, p], lr=0.1)
    p.grad = torch.full(SHAPE, math.nan)
    e.grad = torch.zeros(3)
    with pytest.raises(NonFiniteGradientError) as info:
        opt.step()
    msg = str(info.value)
    assert "param_groups[0]['params'][1]" in msg
    assert "shape (8, 4, 3, 3)" in msg and "sphere+stiefel" in msg
    assert "named_parameters" in msg


# ----------------------------------------------------------------- half precision
@pytest.mark.parametrize("path", ["reference", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("geom", ["stiefel", "stiefel-slice", "stiefel-polar", "product"])
def test_half_precision_stiefel_steps_in_float32(geom, dtype, path):
    """torch has no half-precision Cholesky/QR/SVD on the CPU: the factorisation is done in
    float32 (upcast) and the result stored in the parameter's dtype; every parameter of the
    step (a sphere kernel too) is updated, and the periodic re-projection works too."""
    m, p = _param(geom, dtype=torch.float32)
    p = geoopt.ManifoldParameter(p.detach().to(dtype), manifold=m)
    _, s = _param("sphere", seed=5)
    s = geoopt.ManifoldParameter(s.detach().to(dtype), manifold=s.manifold)
    opt = ConvergentRSGD([p, s], lr=0.1, momentum=0.9, stabilize=2, **PATHS[path])
    gen = torch.Generator().manual_seed(4)
    for _ in range(4):
        x0, s0 = p.detach().clone(), s.detach().clone()
        p.grad, s.grad = _grad(SHAPE, 1.0, gen, dtype), _grad(SHAPE, 1.0, gen, dtype)
        opt.step()
        assert p.dtype == dtype and torch.isfinite(p.float()).all()
        assert not torch.equal(p.detach(), x0) and not torch.equal(s.detach(), s0)
        # half precision: the stored point is on the manifold to its rounding (~1e-2)
        assert m.constraint_error(p.float()) < 5e-2


# ------------------------------------------------------------------ sparse gradients
@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("which", ["kernel", "euclidean"])
def test_sparse_gradient_is_refused_naming_the_parameter(which, path):
    _needs(path)
    _, p = _param("sphere")
    e = torch.nn.Parameter(torch.zeros(4, 3))
    opt = ConvergentRSGD([("conv.weight", p), ("emb.weight", e)], lr=0.1, **PATHS[path])
    p.grad, e.grad = torch.ones(SHAPE), torch.ones(4, 3)
    bad, name = (p, "conv.weight") if which == "kernel" else (e, "emb.weight")
    bad.grad = bad.grad.to_sparse()
    x0 = [p.detach().clone(), e.detach().clone()]
    with pytest.raises(RuntimeError, match=rf"sparse gradients.*'{name}'"):
        opt.step()
    assert torch.equal(p.detach(), x0[0]) and torch.equal(e.detach(), x0[1])


# ---------------------------------------------------------------------- state dicts
def _trained(geom, path="torch"):
    m, p = _param(geom)
    opt = ConvergentRSGD([("conv.weight", p)], lr=0.1, momentum=0.9, **PATHS[path])
    p.grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    opt.step()
    return m, p, opt


@pytest.mark.parametrize("path", list(PATHS))
def test_state_dict_of_another_geometry_is_refused_at_load(path):
    _needs(path)
    _, _, src = _trained("product")  # two momentum blocks
    _, p, opt = _trained("sphere", path)
    before = opt.state_dict()
    with pytest.raises(ValueError, match=r"'conv.weight'.*2 momentum block\(s\), the manifold"
                                         r" has 1"):
        opt.load_state_dict(src.state_dict())
    after = opt.state_dict()
    assert torch.equal(before["state"][0]["momentum_blocks"][0],
                       after["state"][0]["momentum_blocks"][0])
    # another shape
    m, q = _param("sphere", shape=(4, 4, 3, 3))
    o2 = ConvergentRSGD([("conv.weight", q)], lr=0.1, momentum=0.9, **PATHS[path])
    with pytest.raises(ValueError, match=r"'conv.weight'.*shape \(8, 4, 3, 3\), expected "
                                         r"\(4, 4, 3, 3\)"):
        o2.load_state_dict(opt.state_dict())
    # a Euclidean buffer for a kernel, and NaN momentum
    sd = opt.state_dict()
    sd["state"][0] = {"momentum_buffer": torch.zeros(SHAPE)}
    with pytest.raises(ValueError, match="Euclidean 'momentum_buffer'"):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["state"][0]["momentum_blocks"] = [torch.full(SHAPE, math.nan)]
    with pytest.raises(ValueError, match="NaN"):
        opt.load_state_dict(sd)
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = math.inf
    with pytest.raises(ValueError, match="lr=inf"):
        opt.load_state_dict(sd)


@pytest.mark.parametrize("path", list(PATHS))
def test_loaded_momentum_is_made_tangent_and_next_step_is_clean(path):
    """A state of another geometry with the same block structure (Stiefel -> sphere) loads;
    its momentum is projected onto the tangent space at the current point."""
    _needs(path)
    _, _, src = _trained("stiefel")
    m, p, opt = _trained("sphere", path)
    opt.load_state_dict(src.state_dict())
    buf = opt.state[p]["momentum_blocks"][0]
    torch.testing.assert_close(m.proju(p.detach(), buf), buf, rtol=1e-5, atol=1e-6)
    x = m.to_batch(p.detach().double())
    assert float((x * m.to_batch(buf.double())).sum(-1).abs().max()) < 1e-6
    p.grad = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    opt.step()
    assert torch.isfinite(p).all() and m.constraint_error(p) < 1e-5


# ------------------------------------------------------------------ constraint_error
def test_constraint_error_propagates_nan_and_inf_over_layers_and_blocks():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3))
    kernelgeo.constrain(net, "sphere")
    assert kernelgeo.constraint_error(net) < 1e-5
    with torch.no_grad():
        net[1].weight[2, 0, 0, 0] = math.nan
    assert math.isnan(kernelgeo.constraint_error(net))
    with torch.no_grad():
        net[1].weight[2, 0, 0, 0] = math.inf
    assert kernelgeo.constraint_error(net) == math.inf
    with torch.no_grad():  # NaN anywhere wins over Inf elsewhere
        net[0].weight[0, 0, 0, 0] = math.nan
    assert math.isnan(kernelgeo.constraint_error(net))

    prod = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3))
    kernelgeo.constrain(prod, "po:sphere+stiefel")
    assert kernelgeo.constraint_error(prod) < 1e-5
    with torch.no_grad():  # the second (Stiefel) block only
        prod[0].weight[7, 0, 0, 0] = math.nan
    assert math.isnan(kernelgeo.constraint_error(prod))


# ---------------------------------------------------------------------------- soak
#: 1e4 steps (about 10-15 s of one core) in the default slow run; the full soak is
#: ``KERNELGEO_SOAK_STEPS=100000 pytest -m slow tests/test_hostile.py`` (about 90 s)
SOAK_STEPS = int(os.environ.get("KERNELGEO_SOAK_STEPS", "10000"))


@pytest.mark.slow
def test_soak_float32_constraint_error_stays_small():
    """``SOAK_STEPS`` float32 steps with momentum on one small kernel of every geometry (one
    optimizer, default settings: fused kernels where they apply, re-projection every 100
    steps): the constraint error stays below 1e-6 (unit radius) throughout."""
    params, mans = [], []
    for i, geom in enumerate(GEOMS):
        m, p = _param(geom, shape=(4, 2, 3, 3), seed=i)
        params.append(p)
        mans.append(m)
    opt = ConvergentRSGD(params, lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(64, len(params), 4, 2, 3, 3, generator=gen)
    t0 = time.perf_counter()
    worst = 0.0
    for t in range(SOAK_STEPS):
        gs = noise[t % 64]
        for k, p in enumerate(params):  # noise: steps of constant size, the worst for drift
            p.grad = gs[k]
        opt.step()
        if t % 1000 == 999 or t == SOAK_STEPS - 1:
            errs = [m.constraint_error(p) for m, p in zip(mans, params, strict=True)]
            worst = max(worst, *errs)
            assert worst <= 1e-6, (t, dict(zip(GEOMS, errs, strict=True)))
    assert all(torch.isfinite(p).all() for p in params)
    assert time.perf_counter() - t0 < 3600
