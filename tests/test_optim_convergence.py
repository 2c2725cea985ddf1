"""Convergence of ConvergentRSGD with noisy gradients and a Robbins–Monro schedule on problems
with known minimisers (leading eigenvector, orthogonal Procrustes, Karcher mean, a product)."""

from __future__ import annotations

import pytest
import torch

from kernelgeo._compat import geoopt
from kernelgeo.manifolds import get_manifold
from kernelgeo.optim import ConvergentRSGD, RobbinsMonroLR


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny LAPACK calls stall on a busy 2-core machine otherwise
    yield
    torch.set_num_threads(n)


#: (lr0, t0, rho) per problem; rho bounds the distance to the minimiser (None: diameter)
SETTINGS = {"eig-gsgd": (5.0, 50, None), "eig-bounded": (0.3, 50, None),
            "procrustes": (5.0, 50, 1.0), "karcher": (3.0, 50, None), "product": (5.0, 50, 1.0)}


def _run(p, grad_fn, dist_fn, *, steps, key, rule, momentum=0.0):
    lr, t0, rho = SETTINGS[key]
    opt = ConvergentRSGD([p], lr=lr, momentum=momentum, step_rule=rule, rho=rho,
                         log_stats=True)
    sched = RobbinsMonroLR(opt, t0=t0, power=1.0)
    dists, ratios = [], []
    for _ in range(steps):
        p.grad = grad_fn(p.detach())
        opt.step()
        sched.step()
        dists.append(float(dist_fn(p.detach())))
        ratios.append(float(opt.last_stats[0]["step_over_inj_max"]))
    return torch.tensor(dists), max(ratios)


def _check(dists, worst, tol):
    n = len(dists)
    # the distance trends down: window means decrease from the start to the end
    w = [float(dists[i * n // 5:(i + 1) * n // 5].mean()) for i in range(5)]
    assert w[-1] < 0.5 * w[0] and w[-1] <= 1.1 * min(w), w
    assert dists[-1] < tol, float(dists[-1])
    assert worst < 1.0  # no step longer than the injectivity radius


@pytest.mark.parametrize("rule", ["gsgd", "bounded"])
def test_leading_eigenvector_on_sphere(rule, gen):
    n = 10
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=gen))
    evals = torch.cat([torch.linspace(1.0, 2.0, n - 1, dtype=torch.float64),
                       torch.tensor([4.0], dtype=torch.float64)])  # eigengap 2
    a = q @ torch.diag(evals) @ q.T
    v = q[:, -1]
    m = get_manifold("sphere")
    p = geoopt.ManifoldParameter(m.random((4, n), generator=gen, dtype=torch.float64),
                                 manifold=m)

    def grad(x):  # f(x) = -x^T A x / 2 per row, plus Gaussian noise
        return -x @ a + 0.1 * torch.randn(x.shape, dtype=x.dtype, generator=gen)

    def dist(x):  # angle to the closest of +-v, worst row
        c = (x @ v).abs().clamp(max=1)
        return torch.arccos(c).max()

    # gsgd shrinks steps of large gradients (step length <= lr / (2 rho)): larger lr0
    dists, worst = _run(p, grad, dist, steps=1500, key=f"eig-{rule}", rule=rule, momentum=0.5)
    _check(dists, worst, 0.1)


def test_orthogonal_procrustes_on_stiefel(gen):
    n, k = 8, 3
    mat = torch.randn(n, k, dtype=torch.float64, generator=gen)
    mat = 2 * mat / mat.norm()  # bounded gradients: |grad| <= 2 + noise
    u, _, vh = torch.linalg.svd(mat, full_matrices=False)
    xstar = u @ vh  # argmax tr(X^T M) over St(n, k)
    m = get_manifold("stiefel")
    p = geoopt.ManifoldParameter(m.random((k, n), generator=gen, dtype=torch.float64),
                                 manifold=m)  # kernel (k, n): X = W^T

    def grad(w):  # f(W) = -tr(W M) = -<X, M>, noisy
        return -mat.T + 0.03 * torch.randn(w.shape, dtype=w.dtype, generator=gen)

    def dist(w):
        return (w.T - xstar).norm()

    dists, worst = _run(p, grad, dist, steps=1500, key="procrustes", rule="gsgd", momentum=0.5)
    _check(dists, worst, 0.1)


def test_karcher_mean_on_oblique(gen):
    m = get_manifold("oblique")
    shape = (2, 2, 3, 3)
    center = m.random(shape, generator=gen, dtype=torch.float64)
    data = torch.stack([m.expmap(center, 0.4 * m.random_tangent(center, generator=gen))
                        for _ in range(20)])
    # independent oracle: deterministic fixed-point iteration x <- Exp_x(mean_i Log_x(y_i))
    mean = center.clone()
    for _ in range(200):
        mean = m.expmap(mean, torch.stack([m.logmap(mean, y) for y in data]).mean(0))
    p = geoopt.ManifoldParameter(m.random(shape, generator=gen, dtype=torch.float64),
                                 manifold=m)

    def grad(x):  # stochastic gradient of sum_i d(x, y_i)^2 / 2: a minibatch of 4 samples
        idx = torch.randint(len(data), (4,), generator=gen)
        return -torch.stack([m.logmap(x, data[i]) for i in idx]).mean(0)

    def dist(x):
        return m.component_dist(x, mean).max()

    dists, worst = _run(p, grad, dist, steps=1500, key="karcher", rule="gsgd")
    _check(dists, worst, 0.15)


def test_mixed_product_sphere_stiefel(gen):
    m = get_manifold("po:sphere+stiefel")
    shape = (8, 6)
    target = torch.randn(shape, dtype=torch.float64, generator=gen)
    target = 3 * target / target.norm()
    # minimiser of -<W, T>: rows 0:4 on spheres -> T_i/|T_i|; rows 4:8 Stiefel -> polar
    best = torch.empty_like(target)
    best[:4] = target[:4] / target[:4].norm(dim=1, keepdim=True)
    u, _, vh = torch.linalg.svd(target[4:].T, full_matrices=False)
    best[4:] = (u @ vh).T
    p = geoopt.ManifoldParameter(m.random(shape, generator=gen, dtype=torch.float64),
                                 manifold=m)

    def grad(w):
        return -target + 0.03 * torch.randn(w.shape, dtype=w.dtype, generator=gen)

    def dist(w):
        return (w - best).norm()

    dists, worst = _run(p, grad, dist, steps=1500, key="product", rule="gsgd", momentum=0.5)
    _check(dists, worst, 0.15)
