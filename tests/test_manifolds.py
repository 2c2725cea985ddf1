"""Randomized property tests of the kernel manifolds (issue 2's acceptance list).

Every manifold of the registry, the Stiefel/Oblique variants, radii other than 1 and products
are run on a range of kernel shapes (Conv1d/2d/3d, 1x1, kh != kw, out > fan-in, a prime out,
depthwise, a linear weight).  Checks that do not trust the code under test use independent
oracles: the constraint residuals below are written from the kernel tensor directly (not
through ``to_batch``), projections are compared with closed forms (row/column normalisation,
scipy's polar decomposition), Stiefel's exponential with geoopt's ``EuclideanStiefel``, and
geodesics and curvature are checked by finite differences of ``expmap``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from conftest import TOL

from kernelgeo._compat import geoopt
from kernelgeo.manifolds import (
    CenteredSphere,
    Euclidean,
    KernelProduct,
    KernelShapeError,
    Oblique,
    RowSphere,
    Sphere,
    Stiefel,
    available,
    get_manifold,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny tensors: thread start-up dominates, and on a shared 2-core box matrix_exp with two
    # threads runs ~10x slower than with one
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

# ----------------------------------------------------------------------------- cases
SHAPES = {
    "conv1d": (6, 4, 5),
    "conv2d": (8, 3, 3, 3),
    "1x1": (6, 10, 1, 1),
    "k3x5": (4, 2, 3, 5),
    "k5x3": (4, 2, 5, 3),
    "wide": (64, 3, 3, 3),  # out > fan-in: Stiefel groups 4 x St(27, 16)
    "prime": (31, 2, 1, 1),  # prime out > n = 2: Stiefel 31 x St(2, 1)
    "depthwise": (5, 1, 3, 3),
    "conv3d": (4, 2, 2, 3, 3),
    "linear": (5, 7),
}

MANIFOLDS = {name: (lambda n=name: get_manifold(n)) for name in available()}
MANIFOLDS.update({
    "sphere-r2.5": lambda: Sphere(radius=2.5),
    "centered-sphere-fanin": lambda: CenteredSphere(radius=0.5, radius_scale="fan_in"),
    "oblique-fanin": lambda: Oblique(radius_scale="fan_in"),
    "oblique-slice-r3": lambda: Oblique(per="slice", radius=3.0),
    "stiefel-polar": lambda: Stiefel(retraction="polar"),
    "stiefel-slice-polar": lambda: Stiefel(per="slice", retraction="polar"),
    "stiefel-g8": lambda: Stiefel(group_size=8),
    "stiefel-fanin": lambda: Stiefel(radius=0.7, radius_scale="fan_in"),
    "po:sphere+stiefel": lambda: get_manifold("po:sphere+stiefel"),
    "po:sphere+stiefel-r2": lambda: get_manifold("po:sphere+stiefel", radius=2.0),
    "pi:2:sphere": lambda: get_manifold("pi:2:sphere"),
    "pio:2x2:sphere+oblique": lambda: get_manifold("pio:2x2:sphere+oblique"),
    "po:3:centered-sphere+euclidean": lambda: get_manifold("po:3:centered-sphere+euclidean"),
})

#: (manifold, shape) pairs that must be rejected by check_kernel_shape; all others must pass
INVALID = {
    ("centered-sphere", "prime"), ("centered-sphere-fanin", "prime"),
    ("po:3:centered-sphere+euclidean", "prime"),
    *((m, s) for m in ("oblique", "oblique-slice", "oblique-fanin", "oblique-slice-r3",
                       "stiefel-slice", "stiefel-slice-polar")
      for s in ("1x1", "prime", "linear")),
    *(("stiefel-g8", s) for s in SHAPES if s not in ("conv2d", "wide")),
    ("pi:2:sphere", "depthwise"), ("pi:2:sphere", "prime"),
    *(("pio:2x2:sphere+oblique", s) for s in ("1x1", "prime", "depthwise", "linear")),
}

#: radius and retraction variants run on fewer shapes (their layouts are the base ones)
VARIANTS = {"sphere-r2.5", "centered-sphere-fanin", "oblique-fanin", "oblique-slice-r3",
            "stiefel-polar", "stiefel-slice-polar", "stiefel-fanin", "po:sphere+stiefel-r2"}
VARIANT_SHAPES = {"conv1d", "k3x5", "wide", "prime", "depthwise", "conv3d"}
CASES = [pytest.param(m, s, id=f"{m}-{s}") for m in MANIFOLDS for s in SHAPES
         if (m, s) not in INVALID and (m not in VARIANTS or s in VARIANT_SHAPES)]
#: cases small enough for dense (numel x numel) projector matrices
SMALL = [c for c in CASES if math.prod(SHAPES[c.values[1]]) <= 360]


def _case(mid, sid):
    return MANIFOLDS[mid](), SHAPES[sid]


# ------------------------------------------------------------------- independent oracles
def blocks(m, shape):
    """(plain manifold, index) pairs; a plain manifold is one block covering everything."""
    if isinstance(m, KernelProduct):
        return m.blocks(shape)
    return [(m, (slice(None),))]


def has_stiefel(m, shape):
    return any(isinstance(b, Stiefel) for b, _ in blocks(m, shape))


def slice_dims(shape):
    k = tuple(shape[2:])
    return (k[0], 1) if len(k) == 1 else (math.prod(k[:-1]), k[-1])


def stiefel_grid(b, shape):
    """(G, p, n) of per-filter Stiefel written from the definition: groups of <= n filters."""
    out, n = shape[0], math.prod(shape[1:])
    if b.group_size is not None:
        return out // b.group_size, b.group_size, n
    g = next(g for g in range(1, out + 1) if out % g == 0 and out // g <= n)
    return g, out // g, n


def expected_radius(b, shape):
    if b.radius_scale is None:
        return b.radius
    if isinstance(b, Oblique):
        a, c = slice_dims(shape)
        return b.radius * math.sqrt(a if b.per == "column" else a * c)
    if isinstance(b, Stiefel) and b.per == "slice":
        return b.radius * math.sqrt(max(slice_dims(shape)))
    return b.radius * math.sqrt(math.prod(shape[1:]))


def residuals(m, w):
    """Constraint residuals c(W) (zero iff W is on the manifold), read off the raw kernel.

    Each residual is quadratic or linear in W, so ``c(W+U) - c(W-U)`` is exactly four times
    (twice for linear ones) the derivative ``Dc(W)[U]``: a tangent-space oracle.
    """
    res = []
    for b, idx in blocks(m, w.shape):
        x = w[idx]
        shp = x.shape
        if isinstance(b, Euclidean):
            continue
        r2 = expected_radius(b, shp) ** 2
        o, i = shp[0], shp[1]
        if isinstance(b, Stiefel):
            if b.per == "filter":
                g, p, n = stiefel_grid(b, shp)
                mat = x.reshape(g, p, n)  # rows are filters
                gram = mat @ mat.transpose(-1, -2)
            else:
                a, c = slice_dims(shp)
                mat = x.reshape(o * i, a, c)
                gram = (mat.transpose(-1, -2) @ mat) if a >= c else (mat @ mat.transpose(-1, -2))
            eye = torch.eye(gram.shape[-1], dtype=w.dtype)
            res.append(((gram - r2 * eye) / r2).flatten())
        elif isinstance(b, Oblique):
            a, c = slice_dims(shp)
            if b.per == "column":
                res.append(((x.reshape(o, i, a, c) ** 2).sum(-2) / r2 - 1).flatten())
            else:
                res.append(((x.reshape(o, i, a * c) ** 2).sum(-1) / r2 - 1).flatten())
        elif isinstance(b, Sphere):
            f = x.reshape(o, -1)
            res.append((f**2).sum(1) / r2 - 1)
            if isinstance(b, CenteredSphere):
                res.append(f.sum(1) / math.sqrt(r2 * f.shape[1]))
        else:  # pragma: no cover - a new geometry needs an oracle here
            raise AssertionError(f"no residual oracle for {type(b).__name__}")
    return torch.cat(res) if res else w.new_zeros(0)


def scale_of(m, shape):
    """Largest radius over the blocks (magnitude of points, for absolute tolerances)."""
    rs = [expected_radius(b, w_shape(shape, idx)) for b, idx in blocks(m, shape)
          if not isinstance(b, Euclidean)]
    return max(rs, default=1.0)


def w_shape(shape, idx):
    return tuple(torch.empty(shape, device="meta")[idx].shape)


def on_manifold_err(m, w):
    r = residuals(m, w)
    return float(r.abs().max()) if r.numel() else 0.0


def tangent_err(m, x, u):
    """Relative size of Dc(x)[u] (zero iff u is tangent at x)."""
    d = residuals(m, x + u) - residuals(m, x - u)
    if not d.numel():
        return 0.0
    nrm = float(u.norm()) * scale_of(m, x.shape) + 1e-300
    return float(d.abs().max()) / nrm


def normal_vector(m, x, gen):
    """A random vector of the normal space at x: c x per sphere row (plus constants for the
    centred sphere), X S with S symmetric for Stiefel, nothing for Euclidean blocks."""
    out = torch.zeros_like(x)
    for b, idx in blocks(m, x.shape):
        xb = x[idx]
        if isinstance(b, Euclidean):
            continue
        bb = b.to_batch(xb)
        if isinstance(b, RowSphere):
            nb = torch.randn(bb.shape[0], 1, generator=gen, dtype=x.dtype) * bb
            if isinstance(b, CenteredSphere):
                nb = nb + torch.randn(bb.shape[0], 1, generator=gen, dtype=x.dtype)
        else:
            s = torch.randn(bb.shape[0], bb.shape[-1], bb.shape[-1], generator=gen,
                            dtype=x.dtype)
            nb = bb @ (s + s.transpose(-1, -2))
        out[idx] = b.from_batch(nb, xb.shape)
    return out


def point_and_tangent(m, shape, dtype, gen):
    x = m.random(shape, dtype=dtype, generator=gen)
    u = m.random_tangent(x, generator=gen)
    return x, u


def assert_close(a, b, dtype, scale=1.0, k=1.0):
    t = TOL[dtype] * k
    torch.testing.assert_close(a, b, atol=t * scale, rtol=t)


def single_component(m, x, u):
    """u restricted to the first component of the first non-Euclidean block (else all of u)."""
    for b, idx in blocks(m, x.shape):
        if isinstance(b, Euclidean):
            continue
        ub = b.to_batch(u[idx]).clone()
        ub[1:] = 0
        out = torch.zeros_like(u)
        out[idx] = b.from_batch(ub, u[idx].shape)
        return out
    return u


# ----------------------------------------------------------------------- case table
@pytest.mark.parametrize("mid", list(MANIFOLDS))
def test_kernel_shape_validity_table(mid):
    for sid in SHAPES:
        m, shape = _case(mid, sid)
        if (mid, sid) in INVALID:
            with pytest.raises(KernelShapeError):
                m.check_kernel_shape(shape)
        else:
            m.check_kernel_shape(shape)


# ------------------------------------------------------------------------------- projx
@pytest.mark.parametrize("mid,sid", CASES)
def test_projx_on_manifold_idempotent_first_order_optimal(mid, sid, dtype, gen):
    m, shape = _case(mid, sid)
    s = scale_of(m, shape)
    for amp in (1e-3, 1.0, 1e3):
        w = amp * torch.randn(shape, dtype=dtype, generator=gen)
        p = m.projx(w)
        assert p.shape == w.shape and p.dtype == dtype
        assert on_manifold_err(m, p) < 10 * TOL[dtype]
        assert m.check_point_on_manifold(p, atol=10 * TOL[dtype], rtol=10 * TOL[dtype])
        assert_close(m.projx(p), p, dtype, s, k=10)
        # nearest point => the residual w - p is normal at p
        if amp == 1.0:
            assert float(m.proju(p, w - p).norm()) < 100 * TOL[dtype] * float(w.norm())


@pytest.mark.parametrize("mid,sid", CASES)
def test_projx_is_nearest_point(mid, sid, gen):
    m, shape = _case(mid, sid)
    w = torch.randn(shape, dtype=F64, generator=gen)
    p = m.projx(w)
    d0 = float((w - p).norm())
    for _ in range(20):
        y = m.random(shape, dtype=F64, generator=gen)
        assert float((w - y).norm()) >= d0 - 1e-9
    for t in (1e-3, 1e-1):
        y = m.retr(p, t * m.random_tangent(p, generator=gen))
        assert float((w - y).norm()) >= d0 - 1e-9


@pytest.mark.parametrize("mid,sid", CASES)
def test_projx_closed_forms(mid, sid, gen):
    """Projection equals the known metric projection, computed without the layout code."""
    m, shape = _case(mid, sid)
    w = torch.randn(shape, dtype=F64, generator=gen)
    p = m.projx(w)
    for b, idx in blocks(m, shape):
        x, got = w[idx].numpy(), p[idx].numpy()
        shp = x.shape
        o, i = shp[0], shp[1]
        r = expected_radius(b, shp)
        if isinstance(b, Euclidean):
            want = x
        elif isinstance(b, Stiefel):
            if b.per == "filter":
                g, q, n = stiefel_grid(b, shp)
                mats = x.reshape(g, q, n)
            else:
                mats = x.reshape(o * i, *slice_dims(shp))
            want = np.stack([r * _polar_np(a) for a in mats]).reshape(shp)
        elif isinstance(b, Oblique):
            a, c = slice_dims(shp)
            if b.per == "column":
                s4 = x.reshape(o, i, a, c)
                want = (r * s4 / np.linalg.norm(s4, axis=2, keepdims=True)).reshape(shp)
            else:
                s3 = x.reshape(o, i, a * c)
                want = (r * s3 / np.linalg.norm(s3, axis=2, keepdims=True)).reshape(shp)
        else:
            f = x.reshape(o, -1)
            if isinstance(b, CenteredSphere):
                f = f - f.mean(1, keepdims=True)
            want = (r * f / np.linalg.norm(f, axis=1, keepdims=True)).reshape(shp)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9 * r)


def _polar_np(a):
    # orthonormal factor of the polar decomposition of a (tall or wide)
    if a.shape[0] >= a.shape[1]:
        return scipy.linalg.polar(a)[0]
    return scipy.linalg.polar(a.T)[0].T


@pytest.mark.parametrize("mid,sid", CASES)
def test_projx_of_degenerate_kernels_is_finite(mid, sid):
    m, shape = _case(mid, sid)
    for dtype in (torch.float64, torch.float32):
        zero = torch.zeros(shape, dtype=dtype)
        const = torch.ones(shape, dtype=dtype)  # centred part is zero for the centred sphere
        half = torch.randn(shape, dtype=dtype)
        half[: shape[0] // 2] = 0  # some zero filters only
        tiny = 1e-30 * torch.randn(shape, dtype=dtype)
        for w in (zero, const, half, tiny):
            p = m.projx(w)
            assert torch.isfinite(p).all(), dtype
            assert on_manifold_err(m, p) < 10 * TOL[dtype], dtype


def test_projx_of_one_entry_rows_does_not_crash():
    """Shapes whose rows have one entry are rejected by check_kernel_shape; projx called on
    one anyway gives the nearest point of S^0 (the sign), and +r for a zero entry."""
    m = get_manifold("sphere")
    with pytest.raises(ValueError):
        m.check_kernel_shape((4, 1, 1, 1))
    w = torch.tensor([-2.0, 0.0, 3.0, -0.5]).view(4, 1, 1, 1)
    assert m.projx(w).flatten().tolist() == [-1.0, 1.0, 1.0, -1.0]


@pytest.mark.parametrize("mid,sid", CASES)
def test_constraint_error_is_distance_to_manifold(mid, sid, gen):
    """Largest per-component distance ||x_k - projx(x)_k|| (exact for spheres, to first order
    for Stiefel) for points pushed off the manifold along normal directions (regression: the
    centred sphere summed the radial and mean errors, overestimating by up to sqrt 2)."""
    m, shape = _case(mid, sid)
    x = m.random(shape, dtype=F64, generator=gen)
    nv = normal_vector(m, x, gen)
    if float(nv.norm()) == 0:
        assert m.constraint_error(x + torch.randn(shape, dtype=F64, generator=gen)) == 0
        return
    y = x + 1e-3 * scale_of(m, shape) * nv / nv.abs().max()
    diff = y - m.projx(y)
    true = max(float(b.to_batch(diff[idx]).flatten(1).norm(dim=1).max())
               for b, idx in blocks(m, shape))
    rel = 1e-2 if has_stiefel(m, shape) else 1e-9
    assert m.constraint_error(y) == pytest.approx(true, rel=rel)


# ------------------------------------------------------------------------------- proju
@pytest.mark.parametrize("mid,sid", CASES)
def test_proju_idempotent_selfadjoint_tangent(mid, sid, dtype, gen):
    m, shape = _case(mid, sid)
    x = m.random(shape, dtype=dtype, generator=gen)
    u = torch.randn(shape, dtype=dtype, generator=gen)
    v = torch.randn(shape, dtype=dtype, generator=gen)
    pu, pv = m.proju(x, u), m.proju(x, v)
    s = float(u.norm())
    assert_close(m.proju(x, pu), pu, dtype, s / math.sqrt(u.numel()), k=10)
    lhs, rhs = (pu * v).sum(), (u * pv).sum()
    assert abs(float(lhs - rhs)) < 10 * TOL[dtype] * s * float(v.norm())
    assert tangent_err(m, x, pu) < 10 * TOL[dtype]
    assert m.check_vector_on_tangent(x, pu, atol=10 * TOL[dtype], rtol=10 * TOL[dtype])
    assert_close(m.egrad2rgrad(x, u), pu, dtype, s)
    # the discarded part is orthogonal to every tangent vector
    assert abs(float(((u - pu) * pv).sum())) < 10 * TOL[dtype] * s * float(v.norm())


@pytest.mark.parametrize("mid,sid", CASES)
def test_proju_kills_normal_directions(mid, sid, dtype, gen):
    m, shape = _case(mid, sid)
    x, u = point_and_tangent(m, shape, dtype, gen)
    nv = normal_vector(m, x, gen)
    s = float(nv.norm()) + float(u.norm())
    assert float(m.proju(x, nv).norm()) < 10 * TOL[dtype] * s
    assert_close(m.proju(x, u + nv), u, dtype, s / math.sqrt(u.numel()), k=10)
    if not any(isinstance(b, Euclidean) for b, _ in blocks(m, shape)):
        assert float(m.proju(x, x).norm()) < 10 * TOL[dtype] * float(x.norm())
    if float(nv.norm()) > 0:  # the tangent check must see a normal component
        ok, why = m.check_vector_on_tangent(x, u + nv, explain=True)
        assert not ok and why


@pytest.mark.parametrize("mid,sid", SMALL)
def test_dim_is_rank_of_tangent_projector(mid, sid):
    m, shape = _case(mid, sid)
    gen = torch.Generator().manual_seed(0)
    x = m.random(shape, dtype=F64, generator=gen)
    n = x.numel()
    eye = torch.eye(n, dtype=F64)
    cols = torch.stack([m.proju(x, eye[j].reshape(shape)).flatten() for j in range(n)], 1)
    torch.testing.assert_close(cols, cols.T, atol=1e-12, rtol=0)  # self-adjoint
    torch.testing.assert_close(cols @ cols, cols, atol=1e-12, rtol=0)  # idempotent
    assert int(torch.linalg.matrix_rank(cols)) == m.dim(shape)
    assert round(float(torch.trace(cols))) == m.dim(shape)


# ------------------------------------------------------------------------ retr / expmap
@pytest.mark.parametrize("mid,sid", CASES)
def test_retr_expmap_stay_on_manifold(mid, sid, dtype, gen):
    m, shape = _case(mid, sid)
    x, u = point_and_tangent(m, shape, dtype, gen)
    s = scale_of(m, shape)
    for t in (1e-6, 0.1, 1.0, 7.0):
        for op in (m.retr, m.expmap):
            y = op(x, t * s * u / u.norm())
            assert torch.isfinite(y).all()
            assert on_manifold_err(m, y) < 10 * TOL[dtype]
    zero = torch.zeros_like(u)
    assert_close(m.retr(x, zero), x, dtype, s)
    assert_close(m.expmap(x, zero), x, dtype, s)


@pytest.mark.parametrize("mid,sid", CASES)
def test_retr_expmap_first_order(mid, sid, gen):
    m, shape = _case(mid, sid)
    x, u = point_and_tangent(m, shape, F64, gen)
    h = 1e-6
    for op in (m.retr, m.expmap):
        d = (op(x, h * u) - op(x, -h * u)) / (2 * h)
        torch.testing.assert_close(d, u, atol=1e-7 * float(u.abs().max()), rtol=1e-6)
    if not has_stiefel(m, shape):  # sphere-type retraction is the metric projection of x + u
        torch.testing.assert_close(m.retr(x, u), m.projx(x + u), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("mid,sid", CASES)
def test_expmap_is_geodesic(mid, sid, gen):
    """Constant speed ||u|| and normal acceleration along t -> Exp_x(t u)."""
    m, shape = _case(mid, sid)
    x, u = point_and_tangent(m, shape, F64, gen)
    s = scale_of(m, shape)
    u = u * (s / float(u.norm()))  # total length ~ one radius
    speed = float(u.norm())
    for t in (0.0, 0.4, 1.3):
        h = 1e-5
        g0 = m.expmap(x, t * u)
        vel = (m.expmap(x, (t + h) * u) - m.expmap(x, (t - h) * u)) / (2 * h)
        assert abs(float(vel.norm()) - speed) < 1e-7 * speed
        h = 1e-4
        acc = (m.expmap(x, (t + h) * u) - 2 * g0 + m.expmap(x, (t - h) * u)) / h**2
        tangential = m.proju(g0, acc)
        assert float(tangential.norm()) < 1e-5 * speed**2 / s * math.sqrt(acc.numel())


@pytest.mark.parametrize("mid,sid", [c for c in CASES if c.values[0].startswith("stiefel")])
def test_stiefel_retractions(mid, sid, gen):
    """QR: X + U = R_X(U) T with T upper triangular, positive diagonal (the sign-corrected
    Q factor); polar: R_X(U) is the metric projection of X + U."""
    m, shape = _case(mid, sid)
    x, u = point_and_tangent(m, shape, F64, gen)
    u = u * (m.radius_of(shape) / float(u.norm()))
    y = m.retr(x, u)
    r = m.radius_of(shape)
    if m.retraction == "polar":
        torch.testing.assert_close(y, m.projx(x + u), atol=1e-12 * r, rtol=1e-10)
    else:
        yb, mb = m.to_batch(y) / r, m.to_batch(x + u) / r
        t = yb.transpose(-1, -2) @ mb
        torch.testing.assert_close(yb @ t, mb, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(torch.tril(t, -1), torch.zeros_like(t), atol=1e-12, rtol=0)
        assert (torch.diagonal(t, dim1=-2, dim2=-1) > 0).all()


@pytest.mark.parametrize("mid,sid", [c for c in CASES if c.values[0].startswith("stiefel")])
def test_stiefel_expmap_matches_geoopt_euclidean_stiefel(mid, sid, gen):
    m, shape = _case(mid, sid)
    x, u = point_and_tangent(m, shape, F64, gen)
    u = u * (2.0 * m.radius_of(shape) / float(u.norm()))
    r = m.radius_of(shape)
    want = r * geoopt.EuclideanStiefel().expmap(m.to_batch(x) / r, m.to_batch(u) / r)
    torch.testing.assert_close(m.to_batch(m.expmap(x, u)), want, atol=1e-10 * r, rtol=1e-10)


@pytest.mark.parametrize("mid,sid", [c for c in CASES if "sphere" in c.values[0]
                                     or "oblique" in c.values[0]])
def test_sphere_expmap_is_periodic(mid, sid, gen):
    """Exp_x(pi r e) = -x and Exp_x(2 pi r e) = x for a unit tangent e of every component."""
    m, shape = _case(mid, sid)
    x, u = point_and_tangent(m, shape, F64, gen)
    if isinstance(m, KernelProduct):
        pytest.skip("per-component scaling is checked on plain row spheres")
    ub = m.to_batch(u)
    e = m.from_batch(ub / ub.norm(dim=-1, keepdim=True), shape)
    r = m.radius_of(shape)
    torch.testing.assert_close(m.expmap(x, math.pi * r * e), -x, atol=1e-12 * r, rtol=0)
    torch.testing.assert_close(m.expmap(x, 2 * math.pi * r * e), x, atol=1e-12 * r, rtol=0)


# ---------------------------------------------------------------------- logmap / dist
LOG_CASES = [c for c in CASES if not has_stiefel(MANIFOLDS[c.values[0]](), SHAPES[c.values[1]])]


def scale_components(m, x, v, fracs_of):
    """Rescale v so that each component's norm is fracs_of(B) * injectivity radius."""
    out = torch.zeros_like(v)
    for b, idx in blocks(m, x.shape):
        vb = b.to_batch(v[idx])
        shp = v[idx].shape
        inj = b.injectivity_radius(shp)
        if math.isinf(inj):
            out[idx] = v[idx]
            continue
        f = fracs_of(vb.shape[0]).to(v.dtype).reshape(-1, *([1] * (vb.dim() - 1)))
        nrm = vb.flatten(1).norm(dim=1).reshape(f.shape)
        out[idx] = b.from_batch(vb / nrm * f * inj, shp)
    return out


@pytest.mark.parametrize("mid,sid", LOG_CASES)
def test_logmap_inverts_expmap_and_dist_is_length(mid, sid, gen):
    m, shape = _case(mid, sid)
    x, v = point_and_tangent(m, shape, F64, gen)
    v = scale_components(m, x, v, lambda b: 0.01 + 0.94 * torch.rand(b, generator=gen,
                                                                      dtype=F64))
    y = m.expmap(x, v)
    s = scale_of(m, shape)
    torch.testing.assert_close(m.logmap(x, y), v, atol=1e-9 * s, rtol=1e-9)
    torch.testing.assert_close(m.dist(x, y), v.norm(), atol=1e-9 * s, rtol=1e-9)
    torch.testing.assert_close(m.component_dist(x, y), m.component_norm(x, v),
                               atol=1e-9 * s, rtol=1e-9)
    assert tangent_err(m, x, m.logmap(x, y)) < 1e-9
    torch.testing.assert_close(m.logmap(x, x), torch.zeros_like(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize("mid,sid", LOG_CASES)
def test_dist_metric_axioms(mid, sid, dtype, gen):
    m, shape = _case(mid, sid)
    s = scale_of(m, shape)
    pts = [m.random(shape, dtype=dtype, generator=gen) for _ in range(3)]
    x0, u = point_and_tangent(m, shape, dtype, gen)
    near = [x0, m.expmap(x0, 1e-2 * s * u / u.norm()), m.expmap(x0, -3e-2 * s * u / u.norm())]
    for x, y, z in (pts, near, (pts[0], near[0], near[1])):
        assert float(m.dist(x, x)) < 10 * TOL[dtype] * s
        assert_close(m.dist(x, y), m.dist(y, x), dtype, s)
        assert float(m.dist(x, z)) <= float(m.dist(x, y) + m.dist(y, z)) + 10 * TOL[dtype] * s
        d = m.component_dist(x, y)
        assert d.shape == (m.num_components(shape),) and (d >= 0).all()
        assert_close(m.dist(x, y, keepdim=True).flatten()[0], d.pow(2).sum().sqrt(), dtype, s)


@pytest.mark.parametrize("mid", ["sphere", "sphere-r2.5", "centered-sphere", "oblique",
                                 "oblique-slice"])
@pytest.mark.parametrize("angle", [1e-3, 3e-4, 1e-4])
def test_dist_small_angles_float32(mid, angle, gen):
    """d(x, Exp_x(v)) = ||v|| in float32 down to 1e-4 rad, where geoopt's arccos fails."""
    m = MANIFOLDS[mid]()
    shape = (8, 3, 3, 3)
    r = m.radius_of(shape)
    x, v = point_and_tangent(m, shape, F64, gen)
    v = scale_components(m, x, v, lambda b: torch.full((b,), angle / math.pi))
    y = m.expmap(x, v)
    d32 = m.component_dist(x.float(), y.float())
    np.testing.assert_allclose(d32.numpy(), angle * r, rtol=2e-2)
    lg = m.logmap(x.float(), y.float())
    np.testing.assert_allclose(m.component_norm(x, lg.double()).numpy(), angle * r, rtol=2e-2)
    if mid == "sphere":  # the motivation: geoopt's Sphere.dist is stuck at ~1.4e-2 rad
        g = geoopt.Sphere().dist(m.to_batch(x).float(), m.to_batch(y).float())
        assert float((g - angle).abs().min()) > 0.5 * angle


# --------------------------------------------------------------------------- transport
@pytest.mark.parametrize("mid,sid", CASES)
def test_transp_lands_in_target_tangent_space(mid, sid, dtype, gen):
    m, shape = _case(mid, sid)
    x, u = point_and_tangent(m, shape, dtype, gen)
    v = m.random_tangent(x, generator=gen)
    y = m.random(shape, dtype=dtype, generator=gen)
    tv = m.transp(x, y, v)
    assert tv.shape == v.shape and tangent_err(m, y, tv) < 10 * TOL[dtype]
    y2, tv2 = m.retr_transp(x, u, v)
    assert_close(y2, m.retr(x, u), dtype, scale_of(m, shape))
    assert tangent_err(m, y2, tv2) < 10 * TOL[dtype]
    assert_close(m.transp(x, x, v), v, dtype, float(v.abs().max()), k=10)


PT_CASES = [c for c in CASES if isinstance(MANIFOLDS[c.values[0]](), RowSphere)]


@pytest.mark.parametrize("mid,sid", PT_CASES)
def test_parallel_transport_on_spheres(mid, sid, gen):
    m, shape = _case(mid, sid)
    x, u = point_and_tangent(m, shape, F64, gen)
    u = scale_components(m, x, u, lambda b: 0.05 + 0.85 * torch.rand(b, generator=gen,
                                                                      dtype=F64))
    v1, v2 = m.random_tangent(x, generator=gen), m.random_tangent(x, generator=gen)
    y = m.expmap(x, u)
    p1, p2 = m.parallel_transp(x, u, v1), m.parallel_transp(x, u, v2)
    assert tangent_err(m, y, p1) < 1e-10
    xb = m.to_batch
    torch.testing.assert_close((xb(p1) * xb(p2)).sum(-1), (xb(v1) * xb(v2)).sum(-1),
                               atol=1e-10, rtol=1e-10)
    h = 1e-5
    vel = (m.expmap(x, (1 + h) * u) - m.expmap(x, (1 - h) * u)) / (2 * h)
    torch.testing.assert_close(m.parallel_transp(x, u, u), vel, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(m.parallel_transp(x, torch.zeros_like(u), v1), v1)


# ---------------------------------------------------------------------------- facts
@pytest.mark.parametrize("mid,sid", CASES)
def test_facts_are_consistent(mid, sid):
    m, shape = _case(mid, sid)
    bl = blocks(m, shape)
    nc = sum(b.to_batch(torch.empty(w_shape(shape, i), device="meta")).shape[0] for b, i in bl)
    assert m.num_components(shape) == nc
    assert m.dim(shape) == sum(b.num_components(w_shape(shape, i))
                               * b.component_dim(w_shape(shape, i)) for b, i in bl)
    kmin, kmax = m.curvature_bounds(shape)
    assert kmin <= kmax
    assert m.injectivity_radius(shape) > 0 and m.diameter(shape) >= m.injectivity_radius(shape)
    assert isinstance(m.describe(shape), str) and m.describe(shape)
    for b, i in bl:
        sh = w_shape(shape, i)
        r = expected_radius(b, sh)
        assert b.radius_of(sh) == pytest.approx(r)
        if isinstance(b, Euclidean):
            assert b.curvature_bounds(sh) == (0.0, 0.0)
            assert math.isinf(b.injectivity_radius(sh)) and math.isinf(b.diameter(sh))
        elif isinstance(b, RowSphere):
            assert b.injectivity_radius(sh) == pytest.approx(math.pi * r)
            assert b.diameter(sh) == pytest.approx(math.pi * r)
            if b.component_dim(sh) >= 2:
                assert b.curvature_bounds(sh) == pytest.approx((1 / r**2, 1 / r**2))
        else:
            g, n, p = b.to_batch(torch.empty(sh, device="meta")).shape
            assert b.component_dim(sh) == n * p - p * (p + 1) // 2
            lo, hi = b.curvature_bounds(sh)
            assert -1 / r**2 - 1e-12 <= lo <= hi <= 1 / r**2 + 1e-12
            # O(p) (n = p): one component's diameter, all rotation angles pi
            diam = math.sqrt(p) if n > p else math.sqrt(2 * (p // 2))
            assert b.diameter(sh) == pytest.approx(math.pi * diam * r)


EXPECTED_FACTS = [
    # manifold, shape, num_components, dim, point_shape
    ("sphere", (8, 3, 3, 3), 8, 8 * 26, (27,)),
    ("centered-sphere", (8, 3, 3, 3), 8, 8 * 25, (27,)),
    ("oblique", (8, 3, 3, 3), 72, 72 * 2, (3,)),
    ("oblique", (4, 2, 3, 5), 40, 40 * 2, (3,)),
    ("oblique", (4, 2, 5, 3), 24, 24 * 4, (5,)),
    ("oblique", (6, 4, 5), 24, 24 * 4, (5,)),
    ("oblique-slice", (8, 3, 3, 3), 24, 24 * 8, (9,)),
    ("stiefel", (8, 3, 3, 3), 1, 27 * 8 - 36, (27, 8)),
    ("stiefel", (64, 3, 3, 3), 4, 4 * (27 * 16 - 136), (27, 16)),
    ("stiefel", (31, 2, 1, 1), 31, 31, (2, 1)),
    ("stiefel-slice", (4, 2, 3, 5), 8, 8 * (15 - 6), (5, 3)),
    ("stiefel-slice", (4, 2, 2, 3, 3), 8, 8 * (18 - 6), (6, 3)),
    ("euclidean", (8, 3, 3, 3), 1, 216, (216,)),
]


@pytest.mark.parametrize("mid,shape,nc,dim,ps", EXPECTED_FACTS)
def test_facts_explicit(mid, shape, nc, dim, ps):
    m = get_manifold(mid)
    assert m.num_components(shape) == nc
    assert m.dim(shape) == dim
    assert m.point_shape(shape) == ps


def test_stiefel_explicit_group_size():
    m = Stiefel(group_size=8)
    assert m.num_components((64, 3, 3, 3)) == 8 and m.point_shape((64, 3, 3, 3)) == (27, 8)


def test_product_facts():
    m = get_manifold("po:sphere+stiefel")
    shape = (16, 8, 3, 3)
    assert m.num_components(shape) == 8 + 1
    assert m.dim(shape) == 8 * 71 + (72 * 8 - 36)
    assert m.injectivity_radius(shape) == pytest.approx(math.pi)
    st = Stiefel().curvature_bounds((8, 8, 3, 3))
    assert m.curvature_bounds(shape) == (min(st[0], 1.0), max(st[1], 1.0))


def test_stiefel_curvature_lower_bound_is_attained():
    """K(U, V) = -1/2 for U = Y_perp e1^T, V = Y_perp e2^T (Gauss equation, from expmap)."""
    m = Stiefel()
    shape = (2, 3, 1, 1)  # St(3, 2)
    x = m.random(shape, dtype=F64, generator=torch.Generator().manual_seed(0))
    y = m.to_batch(x)[0]
    yperp = torch.linalg.svd(torch.eye(3, dtype=F64) - y @ y.T)[0][:, :1]
    e = torch.eye(2, dtype=F64)
    u = m.from_batch((yperp @ e[:1])[None], shape)
    v = m.from_batch((yperp @ e[1:])[None], shape)
    iuu, ivv = _second_fundamental(m, x, u), _second_fundamental(m, x, v)
    iuv = (_second_fundamental(m, x, u + v) - _second_fundamental(m, x, u - v)) / 4
    k = float((iuu * ivv).sum() - (iuv * iuv).sum())
    assert k == pytest.approx(-0.5, abs=1e-5)
    assert m.curvature_bounds(shape)[0] <= k + 1e-5


def _second_fundamental(m, x, w, h=1e-3):
    # geodesic acceleration at t = 0 is II(w, w) for the embedded metric
    return (m.expmap(x, h * w) - 2 * x + m.expmap(x, -h * w)) / h**2


@pytest.mark.parametrize("mid,sid", [c for c in CASES if "euclidean" not in c.values[0]])
def test_sectional_curvature_within_bounds(mid, sid, gen):
    """Gauss equation K = <II(u,u), II(v,v)> - |II(u,v)|^2 from expmap, for orthonormal u, v
    inside one component; equals 1/r^2 on spheres, lies in curvature_bounds otherwise."""
    m, shape = _case(mid, sid)
    x = m.random(shape, dtype=F64, generator=gen)
    b0, idx0 = next((b, i) for b, i in blocks(m, shape) if not isinstance(b, Euclidean))
    sh = w_shape(shape, idx0)
    if b0.component_dim(sh) < 2:
        pytest.skip("no 2-planes in a 1-dimensional component")
    lo, hi = b0.curvature_bounds(sh)
    for _ in range(4):
        u = single_component(m, x, m.random_tangent(x, generator=gen))
        v = single_component(m, x, m.random_tangent(x, generator=gen))
        u = u / u.norm()
        v = v - (u * v).sum() * u
        v = v / v.norm()
        iuu, ivv = _second_fundamental(m, x, u), _second_fundamental(m, x, v)
        iuv = (_second_fundamental(m, x, u + v) - _second_fundamental(m, x, u - v)) / 4
        k = float((iuu * ivv).sum() - (iuv * iuv).sum())
        assert lo - 1e-4 * abs(lo) - 1e-6 <= k <= hi + 1e-4 * abs(hi) + 1e-6, (k, lo, hi)
        if isinstance(b0, RowSphere):
            assert k == pytest.approx(lo, rel=1e-4)


def test_sphere_curvature_from_distances(gen):
    """d(Exp(tu), Exp(tv))^2 = 2 t^2 - K t^4 / 3 + O(t^5) for orthonormal u, v."""
    m = Sphere(radius=1.7)
    shape = (3, 2, 2, 2)
    x = m.random(shape, dtype=F64, generator=gen)
    ub = m.to_batch(m.random_tangent(x, generator=gen))
    vb = m.to_batch(m.random_tangent(x, generator=gen))
    ub = ub / ub.norm(dim=-1, keepdim=True)
    vb = vb - (ub * vb).sum(-1, keepdim=True) * ub
    vb = vb / vb.norm(dim=-1, keepdim=True)
    t = 1e-2
    d = m.component_dist(m.expmap(x, t * m.from_batch(ub, shape)),
                         m.expmap(x, t * m.from_batch(vb, shape)))
    k = 3 * (2 * t**2 - d**2) / t**4
    torch.testing.assert_close(k, torch.full_like(k, 1 / 1.7**2), rtol=1e-3, atol=0)


def test_sphere_injectivity_radius_and_diameter_are_sharp(gen):
    m = Sphere(radius=2.0)
    shape = (4, 3, 3, 3)
    x, u = point_and_tangent(m, shape, F64, gen)
    r = 2.0
    torch.testing.assert_close(m.component_dist(x, -x), torch.full((4,), math.pi * r,
                                                                   dtype=F64))
    ub = m.to_batch(u)
    e = m.from_batch(ub / ub.norm(dim=-1, keepdim=True), shape)
    beyond = m.logmap(x, m.expmap(x, 1.1 * math.pi * r * e))
    torch.testing.assert_close(m.component_norm(x, beyond),
                               torch.full((4,), 0.9 * math.pi * r, dtype=F64))


def test_stiefel_o2_injectivity_radius():
    """SO(2) with the Frobenius metric is a circle of length 2 pi sqrt 2 (regression: pi)."""
    m = Stiefel()
    shape = (2, 2, 1, 1)  # St(2, 2) = O(2)
    x = m.random(shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    u = m.random_tangent(x, generator=torch.Generator().manual_seed(2))
    u = u / u.norm()
    # the geodesic closes only after length 2 pi sqrt 2, and Exp is injective below pi sqrt 2
    torch.testing.assert_close(m.expmap(x, 2 * math.pi * math.sqrt(2) * u), x)
    a, b = m.expmap(x, 1.2 * math.pi * u), m.expmap(x, -1.2 * math.pi * u)
    assert float((a - b).norm()) > 0.1
    assert m.injectivity_radius(shape) == pytest.approx(math.pi * math.sqrt(2))


# --------------------------------------------------------------------------- random
@pytest.mark.parametrize("mid,sid", CASES)
def test_random_on_manifold_and_deterministic(mid, sid, dtype, seed):
    m, shape = _case(mid, sid)
    a = m.random(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    b = m.random(*shape, dtype=dtype, generator=torch.Generator().manual_seed(seed))
    c = m.random(shape, dtype=dtype, generator=torch.Generator().manual_seed(seed + 1))
    assert a.shape == shape and a.dtype == dtype
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert on_manifold_err(m, a) < 10 * TOL[dtype]
    assert m.check_point_on_manifold(a)
    # a different stream: the same Gaussian would be normal to the point it was projected to
    u = m.random_tangent(a, generator=torch.Generator().manual_seed(seed + 2))
    assert tangent_err(m, a, u) < 10 * TOL[dtype]


def _sphere_coordinate_cdf(n):
    # CDF of one coordinate of a uniform point of S^{n-1}: density prop. to (1 - t^2)^{(n-3)/2}
    return lambda t: scipy.stats.beta.cdf((np.asarray(t) + 1) / 2, (n - 1) / 2, (n - 1) / 2)


def test_stiefel_random_is_haar():
    """QR-of-Gaussian with sign correction: E[X] = 0, each column uniform on the sphere."""
    n, p, groups = 5, 3, 2000
    m = Stiefel(group_size=p)
    x = m.random((groups * p, n, 1, 1), dtype=F64, generator=torch.Generator().manual_seed(7))
    xb = m.to_batch(x).numpy()  # (groups, n, p)
    assert xb.shape == (groups, n, p)
    se = 1 / math.sqrt(n * groups)
    assert np.abs(xb.mean(0)).max() < 5 * se
    np.testing.assert_allclose((xb**2).mean(0), 1 / n, atol=5 * se)
    cdf = _sphere_coordinate_cdf(n)
    for i, j in ((0, 0), (n - 1, p - 1), (2, 1)):
        assert scipy.stats.kstest(xb[:, i, j], cdf).pvalue > 1e-3


@pytest.mark.parametrize("mid", ["sphere", "centered-sphere", "oblique-slice"])
def test_sphere_random_is_uniform(mid):
    m = get_manifold(mid)
    x = m.random((3000, 1, 2, 3), dtype=F64, generator=torch.Generator().manual_seed(3))
    xb = m.to_batch(x).numpy()
    n = xb.shape[1]
    se = 1 / math.sqrt(n * xb.shape[0])
    assert np.abs(xb.mean(0)).max() < 5 * se
    if mid != "centered-sphere":
        assert scipy.stats.kstest(xb[:, 0], _sphere_coordinate_cdf(n)).pvalue > 1e-3


# --------------------------------------------------------------------------- layout
@pytest.mark.parametrize("mid,sid", CASES)
def test_layout_roundtrip_and_partition(mid, sid, gen):
    m, shape = _case(mid, sid)
    x = torch.randn(shape, dtype=F64, generator=gen)
    cover = torch.zeros(shape, dtype=torch.int64)
    for b, idx in blocks(m, shape):
        xb = x[idx]
        bb = b.to_batch(xb)
        assert bb.shape == (b.num_components(xb.shape), *b.point_shape(xb.shape))
        assert torch.equal(b.from_batch(bb, xb.shape), xb)
        cover[idx] += 1
    assert (cover == 1).all()


def _batch_partner(m, shape):
    """A different kernel shape with the same batch_key, if the geometry has one."""
    for k in (2, 3, 1 / 2):
        out = int(shape[0] * k)
        if out < 1 or out == shape[0]:
            continue
        other = (out, *shape[1:])
        try:
            m.check_kernel_shape(other)
        except KernelShapeError:
            continue
        if m.batch_key(other) == m.batch_key(shape):
            return other
    return None


@pytest.mark.parametrize("mid,sid", [c for c in CASES if ":" not in c.values[0]])
def test_batch_key_allows_one_batched_call(mid, sid, gen):
    """Kernels with equal keys, concatenated in the canonical layout, give the same results
    through the batched primitives as one by one."""
    m, shape = _case(mid, sid)
    other = _batch_partner(m, shape)
    if other is None:
        assert "stiefel" in mid or mid == "euclidean", f"no partner for {mid} {shape}"
        pytest.skip("no kernel shape with an equal batch key in the tried range")
    xs = [m.random(s, dtype=F64, generator=gen) for s in (shape, other)]
    us = [m.random_tangent(x, generator=gen) for x in xs]
    r = m.radius_of(shape)
    cat = lambda ts: torch.cat([m.to_batch(t) for t in ts])  # noqa: E731
    n0 = m.num_components(shape)
    for bop, op in ((m._bretr, m.retr), (m._bexpmap, m.expmap), (m._bproju, m.proju)):
        joint = bop(cat(xs), cat(us), r)
        torch.testing.assert_close(m.from_batch(joint[:n0], shape), op(xs[0], us[0]))
        torch.testing.assert_close(m.from_batch(joint[n0:], other), op(xs[1], us[1]))


def test_batch_keys_distinguish_geometries():
    shape = (8, 3, 3, 3)
    keys = {get_manifold(n).batch_key(shape) for n in available()}
    assert len(keys) >= len(available()) - 1  # oblique-slice may share oblique's row sphere
    assert Sphere().batch_key(shape) != CenteredSphere().batch_key(shape)
    assert Sphere().batch_key(shape) != Sphere(radius=2).batch_key(shape)
    assert Stiefel().batch_key(shape) != Stiefel(retraction="polar").batch_key(shape)
    assert Sphere().batch_key(shape) == Sphere().batch_key((16, 3, 3, 3))
    assert Stiefel().batch_key((64, 3, 3, 3)) == Stiefel().batch_key((32, 3, 3, 3))
    with pytest.raises(TypeError):
        get_manifold("po:sphere+stiefel").batch_key(shape)


# ---------------------------------------------------------------------------- geoopt
@pytest.mark.parametrize("mid,sid", [c for c in CASES
                                     if c.values[1] in ("conv1d", "wide", "prime", "conv3d")])
def test_geoopt_parameter_and_riemannian_sgd(mid, sid, gen):
    m, shape = _case(mid, sid)
    w = torch.randn(shape, generator=gen)
    target = torch.randn(shape, generator=gen)
    for momentum in (0.0, 0.9):
        p = geoopt.ManifoldParameter(m.projx(w), manifold=m)
        assert p.manifold is m and isinstance(p, torch.nn.Parameter)
        opt = geoopt.optim.RiemannianSGD([p], lr=0.05, momentum=momentum, stabilize=2)
        start = (p.detach() - target).pow(2).sum()
        for _ in range(4):
            opt.zero_grad()
            loss = (p - target).pow(2).sum()
            loss.backward()
            opt.step()
            assert on_manifold_err(m, p.detach()) < 10 * TOL[torch.float32]
        assert torch.isfinite(p).all()
        if momentum == 0:
            assert float((p.detach() - target).pow(2).sum()) < float(start)


# ------------------------------------------------------------------ hypothesis: any shape
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

HYP_NAMES = [*available(), "stiefel-polar", "stiefel-g8", "po:sphere+stiefel", "pi:2:sphere",
             "pio:2x2:sphere+oblique", "po:3:centered-sphere+euclidean", "oblique-fanin"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(HYP_NAMES),
       out=st.integers(1, 40), cin=st.integers(1, 5),
       ks=st.lists(st.integers(1, 4), min_size=0, max_size=3),
       seed=st.integers(0, 2**31 - 1))
def test_any_kernel_shape(name, out, cin, ks, seed):
    """On any conv/linear shape a manifold either rejects the kernel with KernelShapeError or
    gives points on it (oracle residuals), tangent projections and a consistent layout."""
    m = MANIFOLDS[name]()
    shape = (out, cin, *ks)
    try:
        m.check_kernel_shape(shape)
    except KernelShapeError:
        return
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, dtype=F64, generator=gen)
    p = m.projx(w)
    assert on_manifold_err(m, p) < 1e-9
    u = m.proju(p, torch.randn(shape, dtype=F64, generator=gen))
    assert tangent_err(m, p, u) < 1e-9
    assert on_manifold_err(m, m.retr(p, u)) < 1e-9
    assert on_manifold_err(m, m.expmap(p, u)) < 1e-9
    assert m.dim(shape) <= p.numel()
    for b, idx in blocks(m, shape):
        sub = p[idx]
        assert torch.equal(b.from_batch(b.to_batch(sub), sub.shape), sub)
