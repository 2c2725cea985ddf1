"""Landscapes, Riemannian Hessians and figures."""

import math
import time

import numpy as np
import pytest
import torch

from kernelgeo._compat import ManifoldParameter
from kernelgeo.analysis import hessian as H
from kernelgeo.analysis import landscape as L
from kernelgeo.analysis.plotting import image_variance, plot_curves_1d, plot_slices
from kernelgeo.manifolds import Sphere, Stiefel

GEOMETRY = "conv1=sphere,layer1.*=stiefel,layer2.*=po:sphere+oblique"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A one-epoch digits run of `kernelgeo train` with three kernel geometries."""
    from kernelgeo.runs import load_run
    from kernelgeo.train import TrainConfig, train

    out = tmp_path_factory.mktemp("landscape") / "run"
    train(TrainConfig(dataset="digits", epochs=1, geometry=GEOMETRY, out=str(out), seed=0,
                      quiet=True, threads=1))
    return load_run(out)


@pytest.fixture(scope="module")
def digits(run):
    x, y = run.train_batch(512)
    return x, y, None, None


@pytest.fixture(scope="module")
def trained(run):
    return run.model


def test_li_directions_have_the_weights_filter_norms(trained, gen):
    d = L.li_directions(trained, generator=gen)
    for name, p in trained.named_parameters():
        if p.dim() < 2:
            assert float(d[name].abs().max()) == 0  # biases and BN untouched
        else:
            assert torch.allclose(d[name].flatten(1).norm(dim=1),
                                  p.detach().flatten(1).norm(dim=1), rtol=1e-5)


def test_manifold_directions_are_tangent_and_component_normalised(trained, gen):
    d = L.tangent_directions(trained, generator=gen)
    for name, p in trained.named_parameters():
        if isinstance(p, ManifoldParameter):
            m = p.manifold
            ok, why = m._check_vector_on_tangent(p.detach(), d[name], atol=1e-5, rtol=1e-5)
            assert ok, (name, why)
            for mi, idx in m.blocks(p.shape):
                xb, ub = mi.to_batch(p.detach()[idx]), mi.to_batch(d[name][idx])
                assert torch.allclose(ub.flatten(1).norm(dim=1), xb.flatten(1).norm(dim=1),
                                      rtol=1e-5)


def test_21x21_slices_fast_centred_and_plotted(trained, digits, tmp_path, gen):
    xtr, ytr, _, _ = digits
    ev = L.Evaluator(trained, xtr[:256], ytr[:256])
    loss0, acc0 = ev()
    t = time.perf_counter()
    se = L.landscape_2d(trained, ev, mode="euclidean", points=21, generator=gen,
                        num_threads=1)
    elapsed = time.perf_counter() - t
    assert elapsed < 60.0
    sm = L.landscape_2d(trained, ev, mode="manifold", points=7, span=0.5, generator=gen,
                        num_threads=1)
    for s in (se, sm):
        assert s.center == pytest.approx((loss0, acc0), rel=1e-6)
        assert np.isfinite(s.loss).all() and s.loss.max() > s.center[0]
    # retraction moves stay on the manifold too; the slice centre is still the model
    sr = L.landscape_2d(trained, ev, mode="manifold", points=3, move="retr", generator=gen)
    assert sr.center[0] == pytest.approx(loss0, rel=1e-6)
    f = plot_slices({"euclidean": se, "manifold": sm}, tmp_path / "s.png")
    assert f.exists() and image_variance(f) > 1e-3


def test_1d_geodesic_vs_linear(run, trained, digits, tmp_path):
    xtr, ytr, _, _ = digits
    ev = L.Evaluator(trained, xtr[:128], ytr[:128])
    start = run.init_state
    c = L.landscape_1d(trained, ev, start, trained, ts=[0.0, 0.5, 1.0],
                       stiefel_metric="canonical")
    assert c["geodesic_loss"][-1] == pytest.approx(ev()[0], rel=1e-5)
    assert c["linear_loss"][-1] == pytest.approx(ev()[0], rel=1e-5)
    assert c["geodesic_loss"][0] == pytest.approx(c["linear_loss"][0], rel=1e-5)
    f = plot_curves_1d({"m": c}, tmp_path / "c.png")
    assert image_variance(f) > 1e-3


def test_riemannian_hessian_on_sphere_matches_closed_form():
    n = 6
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    lam = torch.arange(n, dtype=torch.float64)
    a = q @ torch.diag(lam) @ q.T
    m = Sphere(radius=2.0)
    m.min_rank = 1
    x = 2.0 * q[:, 2].reshape(1, n)
    hvp = H.hessian_operator(lambda ps: (ps[0] @ a * ps[0]).sum(), [x], [m])
    # f(x) = x^T A x on S(r) at an eigenvector: Hess eigenvalues 2(l_j - l_2), j != 2
    assert H.top_eigenvalue(hvp, [x.shape]) == pytest.approx(2 * (5 - 2), rel=1e-8)
    assert H.top_eigenvalue(hvp, [x.shape], which="SA") == pytest.approx(2 * (0 - 2), rel=1e-8)
    # closed form P(A u) - (x^T grad / r^2) u
    u = m.random_tangent(x)
    g = 2 * x @ a
    want = m.proju(x, 2 * u @ a) - ((x * g).sum() / 4.0) * u
    assert torch.allclose(hvp([u])[0], want, atol=1e-12)


def test_riemannian_hessian_on_stiefel_is_derivative_of_gradient(gen):
    m = Stiefel()
    m.min_rank = 2
    x = m.random((3, 7), dtype=torch.float64, generator=gen)
    b = torch.randn(7, 7, dtype=torch.float64, generator=gen)
    b = b + b.T
    c = torch.randn(3, 7, dtype=torch.float64, generator=gen)

    def f(w):
        return (w @ b * w).sum() + (torch.sin(w) * c).sum()

    hvp = H.hessian_operator(lambda ps: f(ps[0]), [x], [m])
    u, v = m.random_tangent(x, generator=gen), m.random_tangent(x, generator=gen)

    def rgrad(w):
        w = w.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(f(w), w)
        return m.proju(w.detach(), g)

    h = 1e-5
    fd = m.proju(x, (rgrad(m.expmap(x, h * u)) - rgrad(m.expmap(x, -h * u))) / (2 * h))
    hu = hvp([u])[0]
    assert float((hu - fd).norm() / hu.norm()) < 1e-7
    assert float((hu * v).sum()) == pytest.approx(float((hvp([v])[0] * u).sum()), rel=1e-10)


def test_sharpness_of_model(trained, digits):
    xtr, ytr, _, _ = digits
    with L.torch_threads(1):
        r = H.sharpness(trained, xtr[:64], ytr[:64], riemannian=True, tol=1e-3)
        e = H.sharpness(trained, xtr[:64], ytr[:64], riemannian=False, tol=1e-3)
    assert math.isfinite(r) and math.isfinite(e) and r > 0 and e > 0
