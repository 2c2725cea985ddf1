"""ConvergentRSGD: parity with torch SGD and with its per-parameter reference, state, API."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch

from kernelgeo._compat import geoopt
from kernelgeo.manifolds import get_manifold
from kernelgeo.optim import (
    ConvergentRSGD,
    NonFiniteGradientError,
    RobbinsMonroLR,
    ScheduleWarning,
    StepScaling,
    check_robbins_monro,
    rule_constants,
    step_sizes,
)

SPECS = ["sphere", "centered-sphere", "oblique", "oblique-slice", "stiefel", "stiefel-slice",
         "po:sphere+stiefel", "pi:2:sphere", "pio:2x2:sphere+oblique", "po:sphere+euclidean"]
SHAPES = [(8, 4, 3, 3), (6, 4, 3, 3), (16, 2, 3, 3), (4, 3, 3, 3), (12, 6, 3, 3)]
CONFIGS = [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
           dict(momentum=0.5, dampening=0.3, weight_decay=1e-2)]


def _params(spec, dtype, gen):
    m = get_manifold(spec)
    ps = [geoopt.ManifoldParameter(m.random(s, dtype=dtype, generator=gen), manifold=m)
          for s in SHAPES]
    ps.append(torch.nn.Parameter(torch.randn(5, dtype=dtype, generator=gen)))
    return m, ps


def _clone(ps):
    return [geoopt.ManifoldParameter(p.detach().clone(), manifold=p.manifold)
            if hasattr(p, "manifold") else torch.nn.Parameter(p.detach().clone()) for p in ps]


def _feed(pss, gen, scale=1.0):
    for group in zip(*pss, strict=True):
        g = torch.randn(group[0].shape, dtype=group[0].dtype, generator=gen) * scale
        for p in group:
            p.grad = g.clone()


@pytest.mark.parametrize("spec", SPECS)
def test_batched_matches_reference(spec, dtype, gen):
    """Fast path (small chunks: concatenated, split and single blocks) == reference."""
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for rule, cfg in zip(["gsgd", "bounded", "none", "gsgd"], CONFIGS, strict=True):
        m, ps = _params(spec, dtype, gen)
        qs = _clone(ps)
        o1 = ConvergentRSGD(ps, lr=0.3, step_rule=rule, chunk_numel=300, **cfg)
        o2 = ConvergentRSGD(qs, lr=0.3, step_rule=rule, batched=False, **cfg)
        for _ in range(3):
            _feed([ps, qs], gen)
            o1.step()
            o2.step()
        for a, b in zip(ps, qs, strict=True):
            assert (a.detach() - b.detach()).abs().max() < tol, (spec, rule, cfg)
        for a in ps[:-1]:
            assert m.constraint_error(a) < (1e-10 if dtype == torch.float64 else 1e-5)
        if cfg["momentum"]:
            for a, b in zip(ps[:-1], qs[:-1], strict=True):
                for ba, bb in zip(o1.state[a]["momentum_blocks"], o2.state[b]["momentum_blocks"],
                                  strict=True):
                    assert (ba - bb).abs().max() < tol * 10


@pytest.mark.parametrize("batched", [True, False])
@pytest.mark.parametrize("cfg", CONFIGS + [dict(momentum=0.9, weight_decay=5e-3,
                                                 nesterov=True)])
def test_euclidean_parity_with_torch_sgd(cfg, batched, gen):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 2))
    ref = copy.deepcopy(net)
    ours = ConvergentRSGD(net.parameters(), lr=0.05, batched=batched, **cfg)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.05, **cfg)
    for _ in range(6):
        x = torch.randn(8, 6, generator=gen)
        for model, opt in ((net, ours), (ref, sgd)):
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()
        for a, b in zip(net.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_momentum_tangent_from_first_step_and_grad_untouched(gen):
    m = get_manifold("stiefel")
    p = geoopt.ManifoldParameter(m.random((4, 9), generator=gen, dtype=torch.float64),
                                 manifold=m)
    g = torch.randn(4, 9, dtype=torch.float64, generator=gen)
    p.grad = g.clone()
    opt = ConvergentRSGD([p], lr=0.1, momentum=0.9)
    opt.step()
    assert torch.equal(p.grad, g)
    buf = opt.state[p]["momentum_blocks"][0]
    ok, why = m._check_vector_on_tangent(p.detach(), buf, atol=1e-12, rtol=1e-12)
    assert ok, why


def _train(opt, ps, gen, n):
    for _ in range(n):
        _feed([ps], gen)
        opt.step()


@pytest.mark.parametrize("batched", [True, False])
def test_state_dict_round_trip_continues_identically(batched, gen):
    m, ps = _params("po:sphere+stiefel", torch.float64, gen)
    kw = dict(lr=0.2, momentum=0.9, nesterov=True, batched=batched, chunk_numel=300)
    opt = ConvergentRSGD(ps, **kw)
    sched = RobbinsMonroLR(opt, t0=3, power=0.75)
    _train(opt, ps, gen, 3)
    sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    qs = _clone(ps)
    opt2 = ConvergentRSGD(qs, **kw)
    sched2 = RobbinsMonroLR(opt2, t0=3, power=0.75)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    opt2.load_state_dict(sd["opt"])
    sched2.load_state_dict(sd["sched"])
    g2 = torch.Generator().manual_seed(7)
    g3 = torch.Generator().manual_seed(7)
    for _ in range(4):
        _feed([ps], g2)
        _feed([qs], g3)
        opt.step()
        opt2.step()
        sched.step()
        sched2.step()
    for a, b in zip(ps, qs, strict=True):
        assert torch.equal(a.detach(), b.detach())


def test_closure_and_lr_scheduler(gen):
    m = get_manifold("sphere")
    p = geoopt.ManifoldParameter(m.random((3, 5), generator=gen), manifold=m)
    opt = ConvergentRSGD([p], lr=0.5, momentum=0.5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.1)
    target = m.random((3, 5), generator=gen)

    def closure():
        opt.zero_grad()
        loss = (p - target).square().sum()
        loss.backward()
        return loss

    losses = []
    for _ in range(4):
        losses.append(opt.step(closure).item())
        sched.step()
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    assert m.constraint_error(p) < 1e-5


def test_param_groups_with_own_settings(gen):
    m, ps = _params("sphere", torch.float64, gen)
    qs = _clone(ps)

    def groups(xs):
        return [dict(params=xs[:2], lr=0.5, step_rule="bounded", momentum=0.9),
                dict(params=xs[2:], lr=0.1, step_rule="none", weight_decay=0.1)]

    o1 = ConvergentRSGD(groups(ps), lr=1.0, chunk_numel=300)
    o2 = ConvergentRSGD(groups(qs), lr=1.0, batched=False)
    assert o1.param_groups[0]["step_rule"] == "bounded"
    for _ in range(3):
        _feed([ps, qs], gen, scale=10.0)
        o1.step()
        o2.step()
    for a, b in zip(ps, qs, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-10)


@pytest.mark.parametrize("batched", [True, False])
def test_nonfinite_gradient_raises_naming_param_or_skips(batched, gen):
    m = get_manifold("sphere")
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Flatten(),
                              torch.nn.Linear(4, 1))
    net[0].weight = geoopt.ManifoldParameter(m.projx(net[0].weight.detach()), manifold=m)
    before = [p.detach().clone() for p in net.parameters()]
    for p in net.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    net[0].weight.grad[1, 0, 0, 0] = float("nan")
    opt = ConvergentRSGD(net.named_parameters(), lr=0.1, momentum=0.9, batched=batched)
    with pytest.raises(NonFiniteGradientError, match=r"0\.weight"):
        opt.step()
    net[0].weight.grad[1, 0, 0, 0] = 0.0
    net[2].bias.grad[0] = float("inf")
    opt2 = ConvergentRSGD(net.parameters(), lr=0.1, momentum=0.9, batched=batched,
                          nonfinite="skip")
    opt2.step()
    assert opt2.skipped_steps == 1
    for a, b in zip(before, net.parameters(), strict=True):
        assert torch.equal(a, b.detach())
    assert not any(opt.state.values()) and not any(opt2.state.values())


def test_step_rules_formulas():
    sph = get_manifold("sphere")
    c = rule_constants("gsgd", sph, (4, 9))  # unit sphere: cap = 0.5 * pi/2
    assert c.cap == pytest.approx(math.pi / 4)
    r = torch.tensor([0.01, 0.5, 3.0], dtype=torch.float64)
    torch.testing.assert_close(step_sizes(0.7, r, c), torch.minimum(
        torch.full_like(r, 0.7), math.pi / 4 / r))
    with pytest.raises(ValueError, match="rho"):
        ConvergentRSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, rho=1.0)
    cb = rule_constants("bounded", sph, (4, 9), max_step=0.5)
    g = step_sizes(100.0, r, cb)
    assert torch.all(g * r <= 0.5 * math.pi + 1e-12)
    assert step_sizes(0.3, r, rule_constants("none", sph, (4, 9))).eq(0.3).all()
    with pytest.raises(ValueError, match="step_rule"):
        ConvergentRSGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1, step_rule="adam")


def test_bounded_rule_caps_actual_step_with_momentum(gen):
    m = get_manifold("sphere")
    p = geoopt.ManifoldParameter(m.random((6, 8), generator=gen), manifold=m)
    opt = ConvergentRSGD([p], lr=50.0, momentum=0.99, step_rule="bounded", max_step=0.5,
                         log_stats=True)
    for _ in range(5):
        p.grad = 100 * torch.randn(6, 8, generator=gen)
        opt.step()
        assert float(opt.last_stats[0]["step_over_inj_max"]) <= 0.5 + 1e-6


def test_robbins_monro_schedule_and_check():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = ConvergentRSGD([p], lr=2.0)
    s = RobbinsMonroLR(opt, t0=4, power=1.0)
    for t in range(1, 9):
        p.grad = torch.zeros(1)
        opt.step()
        s.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(2.0 / (1 + t / 4))
    with pytest.raises(ValueError, match="Robbins-Monro"):
        RobbinsMonroLR(opt, power=0.4)
    assert check_robbins_monro(s, warn=False)
    with pytest.warns(ScheduleWarning):
        assert not check_robbins_monro(None)
    with pytest.warns(ScheduleWarning):
        assert not check_robbins_monro(torch.optim.lr_scheduler.StepLR(opt, 5))
    lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: (1 + t) ** -0.6)
    assert check_robbins_monro(lam, warn=False)
    # guarantee requested without a schedule: warn once at the first step
    opt2 = ConvergentRSGD([p], lr=0.1, guarantee=True)
    with pytest.warns(ScheduleWarning, match="constant"):
        opt2.step()
    opt3 = ConvergentRSGD([p], lr=0.1, guarantee=True)
    RobbinsMonroLR(opt3, t0=10, power=0.75)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScheduleWarning)
        opt3.step()


def test_step_scaling_structure_factor(gen):
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Conv2d(4, 4, 3))
    m = get_manifold("sphere")
    for layer in net:
        layer.weight = geoopt.ManifoldParameter(m.projx(layer.weight.detach()), manifold=m)
    sc = StepScaling(net, data=False)
    a, b = (float(sc.multiplier(layer.weight)) for layer in net)
    assert a / b == pytest.approx(math.sqrt(36 / 18))
    assert a * b == pytest.approx(1.0)
    sc2 = StepScaling(net)
    net(torch.randn(2, 2, 9, 9, generator=gen)).sum().backward()
    opt = ConvergentRSGD(net.parameters(), lr=0.1, radius_scaling=sc2)
    ref = ConvergentRSGD(_clone(list(net.parameters())), lr=0.1, batched=False,
                         radius_scaling=sc2)
    for p, q in zip(net.parameters(), ref.param_groups[0]["params"], strict=True):
        q.grad = p.grad.clone()
    sc2._by_param.update({id(q): mod for q, mod in zip(ref.param_groups[0]["params"][::2],
                                                       net, strict=True)})
    opt.step()
    assert all(m.constraint_error(layer.weight) < 1e-5 for layer in net)
    assert set(sc2.state()) == {"0", "1"}


@pytest.fixture
def one_thread():
    """LAPACK calls on tiny matrices stall with 2 threads on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_reprojection_keeps_float32_constraint_over_1e4_steps(gen, one_thread):
    specs = (("sphere", (16, 8)), ("stiefel", (4, 12)), ("oblique", (4, 2, 3, 3)))
    ps = [geoopt.ManifoldParameter(get_manifold(s).random(shape, generator=gen))
          for s, shape in specs]
    opt = ConvergentRSGD(ps, lr=0.05, momentum=0.9, step_rule="none", stabilize=100)
    grads = torch.randn(10, sum(p.numel() for p in ps), generator=gen)
    for t in range(10_000):
        g = grads[t % 10]
        off = 0
        for p in ps:
            p.grad = g[off:off + p.numel()].view(p.shape)
            off += p.numel()
        opt.step()
    for p in ps:
        assert p.manifold.constraint_error(p) < 1e-5


@pytest.mark.parametrize("spec", ["sphere", "stiefel"])
def test_compiled_training_step_keeps_constraint(spec, gen):
    """torch.compile of a whole training step (forward, backward, optimizer step).

    The manifold of each parameter is decided when the plan is built, from the tensor
    objects, not inside traced code, so the compiled step cannot silently fall back to
    Euclidean updates (geoopt's RiemannianSGD does under the compiler).  The ``aot_eager``
    backend traces with dynamo and AOTAutograd like inductor but skips C++ code generation,
    which takes minutes on this 2-core CPU.
    """
    torch._dynamo.reset()
    m = get_manifold(spec)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 2))
    net[0].weight = geoopt.ManifoldParameter(m.projx(net[0].weight.detach()), manifold=m)
    opt = ConvergentRSGD(net.parameters(), lr=0.5, momentum=0.9)
    x = torch.randn(4, 3, 6, 6, generator=gen)

    @torch.compile(backend="aot_eager")
    def train_step(x):
        opt.zero_grad()
        loss = net(x).square().mean()
        loss.backward()
        opt.step()
        return loss

    w0 = net[0].weight.detach().clone()
    for _ in range(3):
        train_step(x)
    assert not torch.equal(w0, net[0].weight.detach())  # it moved
    assert m.constraint_error(net[0].weight) < 1e-5


class _FixedScaling:
    """Layer multipliers m_l given per parameter (stands in for StepScaling)."""

    def __init__(self, mults):
        self.mults = mults

    def refresh(self):
        pass

    def multiplier(self, p):
        return self.mults[id(p)]


@pytest.mark.parametrize("spec", ["oblique", "sphere", "pio:2x2:sphere+oblique"])
def test_batched_partial_fresh_rows_and_layer_scaling(spec, gen):
    """Chunks whose members start momentum at different steps, with per-layer multipliers
    (the SoA oblique path maps both onto its column order) == reference, buffers included."""
    m, ps = _params(spec, torch.float64, gen)
    qs = _clone(ps)
    mults = [torch.tensor(0.5 + 0.25 * i, dtype=torch.float64) for i in range(len(ps))]
    sa = _FixedScaling({id(p): c for p, c in zip(ps, mults, strict=True)})
    sb = _FixedScaling({id(q): c for q, c in zip(qs, mults, strict=True)})
    kw = dict(lr=0.3, momentum=0.9, dampening=0.2)
    o1 = ConvergentRSGD(ps, radius_scaling=sa, chunk_numel=2000, **kw)
    o2 = ConvergentRSGD(qs, radius_scaling=sb, batched=False, **kw)
    for t in range(4):
        _feed([ps, qs], gen)
        for p, q in zip(ps[t % 2::2], qs[t % 2::2], strict=True):
            if t == 0:  # every other parameter joins one step later
                p.grad = q.grad = None
        o1.step()
        o2.step()
    for a, b in zip(ps, qs, strict=True):
        assert (a.detach() - b.detach()).abs().max() < 1e-8
    for a, b in zip(ps[:-1], qs[:-1], strict=True):
        for ba, bb in zip(o1.state[a]["momentum_blocks"], o2.state[b]["momentum_blocks"],
                          strict=True):
            assert (ba - bb).abs().max() < 1e-7


@pytest.mark.parametrize("spec", ["oblique", "sphere", "stiefel"])
def test_batched_follows_replaced_parameter_storage(spec, gen):
    """The plan caches views of the parameters; ``p.data = ...`` must not leave them stale."""
    m, ps = _params(spec, torch.float64, gen)
    qs = _clone(ps)
    o1 = ConvergentRSGD(ps, lr=0.3, momentum=0.9, chunk_numel=2000)
    o2 = ConvergentRSGD(qs, lr=0.3, momentum=0.9, batched=False)
    for t in range(4):
        if t == 2:
            for p, q in zip(ps, qs, strict=True):
                p.data = p.data.clone()
                q.data = q.data.clone()
        _feed([ps, qs], gen)
        o1.step()
        o2.step()
    for a, b in zip(ps, qs, strict=True):
        assert (a.detach() - b.detach()).abs().max() < 1e-10


def test_deepcopy_and_pickle_keep_the_configuration(gen):
    """``Optimizer.__getstate__`` keeps only defaults, state and groups: ours adds its
    configuration, so a copied optimizer steps like the original (plans are rebuilt)."""
    m = get_manifold("sphere")
    p = geoopt.ManifoldParameter(m.random((4, 3, 3, 3), generator=gen), manifold=m)
    opt = ConvergentRSGD([p], lr=0.2, momentum=0.9, step_rule="bounded", nonfinite="skip")
    p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    for other in (copy.deepcopy(opt), None):
        if other is None:
            buf = io.BytesIO()
            torch.save(opt, buf)
            buf.seek(0)
            other = torch.load(buf, weights_only=False)
        assert other.nonfinite == "skip" and other.param_groups[0]["step_rule"] == "bounded"
        q = other.param_groups[0]["params"][0]
        q.grad = p.grad.clone()
        other.step()
        assert m.constraint_error(q) < 1e-5
