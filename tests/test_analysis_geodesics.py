"""Geodesic distances, Stiefel logarithms, interpolation and distances travelled."""

import math
import time

import pytest
import torch

import kernelgeo
from kernelgeo.analysis import geodesics as G
from kernelgeo.manifolds import Stiefel, get_manifold

CLOSED = [("sphere", (4, 3, 3, 3)), ("centered-sphere", (4, 3, 3, 3)),
          ("oblique", (3, 2, 3, 3)), ("oblique-slice", (3, 2, 3, 3)),
          ("euclidean", (3, 2, 3, 3)), ("pio:2x2:sphere+oblique", (4, 4, 3, 3)),
          ("po:sphere+centered-sphere", (4, 3, 3, 3))]


@pytest.mark.parametrize("name,shape", CLOSED)
@pytest.mark.parametrize("angle", [3e-5, 7e-4, 0.3, 2.5])
def test_dist_of_expmap_is_norm_below_injectivity_radius(name, shape, angle, dtype, gen):
    r = 1.7
    m = get_manifold(name, radius=r) if name != "euclidean" else get_manifold(name)
    x = m.random(shape, dtype=dtype, generator=gen)
    u = m.random_tangent(x, generator=gen)
    # every component turns by `angle` (radians of its own sphere)
    if name in ("euclidean",):
        v = u / u.norm() * angle
    else:
        cn = m.component_norm(x, u)
        v = u.clone()
        for mi, idx in (m.blocks(x.shape)):
            b = mi.to_batch(u[idx])
            rr = mi.radius_of(x[idx].shape)
            nb = b.flatten(1).norm(dim=1).reshape(-1, *[1] * (b.dim() - 1))
            v[idx] = mi.from_batch(b / nb * angle * rr, x[idx].shape)
        assert cn.numel() == m.num_components(shape)
    y = m.expmap(x, v)
    d = G.kernel_dist(m, x, y)
    nv = v.double().norm()
    rel = 1e-9 if dtype == torch.float64 else (2e-3 if angle < 1e-3 else 2e-4)
    assert abs(float(d) - float(nv)) <= rel * float(nv) + (1e-12 if dtype == torch.float64
                                                            else 1e-6)
    # per component too, and logmap inverts expmap
    dc = G.kernel_dist(m, x, y, per_component=True)
    assert dc.shape == (m.num_components(shape),)
    if dtype == torch.float64:
        assert torch.allclose(G.kernel_logmap(m, x, y), v, atol=1e-9 * max(1.0, float(nv)))


@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (6, 2, 2, 2)])
@pytest.mark.parametrize("scale", [1e-3, 0.4, 1.5])
def test_stiefel_log_inverts_expmap(shape, scale, gen):
    m = Stiefel(radius=2.0)
    x = m.random(shape, dtype=torch.float64, generator=gen)
    u = m.random_tangent(x, generator=gen)
    xb = m.to_batch(x)
    ub = m.to_batch(u)
    ub = ub / ub.flatten(1).norm(dim=1).reshape(-1, 1, 1) * scale * 2.0
    v = m.from_batch(ub, shape)
    y = m.expmap(x, v)
    lv = G.stiefel_log(xb, m.to_batch(y), r=2.0)
    assert torch.allclose(lv, ub, atol=1e-8 * (1 + scale))
    d = G.kernel_dist(m, x, y)
    assert float(d) == pytest.approx(float(v.norm()), rel=1e-9)
    # canonical log inverts the canonical exponential
    yc = 2.0 * G.stiefel_exp_canonical(xb / 2.0, ub / 2.0)
    lc = G.stiefel_log(xb, yc, r=2.0, metric="canonical")
    assert torch.allclose(lc, ub, atol=1e-8 * (1 + scale))
    # surrogate distances: chordal <= geodesic; all vanish at x
    ch = G.stiefel_dist(xb, m.to_batch(y), r=2.0, metric="chordal")
    ge = G.stiefel_dist(xb, m.to_batch(y), r=2.0)
    assert bool((ch <= ge + 1e-12).all())
    for metric in ("euclidean", "canonical", "chordal", "procrustes"):
        assert float(G.stiefel_dist(xb, xb, r=2.0, metric=metric).max()) < 1e-6


def test_stiefel_log_fast_on_576x64(gen):
    m = Stiefel()
    x = m.random((64, 64, 3, 3), dtype=torch.float64, generator=gen)
    u = m.random_tangent(x, generator=gen)
    y = m.expmap(x, u / u.norm())
    t = time.perf_counter()
    d = G.kernel_dist(m, x, y)
    elapsed = time.perf_counter() - t
    assert float(d) == pytest.approx(1.0, rel=1e-8)
    assert elapsed < 20.0  # ~1 s on a quiet 2-core CPU; geomstats needed 26 s


def test_stiefel_log_reports_failure():
    m = Stiefel()
    m.min_rank = 2
    x = m.random((2, 4), dtype=torch.float64)
    # -X is pi*sqrt(2) away on St(4, 2): beyond the certified radius pi, refused with reason
    with pytest.raises(G.StiefelLogError, match="beyond the radius"):
        G.stiefel_log(m.to_batch(x), -m.to_batch(x))
    with pytest.raises(G.StiefelLogError, match="beyond the radius"):
        G.stiefel_dist(m.to_batch(x), -m.to_batch(x))


@pytest.mark.parametrize("name", ["sphere", "stiefel", "po:sphere+stiefel", "oblique"])
def test_geodesic_interpolation_endpoints_and_constant_speed(name, gen):
    m = get_manifold(name)
    shape = (8, 3, 3, 3)
    x = m.random(shape, dtype=torch.float64, generator=gen)
    u = m.random_tangent(x, generator=gen)
    y = m.expmap(x, 0.5 * u / u.norm())
    pts = G.geodesic(m, x, y, [0.0, 0.25, 0.5, 1.0])
    assert torch.allclose(pts[0], x, atol=1e-10) and torch.allclose(pts[-1], y, atol=1e-8)
    assert m.constraint_error(pts[2]) < 1e-10
    d = float(G.kernel_dist(m, x, y))
    assert float(G.kernel_dist(m, x, pts[1])) == pytest.approx(0.25 * d, rel=1e-7)
    assert float(G.kernel_dist(m, pts[2], y)) == pytest.approx(0.5 * d, rel=1e-7)


def _tiny_model(spec):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 6, 3), torch.nn.BatchNorm2d(6),
                              torch.nn.ReLU(), torch.nn.Conv2d(6, 4, 3), torch.nn.Flatten(),
                              torch.nn.Linear(4 * 4 * 4, 3))
    kernelgeo.constrain(net, spec)
    return net


@pytest.mark.parametrize("spec", ["sphere", "stiefel", "po:sphere+stiefel"])
def test_path_recorder_and_checkpoint_path_lengths(spec):
    from kernelgeo._compat import RiemannianSGD

    net = _tiny_model(spec)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
    opt = RiemannianSGD(net.parameters(), lr=0.05)
    rec = G.PathRecorder(net, opt, stiefel_metric="euclidean")
    cps = [{k: v.clone() for k, v in net.state_dict().items()}]
    for _ in range(4):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        cps.append({k: v.clone() for k, v in net.state_dict().items()})
    rec.remove()
    mans = G.parameter_manifolds(net)
    pl = G.path_lengths(mans, cps)
    end = rec.endpoint()
    assert rec.steps == 4 and set(pl) == set(end) == {"0.weight", "3.weight", "5.weight"}
    for k in pl:
        assert pl[k]["path"] == pytest.approx(rec.length[k], rel=1e-5)
        assert pl[k]["endpoint"] == pytest.approx(end[k], rel=1e-5)
        assert pl[k]["path"] >= pl[k]["endpoint"] * (1 - 1e-6) > 0  # triangle inequality


def test_interpolate_state_dict_geodesic_stays_on_manifold():
    a, b = _tiny_model("sphere"), _tiny_model("sphere")
    with torch.no_grad():
        for p in b.parameters():
            p.copy_(p.manifold.projx(p + 0.3 * torch.randn_like(p))
                    if hasattr(p, "manifold") else p + 0.1)
    mans = G.parameter_manifolds(a)
    mid = G.interpolate_state_dict(mans, a, b, 0.5)
    lin = G.interpolate_state_dict(mans, a, b, 0.5, mode="linear")
    m = mans["0.weight"]
    assert m.constraint_error(mid["0.weight"]) < 1e-5
    assert m.constraint_error(lin["0.weight"]) > 1e-3
    assert torch.equal(mid["1.num_batches_tracked"], a.state_dict()["1.num_batches_tracked"])
    dists = G.layer_distances(mans, a, b)
    half = G.layer_distances(mans, a, mid)
    assert half["0.weight"] == pytest.approx(dists["0.weight"] / 2, rel=1e-4)
    assert not math.isnan(dists["5.weight"])
