"""Sectional curvature of the kernel manifolds: Gauss equation vs closed forms, geomstats,
autograd second fundamental forms, Jacobi fields and the documented bounds."""

import math

import pytest
import torch

from kernelgeo.analysis import curvature as C
from kernelgeo.manifolds import (
    CenteredSphere,
    Euclidean,
    KernelProduct,
    Oblique,
    Sphere,
    Stiefel,
    get_manifold,
)

D = torch.float64


def _one_component(m, x, u):
    """Keep only the first component of a tangent vector (a plane inside one factor)."""
    b = m.to_batch(u).clone()
    b[1:] = 0
    return m.from_batch(b, x.shape)


@pytest.mark.parametrize("r", [0.5, 1.0, 3.0])
def test_sphere_curvature_is_inverse_radius_squared_and_matches_geomstats(r, gen):
    m = Sphere(radius=r)
    x = m.random((5, 4, 3, 3), dtype=D, generator=gen)
    u, v = m.random_tangent(x, generator=gen), m.random_tangent(x, generator=gen)
    k = C.component_sectional_curvature(m, x, u, v)
    assert torch.allclose(k, torch.full_like(k, 1 / r**2), rtol=0, atol=1e-8)
    # single filter plane through the whole-kernel API
    k0 = C.sectional_curvature(m, x, _one_component(m, x, u), _one_component(m, x, v))
    assert abs(float(k0) - 1 / r**2) < 1e-8

    from kernelgeo._compat import geomstats

    before = torch.get_default_dtype()
    geomstats()
    from geomstats.geometry.hypersphere import Hypersphere

    assert torch.get_default_dtype() == before
    xb, ub, vb = (m.to_batch(t)[0] / r for t in (x, u, v))  # unit sphere S^35
    sphere = Hypersphere(dim=xb.numel() - 1)
    kg = float(sphere.metric.sectional_curvature(ub, vb, xb)) / r**2
    assert abs(kg - float(k[0])) < 1e-8
    assert torch.get_default_dtype() == before


@pytest.mark.parametrize("name,shape", [
    ("sphere", (4, 3, 3, 3)), ("centered-sphere", (4, 3, 3, 3)), ("oblique", (3, 2, 3, 3)),
    ("oblique-slice", (3, 2, 3, 3)), ("stiefel", (8, 3, 3, 3)), ("stiefel-slice", (2, 2, 3, 3)),
    ("stiefel", (6, 2, 2, 2)), ("euclidean", (3, 2, 3, 3)), ("po:sphere+stiefel", (8, 3, 3, 3)),
    ("pio:2x2:sphere+oblique", (4, 4, 3, 3)),
])
def test_closed_form_second_fundamental_form_equals_derivative_of_projection(name, shape, gen):
    m = get_manifold(name, radius=1.7) if name != "euclidean" else get_manifold(name)
    x = m.random(shape, dtype=D, generator=gen)
    u, v = m.random_tangent(x, generator=gen), m.random_tangent(x, generator=gen)
    ii = C.second_fundamental_form(m, x, u, v)
    ia = C.second_fundamental_form_autograd(m, x, u, v)
    assert torch.allclose(ii, ia, atol=1e-12, rtol=1e-10)
    assert torch.allclose(ii, C.second_fundamental_form(m, x, v, u), atol=1e-12)  # symmetric
    assert float(m.proju(x, ii).norm()) < 1e-10 * (1 + float(ii.norm()))  # normal
    k1 = C.sectional_curvature(m, x, u, v)
    k2 = C.sectional_curvature(m, x, u, v, method="autograd")
    assert abs(float(k1 - k2)) < 1e-10
    lo, hi = m.curvature_bounds(shape)
    kc = C.component_sectional_curvature(m, x, u, v)
    kc = kc[torch.isfinite(kc)]
    assert float(kc.min()) >= lo - 1e-9 and float(kc.max()) <= hi + 1e-9


def test_oblique_gauss_equals_product_of_spheres_formula(gen):
    r = 1.3
    m = Oblique(radius=r)
    x = m.random((3, 2, 3, 3), dtype=D, generator=gen)
    u, v = m.random_tangent(x, generator=gen), m.random_tangent(x, generator=gen)
    k = C.sectional_curvature(m, x, u, v)
    kp = C.product_of_spheres_curvature(m.to_batch(x), m.to_batch(u), m.to_batch(v), r)
    assert abs(float(k - kp)) < 1e-12
    assert 0 <= float(k) <= 1 / r**2
    # a plane mixing two columns is flat
    ub, vb = torch.zeros_like(m.to_batch(u)), torch.zeros_like(m.to_batch(v))
    ub[0], vb[1] = m.to_batch(u)[0], m.to_batch(v)[1]
    kmix = C.sectional_curvature(m, x, m.from_batch(ub, x.shape), m.from_batch(vb, x.shape))
    assert abs(float(kmix)) < 1e-12


def test_centered_sphere_curvature(gen):
    m = CenteredSphere(radius=2.0)
    x = m.random((4, 2, 3, 3), dtype=D, generator=gen)
    u, v = m.random_tangent(x, generator=gen), m.random_tangent(x, generator=gen)
    k = C.component_sectional_curvature(m, x, u, v)
    assert torch.allclose(k, torch.full_like(k, 0.25), atol=1e-10)


def test_euclidean_factors_are_flat(gen):
    m = KernelProduct([Euclidean(), Sphere()])
    x = m.random((4, 3, 3, 3), dtype=D, generator=gen)
    u, v = m.random_tangent(x, generator=gen), m.random_tangent(x, generator=gen)
    u[2:], v[2:] = 0, 0  # plane inside the Euclidean block
    assert float(C.sectional_curvature(m, x, u, v).abs()) < 1e-14
    k = C.component_sectional_curvature(Euclidean(), x, u, v)
    assert float(k.abs().max()) == 0


@pytest.mark.parametrize("shape,group", [((3, 5), 3), ((2, 9), 2), ((4, 4), 4)])
def test_stiefel_curvature_closed_form_and_bounds(shape, group, gen):
    m = Stiefel(group_size=group, radius=1.5)
    m.min_rank = 2
    x = m.random(shape, dtype=D, generator=gen)
    lo, hi = m.curvature_bounds(shape)
    for _ in range(20):
        u, v = m.random_tangent(x, generator=gen), m.random_tangent(x, generator=gen)
        k = float(C.sectional_curvature(m, x, u, v))
        kc = float(C.stiefel_curvature(m.to_batch(x)[0], m.to_batch(u)[0], m.to_batch(v)[0],
                                       r=1.5))
        assert abs(k - kc) < 1e-12
        assert lo - 1e-12 <= k <= hi + 1e-12


@pytest.mark.slow
def test_stiefel_extreme_curvatures_reach_literature_bounds(gen):
    # St(5,3): -1/2 and 1 (Zimmermann & Stoye 2024); St(4,3) (n = p + 1): -1/2 and 1/2
    for shape, want in (((3, 5), (-0.5, 1.0)), ((3, 4), (-0.5, 0.5))):
        m = Stiefel(group_size=3)
        m.min_rank = 2
        x = m.random(shape, dtype=D, generator=gen)
        kmax = C.optimize_curvature(m, x, maximize=True, steps=150, restarts=2, generator=gen)
        kmin = C.optimize_curvature(m, x, maximize=False, steps=150, restarts=2, generator=gen)
        assert kmax == pytest.approx(want[1], abs=1e-3)
        assert kmin == pytest.approx(want[0], abs=1e-3)
        lo, hi = m.curvature_bounds(shape)
        assert (lo, hi) == want and lo <= kmin and kmax <= hi + 1e-9


@pytest.mark.parametrize("name,shape", [("sphere", (3, 2, 3, 3)), ("oblique", (2, 2, 3, 3)),
                                        ("stiefel", (6, 2, 2, 2)), ("stiefel", (8, 3, 3, 3)),
                                        ("stiefel-slice", (1, 1, 3, 3))])
def test_jacobi_field_spreading_matches_gauss_equation(name, shape, gen):
    m = get_manifold(name, radius=1.2)
    x = m.random(shape, dtype=D, generator=gen)
    u = _one_component(m, x, m.random_tangent(x, generator=gen))
    v = _one_component(m, x, m.random_tangent(x, generator=gen))
    kg = float(C.sectional_curvature(m, x, u, v))
    kj = C.jacobi_curvature(m, x, u, v, t=1e-2)
    assert kj == pytest.approx(kg, abs=1e-4)


def test_curvature_table_for_a_constrained_model(gen):
    import kernelgeo

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3), torch.nn.Flatten(),
                              torch.nn.Linear(4, 2))
    kernelgeo.constrain(net, {"0": "stiefel", "2": "sphere"})
    rows = C.curvature_table(net, generator=gen)
    assert [r.name for r in rows] == ["0.weight", "2.weight", "4.weight"]
    st, sp, fl = rows
    assert st.dim == 27 * 8 - 36 and (st.k_min, st.k_max) == (-0.5, 1.0)
    assert st.k_min <= st.k_sampled_min <= st.k_sampled_max <= st.k_max
    assert sp.k_sampled_min == pytest.approx(1.0) and sp.injectivity_radius == math.pi
    assert fl.k_max == 0 and math.isinf(fl.diameter)
    md = C.rows_to_markdown(rows)
    assert md.count("\n") == 4 and "St(27,8)" in md
