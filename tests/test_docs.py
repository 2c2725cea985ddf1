"""The documentation's formulas against the functions that implement them.

Every formula in ``docs/`` that carries a ``:label:`` is a formula the code implements: the
page names the implementing function right after it ("*Implemented by* ..."), and this file
holds one check per label, which evaluates the formula independently (numpy, float64, from
the page's own expression) and compares it with the function.  ``test_every_label_checked``
fails when a labelled formula has no check or a check has no formula, so the two cannot
drift apart.  Also checked here: every public name (each module's ``__all__``) appears in the
API pages, and the tutorials' doctest blocks run.
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import math
import pkgutil
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from kernelgeo.analysis import curvature as kcurv
from kernelgeo.manifolds import (
    CenteredSphere,
    KernelProduct,
    Oblique,
    Sphere,
    Stiefel,
    stiefel_groups,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
TOL = 1e-10
CHECKS: dict[str, callable] = {}


def check(label):
    def deco(fn):
        assert label not in CHECKS, label
        CHECKS[label] = fn
        return fn
    return deco


def _rng(seed=0):
    return np.random.default_rng(seed)


def _t(a):
    # a copy: the optimizer updates parameters in place, the formula needs the old value
    return torch.tensor(np.array(a, dtype=np.float64))


def _np(t):
    return t.detach().cpu().numpy()


def _close(a, b, tol=TOL):
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def _sphere_point(rng, out=4, n=6, r=1.7):
    w = rng.standard_normal((out, n))
    return r * w / np.linalg.norm(w, axis=1, keepdims=True)


def _sphere_tangent(rng, x, r):
    u = rng.standard_normal(x.shape)
    return u - (x * u).sum(1, keepdims=True) / r**2 * x


def _stiefel_point(rng, n=7, p=3):
    q, rr = np.linalg.qr(rng.standard_normal((n, p)))
    return q * np.sign(np.diag(rr))


def _stiefel_tangent(rng, y):
    u = rng.standard_normal(y.shape)
    a = y.T @ u
    return u - y @ (a + a.T) / 2


def _stiefel_kernel(y):
    """Kernel ``(p, n)`` whose per-filter Stiefel point (one group) is ``y`` (``(n, p)``)."""
    return _t(y.T.copy())


# --------------------------------------------------------------------- embedded geometry
@check("rgrad")
def _():
    rng = _rng(1)
    x, r = _sphere_point(rng), 1.7
    g = rng.standard_normal(x.shape)
    m = Sphere(radius=r)
    _close(_np(m.egrad2rgrad(_t(x), _t(g))), g - (x * g).sum(1, keepdims=True) / r**2 * x)


@check("transp-proj")
def _():
    rng = _rng(2)
    m = Stiefel()
    y0, y1 = _stiefel_point(rng), _stiefel_point(rng)
    v = _stiefel_tangent(rng, y0)
    got = _np(m.transp(_stiefel_kernel(y0), _stiefel_kernel(y1), _stiefel_kernel(v))).T
    a = y1.T @ v
    _close(got, v - y1 @ (a + a.T) / 2)


@check("ii-projection")
def _():
    # D_u P [v] (by central finite differences of the page's projection) equals the
    # autograd second fundamental form; for the sphere it is -<u,v> x / r^2
    rng = _rng(3)
    r = 1.3
    x = _sphere_point(rng, 1, 5, r)
    u, v = _sphere_tangent(rng, x, r), _sphere_tangent(rng, x, r)

    def proj(xx, w):
        return w - (xx * w).sum(1, keepdims=True) / r**2 * xx

    h = 1e-5
    fd = (proj(x + h * u, v) - proj(x - h * u, v)) / (2 * h)
    got = _np(kcurv.second_fundamental_form_autograd(Sphere(radius=r), _t(x), _t(u), _t(v)))
    _close(got, fd, 1e-8)


@check("gauss")
def _():
    # the Gauss equation evaluated with the autograd II (the page's general formula) on a
    # Stiefel kernel equals sectional_curvature's closed-form path and the Jacobi estimate
    rng = _rng(4)
    y = _stiefel_point(rng, 6, 3)
    m, x = Stiefel(), _stiefel_kernel(y)
    u, v = _stiefel_kernel(_stiefel_tangent(rng, y)), _stiefel_kernel(_stiefel_tangent(rng, y))
    ii = kcurv.second_fundamental_form_autograd
    num = (ii(m, x, u, u) * ii(m, x, v, v)).sum() - ii(m, x, u, v).pow(2).sum()
    den = (u * u).sum() * (v * v).sum() - (u * v).sum() ** 2
    _close(float(kcurv.sectional_curvature(m, x, u, v)), float(num / den), 1e-9)


@check("jacobi")
def _():
    # ||J(t)||^2 = t^2 - K t^4 / 3: the Jacobi estimate on a sphere of radius r gives 1/r^2,
    # and on Stiefel agrees with the Gauss equation
    rng = _rng(5)
    r = 1.5
    x = _sphere_point(rng, 1, 5, r)
    u, v = _sphere_tangent(rng, x, r), _sphere_tangent(rng, x, r)
    _close(kcurv.jacobi_curvature(Sphere(radius=r), _t(x), _t(u), _t(v)), 1 / r**2, 1e-5)
    y = _stiefel_point(rng, 5, 2)
    ys, us, vs = (_stiefel_kernel(a) for a in
                  (y, _stiefel_tangent(rng, y), _stiefel_tangent(rng, y)))
    _close(kcurv.jacobi_curvature(Stiefel(), ys, us, vs),
           float(kcurv.sectional_curvature(Stiefel(), ys, us, vs)), 1e-4)


# ---------------------------------------------------------------------------------- sphere
@check("sphere-dim")
def _():
    for shape in [(8, 3, 3, 3), (5, 2, 1, 1), (4, 7)]:
        n = math.prod(shape[1:])
        assert Sphere().dim(shape) == shape[0] * (n - 1)


@check("sphere-proj")
def _():
    rng = _rng(6)
    r = 0.7
    x = _sphere_point(rng, 5, 9, r)
    u = rng.standard_normal(x.shape)
    expect = u - (x * u).sum(1, keepdims=True) / r**2 * x
    _close(_np(Sphere(radius=r).proju(_t(x), _t(u))), expect)


@check("sphere-metric")
def _():
    rng = _rng(7)
    x = _sphere_point(rng)
    u, v = _sphere_tangent(rng, x, 1.7), _sphere_tangent(rng, x, 1.7)
    m = Sphere(radius=1.7)
    _close(float(m.inner(_t(x), _t(u), _t(v))), np.trace(u.T @ v))
    _close(_np(m.component_norm(_t(x), _t(u))), np.linalg.norm(u, axis=1))


@check("sphere-retr")
def _():
    rng = _rng(8)
    r = 2.0
    x = _sphere_point(rng, 4, 6, r)
    u = _sphere_tangent(rng, x, r)
    _close(_np(Sphere(radius=r).retr(_t(x), _t(u))),
           r * (x + u) / np.linalg.norm(x + u, axis=1, keepdims=True))


@check("sphere-exp")
def _():
    rng = _rng(9)
    r = 1.3
    x = _sphere_point(rng, 4, 6, r)
    u = _sphere_tangent(rng, x, r) * np.array([[0.0], [1e-9], [0.5], [3.0]])
    nu = np.linalg.norm(u, axis=1, keepdims=True)
    t = nu / r
    with np.errstate(invalid="ignore", divide="ignore"):
        expect = np.cos(t) * x + r * np.sin(t) * np.where(nu > 0, u / nu, 0.0)
    _close(_np(Sphere(radius=r).expmap(_t(x), _t(u))), expect)


@check("sphere-dist")
def _():
    rng = _rng(10)
    r = 1.7
    x, y = _sphere_point(rng, 6, 5, r), _sphere_point(rng, 6, 5, r)
    theta = np.arccos(np.clip((x * y).sum(1) / r**2, -1, 1))
    m = Sphere(radius=r)
    _close(_np(m.component_dist(_t(x), _t(y))), r * theta, 1e-9)
    _close(float(m.dist(_t(x), _t(y))), np.sqrt(((r * theta) ** 2).sum()), 1e-9)
    # small angles, where arccos fails: d(x, Exp_x(u)) = |u| in float32 too
    u = _sphere_tangent(rng, x, r)
    u = 1e-4 * u / np.linalg.norm(u, axis=1, keepdims=True)
    x32 = torch.tensor(x, dtype=torch.float32)
    y32 = m.expmap(x32, torch.tensor(u, dtype=torch.float32))
    np.testing.assert_allclose(_np(m.component_dist(x32, y32)), 1e-4, rtol=2e-2)


@check("sphere-log")
def _():
    rng = _rng(11)
    r = 1.1
    x, y = _sphere_point(rng, 4, 5, r), _sphere_point(rng, 4, 5, r)
    w = (y - x) - ((x * (y - x)).sum(1, keepdims=True) / r**2) * x
    theta = np.arccos(np.clip((x * y).sum(1, keepdims=True) / r**2, -1, 1))
    _close(_np(Sphere(radius=r).logmap(_t(x), _t(y))),
           r * theta * w / np.linalg.norm(w, axis=1, keepdims=True), 1e-9)


@check("sphere-ptransp")
def _():
    rng = _rng(12)
    r = 1.4
    x = _sphere_point(rng, 3, 5, r)
    u, v = _sphere_tangent(rng, x, r), _sphere_tangent(rng, x, r)
    nu = np.linalg.norm(u, axis=1, keepdims=True)
    e, t = u / nu, nu / r
    expect = v - (e * v).sum(1, keepdims=True) * ((1 - np.cos(t)) * e + np.sin(t) * x / r)
    got = _np(Sphere(radius=r).parallel_transp(_t(x), _t(u), _t(v)))
    _close(got, expect)
    # an isometry onto the tangent space at Exp_x(u)
    y = _np(Sphere(radius=r).expmap(_t(x), _t(u)))
    _close((got * y).sum(1), 0.0)
    _close(np.linalg.norm(got, axis=1), np.linalg.norm(v, axis=1))


@check("sphere-ii")
def _():
    rng = _rng(13)
    r = 0.9
    x = _sphere_point(rng, 3, 6, r)
    u, v = _sphere_tangent(rng, x, r), _sphere_tangent(rng, x, r)
    m = Sphere(radius=r)
    _close(_np(kcurv.second_fundamental_form(m, _t(x), _t(u), _t(v))),
           -((u * v).sum(1, keepdims=True) / r**2) * x)


@check("sphere-curv")
def _():
    rng = _rng(14)
    r = 2.5
    m = Sphere(radius=r)
    x = _sphere_point(rng, 1, 7, r)
    u, v = _sphere_tangent(rng, x, r), _sphere_tangent(rng, x, r)
    _close(float(kcurv.sectional_curvature(m, _t(x), _t(u), _t(v))), 1 / r**2)
    assert m.curvature_bounds((1, 7)) == pytest.approx((1 / r**2, 1 / r**2))
    assert Sphere().curvature_bounds((3, 2)) == (0.0, 0.0)  # circles: no 2-planes


@check("sphere-inj")
def _():
    r = 1.9
    m = Sphere(radius=r)
    assert m.injectivity_radius((4, 9)) == pytest.approx(math.pi * r)
    assert m.diameter((4, 9)) == pytest.approx(math.pi * r)
    x = _t(_sphere_point(_rng(15), 4, 9, r))
    _close(_np(m.component_dist(x, -x)), math.pi * r)


# ------------------------------------------------------------------------ centred sphere
@check("csphere-dim")
def _():
    for shape in [(8, 3, 3, 3), (4, 3)]:
        assert CenteredSphere().dim(shape) == shape[0] * (math.prod(shape[1:]) - 2)


@check("csphere-projx")
def _():
    rng = _rng(16)
    r = 1.6
    w = rng.standard_normal((5, 7))
    c = w - w.mean(1, keepdims=True)
    _close(_np(CenteredSphere(radius=r).projx(_t(w))),
           r * c / np.linalg.norm(c, axis=1, keepdims=True))


@check("csphere-proj")
def _():
    rng = _rng(17)
    r, n = 1.6, 7
    m = CenteredSphere(radius=r)
    x = _np(m.projx(_t(rng.standard_normal((5, n)))))
    u = rng.standard_normal((5, n))
    C = np.eye(n) - np.ones((n, n)) / n
    cu = u @ C.T
    expect = cu - (x * cu).sum(1, keepdims=True) / r**2 * x
    got = _np(m.proju(_t(x), _t(u)))
    _close(got, expect)
    _close(got.sum(1), 0.0)
    _close((got * x).sum(1), 0.0)


# -------------------------------------------------------------------------------- oblique
@check("oblique-dim")
def _():
    shape = (4, 3, 5, 2)  # out, in, a=5, b=2
    assert Oblique().dim(shape) == 4 * 3 * 2 * (5 - 1)
    assert Oblique(per="slice").dim(shape) == 4 * 3 * (5 * 2 - 1)


def _oblique_point(rng, shape, r):
    x = rng.standard_normal(shape)
    return r * x / np.linalg.norm(x, axis=-2, keepdims=True)  # columns of each (a, b) slice


@check("oblique-proj")
def _():
    rng = _rng(18)
    r, shape = 1.2, (3, 2, 4, 3)
    x = _oblique_point(rng, shape, r)
    u = rng.standard_normal(shape)
    xtu = np.swapaxes(x, -1, -2) @ u
    ddiag = np.eye(shape[-1]) * xtu  # keep the diagonal of X^T U
    expect = u - x @ ddiag / r**2
    _close(_np(Oblique(radius=r).proju(_t(x), _t(u))), expect)


@check("oblique-dist")
def _():
    rng = _rng(19)
    r, shape = 1.2, (3, 2, 4, 3)
    x, y = _oblique_point(rng, shape, r), _oblique_point(rng, shape, r)
    theta = 2 * np.arctan2(np.linalg.norm(x - y, axis=-2), np.linalg.norm(x + y, axis=-2))
    _close(float(Oblique(radius=r).dist(_t(x), _t(y))), np.sqrt((r**2 * theta**2).sum()))
    cos = np.clip((x * y).sum(-2) / r**2, -1, 1)
    _close(np.sort(_np(Oblique(radius=r).component_dist(_t(x), _t(y)))),
           np.sort(r * np.arccos(cos).ravel()), 1e-8)


# -------------------------------------------------------------------------------- Stiefel
@check("stiefel-groups")
def _():
    def page(out, n):
        return min(g for g in range(1, out + 1) if out % g == 0 and out // g <= n)

    for out, n in [(16, 27), (64, 27), (7, 3), (12, 5), (1, 2), (100, 9)]:
        assert stiefel_groups(out, n) == page(out, n)
    g, n, p = Stiefel().to_batch(torch.zeros(64, 3, 3, 3)).shape
    assert (g, n, p) == (page(64, 27), 27, 64 // page(64, 27))


@check("stiefel-dim")
def _():
    for shape in [(16, 3, 3, 3), (64, 3, 3, 3), (5, 5)]:
        g, n, p = Stiefel().to_batch(torch.zeros(shape)).shape
        assert Stiefel().component_dim(shape) == n * p - p * (p + 1) // 2
        assert Stiefel().dim(shape) == g * (n * p - p * (p + 1) // 2)


@check("stiefel-proj")
def _():
    rng = _rng(20)
    y = _stiefel_point(rng)
    u = rng.standard_normal(y.shape)
    a = y.T @ u
    got = _np(Stiefel().proju(_stiefel_kernel(y), _stiefel_kernel(u))).T
    _close(got, u - y @ (a + a.T) / 2)
    a2 = y.T @ got
    _close(a2 + a2.T, 0.0)


@check("stiefel-qr")
def _():
    rng = _rng(21)
    y = _stiefel_point(rng)
    u = 0.3 * _stiefel_tangent(rng, y)
    q, rr = np.linalg.qr(y + u)
    expect = q * np.sign(np.diag(rr))
    got = _np(Stiefel(retraction="qr").retr(_stiefel_kernel(y), _stiefel_kernel(u))).T
    _close(got, expect)
    assert np.all(np.diag(got.T @ (y + u)) > 0)  # diag(R) > 0


@check("stiefel-polar")
def _():
    rng = _rng(22)
    y = _stiefel_point(rng)
    u = 0.5 * _stiefel_tangent(rng, y)
    ev, evec = np.linalg.eigh(np.eye(y.shape[1]) + u.T @ u)
    expect = (y + u) @ evec @ np.diag(ev**-0.5) @ evec.T
    got = _np(Stiefel(retraction="polar").retr(_stiefel_kernel(y), _stiefel_kernel(u))).T
    _close(got, expect)
    svd_u, _, svd_vh = np.linalg.svd(y + u, full_matrices=False)
    _close(expect, svd_u @ svd_vh)
    _close(_np(Stiefel().projx(_stiefel_kernel(y + u))).T, expect, 1e-9)


@check("stiefel-exp")
def _():
    # the page's closed form against RK4 integration of Y'' = -Y (Y'^T Y')
    rng = _rng(23)
    y0 = _stiefel_point(rng, 6, 3)
    u0 = _stiefel_tangent(rng, y0)
    u0 *= 1.2 / np.linalg.norm(u0)
    got = _np(Stiefel().expmap(_stiefel_kernel(y0), _stiefel_kernel(u0))).T

    def f(state):
        y, v = state
        return np.array([v, -y @ (v.T @ v)])

    s, steps = np.array([y0, u0]), 2000
    h = 1.0 / steps
    for _ in range(steps):
        k1 = f(s)
        k2 = f(s + h / 2 * k1)
        k3 = f(s + h / 2 * k2)
        k4 = f(s + h * k3)
        s = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    _close(got, s[0], 1e-9)
    _close(got.T @ got, np.eye(3))


@check("stiefel-ii")
def _():
    rng = _rng(24)
    r = 1.5
    y = _stiefel_point(rng, 6, 3)
    x = r * y
    u, v = _stiefel_tangent(rng, y), _stiefel_tangent(rng, y)
    m = Stiefel(radius=r)
    got = _np(kcurv.second_fundamental_form(m, _stiefel_kernel(x), _stiefel_kernel(u),
                                             _stiefel_kernel(v))).T
    a = u.T @ v
    _close(got, -x @ (a + a.T) / 2 / r**2)
    auto = _np(kcurv.second_fundamental_form_autograd(m, _stiefel_kernel(x), _stiefel_kernel(u),
                                                      _stiefel_kernel(v))).T
    _close(auto, got, 1e-9)


@check("stiefel-curv")
def _():
    rng = _rng(25)
    y = _stiefel_point(rng, 6, 3)
    u, v = _stiefel_tangent(rng, y), _stiefel_tangent(rng, y)
    # orthonormalise the plane's basis, then the page's formula
    u = u / np.linalg.norm(u)
    v = v - (u * v).sum() * u
    v = v / np.linalg.norm(v)
    a = u.T @ v
    k = np.linalg.norm(u @ v.T) ** 2 - np.linalg.norm((a + a.T) / 2) ** 2
    _close(np.sum((u.T @ u) * (v.T @ v)) - np.linalg.norm((a + a.T) / 2) ** 2, k)
    _close(float(kcurv.stiefel_curvature(_t(y), _t(u), _t(v))), k)
    _close(float(kcurv.sectional_curvature(Stiefel(), _stiefel_kernel(y), _stiefel_kernel(u),
                                           _stiefel_kernel(v))), k)
    lo, hi = Stiefel().curvature_bounds((3, 6))
    assert lo <= k <= hi and (lo, hi) == (-0.5, 1.0)
    # the page's witness of the lower bound: U = [a, 0], V = [0, a], a orthogonal to span Y
    a = rng.standard_normal(6)
    a -= y @ (y.T @ a)
    a /= np.linalg.norm(a)
    uw, vw = np.zeros((6, 3)), np.zeros((6, 3))
    uw[:, 0], vw[:, 1] = a, a
    _close(float(kcurv.stiefel_curvature(_t(y), _t(uw), _t(vw))), -0.5)
    # O(p): K = |[A, C]|^2 / 4 in [0, 1/4] (p >= 4), constant 1/8 on O(3)
    for p_, lo_, hi_ in [(4, 0.0, 0.25), (5, 0.0, 0.25), (3, 0.125, 0.125)]:
        q = _stiefel_point(rng, p_, p_)
        a, c = rng.standard_normal((2, p_, p_))
        a, c = (a - a.T) / 2, (c - c.T) / 2
        a /= np.linalg.norm(a)
        c -= (a * c).sum() * a
        c /= np.linalg.norm(c)
        k_on = np.linalg.norm(a @ c - c @ a) ** 2 / 4
        _close(float(kcurv.stiefel_curvature(_t(q), _t(q @ a), _t(q @ c))), k_on)
        assert Stiefel().curvature_bounds((p_, p_)) == pytest.approx((lo_, hi_))
        assert lo_ - 1e-12 <= k_on <= hi_ + 1e-12


@check("stiefel-inj")
def _():
    r = 1.3
    m = Stiefel(radius=r)
    shape = (3, 7)  # St(7, 3)
    assert m.injectivity_radius(shape) == pytest.approx(math.pi * r)
    assert m.diameter(shape) == pytest.approx(math.pi * math.sqrt(3) * r)
    assert m.injectivity_radius((4, 4)) == pytest.approx(math.pi * math.sqrt(2) * r)
    # the diameter's lower-bound witness: Y and -Y have all columns antipodal
    y = _stiefel_point(_rng(26), 7, 3)
    col = 2 * np.arctan2(np.linalg.norm(2 * y, axis=0), np.linalg.norm(0 * y, axis=0))
    _close(np.sqrt((col**2).sum()), math.pi * math.sqrt(3))


@check("op-dist")
def _():
    from scipy.linalg import logm

    rng = _rng(27)
    r = 1.3
    m = Stiefel(per="slice", radius=r)
    for p_ in (3, 4, 5):
        x, y = _stiefel_point(rng, p_, p_), _stiefel_point(rng, p_, p_)
        if np.linalg.det(x.T @ y) < 0:
            y[:, 0] *= -1
        lam = np.linalg.eigvals(x.T @ y)
        page = r * np.sqrt(np.sum(np.angle(lam) ** 2))
        _close(page, r * np.linalg.norm(np.real(logm(x.T @ y))), 1e-9)
        xs, ys = (_t(r * a).reshape(1, 1, p_, p_) for a in (x, y))
        _close(float(m.component_dist(xs, ys)[0]), page, 1e-9)
        assert page <= m.diameter((1, 1, p_, p_)) + 1e-12
        assert m.diameter((1, 1, p_, p_)) == pytest.approx(math.pi * math.sqrt(2 * (p_ // 2)) * r)
        y[:, 0] *= -1  # the other component
        assert math.isinf(float(m.component_dist(xs, _t(r * y).reshape(1, 1, p_, p_))[0]))


# ------------------------------------------------------------------------------- products
@check("product-split")
def _():
    def page(n, k):
        sizes = [math.ceil(n / k)] * (n % k) + [n // k] * (k - n % k)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        return [(int(s), int(s + z)) for s, z in zip(starts, sizes)]

    for n, k in [(10, 3), (16, 2), (7, 7), (5, 1)]:
        blocks = KernelProduct([Sphere()], partition="out", groups=k).blocks((n, 4, 3, 3))
        assert [(so.start, so.stop) for _, (so, _) in blocks] == page(n, k)
    m = KernelProduct([Sphere(), Stiefel()], partition="both", groups=(2, 2))
    kinds = [type(c).__name__ for c, _ in m.blocks((8, 6, 3, 3))]
    assert kinds == ["Sphere", "Stiefel", "Sphere", "Stiefel"]  # row-major, cycled


@check("product-dist")
def _():
    rng = _rng(27)
    m = KernelProduct([Sphere(radius=1.3), Oblique()], partition="out")
    x, y = (m.random((6, 2, 3, 3), dtype=torch.float64) for _ in range(2))
    expect = 0.0
    for comp, idx in m.blocks(x.shape):
        expect += float(comp.dist(x[idx], y[idx])) ** 2
    _close(float(m.dist(x, y)), math.sqrt(expect))
    del rng


@check("product-spheres-curv")
def _():
    rng = _rng(28)
    r = 1.2
    x = _sphere_point(rng, 5, 4, r)
    u, v = _sphere_tangent(rng, x, r), _sphere_tangent(rng, x, r)
    uu, vv, uv = (u * u).sum(1), (v * v).sum(1), (u * v).sum(1)
    k = (uu * vv - uv**2).sum() / (r**2 * (uu.sum() * vv.sum() - uv.sum() ** 2))
    _close(float(kcurv.product_of_spheres_curvature(_t(x), _t(u), _t(v), r)), k)
    _close(float(kcurv.sectional_curvature(Sphere(radius=r), _t(x), _t(u), _t(v))), k)
    assert 0 <= k <= 1 / r**2
    # a plane mixing two filters is flat
    u2, v2 = np.zeros_like(u), np.zeros_like(v)
    u2[0], v2[1] = u[0], v[1]
    _close(float(kcurv.sectional_curvature(Sphere(radius=r), _t(x), _t(u2), _t(v2))), 0.0)


# --------------------------------------------------------------------------- optimization
def _rule_consts(rule, manifold, shape, **kw):
    from kernelgeo.optim.step_rules import rule_constants

    return rule_constants(rule, manifold, shape, **kw)


@check("rsgd-step")
def _():
    from kernelgeo.optim.step_rules import step_sizes

    rnorm = torch.tensor([0.0, 0.3, 5.0, 80.0], dtype=torch.float64)
    c = _rule_consts("none", Sphere(), (4, 9))
    _close(_np(step_sizes(0.1, rnorm, c)), 0.1)
    c = _rule_consts("gsgd", Sphere(), (4, 9))
    _close(_np(step_sizes(0.1, rnorm, c)), 0.1 / np.maximum(1.0, 0.1 * _np(rnorm) / c.cap))
    try:
        from kernelgeo.optim import ConvergentRSGD
    except ImportError:  # the optimizer is checked once it exists
        return
    from kernelgeo._compat import ManifoldParameter

    rng = _rng(29)
    m = Sphere()
    x0 = _sphere_point(rng, 4, 9, 1.0)
    g = rng.standard_normal(x0.shape)
    p = ManifoldParameter(_t(x0), manifold=m)
    opt = ConvergentRSGD([p], lr=0.1, step_rule="gsgd")
    p.grad = _t(g)
    opt.step()
    d = g - (x0 * g).sum(1, keepdims=True) * x0
    rn = np.linalg.norm(d, axis=1, keepdims=True)
    c = _rule_consts("gsgd", m, (4, 9))
    gam = 0.1 * rn / c.cap
    step = -(0.1 / np.maximum(1.0, gam)) * d
    _close(_np(p.detach()), (x0 + step) / np.linalg.norm(x0 + step, axis=1, keepdims=True), 1e-9)


@check("gsgd-cap")
def _():
    from kernelgeo.optim.step_rules import convexity_radius, step_sizes

    # (manifold, shape, inj, K_max) from the theory pages
    cases = [(Sphere(radius=1.3), (4, 9), math.pi * 1.3, 1 / 1.3**2),
             (Stiefel(), (3, 8), math.pi, 1.0),
             (Stiefel(), (4, 4, 1, 1), math.pi * math.sqrt(2), 0.25),
             (Sphere(), (4, 2), math.pi, 0.0)]  # circle: flat, inj only
    for m, shape, inj, kmax in cases:
        rc = 0.5 * min(inj, math.pi / math.sqrt(kmax) if kmax > 0 else math.inf)
        assert convexity_radius(m.injectivity_radius(shape),
                                m.curvature_bounds(shape)[1]) == pytest.approx(rc)
        for theta in (0.1, 0.5, 0.9):
            c = _rule_consts("gsgd", m, shape, max_step=theta)
            assert c.cap == pytest.approx(theta * rc)
            rn = np.logspace(-4, 4, 60)
            for lam in (1e-3, 0.3, 50.0):
                g = _np(step_sizes(lam, _t(rn), c))
                _close(g, lam / np.maximum(1, lam * rn / (theta * rc)))
                _close(g * rn, np.minimum(lam * rn, theta * rc))


@check("bounded-gamma")
def _():
    from kernelgeo.optim.step_rules import step_sizes

    for m, shape in [(Sphere(radius=0.8), (4, 9)), (Stiefel(), (4, 4, 3, 3))]:
        c = _rule_consts("bounded", m, shape, max_step=0.5)
        assert c.cap == pytest.approx(0.5 * m.injectivity_radius(shape))
        rn = torch.logspace(-3, 3, 50, dtype=torch.float64)
        for lam in (0.01, 1.0, 100.0):
            length = _np(step_sizes(lam, rn, c) * rn)
            _close(length, np.minimum(lam * _np(rn), c.cap))
            assert length.max() < m.injectivity_radius(shape)


@check("robbins-monro")
def _():
    from kernelgeo.optim.schedules import RobbinsMonroLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    s = RobbinsMonroLR(opt, t0=7.0, power=0.75)
    for t in range(30):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.4 / (1 + t / 7.0) ** 0.75)
        assert s.factor(t) == pytest.approx((1 + t / 7.0) ** -0.75)
        opt.step()
        s.step()
    with pytest.raises(ValueError):
        RobbinsMonroLR(opt, power=0.5)


# ================================================================ label <-> check linkage
_LABEL = re.compile(r"^\s*:label:\s*(\S+)\s*$")


def doc_labels() -> dict[str, tuple[Path, int]]:
    """Every ``:label:`` of a math block in the docs, with file and line."""
    out = {}
    for path in sorted(DOCS.rglob("*.rst")):
        if "_build" in path.parts:
            continue
        for i, line in enumerate(path.read_text().splitlines()):
            m = _LABEL.match(line)
            if m:
                assert m.group(1) not in out, f"duplicate label {m.group(1)}"
                out[m.group(1)] = (path, i)
    return out


def test_every_label_checked():
    labels = set(doc_labels())
    assert labels, "no labelled formulas found in docs/"
    assert sorted(labels - set(CHECKS)) == [], "formulas without a check in tests/test_docs.py"
    assert sorted(set(CHECKS) - labels) == [], "checks whose formula is gone from docs/"


@pytest.mark.parametrize("label", sorted(doc_labels()))
def test_formula_names_its_implementation(label):
    path, line = doc_labels()[label]
    after = "\n".join(path.read_text().splitlines()[line:line + 25])
    m = re.search(r"\*Implemented by\*\s*(.{0,200})", after, re.S)
    assert m, f"{path.name}: formula {label} is not followed by '*Implemented by*'"
    assert re.search(r":(func|meth|class|attr):`", m.group(1)), (
        f"{path.name}: formula {label}: 'Implemented by' must cross-reference a function")


@pytest.mark.parametrize("label", sorted(CHECKS))
def test_formula(label):
    torch.manual_seed(0)
    CHECKS[label]()


# ============================================================================ API pages
def _public_modules():
    import kernelgeo

    names = ["kernelgeo"]
    for info in pkgutil.walk_packages(kernelgeo.__path__, "kernelgeo."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def test_api_pages_cover_all():
    """Every name in every public module's ``__all__`` is listed in docs/api (regenerate
    the pages with ``python docs/_ext/gen_api.py``)."""
    text = "\n".join(p.read_text() for p in sorted((DOCS / "api").glob("*.rst")))
    listed = {t.rsplit(".", 1)[-1] for t in re.findall(r"[\w.]+", text)}
    missing = []
    for modname in _public_modules():
        mod = importlib.import_module(modname)
        for name in getattr(mod, "__all__", []):
            if inspect.ismodule(getattr(mod, name, None)) or name == "__version__":
                continue
            if name not in listed:
                missing.append(f"{modname}.{name}")
        if modname not in text and modname != "kernelgeo.constraints":
            shadowed = modname.rsplit(".", 1)
            parent = importlib.import_module(shadowed[0])
            if shadowed[1] not in getattr(parent, "__all__", []):
                missing.append(modname)
    assert missing == [], "not in docs/api; run python docs/_ext/gen_api.py"


# ============================================================================ tutorials
TUTORIALS = sorted(p.name for p in (DOCS / "tutorials").glob("*.rst") if p.name != "index.rst")


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_doctests(name):
    """The ``>>>`` examples of each tutorial give the printed output (the build runs the same
    code through the plot directive and keeps the figures)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    globs = {"np": np, "torch": torch, "plt": plt}  # what conf.py's plot_pre_code provides
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the docs build; tiny models gain nothing from more
    try:
        res = doctest.testfile(str(DOCS / "tutorials" / name), module_relative=False,
                               globs=globs, optionflags=doctest.ELLIPSIS
                               | doctest.NORMALIZE_WHITESPACE, verbose=False)
    finally:
        plt.close("all")
        torch.set_num_threads(threads)
    assert res.attempted > 0
    assert res.failed == 0


# ========================================================== Markdown results inclusion
_NASTY_MD = """# Benchmark results

Machine: **CPU** x86_64, torch 2.14; command `python bench/optimizer_step.py --n 10`.

## ResNet-20 parameters *(CPU)*

| optimizer | geometry | step (ms) | ratio |
|---|---|---:|---:|
| torch SGD (foreach) | - | 0.75 | 1.00x |
| geoopt | stiefel_qr | 15 | `20x` |
| a \\| b | 1. | .. | * |

- a bullet with *emphasis*, a [link](https://example.org), a snake_case_name, 2*3=6
  continued on a second line
  and on a third line
* **a star bullet**: then a paragraph right after the list
without a blank line
- see [the report](report.md) and ![plot](loss.png)

1. a numbered line
---

```bash
$ make bench   # |x| *y*
```
Trailing paragraph with <angle> brackets, a_b_ and `` `tick` ``.
"""


def test_markdown_include_renders_without_warnings():
    """Result files are free text: their conversion must never produce reST warnings
    (``-W`` would turn them into a failed docs build)."""
    import sys

    from docutils.core import publish_doctree

    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from kgdocs import md_to_rst
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    rst = "Results\n=======\n\n" + md_to_rst(_NASTY_MD, top_level=1)
    tree = publish_doctree(rst, settings_overrides={"halt_level": 2, "report_level": 2,
                                                    "warning_stream": False})
    text = tree.astext()
    for snippet in ("stiefel_qr", "snake_case_name", "2*3=6", "make bench", "a | b",
                    "on a third line", "without a blank line"):
        assert snippet in text


# ========================================================== generated pages, offline maths
def _ext(name):
    import importlib
    import sys

    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(DOCS / "_ext"))


def test_cli_reference_finds_the_parser_main_uses(monkeypatch):
    """docs/cli.rst renders the parser that ``kernelgeo.cli.main`` really parses with, and
    every subcommand's ``--help`` (found without running any command)."""
    kgcli = _ext("kgcli")
    parser = kgcli.capture_parser("kernelgeo.cli", prog="kernelgeo")
    cmds = kgcli.commands(parser)
    assert len(cmds) >= 3, "the kernelgeo command has subcommands"
    for words, helpline, p in cmds:
        text = kgcli.format_help(p)
        assert text.startswith("usage: kernelgeo"), words
        assert " ".join(words) in text.splitlines()[0]
        monkeypatch.setenv("COLUMNS", "200")  # the page does not depend on a terminal
        assert kgcli.format_help(p) == text
        monkeypatch.delenv("COLUMNS")
        if words:
            assert helpline, f"subcommand {words} has no help line"
    assert "cli-reference:: kernelgeo.cli" in (DOCS / "cli.rst").read_text()


def test_cli_reference_fails_loudly_when_main_does_not_parse(tmp_path, monkeypatch):
    from sphinx.errors import ExtensionError

    kgcli = _ext("kgcli")
    (tmp_path / "fake_cli.py").write_text("def main(argv=None):\n    return 0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ExtensionError, match="without calling"):
        kgcli.capture_parser("fake_cli")
    with pytest.raises(ExtensionError, match="cannot import"):
        kgcli.capture_parser("kernelgeo.cli", entry="no_such_main")


def test_mathjax_is_served_from_the_site():
    """Formulas render offline: MathJax's SVG build comes from the docs extra."""
    pytest.importorskip("sphinx")
    kgmathjax = _ext("kgmathjax")
    import importlib.util

    if importlib.util.find_spec(kgmathjax.PACKAGE) is None:
        pytest.skip(f"{kgmathjax.PACKAGE} (docs extra) is not installed")
    d = kgmathjax.mathjax_dir()
    assert (d / "tex-svg.js").stat().st_size > 100_000
    assert "https://" not in (DOCS / "conf.py").read_text().split("intersphinx_mapping")[0]


def test_every_analysis_script_is_in_the_gallery():
    text = (DOCS / "gallery.rst").read_text()
    # runnable scripts (a shared module such as studies.py has no __main__ block)
    scripts = sorted(p.name for p in (DOCS.parent / "analysis").glob("*.py")
                     if '__name__ == "__main__"' in p.read_text())
    assert scripts
    for name in scripts:
        assert f".. analysis-script:: analysis/{name}" in text, name


def test_tutorials_show_their_output_and_imports():
    """No skipped examples (the page would show code without its output) and no names that
    only the build's hidden pre-code defines."""
    for path in sorted((DOCS / "tutorials").glob("*.rst")):
        text = path.read_text()
        assert "+SKIP" not in text, path.name
        code = "\n".join(line for line in text.splitlines()
                         if line.lstrip().startswith((">>>", "...")))
        if re.search(r"\bnp\.", code):
            assert "import numpy as np" in code, path.name
        if re.search(r"\bplt\.", code):
            assert "pyplot as plt" in code, path.name
