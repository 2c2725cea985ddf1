"""kernelgeo.optim.RiemannianAdam against torch's Adam, geoopt's RiemannianAdam and closed forms.

Oracles: ``torch.optim.Adam`` for plain parameters; geoopt's ``RiemannianAdam`` on geoopt's own
``Sphere`` (rows of a ``(B, n)`` tensor) and ``EuclideanStiefel`` (a ``(G, n, p)`` tensor),
whose ``component_inner`` is one value per row / frame: the update of Bécigneul & Ganea (2019)
with projection transport, written independently of kernelgeo.  Closed forms: the smallest
eigenvalue (Rayleigh quotient on the sphere) and the polar factor (Procrustes on Stiefel).
"""

from __future__ import annotations

import copy

import pytest
import torch

from kernelgeo._compat import geoopt
from kernelgeo.manifolds import (
    CenteredSphere,
    Euclidean,
    KernelProduct,
    Oblique,
    Sphere,
    Stiefel,
)
from kernelgeo.optim import NonFiniteGradientError, RiemannianAdam

MP = geoopt.ManifoldParameter

GEOMS = {
    "sphere": (Sphere(), (6, 3, 3, 3)),
    "centered": (CenteredSphere(), (5, 2, 3, 3)),
    "oblique": (Oblique(), (4, 3, 3, 3)),
    "oblique-slice": (Oblique(per="slice"), (4, 2, 3, 3)),
    "stiefel": (Stiefel(), (4, 3, 3, 3)),
    "stiefel-slice": (Stiefel(per="slice"), (2, 3, 3, 2)),
    "stiefel-r2": (Stiefel(radius=2.0), (3, 2, 3, 3)),
    "product": (KernelProduct([Sphere(), Stiefel(), Euclidean()], partition="out"),
                (9, 2, 3, 3)),
}


def _kernel(m, shape, gen, dtype=torch.float64):
    return MP(m.random(shape, dtype=dtype, generator=gen), manifold=m)


def _feed(params, gen, scale=1.0):
    grads = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    return grads


# ------------------------------------------------------------------------------ oracles
@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_plain_parameters_follow_torch_adam(gen, amsgrad, wd):
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64))
          for s in [(5,), (3, 4), (2, 3, 3)]]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    a = RiemannianAdam(ps, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd,
                       amsgrad=amsgrad)
    b = torch.optim.Adam(qs, lr=0.05, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd,
                         amsgrad=amsgrad, foreach=False)
    for _ in range(6):
        for p, g in zip(qs, _feed(ps, gen), strict=True):
            p.grad = g
        a.step()
        b.step()
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(a.state[p]["exp_avg_sq"], b.state[q]["exp_avg_sq"],
                                   rtol=1e-12, atol=1e-15)


def _geoopt_twin(m, p):
    """geoopt parameter holding ``p``'s components and the map of kernel tensors onto it."""
    if isinstance(m, Stiefel):
        assert m.radius == 1.0
        return MP(m.to_batch(p.detach()).clone(), manifold=geoopt.EuclideanStiefel()), \
            m.to_batch
    return MP(m.to_batch(p.detach()).clone(), manifold=geoopt.Sphere()), m.to_batch


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("geom", ["sphere", "oblique", "oblique-slice", "stiefel",
                                  "stiefel-slice"])
def test_matches_geoopt_on_its_own_manifolds(gen, geom, amsgrad):
    """A kernel's rows (columns, frames) as one geoopt Sphere / EuclideanStiefel tensor:
    geoopt's per-row second moment is the same update; iterates and moments agree."""
    m, shape = GEOMS[geom]
    p = _kernel(m, shape, gen)
    q, tb = _geoopt_twin(m, p)
    a = RiemannianAdam([p], lr=0.03, amsgrad=amsgrad)
    b = geoopt.optim.RiemannianAdam([q], lr=0.03, amsgrad=amsgrad, stabilize=None)
    for _ in range(8):
        (g,) = _feed([p], gen)
        q.grad = tb(g).clone()
        a.step()
        b.step()
    torch.testing.assert_close(tb(p.detach()), q.detach(), rtol=1e-10, atol=1e-11)
    torch.testing.assert_close(tb(a.state[p]["exp_avg"]), b.state[q]["exp_avg"],
                               rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(a.state[p]["exp_avg_sq"],
                               b.state[q]["exp_avg_sq"].flatten(1)[:, 0], rtol=1e-10, atol=0)


def test_product_blocks_match_geoopt_block_by_block(gen):
    """Sphere, Stiefel and Euclidean blocks of one product kernel: each block follows geoopt
    on its own manifold (Euclidean: one component per entry, i.e. torch's Adam)."""
    m, shape = GEOMS["product"]
    p = _kernel(m, shape, gen)
    twins = []
    for bm, idx in m.blocks(shape):
        x = p.detach()[idx]
        if isinstance(bm, Euclidean):
            twins.append((MP(x.clone(), manifold=geoopt.Euclidean()), idx, lambda t: t))
        elif isinstance(bm, Stiefel):
            twins.append((MP(bm.to_batch(x).clone(), manifold=geoopt.EuclideanStiefel()), idx,
                          bm.to_batch))
        else:
            twins.append((MP(bm.to_batch(x).clone(), manifold=geoopt.Sphere()), idx,
                          bm.to_batch))
    a = RiemannianAdam([p], lr=0.02)
    b = geoopt.optim.RiemannianAdam([t[0] for t in twins], lr=0.02, stabilize=None)
    for _ in range(5):
        (g,) = _feed([p], gen)
        for q, idx, tb in twins:
            q.grad = tb(g[idx]).clone()
        a.step()
        b.step()
    for q, idx, tb in twins:
        torch.testing.assert_close(tb(p.detach()[idx]), q.detach(), rtol=1e-10, atol=1e-11)
    # 3 sphere rows, 1 Stiefel frame, 3*2*3*3 Euclidean entries
    assert a.state[p]["exp_avg_sq"].shape == (3 + 1 + 54,)


def test_foreign_geoopt_manifold_follows_geoopt(gen):
    x = geoopt.Sphere().random(4, 5, dtype=torch.float64)
    p = MP(x.clone(), manifold=geoopt.Sphere())
    q = MP(x.clone(), manifold=geoopt.Sphere())
    a = RiemannianAdam([p], lr=0.05)
    b = geoopt.optim.RiemannianAdam([q], lr=0.05, stabilize=None)
    for _ in range(4):
        (g,) = _feed([p], gen)
        q.grad = g.clone()
        a.step()
        b.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-13)


def test_batched_equals_one_optimizer_per_parameter(gen):
    """Kernels of one class updated together (and one that starts a step later, with its own
    bias correction) equal the same kernels each alone in an optimizer."""
    ps = [_kernel(Sphere(), (4, 2, 3, 3), gen) for _ in range(3)] + \
         [_kernel(Stiefel(), (3, 2, 3, 3), gen) for _ in range(2)]
    qs = [MP(p.detach().clone(), manifold=p.manifold) for p in ps]
    a = RiemannianAdam(ps, lr=0.04, amsgrad=True)
    bs = [RiemannianAdam([q], lr=0.04, amsgrad=True) for q in qs]
    for t in range(5):
        grads = _feed(ps, gen)
        if t == 0:  # the first kernel has no gradient at the first step
            ps[0].grad = None
        for k, (q, g, o) in enumerate(zip(qs, grads, bs, strict=True)):
            if t == 0 and k == 0:
                continue
            q.grad = g.clone()
            o.step()
        a.step()
    assert a.state[ps[0]]["step"] == 4 and a.state[ps[1]]["step"] == 5
    for p, q in zip(ps, qs, strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-13)


# --------------------------------------------------------------------- geometry kept
@pytest.mark.parametrize("geom", sorted(GEOMS))
def test_float32_stays_on_manifold_and_moments_tangent(gen, geom):
    m, shape = GEOMS[geom]
    ps = [_kernel(m, shape, gen, torch.float32) for _ in range(2)]
    opt = RiemannianAdam(ps, lr=0.05, amsgrad=True)
    for _ in range(300):
        _feed(ps, gen, scale=3.0)
        opt.step()
    for p in ps:
        assert m.constraint_error(p) < 2e-6 * max(1.0, m.radius)
        ea = opt.state[p]["exp_avg"]
        blocks = m.blocks(shape) if isinstance(m, KernelProduct) else [(m, (slice(None),))]
        for bm, idx in blocks:
            r = bm.radius_of(p[idx].shape)
            x64, u64 = (bm.to_batch(t[idx].detach()).double() for t in (p, ea))
            err = bm._btangent_error(x64, u64, r).max()
            assert err < 1e-5 * (1 + u64.abs().max()), (bm, float(err))
        n = m.num_components(shape) if geom != "product" else 3 + 1 + 54
        assert opt.state[p]["exp_avg_sq"].shape == (n,)


def test_second_moment_is_one_scalar_per_component(gen):
    """After one step from zero moments the displacement of each sphere row is along its
    Riemannian gradient (the direction is a positive multiple of the tangent vector): the
    elementwise rescaling that torch's Adam would apply is not used."""
    m = Sphere()
    p = _kernel(m, (5, 4, 3, 3), gen)
    x0 = m.to_batch(p.detach()).clone()
    (g,) = _feed([p], gen)
    RiemannianAdam([p], lr=1e-3).step()
    u = m._bproju(x0, m.to_batch(g), 1.0)
    # first step: m = (1-b1) u, v = (1-b2)|u|^2, d = u/|u| (eps aside): a step of length lr
    y = x0 - 1e-3 * u / u.norm(dim=1, keepdim=True)
    expect = y / y.norm(dim=1, keepdim=True)
    torch.testing.assert_close(m.to_batch(p.detach()), expect, rtol=1e-9, atol=1e-12)


# ---------------------------------------------------------------------- convergence
def test_rayleigh_quotient_reaches_the_smallest_eigenvalue(gen):
    n = 9
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    evals = torch.linspace(1.0, 4.0, n, dtype=torch.float64)
    a = q @ torch.diag(evals) @ q.T
    p = _kernel(Sphere(), (6, 1, 3, 3), gen)  # six rows, each on S^8
    opt = RiemannianAdam([p], lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=150, gamma=0.3)
    for _ in range(600):
        opt.zero_grad()
        x = p.reshape(6, n)
        loss = torch.einsum("ki,ij,kj->", x, a, x)
        loss.backward()
        opt.step()
        sched.step()
    x = p.detach().reshape(6, n)
    rq = torch.einsum("ki,ij,kj->k", x, a, x)
    torch.testing.assert_close(rq, torch.full((6,), 1.0, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.3 ** 4)


def test_procrustes_reaches_the_polar_factor(gen):
    """min ||X - B||^2 over Stiefel frames: the minimiser is the polar factor of B."""
    m = Stiefel()
    p = _kernel(m, (4, 3, 3, 3), gen)  # one St(27, 4) frame
    b = torch.randn(27, 4, generator=gen, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(b, full_matrices=False)
    polar = u @ vh

    def closure():
        opt.zero_grad()
        loss = (m.to_batch(p)[0] - b).square().sum()
        loss.backward()
        return loss

    opt = RiemannianAdam([p], lr=0.1)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.99)
    for _ in range(600):
        loss = opt.step(closure)
        sched.step()
    assert isinstance(loss, torch.Tensor)
    best = (polar - b).square().sum()
    assert float(loss.detach()) - float(best) < 1e-7
    torch.testing.assert_close(m.to_batch(p.detach())[0], polar, atol=1e-4, rtol=0)


# ----------------------------------------------------------------- refusal, state
def _snapshot(opt, ps):
    return [p.detach().clone() for p in ps], copy.deepcopy(opt.state_dict())


def _same(opt, ps, snap):
    xs, sd = snap
    for p, x in zip(ps, xs, strict=True):
        assert torch.equal(p.detach(), x)
    now = opt.state_dict()
    assert now["state"].keys() == sd["state"].keys()
    for k, st in sd["state"].items():
        for name, v in st.items():
            w = now["state"][k][name]
            assert torch.equal(w, v) if isinstance(v, torch.Tensor) else w == v


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_refused_and_nothing_changes(gen, bad):
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.Conv2d(4, 4, 3))
    net[0].weight = _kernel(Sphere(), (4, 2, 3, 3), gen, torch.float32)
    net[1].weight = _kernel(Stiefel(), (4, 4, 3, 3), gen, torch.float32)
    ps = list(net.parameters())
    opt = RiemannianAdam(net.named_parameters(), lr=0.1)
    _feed(ps, gen)
    opt.step()
    snap = _snapshot(opt, ps)
    _feed(ps, gen)
    net[1].weight.grad[0, 0, 0, 0] = bad
    with pytest.raises(NonFiniteGradientError, match=r"1\.weight"):
        opt.step()
    _same(opt, ps, snap)
    skip = RiemannianAdam(net.named_parameters(), lr=0.1, nonfinite="skip")
    skip.load_state_dict(opt.state_dict())
    skip.step()
    assert skip.skipped_steps == 1
    _same(skip, ps, snap)


def test_overflowing_moments_are_refused_before_any_write(gen):
    """A finite float32 gradient whose square overflows: torch's Adam would store an infinite
    second moment (and freeze the weight for good); the step is refused instead."""
    p = _kernel(Sphere(), (3, 2, 3, 3), gen, torch.float32)
    w = torch.nn.Parameter(torch.randn(4, generator=gen))
    opt = RiemannianAdam([p, w], lr=0.1)
    _feed([p, w], gen)
    opt.step()
    snap = _snapshot(opt, [p, w])
    _feed([p, w], gen)
    w.grad[1] = 3e38
    with pytest.raises(NonFiniteGradientError, match="non-finite values"):
        opt.step()
    _same(opt, [p, w], snap)


def test_state_dict_round_trip_continues_identically(gen):
    def make():
        net = torch.nn.Sequential(torch.nn.Conv2d(2, 6, 3), torch.nn.Conv2d(6, 4, 3),
                                  torch.nn.Flatten(), torch.nn.Linear(4, 2))
        torch.manual_seed(3)
        net[0].weight = _kernel(Oblique(), (6, 2, 3, 3), torch.Generator().manual_seed(1))
        net[1].weight = _kernel(Stiefel(), (4, 6, 3, 3), torch.Generator().manual_seed(2))
        return net

    a_net = make()
    a = RiemannianAdam(a_net.parameters(), lr=0.02, amsgrad=True)
    for _ in range(3):
        _feed(list(a_net.parameters()), gen)
        a.step()
    b_net = copy.deepcopy(a_net)
    b = RiemannianAdam(b_net.parameters(), lr=0.5, amsgrad=True)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    assert b.param_groups[0]["lr"] == 0.02
    for _ in range(3):
        grads = _feed(list(a_net.parameters()), gen)
        for q, g in zip(b_net.parameters(), grads, strict=True):
            q.grad = g.clone()
        a.step()
        b.step()
    for p, q in zip(a_net.parameters(), b_net.parameters(), strict=True):
        assert torch.equal(p, q)


def test_bad_hyperparameters_and_sparse_gradients(gen):
    p = torch.nn.Parameter(torch.zeros(3))
    for kw in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(eps=-1.0), dict(weight_decay=-1),
               dict(nonfinite="ignore")):
        with pytest.raises(ValueError):
            RiemannianAdam([p], **kw)
    e = torch.nn.Embedding(4, 2, sparse=True)
    e(torch.tensor([1])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        RiemannianAdam(e.parameters()).step()


def test_docstring_examples_run():
    import doctest

    import kernelgeo.optim.adam as mod

    res = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert res.attempted > 0 and res.failed == 0


def test_one_batched_retraction_per_class(gen, monkeypatch):
    """Kernels with the same geometry and component shape share one call of each batched
    primitive per step (no loop over kernels or rows)."""
    calls = []
    for cls in (Sphere, Stiefel):
        orig = cls._bretr
        monkeypatch.setattr(cls, "_bretr",
                            lambda self, x, u, r, _o=orig: calls.append(x.shape) or _o(self, x,
                                                                                      u, r))
    ps = [_kernel(Sphere(), (4, 2, 3, 3), gen) for _ in range(3)] + \
         [_kernel(Sphere(), (5, 1, 3, 3), gen)] + \
         [_kernel(Stiefel(), (3, 2, 3, 3), gen) for _ in range(2)]
    opt = RiemannianAdam(ps, lr=0.01)
    _feed(ps, gen)
    opt.step()
    # sphere rows of length 18 (12 rows), of length 9 (5 rows), Stiefel frames St(18, 3) (2)
    assert sorted(tuple(s) for s in calls) == [(2, 18, 3), (5, 9), (12, 18)]
