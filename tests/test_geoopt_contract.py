"""geoopt's Manifold and optimizer contract, checked on every kernel manifold.

Written after geoopt 0.5.1's own tests (``test_manifold_basic``, ``test_random``,
``test_origin``, ``test_tensor_api``, ``test_scaling``, ``test_rsgd``, ``test_adam``) for conv
kernel shapes, in float64.  Oracles independent of kernelgeo:

* the components of a kernel (sphere rows, oblique columns and slices, Stiefel blocks, product
  blocks) are labelled here from the kernel tensor's indices, written from the definitions
  and not through ``to_batch``; :meth:`component_inner` must equal the per-component sums;
* optimizer trajectories are compared with geoopt's own ``Sphere`` / ``Stiefel`` /
  ``Euclidean`` run on the same numbers reshaped to geoopt's layout (rows, columns, batches
  of matrices); steps to convergence are compared with geoopt's on the same problem.

What kernelgeo deliberately does differently (no batch dims, ``reversible=False``, ...) is
listed in :class:`kernelgeo.manifolds.KernelManifold`'s notes and checked as such here.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from kernelgeo._compat import ManifoldParameter, ManifoldTensor, geoopt
from kernelgeo.manifolds import (
    CenteredSphere,
    Euclidean,
    KernelProduct,
    Oblique,
    Sphere,
    Stiefel,
    get_manifold,
)

F64 = torch.float64


@pytest.fixture(autouse=True, scope="module")
def _one_thread_f64():
    n, d = torch.get_num_threads(), torch.get_default_dtype()
    torch.set_num_threads(1)
    torch.set_default_dtype(F64)  # as geoopt's tests: points made by geoopt itself in float64
    yield
    torch.set_num_threads(n)
    torch.set_default_dtype(d)


# ------------------------------------------------------------- component labels (oracle)
def _groups(n: int, k: int) -> list[range]:
    """``k`` contiguous groups of ``range(n)``, the first ``n % k`` one larger."""
    out, start = [], 0
    for i in range(k):
        size = n // k + (i < n % k)
        out.append(range(start, start + size))
        start += size
    return out


def _stiefel_g(out: int, n: int, group_size: int | None) -> int:
    if group_size is not None:
        return out // group_size
    return min(g for g in range(1, out + 1) if out % g == 0 and out // g <= n)


def labels(kind: tuple, shape: tuple[int, ...]) -> torch.Tensor:
    """Component index of every entry of a kernel of ``shape`` (an int tensor of ``shape``)."""
    name = kind[0]
    o, i = shape[0], shape[1]
    ones = (1,) * (len(shape) - 2)
    if name == "filter":  # sphere, centred sphere: one row per output channel
        return torch.arange(o).view(o, 1, *ones).expand(shape)
    if name == "slice":  # oblique-slice, stiefel-slice: one component per (out, in) slice
        return torch.arange(o * i).view(o, i, *ones).expand(shape)
    if name == "column":  # oblique: entries sharing (out, in, last kernel index)
        if len(shape) == 3:
            return labels(("slice",), shape)
        b = shape[-1]
        return torch.arange(o * i * b).view(o, i, *ones[:-1], b).expand(shape)
    if name == "stiefel":  # G blocks of p consecutive filters
        n = math.prod(shape[1:])
        p = o // _stiefel_g(o, n, kind[1])
        return (torch.arange(o) // p).view(o, 1, *ones).expand(shape)
    if name == "entry":  # euclidean: geoopt's Euclidean factorises into R per entry
        return torch.arange(math.prod(shape)).view(shape)
    if name == "product":
        _, parts, (go, gi) = kind
        out = torch.empty(shape, dtype=torch.long)
        offset, k = 0, 0
        for ro in _groups(o, go):
            for ri in _groups(i, gi):
                sub = (len(ro), len(ri), *shape[2:])
                lab = labels(parts[k % len(parts)], sub) + offset
                out[ro.start:ro.stop, ri.start:ri.stop] = lab
                offset = int(lab.max()) + 1
                k += 1
        return out
    raise AssertionError(name)


def oracle_component_inner(lab: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    flat = lab.reshape(-1)
    sums = torch.zeros(int(flat.max()) + 1, dtype=u.dtype).index_add_(0, flat, (u * v).reshape(-1))
    return sums[flat].view(u.shape)


# --------------------------------------------------------------------------- the cases
S, C = ("filter",), ("column",)
MANIFOLDS = {
    # id: (factory, component kind)
    "euclidean": (Euclidean, ("entry",)),
    "sphere": (Sphere, S),
    "sphere-r2.5": (lambda: Sphere(radius=2.5), S),
    "centered-sphere": (CenteredSphere, S),
    "centered-sphere-fanin": (lambda: CenteredSphere(radius_scale="fan_in"), S),
    "oblique": (Oblique, C),
    "oblique-slice": (lambda: Oblique(per="slice", radius=0.5), ("slice",)),
    "stiefel": (Stiefel, ("stiefel", None)),
    "stiefel-polar": (lambda: Stiefel(retraction="polar"), ("stiefel", None)),
    "stiefel-g2": (lambda: Stiefel(group_size=2), ("stiefel", 2)),
    "stiefel-fanin": (lambda: Stiefel(radius_scale="fan_in"), ("stiefel", None)),
    "stiefel-slice": (lambda: Stiefel(per="slice"), ("slice",)),
    "stiefel-slice-polar": (lambda: Stiefel(per="slice", retraction="polar"), ("slice",)),
    "po:sphere+stiefel": (lambda: get_manifold("po:sphere+stiefel"),
                          ("product", [S, ("stiefel", None)], (2, 1))),
    "pi:2:sphere": (lambda: get_manifold("pi:2:sphere"), ("product", [S], (1, 2))),
    "pio:2x2:sphere+oblique": (lambda: get_manifold("pio:2x2:sphere+oblique"),
                               ("product", [S, C], (2, 2))),
    "pio:2x2:mixed4": (lambda: get_manifold("pio:2x2:stiefel+oblique-slice+euclidean+sphere"),
                       ("product", [("stiefel", None), ("slice",), ("entry",), S], (2, 2))),
    "po:3:centered-sphere+euclidean": (lambda: get_manifold("po:3:centered-sphere+euclidean"),
                                       ("product", [S, ("entry",)], (3, 1))),
}
SHAPES = {
    "conv2d": (8, 4, 3, 3),
    "odd": (7, 3, 5, 3),  # prime out, kh != kw
    "1x1": (6, 16, 1, 1),
    "linear": (10, 6),
    "conv1d": (6, 4, 5),
    "conv3d": (4, 2, 2, 3, 3),
    "groups": (24, 2, 2, 2),  # out > fan-in: Stiefel in 3 blocks of St(8, 8)
    "depthwise": (5, 1, 3, 3),
}


def _valid(mid, sid) -> bool:
    try:
        MANIFOLDS[mid][0]().check_kernel_shape(SHAPES[sid])
    except ValueError:
        return False
    return True


PAIRS = [(m, s) for m in MANIFOLDS for s in SHAPES]
CASES = [p for p in PAIRS if _valid(*p)]
REJECTED = [p for p in PAIRS if not _valid(*p)]


def _case(mid, sid):
    factory, kind = MANIFOLDS[mid]
    return factory(), kind, SHAPES[sid]


def _has_euclidean_block(m) -> bool:
    return isinstance(m, Euclidean) or (
        isinstance(m, KernelProduct) and any(isinstance(c, Euclidean) for c in m.components))


def test_case_table_covers_every_geometry_and_shape_class():
    assert len(CASES) > 90
    assert {m for m, _ in CASES} == set(MANIFOLDS)
    assert {s for _, s in CASES} == set(SHAPES)
    # known rejections: length-1 columns/slices, linear weights for slice geometries
    for bad in [("oblique", "1x1"), ("oblique", "linear"), ("stiefel-slice", "1x1"),
                ("oblique-slice", "linear")]:
        assert bad in REJECTED


# ------------------------------------------------------------- random / origin (geoopt)
@pytest.mark.parametrize("mid,sid", CASES)
def test_random_random_uniform_origin_are_manifold_tensors(mid, sid):
    m, _, shape = _case(mid, sid)
    samplers = [m.random, m.origin]
    if _has_euclidean_block(m):
        with pytest.raises(NotImplementedError, match="uniform"):
            m.random_uniform(*shape)
    else:
        samplers.append(m.random_uniform)
    for sample in samplers:
        for args in ((shape,), shape):
            point = sample(*args)
            assert isinstance(point, ManifoldTensor) and point.manifold is m
            assert point.shape == shape and point.dtype == F64 and not point.requires_grad
            m.assert_check_point_on_manifold(point)
    x = m.random(shape, dtype=torch.float32)
    assert x.dtype == torch.float32 and x.manifold is m


@pytest.mark.parametrize("mid,sid", CASES)
def test_origin_is_deterministic_and_leaves_global_rng_alone(mid, sid):
    m, _, shape = _case(mid, sid)
    state = torch.random.get_rng_state()
    a, b = m.origin(*shape), m.origin(shape, seed=42)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    if isinstance(m, Euclidean):  # the zero kernel, as geoopt's Euclidean
        assert torch.equal(a, torch.zeros(shape)) and torch.equal(m.origin(*shape, seed=7), a)
    else:
        assert not torch.equal(a, m.origin(*shape, seed=7))
        assert not torch.equal(m.origin(*shape, seed=None), m.origin(*shape, seed=None))


@pytest.mark.parametrize("mid,sid", REJECTED)
def test_random_of_a_shape_the_manifold_cannot_hold_raises(mid, sid):
    m, _, shape = _case(mid, sid)
    for sample in (m.random, m.origin):
        with pytest.raises(ValueError):
            sample(*shape)
    assert not m.check_point(torch.zeros(shape))
    ok, why = m.check_point(torch.zeros(shape), explain=True)
    assert not ok and why.startswith("`x`: ") and len(why) > 20


def test_random_of_no_shape_raises():
    for mid in MANIFOLDS:
        m = MANIFOLDS[mid][0]()
        with pytest.raises(ValueError):
            m.random(())
        if m.ndim > 1:
            with pytest.raises(ValueError):
                m.origin(5)


# ------------------------------------------------------- manifold basics (geoopt's list)
@pytest.fixture
def case(request, gen):
    mid, sid = request.param
    m, kind, shape = _case(mid, sid)
    x = m.random(shape, generator=gen)
    ex = torch.randn(shape, generator=gen)
    ev = torch.randn(shape, generator=gen)
    return m, kind, shape, x, ex, ev, gen


CASE_IDS = [f"{m}-{s}" for m, s in CASES]


def _param(fn):
    return pytest.mark.parametrize("case", CASES, indirect=True, ids=CASE_IDS)(fn)


@_param
def test_projection_identity(case):
    m, _, _, x, *_ = case
    # re-projecting a point on the manifold returns it up to rounding (it is not expected to
    # move it, unlike geoopt's test_init_manifold assumes)
    torch.testing.assert_close(m.projx(x), x.as_subclass(torch.Tensor), atol=1e-12, rtol=0)


@_param
def test_projection_via_assert(case):
    m, _, _, _, ex, *_ = case
    px = m.projx(ex)
    m.assert_check_point_on_manifold(px)
    assert m.check_point_on_manifold(px) and m.check_point(px)
    torch.testing.assert_close(m.projx(px), px, atol=1e-12, rtol=0)


@_param
def test_vector_projection_via_assert(case):
    m, _, _, x, ex, ev, _ = case
    pv = m.proju(x, ev)
    m.assert_check_vector_on_tangent(x, pv)
    assert m.check_vector(pv) and m.check_vector_on_tangent(x, pv, ok_point=True)
    torch.testing.assert_close(m.proju(x, pv), pv, atol=1e-12, rtol=0)
    torch.testing.assert_close(m.egrad2rgrad(x, ev), pv, atol=0, rtol=0)
    # orthogonal projection: the removed part is orthogonal to every tangent vector
    w = m.proju(x, ex)
    assert abs(float(m.inner(x, ev - pv, w))) < 1e-10 * float(ev.norm() * w.norm())
    normal = ev - pv
    if float(normal.norm()) > 1e-3:
        ok, why = m.check_vector_on_tangent(x, ev, explain=True)
        assert not ok and "normal component" in why
    # no broadcasting: a vector of another shape is not tangent at x
    ok, why = m.check_vector_on_tangent(x, pv.reshape(pv.shape[0], -1)[:, None], explain=True,
                                        ok_point=True)
    assert not ok and "shape" in why


@_param
def test_point_off_the_manifold_is_reported(case):
    m, _, _, x, *_ = case
    if isinstance(m, Euclidean):
        assert m.check_point_on_manifold(3 * x)
        return
    ok, why = m.check_point_on_manifold(1.5 * x, explain=True)
    assert not ok and isinstance(why, str)
    with pytest.raises(ValueError, match="not lying on"):
        m.assert_check_point_on_manifold(1.5 * x)


@_param
def test_inner_norm_keepdim(case):
    m, _, shape, x, ex, ev, _ = case
    u, v = m.proju(x, ex), m.proju(x, ev)
    ones = (1,) * len(shape)
    total = (u * v).sum()
    torch.testing.assert_close(m.inner(x, u, v), total)
    assert m.inner(x, u, v).shape == () and m.inner(x, u, v, keepdim=True).shape == ones
    torch.testing.assert_close(m.inner(x, u, v, keepdim=True).reshape(()), total)
    torch.testing.assert_close(m.inner(x, u), (u * u).sum())
    assert m.norm(x, u, keepdim=True).shape == ones
    torch.testing.assert_close(m.norm(x, u), u.norm())


@_param
def test_component_inner_is_per_component(case):
    m, kind, shape, x, ex, ev, _ = case
    u, v = m.proju(x, ex), m.proju(x, ev)
    lab = labels(kind, shape)
    ci = m.component_inner(x, u, v)
    assert ci.shape == shape
    torch.testing.assert_close(ci, oracle_component_inner(lab, u, v), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(m.component_inner(x, u), oracle_component_inner(lab, u, u),
                               atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(m.component_inner(x, v, u), ci, atol=0, rtol=0)
    # RiemannianAdam's update: exp_avg_sq (shape of x) += component_inner(x, grad)
    buf = torch.zeros_like(x)
    buf.mul_(0.999).add_(m.component_inner(x, u), alpha=0.001)
    # one scalar per component, so that direction = u / sqrt(buf) stays tangent
    m.assert_check_vector_on_tangent(x, u / (buf.sqrt() + 1e-8))


@_param
def test_retr_expmap_transports(case):
    m, _, _, x, ex, ev, _ = case
    u, v = 0.3 * m.proju(x, ex) / (1 + ex.norm()), m.proju(x, ev)
    for step, step_transp, follow in (
            (m.retr, m.retr_transp, m.transp_follow_retr),
            (m.expmap, m.expmap_transp, m.transp_follow_expmap)):
        y = step(x, u)
        m.assert_check_point_on_manifold(y)
        y2, q = step_transp(x, u, v)
        torch.testing.assert_close(y2, y, atol=1e-12, rtol=0)
        m.assert_check_vector_on_tangent(y, q)
        torch.testing.assert_close(follow(x, u, v), q, atol=1e-12, rtol=0)
        torch.testing.assert_close(m.transp(x, y, v), q, atol=1e-12, rtol=0)
        # a transport of a vector tangent at y is the identity (projection transport)
        torch.testing.assert_close(m.transp(x, y, q), q, atol=1e-10, rtol=0)


@_param
def test_reversibility(case):
    m, _, _, x, ex, *_ = case
    u = m.proju(x, ex) / 3
    z, q = m.retr_transp(x, u, u)
    x1, u1 = m.retr_transp(z, -q, q)
    if m.reversible:
        torch.testing.assert_close(x1, x.as_subclass(torch.Tensor), atol=1e-12, rtol=0)
        torch.testing.assert_close(u1, u, atol=1e-12, rtol=0)
    else:  # declared not reversible: and indeed it is not (on every curved geometry)
        assert not isinstance(m, Euclidean)
        assert float((x1 - x).norm()) > 1e-8


def _within_injectivity(m, x, u):
    """Scale ``u`` so that every component moves by at most 1 (radius >= 0.5 here)."""
    return 0.4 * u / (1 + float(m.component_norm(x, u).max()))


@_param
def test_logmap(case):
    m, _, _, x, ex, *_ = case
    u = _within_injectivity(m, x, m.proju(x, ex))
    y = m.expmap(x, u)
    try:
        uh = m.logmap(x, y)
    except NotImplementedError:
        pytest.skip(f"{m.name}: no closed-form logarithm")
    torch.testing.assert_close(uh, u, atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(m.expmap(x, uh), y, atol=1e-8, rtol=0)
    torch.testing.assert_close(m.logmap(x, x), torch.zeros_like(u), atol=1e-12, rtol=0)


@_param
def test_dist(case):
    m, _, shape, x, ex, *_ = case
    u = _within_injectivity(m, x, m.proju(x, ex))
    y = m.expmap(x, u)
    try:
        d = m.dist(x, y)
    except NotImplementedError:
        pytest.skip(f"{m.name}: no closed-form distance")
    torch.testing.assert_close(d, m.norm(x, u), atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(m.dist2(x, y), m.norm(x, u) ** 2, atol=1e-8, rtol=1e-8)
    assert m.dist(x, y, keepdim=True).shape == (1,) * len(shape)
    assert float(m.dist(x, x)) < 1e-7


@_param
def test_scaled_wrapper(case):
    """geoopt.Scaled: distances times the scale, steps divided by it (test_scaling.py)."""
    m, _, _, x, ex, *_ = case
    s = geoopt.Scaled(m, 2.0)
    u = _within_injectivity(m, x, m.proju(x, ex))
    torch.testing.assert_close(s.retr(x, u), m.retr(x, u / 2), atol=1e-12, rtol=0)
    torch.testing.assert_close(s.expmap(x, u), m.expmap(x, u / 2), atol=1e-12, rtol=0)
    assert s.reversible == m.reversible and s.ndim == m.ndim
    y = m.expmap(x, u)
    try:
        d = m.dist(x, y)
    except NotImplementedError:
        return
    torch.testing.assert_close(s.dist(x, y), 2 * d)


@_param
def test_manifold_tensor_api(case):
    """geoopt's test_tensor_api: a ManifoldTensor delegates to its manifold."""
    m, _, shape, x, ex, ev, _ = case
    u, v = m.proju(x, ex), m.proju(x, ev)
    torch.testing.assert_close(x.proju(ex), u, atol=0, rtol=0)
    torch.testing.assert_close(x.retr(0.1 * u), m.retr(x, 0.1 * u), atol=0, rtol=0)
    torch.testing.assert_close(x.expmap(0.1 * u), m.expmap(x, 0.1 * u), atol=0, rtol=0)
    torch.testing.assert_close(x.inner(u, v), m.inner(x, u, v), atol=0, rtol=0)
    y, q = x.retr_transp(0.1 * u, v)
    torch.testing.assert_close(q, m.transp(x, y, v), atol=1e-12, rtol=0)
    torch.testing.assert_close(x.transp_follow_retr(0.1 * u, v), q, atol=1e-12, rtol=0)
    # in-place projection of a parameter keeps the storage
    p = ManifoldParameter(ex.clone(), manifold=m)
    ptr = p.data_ptr()
    with torch.no_grad():
        p.proj_()
    assert p.data_ptr() == ptr and p.manifold is m
    m.assert_check_point_on_manifold(p)
    # serialisation keeps the manifold
    buf = io.BytesIO()
    torch.save(x, buf)
    buf.seek(0)
    x2 = torch.load(buf, weights_only=False)
    assert isinstance(x2, ManifoldTensor) and type(x2.manifold) is type(m)
    assert repr(x2.manifold) == repr(m) and torch.equal(x2, x)
    x3 = copy.deepcopy(x)
    assert isinstance(x3, ManifoldTensor) and repr(x3.manifold) == repr(m)
    # a parameter made from a point inherits its manifold; another instance is refused
    assert ManifoldParameter(x).manifold is m
    with pytest.raises(ValueError, match="do not match"):
        ManifoldParameter(x, manifold=copy.deepcopy(m))


@pytest.mark.parametrize("mid", list(MANIFOLDS))
def test_name_repr_ndim(mid):
    m = MANIFOLDS[mid][0]()
    assert isinstance(m.name, str) and m.name
    assert repr(m) == f"{m.name}({m.extra_repr()}) manifold"
    if isinstance(m, KernelProduct):
        for c in m.components:
            assert f"{c.name}({c.extra_repr()})" in m.extra_repr()
    # every dim belongs to the kernel: ndim is the smallest rank accepted
    ranks = {Euclidean: 1, Oblique: 3, Sphere: 2, CenteredSphere: 2, Stiefel: 2}
    parts = m.components if isinstance(m, KernelProduct) else [m]
    expected = max(ranks[type(c)] for c in parts)
    expected = max(expected, 2) if isinstance(m, KernelProduct) else expected
    assert m.ndim == expected
    assert not m.check_point(torch.zeros((4,) * (m.ndim - 1)))
    assert m.reversible is isinstance(m, Euclidean)
    assert m.device is None and m.dtype is None  # holds no tensors


# ------------------------------------------------------------------ optimizers (geoopt)
def _geoopt_layout(mid: str, shape):
    """geoopt manifold and reshaping functions for the same geometry (None: no equivalent)."""
    o, i = shape[0], shape[1]
    k = shape[2:]
    a, b = (math.prod(k[:-1]), k[-1]) if len(k) >= 2 else ((k[0], 1) if k else (1, 1))
    n = math.prod(shape[1:])
    if mid == "euclidean":
        return geoopt.Euclidean(), (lambda w: w), (lambda g: g)
    if mid == "sphere":
        return geoopt.Sphere(), (lambda w: w.reshape(o, n)), (lambda g: g.reshape(shape))
    if mid == "centered-sphere":
        return (geoopt.Sphere(complement=torch.ones(n, 1)), (lambda w: w.reshape(o, n)),
                (lambda g: g.reshape(shape)))
    if mid == "oblique":
        return (geoopt.Sphere(), (lambda w: w.reshape(o, i, a, b).transpose(-1, -2)),
                (lambda g: g.transpose(-1, -2).reshape(shape)))
    # the embedded metric: geoopt's EuclideanStiefel (geoopt.Stiefel() is the canonical one)
    if mid == "stiefel":
        g_ = _stiefel_g(o, n, None)
        p = o // g_
        return (geoopt.manifolds.EuclideanStiefel(),
                (lambda w: w.reshape(g_, p, n).transpose(-1, -2)),
                (lambda g: g.transpose(-1, -2).reshape(shape)))
    if mid == "stiefel-slice":
        if a >= b:
            return (geoopt.manifolds.EuclideanStiefel(), (lambda w: w.reshape(o * i, a, b)),
                    (lambda g: g.reshape(shape)))
        return (geoopt.manifolds.EuclideanStiefel(),
                (lambda w: w.reshape(o * i, a, b).transpose(-1, -2)),
                (lambda g: g.transpose(-1, -2).reshape(shape)))
    return None


def _run(manifold, w0, target, opt_cls, params, steps, closure_extra=None, tol=None):
    """geoopt's test_rsgd/test_adam loop; returns (steps taken, final point)."""
    with torch.no_grad():
        x = ManifoldParameter(manifold.projx(w0).clone(), manifold=manifold)
    opt = opt_cls([x], **params)

    def closure():
        opt.zero_grad()
        loss = (x - target).pow(2).sum()
        if closure_extra is not None:
            loss = loss + closure_extra(x)
        loss.backward()
        return loss.item()

    for t in range(steps):
        if tol is not None and float((x.detach() - target).norm()) < tol:
            return t, x.detach()
        opt.step(closure)
    return steps, x.detach()


OPTIMIZERS = [
    ("sgd", geoopt.optim.RiemannianSGD, dict(lr=1e-2)),
    ("sgd-momentum", geoopt.optim.RiemannianSGD, dict(lr=1e-3, momentum=0.9)),
    ("sgd-nesterov", geoopt.optim.RiemannianSGD, dict(lr=1e-3, momentum=0.9, nesterov=True)),
    ("sgd-dampening", geoopt.optim.RiemannianSGD, dict(lr=1e-3, momentum=0.9, dampening=0.1)),
    ("adam", geoopt.optim.RiemannianAdam, dict(lr=1e-2)),
    ("adam-amsgrad", geoopt.optim.RiemannianAdam, dict(lr=1, amsgrad=True)),
]
TRAJ = [(mid, sid) for mid in ("euclidean", "sphere", "centered-sphere", "oblique", "stiefel",
                               "stiefel-slice")
        for sid in ("conv2d", "odd", "groups", "conv1d")
        if (mid, sid) in CASES]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
@pytest.mark.parametrize("mid,sid", TRAJ)
def test_trajectory_equals_geoopts_on_reshaped_kernel(mid, sid, opt, gen):
    """Same numbers, same optimizer: kernelgeo's manifold and geoopt's on geoopt's layout
    take the same steps (to rounding) for 25 iterations."""
    _, opt_cls, params = opt
    m, _, shape = _case(mid, sid)
    gm, fwd, back = _geoopt_layout(mid, shape)
    w0 = torch.randn(shape, generator=gen)
    target = m.projx(torch.randn(shape, generator=gen))
    _, xk = _run(m, w0, target, opt_cls, params, 25)
    _, xg = _run(gm, fwd(w0), fwd(target), opt_cls, params, 25)
    torch.testing.assert_close(xk, back(xg), atol=1e-9, rtol=1e-9)


def _penalty(m, shape):
    """geoopt's Stiefel test penalty 100 * ||X^T X - I||^2, here on every component
    (written from the definitions: the filters of each block / the rows on spheres)."""
    if isinstance(m, Stiefel):
        o, n = shape[0], math.prod(shape[1:])
        g = _stiefel_g(o, n, m.group_size)

        def pen(x):
            y = x.reshape(g, o // g, n) / m.radius_of(shape)
            gram = y @ y.transpose(-1, -2)
            return 100 * (gram - torch.eye(o // g)).pow(2).sum()
        return pen
    if isinstance(m, Sphere):
        return lambda x: 100 * (x.reshape(shape[0], -1).pow(2).sum(-1)
                                - m.radius_of(shape) ** 2).pow(2).sum()
    return None


CONV = [
    # geoopt's test_rsgd / test_adam problem on kernels: (id, shape, optimizers run)
    ("stiefel", (10, 5, 2, 2), [o[0] for o in OPTIMIZERS]),  # St(20, 10): geoopt's 20 x 10
    ("sphere", (8, 4, 3, 3), ["sgd", "adam", "adam-amsgrad"]),
    ("stiefel", (12, 2, 2, 2), ["adam-amsgrad"]),  # 2 blocks St(8, 6)
    ("oblique", (4, 2, 3, 3), ["adam-amsgrad"]),
    ("centered-sphere", (6, 2, 3, 3), ["adam-amsgrad"]),
]
CONV_CASES = [(mid, shape, o) for mid, shape, names in CONV for o in OPTIMIZERS
              if o[0] in names]


@pytest.mark.parametrize("mid,shape,opt", CONV_CASES,
                         ids=[f"{c[0]}-{'x'.join(map(str, c[1]))}-{c[2][0]}" for c in CONV_CASES])
def test_converges_as_geoopt_on_penalty_problem(mid, shape, opt):
    """geoopt's optimizer tests (seed 42, tolerance 1e-5, at most 10000 steps) on a kernel:
    converges, in as many steps as geoopt's manifold on the reshaped problem (+-10%)."""
    _, opt_cls, params = opt
    m = MANIFOLDS[mid][0]()
    gm, fwd, back = _geoopt_layout(mid, shape)
    torch.manual_seed(42)
    w0, target = torch.randn(shape), m.projx(torch.randn(shape))
    pen = _penalty(m, shape)
    tk, xk = _run(m, w0, target, opt_cls, params, 10_000, pen, tol=1e-5)
    pen_g = None if pen is None else (lambda xg: pen(back(xg)))
    tg, _ = _run(gm, fwd(w0), fwd(target), opt_cls, params, 10_000, pen_g, tol=1e-5)
    assert tg < 10_000, "geoopt's reference did not converge"
    assert tk < 10_000 and float((xk - target).norm()) < 1e-5
    assert abs(tk - tg) <= 0.1 * tg + 2


PRODUCTS = [
    ("po:sphere+stiefel", (8, 4, 3, 3)),
    ("pio:2x2:sphere+oblique", (8, 4, 3, 3)),
    ("pi:2:sphere", (6, 4, 3, 3)),
    ("pio:2x2:stiefel+oblique-slice+euclidean+sphere", (8, 4, 3, 3)),
    ("po:3:centered-sphere+euclidean", (9, 2, 3, 3)),
]


@pytest.mark.parametrize("opt", OPTIMIZERS, ids=[o[0] for o in OPTIMIZERS])
@pytest.mark.parametrize("spec,shape", PRODUCTS)
def test_products_follow_their_blocks(spec, shape, opt, gen):
    """Every block of a product follows the optimizer on its own geometry: 25 steps of the
    product equal 25 steps of each block alone (second moments per block component)."""
    _, opt_cls, params = opt
    m = get_manifold(spec)
    w0, target = torch.randn(shape, generator=gen), m.projx(torch.randn(shape, generator=gen))
    _, xk = _run(m, w0, target, opt_cls, params, 25)
    for b, idx in m.blocks(shape):
        _, xb = _run(b, w0[idx], target[idx], opt_cls, params, 25)
        torch.testing.assert_close(xk[idx], xb, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("spec,shape", [
    *PRODUCTS, ("stiefel-slice", (3, 4, 3, 2)), ("oblique-slice", (5, 3, 3, 3)),
    ("stiefel-polar", (10, 5, 2, 2)), ("stiefel-slice-polar", (3, 4, 2, 3)),
    ("stiefel-g2", (6, 3, 1, 1))])
def test_other_geometries_converge_with_riemannian_adam(spec, shape):
    """The geometries without a geoopt counterpart (products, polar retraction, slices)."""
    m = MANIFOLDS[spec][0]() if spec in MANIFOLDS else get_manifold(spec)
    torch.manual_seed(42)
    w0, target = torch.randn(shape), m.projx(torch.randn(shape))
    tk, xk = _run(m, w0, target, geoopt.optim.RiemannianAdam, dict(lr=1, amsgrad=True), 1000,
                  tol=1e-5)
    assert tk < 1000 and float((xk - target).norm()) < 1e-5


def test_adam_sphere_kernel_matches_geoopt_sphere_steps():
    """RiemannianAdam (lr=1, amsgrad) on a (8, 4, 3, 3) sphere kernel takes as many steps as
    geoopt's Sphere on the same numbers reshaped to (8, 36) (an elementwise second moment
    leaves the tangent space and stalls at ~0.06 after 10000 steps)."""
    m = Sphere()
    torch.manual_seed(42)
    w0, t0 = torch.randn(8, 4, 3, 3), torch.randn(8, 4, 3, 3)
    params = dict(lr=1, amsgrad=True)
    tk, xk = _run(m, w0, m.projx(t0), geoopt.optim.RiemannianAdam, params, 10_000, tol=1e-5)
    gs = geoopt.Sphere()
    tg, _ = _run(gs, w0.reshape(8, 36), gs.projx(t0.reshape(8, 36)),
                 geoopt.optim.RiemannianAdam, params, 10_000, tol=1e-5)
    assert tg < 1000 and tk == tg


def test_stabilize_reprojects_without_moving_points_on_the_manifold():
    """geoopt's test_init_manifold, kernel version: ``stabilize=1`` with zero gradients
    projects an off-manifold parameter and leaves on-manifold and Euclidean ones as they are
    (up to rounding: re-projection is not expected to move a point on the manifold)."""
    torch.manual_seed(42)
    m, shape = Stiefel(), (10, 10, 1, 1)
    w0 = torch.randn(shape)
    p_off = ManifoldParameter(w0.clone(), manifold=m)
    p_on = ManifoldParameter(m.random(shape))
    p_rn = ManifoldParameter(torch.randn(shape), manifold=Euclidean())
    old = [p.detach().clone() for p in (p_off, p_on, p_rn)]
    for p in (p_off, p_on, p_rn):
        p.grad = torch.zeros_like(p)
    geoopt.optim.RiemannianSGD([p_off, p_on, p_rn], lr=1, stabilize=1).step()
    # a step from an off-manifold point retracts (QR) it onto the manifold, and the
    # stabilising projection keeps it there
    m.assert_check_point_on_manifold(p_off)
    torch.testing.assert_close(p_off.detach(), m.retr(w0, torch.zeros(shape)), atol=1e-12,
                               rtol=0)
    assert p_off.is_contiguous()
    torch.testing.assert_close(p_on.detach(), old[1], atol=1e-12, rtol=0)
    assert torch.equal(p_rn.detach(), old[2])
