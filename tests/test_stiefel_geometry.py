"""Stiefel geometry against oracles written here from the literature, not kernelgeo's code.

Oracles: the embedded-metric exponential of Edelman, Arias & Smith (1998, eq. 2.45) and the
canonical one as the one-parameter subgroup :math:`e^{t(GY^\\top - YG^\\top)}Y`,
:math:`G = \\Delta - \\tfrac12 YY^\\top\\Delta` (ibid. §2.4), both with ``scipy.linalg.expm``;
the distance on :math:`O(p)` from ``scipy.linalg.logm``; lower bounds (chordal, product of the
columns' spheres) and upper bounds (length of the canonical geodesic, an explicit curve).
"""

import math
import time
import warnings

import numpy as np
import pytest
import scipy.linalg as sl
import torch

from kernelgeo.analysis import curvature as C
from kernelgeo.analysis import geodesics as G
from kernelgeo.manifolds import Stiefel, get_manifold
from kernelgeo.manifolds import stiefel_log as SL
from kernelgeo.manifolds.stiefel_log import StiefelLogError

D = torch.float64
SMALL = [(3, 2), (4, 3), (9, 8), (7, 5), (5, 2), (4, 1)]


# ------------------------------------------------------------------------------- oracles
def exp_embedded(y, u):
    """Edelman, Arias & Smith eq. 2.45 (numpy)."""
    p = y.shape[1]
    a, s = y.T @ u, u.T @ u
    e = sl.expm(np.block([[a, -s], [np.eye(p), a]]))
    return np.hstack([y, u]) @ e[:, :p] @ sl.expm(-a)


def exp_canonical(y, d):
    """Canonical geodesic as a one-parameter subgroup of O(n) acting on Y."""
    g = d - 0.5 * y @ (y.T @ d)
    return sl.expm(g @ y.T - y @ g.T) @ y


def canonical_norm(y, d):
    a = y.T @ d
    return math.sqrt(max(0.0, float(np.sum(d * d) - 0.5 * np.sum(a * a))))


def point(rng, n, p):
    q, r = np.linalg.qr(rng.standard_normal((n, p)))
    return q * np.sign(np.diag(r))


def tangent(rng, y):
    u = rng.standard_normal(y.shape)
    return u - y @ (y.T @ u + u.T @ y) / 2


def column_sphere_dist(y0, y1):
    """Distance in the product of the columns' unit spheres (a lower bound)."""
    c = np.clip(np.sum(y0 * y1, axis=0), -1, 1)
    return float(np.sqrt(np.sum(np.arccos(c) ** 2)))


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))[None]


# ------------------------------------------------------------- logarithm: round trips
@pytest.mark.parametrize("n,p", SMALL)
@pytest.mark.parametrize("metric", ["euclidean", "canonical"])
def test_log_inverts_oracle_exp_up_to_the_certified_radius(n, p, metric, seed):
    rng = np.random.default_rng(seed)
    lim = math.pi if metric == "euclidean" or p == 1 else math.sqrt(0.8) * math.pi
    for s in [0.3, 1.2, 2.0, 2.6, 0.98 * lim]:
        y0 = point(rng, n, p)
        u = tangent(rng, y0)
        nrm = np.linalg.norm(u) if metric == "euclidean" else canonical_norm(y0, u)
        u *= s / nrm
        y1 = (exp_embedded if metric == "euclidean" else exp_canonical)(y0, u)
        lg = G.stiefel_log(t(y0), t(y1), metric=metric)[0].numpy()
        assert np.linalg.norm(lg - u) < 1e-7 * (1 + s), (s, np.linalg.norm(lg - u))
        d01 = float(G.stiefel_dist(t(y0), t(y1), metric=metric)[0])
        d10 = float(G.stiefel_dist(t(y1), t(y0), metric=metric)[0])
        assert d01 == pytest.approx(s, rel=1e-9) and d10 == pytest.approx(s, rel=1e-9)


@pytest.mark.parametrize("n,p", SMALL)
def test_embedded_distance_between_lower_and_upper_bounds(n, p, seed):
    """chordal, column spheres <= d <= embedded length of the canonical geodesic."""
    rng = np.random.default_rng(seed)
    for s in [0.5, 1.0, 1.8, 2.4]:
        y0 = point(rng, n, p)
        dc = tangent(rng, y0)
        dc *= s / canonical_norm(y0, dc)
        y1 = exp_canonical(y0, dc)
        # the canonical geodesic e^{tW}Y0 is a curve of constant embedded speed |dc|
        upper = float(np.linalg.norm(dc))
        try:
            d = float(G.stiefel_dist(t(y0), t(y1))[0])
        except StiefelLogError as err:  # only allowed beyond the certified radius
            assert "beyond" in str(err) and upper > math.pi
            continue
        assert d <= upper * (1 + 1e-10)
        assert d >= column_sphere_dist(y0, y1) * (1 - 1e-10)
        assert d >= np.linalg.norm(y0 - y1) * (1 - 1e-10)
        assert d <= math.pi * math.sqrt(p) + 1e-9  # the diameter


@pytest.mark.parametrize("n,p", [(3, 2), (6, 3), (4, 3), (9, 8)])
def test_haar_pairs_give_a_verified_distance_or_a_reason(n, p, seed):
    rng = np.random.default_rng(seed)
    ok = 0
    for _ in range(6):
        y0, y1 = point(rng, n, p), point(rng, n, p)
        try:
            u, info = G.stiefel_log(t(y0), t(y1), return_info=True)
        except StiefelLogError as err:
            assert "beyond the radius" in str(err)
            # the refusal is about certification, not a failed solve
            u = G.stiefel_log(t(y0), t(y1), certify=False)[0].numpy()
            assert np.linalg.norm(exp_embedded(y0, u) - y1) < 1e-8
            assert np.linalg.norm(u) > math.pi
            continue
        ok += 1
        u = u[0].numpy()
        assert np.linalg.norm(exp_embedded(y0, u) - y1) < 1e-8
        assert np.linalg.norm(u) <= math.pi * (1 + 1e-9)
        assert np.linalg.norm(u) >= column_sphere_dist(y0, y1) * (1 - 1e-10)
    if n <= 4:
        assert ok >= 2  # most Haar pairs on small manifolds are within pi


def test_continuation_alone_recovers_the_log(monkeypatch, seed):
    """The fallback path (no Zimmermann start) on St(3,2) and St(5,2), far inside pi."""
    monkeypatch.setattr(SL, "_zimmermann", lambda *a, **k: None)
    rng = np.random.default_rng(seed)
    for n, p, s in [(3, 2, 2.5), (5, 2, 2.9), (4, 3, 1.5)]:
        y0 = point(rng, n, p)
        u = tangent(rng, y0)
        u *= s / np.linalg.norm(u)
        y1 = exp_embedded(y0, u)
        lg, info = G.stiefel_log(t(y0), t(y1), return_info=True)
        assert info["methods"] == ["continuation"]
        assert np.linalg.norm(lg[0].numpy() - u) < 1e-7


def test_rank_deficient_difference_small_manifold(seed):
    """Y1 - Y0 Y0^T Y1 rank-deficient (a rotation inside span(Y0) plus one normal turn)."""
    rng = np.random.default_rng(seed)
    y0 = point(rng, 5, 3)
    a = np.zeros((3, 3))
    a[0, 1], a[1, 0] = -1.3, 1.3
    q = np.linalg.qr(np.hstack([y0, rng.standard_normal((5, 1))]))[0][:, 3:]
    b = np.zeros((1, 3))
    b[0, 2] = 0.9
    u = y0 @ a + q @ b
    for metric, ex in (("euclidean", exp_embedded), ("canonical", exp_canonical)):
        y1 = ex(y0, u)
        lg = G.stiefel_log(t(y0), t(y1), metric=metric)[0].numpy()
        assert np.linalg.norm(lg - u) < 1e-8
    # n >= 2p and Y1 in the span of Y0 (Y1 - Y0 Y0^T Y1 = 0)
    y0 = point(rng, 8, 3)
    u = y0 @ a
    for metric, ex in (("euclidean", exp_embedded), ("canonical", exp_canonical)):
        y1 = ex(y0, u)
        assert np.linalg.norm(y1 - y0 @ (y0.T @ y1)) < 1e-12
        lg = G.stiefel_log(t(y0), t(y1), metric=metric)[0].numpy()
        assert np.linalg.norm(lg - u) < 1e-8


# -------------------------------------------------------------------------- O(p), n = p
@pytest.mark.parametrize("p", [2, 3, 4])
def test_orthogonal_group_distance_and_components(p, gen):
    m = Stiefel(per="slice", radius=1.5)
    shape = (2, 1, p, p)
    for _ in range(5):
        x = m.random(shape, dtype=D, generator=gen)
        y = m.random(shape, dtype=D, generator=gen)
        xb, yb = m.to_batch(x).numpy() / 1.5, m.to_batch(y).numpy() / 1.5
        same = np.linalg.det(xb.transpose(0, 2, 1) @ yb) > 0
        d = m.component_dist(x, y).numpy()
        for i in range(2):
            if same[i]:
                want = 1.5 * np.linalg.norm(np.real(sl.logm(xb[i].T @ yb[i])))
                assert d[i] == pytest.approx(want, rel=1e-9)
                assert d[i] <= m.diameter(shape) * (1 + 1e-12)
            else:
                assert math.isinf(d[i])
        if same.all():
            lg = m.logmap(x, y)
            torch.testing.assert_close(m.expmap(x, lg), y, atol=1e-10, rtol=0)
        else:
            with pytest.raises(StiefelLogError, match="different components"):
                m.logmap(x, y)
    # the diameter pi sqrt(2 floor(p/2)) r is attained: all rotation angles pi
    x = m.random(shape, dtype=D, generator=gen)
    rot = np.eye(p)
    for k in range(p // 2):
        rot[2 * k:2 * k + 2, 2 * k:2 * k + 2] = -np.eye(2)
    xb = m.to_batch(x)
    y = m.from_batch(xb @ torch.from_numpy(rot), shape)
    d = m.component_dist(x, y)
    assert torch.allclose(d, torch.full_like(d, m.diameter(shape)), rtol=1e-12, atol=0)
    assert m.diameter(shape) == pytest.approx(math.pi * math.sqrt(2 * (p // 2)) * 1.5)


def test_opposite_components_of_o3_never_get_a_finite_distance():
    x = torch.eye(3, dtype=D)[None]
    y = torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=D))[None]
    for metric in ("euclidean", "canonical"):
        assert math.isinf(float(G.stiefel_dist(x, y, metric=metric)[0]))
        with pytest.raises(StiefelLogError, match="different components"):
            G.stiefel_log(x, y, metric=metric)


# ------------------------------------------------------------------ manifold class API
@pytest.mark.parametrize("shape", [(8, 1, 3, 3), (3, 1, 2, 2), (2, 2, 3, 3), (6, 2, 2, 2)])
def test_class_logmap_and_dist_in_kernel_shape_with_radius(shape, gen):
    m = Stiefel(radius=2.0)
    x = m.random(shape, dtype=D, generator=gen)
    u = m.random_tangent(x, generator=gen)
    ub = m.to_batch(u)
    ub = ub / ub.flatten(1).norm(dim=1).reshape(-1, 1, 1) * 2.0 * 2.2  # 2.2 rad < pi
    v = m.from_batch(ub, shape)
    y = m.expmap(x, v)
    lg = m.logmap(x, y)
    assert lg.shape == x.shape
    torch.testing.assert_close(lg, v, atol=1e-8, rtol=0)
    torch.testing.assert_close(m.component_dist(x, y), torch.full((ub.shape[0],), 4.4, dtype=D),
                               atol=1e-8, rtol=0)
    # oracle exponential on each component
    for xi, ui, yi in zip(m.to_batch(x).numpy(), ub.numpy(), m.to_batch(y).numpy()):
        assert np.linalg.norm(2.0 * exp_embedded(xi / 2, ui / 2) - yi) < 1e-9
    # radius respected: beyond pi r the log is refused, not replaced
    far = m.from_batch(-m.to_batch(x), shape)
    with pytest.raises(StiefelLogError, match="beyond"):
        m.logmap(x, far)
    # float32 kernels: computed in float64, returned in float32
    lg32 = m.logmap(x.float(), y.float())
    assert lg32.dtype == torch.float32
    assert float((lg32.double() - v).abs().max()) < 1e-4


def test_product_with_stiefel_block_uses_the_same_log(gen):
    m = get_manifold("po:sphere+stiefel")
    shape = (8, 3, 3, 3)
    x = m.random(shape, dtype=D, generator=gen)
    u = m.random_tangent(x, generator=gen)
    v = 0.8 * u / u.norm()
    y = m.expmap(x, v)
    torch.testing.assert_close(m.logmap(x, y), v, atol=1e-9, rtol=0)
    assert float(m.dist(x, y)) == pytest.approx(0.8, rel=1e-9)
    assert float(G.kernel_dist(m, x, y)) == pytest.approx(0.8, rel=1e-9)


def test_layer_distances_record_nan_with_reason_never_another_metric(gen):
    m = Stiefel()
    x = m.random((4, 1, 3, 3), dtype=D, generator=gen)
    u = m.random_tangent(x, generator=gen)
    near = m.expmap(x, 0.5 * u / u.norm())
    a = {"near": x, "far": x}
    b = {"near": near, "far": -x}  # every column antipodal: distance pi*2 > pi
    with pytest.warns(UserWarning, match="far: euclidean distance not computed.*beyond"):
        d = G.layer_distances({"near": m, "far": m}, a, b)
    assert d["near"] == pytest.approx(0.5, rel=1e-9)
    assert math.isnan(d["far"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pl = G.path_lengths({"near": m}, [a, b])
    assert pl["near"]["path"] == pytest.approx(0.5, rel=1e-9)


# ---------------------------------------------------------------------- ResNet-sized
def test_resnet_sized_logs(gen):
    rng = np.random.default_rng(0)
    for n, p, s in [(27, 16, 2.0), (576, 64, 1.5)]:
        y0 = point(rng, n, p)
        u = tangent(rng, y0)
        u *= s / np.linalg.norm(u)
        y1 = exp_embedded(y0, u)
        t0 = time.perf_counter()
        lg = G.stiefel_log(t(y0), t(y1))[0].numpy()
        elapsed = time.perf_counter() - t0
        assert np.linalg.norm(lg - u) < 1e-8
        assert elapsed < 30.0  # about 2-5 s on one core


# ------------------------------------------------------------------------ curvature
def _orth_pair(rng, y):
    u, v = tangent(rng, y), tangent(rng, y)
    return u, v


def gauss_k(u, v):
    """K = (<U^T U, V^T V> - |sym U^T V|^2) / (|U|^2|V|^2 - <U,V>^2), orthonormal Y."""
    s = 0.5 * (u.T @ v + v.T @ u)
    num = np.sum((u.T @ u) * (v.T @ v)) - np.sum(s * s)
    return num / (np.sum(u * u) * np.sum(v * v) - np.sum(u * v) ** 2)


SHAPES = [  # (kernel shape, per, (n, p), bounds at r = 1)
    ((2, 1, 2, 2), "filter", (4, 2), (-0.5, 1.0)),
    ((3, 1, 2, 2), "filter", (4, 3), (-0.5, 0.5)),
    ((8, 1, 3, 3), "filter", (9, 8), (-0.5, 0.5)),
    ((1, 1, 3, 2), "slice", (3, 2), (-0.5, 0.5)),
    ((1, 1, 5, 3), "slice", (5, 3), (-0.5, 1.0)),
    ((1, 1, 3, 3), "slice", (3, 3), (0.125, 0.125)),
    ((1, 1, 4, 4), "slice", (4, 4), (0.0, 0.25)),
    ((1, 1, 5, 5), "slice", (5, 5), (0.0, 0.25)),
    ((1, 1, 2, 2), "filter", (4, 1), (1.0, 1.0)),
]


@pytest.mark.parametrize("shape,per,np_,bounds", SHAPES)
def test_curvature_bounds_by_shape_reached_and_never_exceeded(shape, per, np_, bounds, seed):
    m = Stiefel(per=per, radius=2.0)
    r2 = 4.0
    assert m.to_batch(torch.empty(shape, device="meta")).shape[1:] == np_
    lo, hi = m.curvature_bounds(shape)
    assert (lo * r2, hi * r2) == pytest.approx(bounds)
    # random planes (any basis, unit radius oracle formula) never leave the bounds
    rng = np.random.default_rng(seed)
    n, p = np_
    ks = []
    for _ in range(400):
        y = point(rng, n, p)
        ks.append(gauss_k(*_orth_pair(rng, y)))
    assert min(ks) >= bounds[0] - 1e-12 and max(ks) <= bounds[1] + 1e-12
    # optimisation (L-BFGS over free ambient matrices, projected) reaches both ends
    x = m.random(shape, dtype=D, generator=torch.Generator().manual_seed(seed))
    for sign, want in ((1.0, hi), (-1.0, lo)):
        best = -math.inf
        for start in range(3):
            g = torch.Generator().manual_seed(seed + start)
            a = torch.randn(shape, dtype=D, generator=g).requires_grad_(True)
            b = torch.randn(shape, dtype=D, generator=g).requires_grad_(True)
            opt = torch.optim.LBFGS([a, b], max_iter=300, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-13, tolerance_change=1e-15)

            def closure(a=a, b=b, opt=opt, sign=sign):
                opt.zero_grad()
                loss = -sign * C.sectional_curvature(m, x, a, b)
                loss.backward()
                return loss

            opt.step(closure)
            k = float(C.sectional_curvature(m, x, a.detach(), b.detach()))
            # the optimised plane, checked with the oracle formula (unit radius, then / r^2)
            y = m.to_batch(x)[0].numpy() / 2.0
            u, v = (m.to_batch(t.detach())[0].numpy() for t in (a, b))
            u, v = (w - y @ (y.T @ w + w.T @ y) / 2 for w in (u, v))
            assert k == pytest.approx(gauss_k(u, v) / r2, abs=1e-9)
            best = max(best, sign * k)
        assert sign * best == pytest.approx(want, abs=1e-6)


def test_explicit_planes_attaining_the_stiefel_bounds():
    """K = 1 (n - p >= 2), K = 1/2 (any n > p, p >= 2), K = -1/2, on St(n, p) at E."""
    for n, p in [(3, 2), (4, 3), (4, 2), (9, 8)]:
        y = np.eye(n)[:, :p]
        q = np.eye(n)[:, p:]
        half_u = np.zeros((n, p))
        half_u[:, 0] = q[:, 0]
        skew = np.zeros((p, p))
        skew[0, 1], skew[1, 0] = -1, 1
        half_v = y @ skew / math.sqrt(2)
        assert gauss_k(half_u, half_v) == pytest.approx(0.5)
        neg_u, neg_v = np.zeros((n, p)), np.zeros((n, p))
        neg_u[:, 0], neg_v[:, 1] = q[:, 0], q[:, 0]
        assert gauss_k(neg_u, neg_v) == pytest.approx(-0.5)
        if n - p >= 2:
            one_u, one_v = np.zeros((n, p)), np.zeros((n, p))
            one_u[:, 0], one_v[:, 0] = q[:, 0], q[:, 1]
            assert gauss_k(one_u, one_v) == pytest.approx(1.0)


def test_injectivity_radius_and_diameter_by_shape():
    m = Stiefel(per="slice", radius=1.5)
    # O(2): two flat circles of length 2 pi sqrt 2 r, no 2-planes
    assert m.curvature_bounds((1, 1, 2, 2)) == (0.0, 0.0)
    assert m.component_dim((1, 1, 2, 2)) == 1
    for (a, b), inj, diam in [((3, 2), math.pi, math.pi * math.sqrt(2)),
                              ((2, 2), math.pi * math.sqrt(2), math.pi * math.sqrt(2)),
                              ((3, 3), math.pi * math.sqrt(2), math.pi * math.sqrt(2)),
                              ((4, 4), math.pi * math.sqrt(2), 2 * math.pi),
                              ((5, 5), math.pi * math.sqrt(2), 2 * math.pi),
                              ((5, 3), math.pi, math.pi * math.sqrt(3))]:
        shape = (1, 1, a, b)
        assert m.injectivity_radius(shape) == pytest.approx(1.5 * inj)
        assert m.diameter(shape) == pytest.approx(1.5 * diam)
