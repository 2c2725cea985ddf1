"""The step rules: bounds, units, convergence against plain Riemannian SGD, the guarantee.

Problems with known minimisers (leading eigenvector, orthogonal Procrustes, Karcher means, a
product), noisy gradients and a Robbins–Monro schedule; every rule sees the same samples.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import kernelgeo
from kernelgeo._compat import geoopt
from kernelgeo.manifolds import KernelProduct, get_manifold
from kernelgeo.optim import (
    ConvergentRSGD,
    GuaranteeWarning,
    RobbinsMonroLR,
    ScheduleWarning,
    StepScaling,
    check_robbins_monro,
    rule_constants,
    step_sizes,
)

DT = torch.float64


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny LAPACK calls stall on a busy 2-core machine otherwise
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------ bounds and units
CASES = [("sphere", (6, 9)), ("oblique", (4, 2, 3, 3)), ("stiefel", (3, 8)),
         ("stiefel", (4, 4, 1, 1)), ("centered-sphere", (5, 7)), ("po:sphere+stiefel", (8, 6))]


def _blocks(m, shape):
    return m.blocks(shape) if isinstance(m, KernelProduct) else [(m, None)]


@pytest.mark.parametrize("spec,shape", CASES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_step_length_never_exceeds_cap(spec, shape, momentum, gen):
    """Every component's step length g R (the tangent vector's norm) is at most its cap, for
    learning rates and gradient scales over 16 orders of magnitude, momentum included; where
    the distance has a closed form, so is the distance moved (the projection retractions
    move by at most the tangent length: r atan(l/r) on spheres)."""
    m = get_manifold(spec)
    caps = [rule_constants("gsgd", bm, shape if idx is None else KernelProduct._sub(shape, idx)
                           ).cap for bm, idx in _blocks(m, shape)]
    for lr in (1e-4, 10.0, 1e4):
        p = geoopt.ManifoldParameter(m.random(shape, generator=gen, dtype=DT), manifold=m)
        opt = ConvergentRSGD([p], lr=lr, momentum=momentum, log_stats=True)
        for scale in (1e-6, 1.0, 1e6):
            x0 = p.detach().clone()
            p.grad = scale * torch.randn(shape, dtype=DT, generator=gen)
            opt.step()
            assert float(opt.last_stats[0]["step_max"]) <= max(caps) * (1 + 1e-9)
            for (bm, idx), cap in zip(_blocks(m, shape), caps, strict=True):
                if "stiefel" in bm.name:
                    continue
                a = x0 if idx is None else x0[idx]
                b = p.detach() if idx is None else p.detach()[idx]
                assert float(bm.component_dist(a, b).max()) <= cap * (1 + 1e-9), (spec, lr)


def test_step_sizes_cap_and_bounds():
    """g R = min(lr R, cap) and min(1, cap/(lr0 G)) <= g/lr <= 1 (the RM carry-over)."""
    for spec, shape in CASES[:4]:
        c = rule_constants("gsgd", get_manifold(spec), shape)
        rn = torch.logspace(-8, 8, 200, dtype=DT)
        big_g = float(rn.max())
        for lr in (1e-6, 1e-2, 1.0, 1e3):
            g = step_sizes(lr, rn, c)
            torch.testing.assert_close(g * rn, torch.minimum(lr * rn, torch.tensor(c.cap,
                                                                               dtype=DT)))
            assert float((g / lr).min()) >= min(1.0, c.cap / (lr * big_g)) * (1 - 1e-12)
            assert float((g / lr).max()) <= 1.0


@pytest.mark.parametrize("spec,shape", CASES)
def test_loss_scale_moves_small_steps_proportionally(spec, shape, gen):
    """Loss times s equals lr times s while the steps are below the cap (the rule depends
    on lr R only), and then the step length is s times the unscaled one."""
    m = get_manifold(spec)
    x0 = m.random(shape, generator=gen, dtype=DT)
    gr = torch.randn(shape, dtype=DT, generator=gen)
    lr = 1e-3
    c = rule_constants("gsgd", _blocks(m, shape)[0][0], shape)
    rn = torch.tensor([0.3, 1.0, 2.0], dtype=DT)
    for s in (0.1, 3.0, 10.0):
        torch.testing.assert_close(step_sizes(lr, s * rn, c) * s * rn,
                                   s * step_sizes(lr, rn, c) * rn)

        def step(lr_, grad_scale):
            p = geoopt.ManifoldParameter(x0.clone(), manifold=m)
            p.grad = grad_scale * gr
            ConvergentRSGD([p], lr=lr_).step()
            return p.detach()

        torch.testing.assert_close(step(lr, s), step(lr * s, 1.0), rtol=0, atol=1e-14)


def test_old_distance_bound_is_refused():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="rho=.*no longer"):
        ConvergentRSGD([p], lr=0.1, rho=1.0)
    with pytest.raises(ValueError, match="rho"):
        ConvergentRSGD([{"params": [p], "rho": 2.0}], lr=0.1)
    with pytest.raises(ValueError, match="max_step"):
        ConvergentRSGD([p], lr=0.1, max_step=1.5)
    assert ConvergentRSGD([p], lr=0.1).defaults["step_rule"] == "gsgd"


# ---------------------------------------------------------------------- convergence problems
def _rayleigh(gen):
    n = 20
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=gen))
    ev = torch.cat([torch.linspace(0.5, 1.0, n - 1, dtype=DT), torch.tensor([3.0], dtype=DT)])
    root, v = q @ torch.diag(ev.sqrt()), q[:, -1]
    m = get_manifold("sphere")

    def grad(x, g):  # Oja: -z z^T x, E[z z^T] = A
        z = root @ torch.randn(n, dtype=DT, generator=g)
        return -(x @ z)[:, None] * z[None, :]

    def dist(x):  # angle to +-v, the closed-form maximiser of x^T A x
        return float(torch.arccos((x @ v).abs().clamp(max=1)).max())

    return m, m.random((1, n), generator=gen, dtype=DT), grad, dist


def _procrustes(gen):
    n, k = 12, 4
    xs, _ = torch.linalg.qr(torch.randn(n, k, dtype=DT, generator=gen))
    m = get_manifold("stiefel")

    def grad(w, g):  # E|X^T a - b|^2 / 2 with b = X*^T a + noise: minimiser X* (closed form)
        a = torch.randn(n, dtype=DT, generator=g)
        b = xs.T @ a + 0.1 * torch.randn(k, dtype=DT, generator=g)
        return torch.outer(w @ a - b, a)

    def dist(w):
        return float((w.T - xs).norm())

    return m, m.random((k, n), generator=gen, dtype=DT), grad, dist


def _karcher(spec, shape):
    def make(gen):
        m = get_manifold(spec)
        center = m.random(shape, generator=gen, dtype=DT)
        data = torch.stack([m.expmap(center, 0.4 * m.random_tangent(center, generator=gen))
                            for _ in range(12)])
        # independent oracle: fixed point x <- Exp_x(mean_i Log_x(y_i))
        mean = center.clone()
        for _ in range(200):
            mean = m.expmap(mean, torch.stack([m.logmap(mean, y) for y in data]).mean(0))

        def grad(x, g):
            return -m.logmap(x, data[int(torch.randint(len(data), (1,), generator=g))])

        def dist(x):
            return float(m.component_dist(x, mean).max())

        return m, m.random(shape, generator=gen, dtype=DT), grad, dist
    return make


def _product(gen):
    m = get_manifold("po:sphere+stiefel")
    t = torch.randn(8, 6, dtype=DT, generator=gen)
    t = 3 * t / t.norm()
    best = torch.empty_like(t)  # argmax <W, T>: normalised rows; polar factor of the block
    best[:4] = t[:4] / t[:4].norm(dim=1, keepdim=True)
    u, _, vh = torch.linalg.svd(t[4:].T, full_matrices=False)
    best[4:] = (u @ vh).T

    def grad(w, g):
        return -t + 0.3 * torch.randn(t.shape, dtype=DT, generator=g)

    def dist(w):
        return float((w - best).norm())

    return m, m.random((8, 6), generator=gen, dtype=DT), grad, dist


#: problem -> (maker, lr0, tolerance of the final distance with the default rule, mu = 0)
PROBLEMS = {"rayleigh": (_rayleigh, 0.1, 0.7), "procrustes": (_procrustes, 0.02, 0.1),
            "karcher-sphere": (_karcher("sphere", (1, 10)), 0.5, 0.45),
            "karcher-oblique": (_karcher("oblique", (2, 2, 3, 3)), 0.5, 0.45),
            "product": (_product, 0.1, 0.3)}


def _run(problem, rule, momentum, lr0, steps, seed=0):
    make = PROBLEMS[problem][0]
    m, x0, grad, dist = make(torch.Generator().manual_seed(seed))
    p = geoopt.ManifoldParameter(x0, manifold=m)
    opt = ConvergentRSGD([p], lr=lr0, momentum=momentum, step_rule=rule)
    sched = RobbinsMonroLR(opt, t0=100, power=0.75)
    g = torch.Generator().manual_seed(1000 + seed)  # the same samples for every rule
    tail = []
    for t in range(steps):
        p.grad = grad(p.detach(), g)
        opt.step()
        sched.step()
        if t >= steps - 100:
            tail.append(dist(p.detach()))
    return sum(tail) / len(tail)  # mean over the last 100 steps: less noisy than one


@pytest.mark.parametrize("problem", list(PROBLEMS))
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_default_rule_matches_or_beats_plain_rsgd(problem, momentum):
    """Same samples, same schedule: the default rule ends at least as close as ``none``
    (plain Riemannian SGD), with lr0 as in the comparison (and ten times larger without
    momentum; with momentum lr0 (1 - momentum), the same effective step)."""
    _, lr0, tol = PROBLEMS[problem]
    lr0 *= 1 - momentum
    for scale in (1.0, 10.0) if momentum == 0 else (1.0,):
        ours = _run(problem, "gsgd", momentum, lr0 * scale, 500)
        plain = _run(problem, "none", momentum, lr0 * scale, 500)
        assert ours <= plain * 1.02 + 1e-3 or math.isnan(plain), (scale, ours, plain)
        if momentum == 0.0 and scale == 1.0:
            assert ours < tol, ours


# ------------------------------------------------------------------------------ guarantee
def _kernel_param(gen):
    m = get_manifold("sphere")
    return geoopt.ManifoldParameter(m.random((3, 5), generator=gen, dtype=DT), manifold=m)


def test_guarantee_silent_inside_theorem(gen):
    p = _kernel_param(gen)
    opt = ConvergentRSGD([p], lr=0.1, guarantee=True)
    RobbinsMonroLR(opt, t0=10, power=0.75)
    p.grad = torch.randn(3, 5, dtype=DT, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GuaranteeWarning)
        opt.step()
    assert opt.guarantee_problems() == []


def test_guarantee_warns_per_group(gen):
    p, q = _kernel_param(gen), _kernel_param(gen)
    opt = ConvergentRSGD([{"params": [p]}, {"params": [q], "momentum": 0.9}], lr=0.1,
                         guarantee=True)
    RobbinsMonroLR(opt, t0=10, power=0.75)
    p.grad = torch.randn(3, 5, dtype=DT, generator=gen)
    q.grad = torch.randn(3, 5, dtype=DT, generator=gen)
    with pytest.warns(GuaranteeWarning, match=r"param group 1: momentum 0.9"):
        opt.step()
    with warnings.catch_warnings():  # once
        warnings.simplefilter("error", GuaranteeWarning)
        opt.step()
    # a schedule whose second group's factor vanishes: the schedule warning names it
    opt2 = ConvergentRSGD([{"params": [p]}, {"params": [q]}], lr=0.1, guarantee=True)
    lam = torch.optim.lr_scheduler.LambdaLR(
        opt2, [lambda t: (1 + t) ** -0.75, lambda t: (1 + t) ** -0.75 if t < 1e9 else 0.0])
    with pytest.warns(ScheduleWarning, match="param group 1"):
        opt2.set_schedule(lam)


def test_guarantee_warns_for_data_scaling_and_foreign(gen):
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LazyLinear(2))
    net(torch.zeros(1, 1, 5, 5))
    kernelgeo.constrain(net, "sphere")
    opt = ConvergentRSGD(net.parameters(), lr=0.1, guarantee=True,
                         radius_scaling=StepScaling(net))
    RobbinsMonroLR(opt, t0=10, power=0.75)
    net(torch.randn(2, 1, 5, 5)).sum().backward()
    with pytest.warns(GuaranteeWarning, match="data statistics"):
        opt.step()
    f = geoopt.ManifoldParameter(torch.tensor([0.6, 0.8, 0.0, 0.0], dtype=DT),
                                 manifold=geoopt.Sphere())
    opt = ConvergentRSGD([f], lr=0.1, guarantee=True, step_rule="none")
    RobbinsMonroLR(opt, t0=10, power=0.75)
    f.grad = torch.randn(4, dtype=DT, generator=gen)
    with pytest.warns(GuaranteeWarning, match="not a kernelgeo kernel manifold"):
        opt.step()


def _lambda(*fns):
    ps = [torch.nn.Parameter(torch.zeros(1)) for _ in fns]
    opt = torch.optim.SGD([{"params": [p]} for p in ps], lr=1.0)
    return torch.optim.lr_scheduler.LambdaLR(opt, list(fns))


@pytest.mark.parametrize("fn,expected", [
    (lambda t: 1 / ((t + 2) * math.log(t + 2)), True),  # sum diverges, squares converge
    (lambda t: (1 + t / 100) ** -0.75 if t < 1e9 else 0.0, False),  # sum converges
    (lambda t: (1 + t) ** -1.0, True),
    (lambda t: (1 + t) ** -0.6, True),
    (lambda t: 1 / (math.sqrt(t + 2) * math.log(t + 2)), True),
    (lambda t: (1 + t) ** -0.5, False),  # sum of squares diverges
    (lambda t: (1 + t) ** -1.2, False),
    (lambda t: 1 / ((t + 2) * math.log(t + 2) ** 2), False),
    (lambda t: 1.0, False),
    (lambda t: 0.99 ** t, False),
    (lambda t: 1 + math.cos(t), False),
])
def test_check_robbins_monro_lambdas(fn, expected):
    assert check_robbins_monro(_lambda(fn), warn=False) is expected


def test_check_robbins_monro_probes_every_group():
    good = lambda t: (1 + t) ** -0.75  # noqa: E731
    bad = lambda t: (1 + t) ** -0.4  # noqa: E731
    assert check_robbins_monro(_lambda(good, good), warn=False)
    with pytest.warns(ScheduleWarning, match="param group 1"):
        assert not check_robbins_monro(_lambda(good, bad))


# ---------------------------------------------------------------------------- step scaling
class _Scale(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x):
        return self.c * x


def _scaled_net(c, norm2):
    torch.manual_seed(0)
    # tiny eps: batch norm is then invariant to its input's scale up to ~1e-12
    bn2 = nn.BatchNorm2d(6, eps=1e-14) if norm2 else nn.Identity()
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), _Scale(c),
                        nn.Conv2d(4, 6, 3), bn2, nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)).double()
    net(torch.zeros(2, 1, 8, 8, dtype=DT))
    kernelgeo.constrain(net, "sphere")
    return net


def test_step_scaling_ignores_input_scale_of_scale_invariant_layers():
    """Scaling conv2's input by 1, 10, 100 with batch norm after conv2 changes neither the
    loss nor conv2's Riemannian gradient, so no multiplier may change; without the batch
    norm only conv2's own multiplier follows 1/c."""
    x = torch.randn(16, 1, 8, 8, dtype=DT, generator=torch.Generator().manual_seed(1))
    y = torch.arange(16) % 3
    for norm2 in (True, False):
        rows = []
        for c in (1.0, 10.0, 100.0):
            net = _scaled_net(c, norm2)
            sc = StepScaling(net)
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            w = net[4].weight
            rows.append((float(loss.detach()), w.manifold.egrad2rgrad(w, w.grad), sc.state()))
        (l1, g1, s1), *rest = rows
        for (lc, gc, sc_), c in zip(rest, (10.0, 100.0), strict=True):
            assert sc_["0"] == pytest.approx(s1["0"], rel=1e-6)  # no coupling
            if norm2:
                assert lc == pytest.approx(l1, rel=1e-6)
                torch.testing.assert_close(gc, g1, rtol=1e-5, atol=1e-8)
                assert sc_["4"] == pytest.approx(s1["4"], rel=1e-6)
            else:
                assert sc_["4"] == pytest.approx(max(s1["4"] / c, 0.1), rel=1e-4)
    assert sorted(StepScaling(_scaled_net(1.0, True)).modules.values()) == ["0", "4"]
