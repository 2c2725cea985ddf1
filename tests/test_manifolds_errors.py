"""Bad input to the kernel manifolds: clear errors naming the shape and the valid choices,
plus numerical edge cases of the projections (degenerate and extreme-magnitude kernels)."""

from __future__ import annotations

import copy
import io

import pytest
import torch

from kernelgeo._compat import geoopt
from kernelgeo.manifolds import (
    ALIASES,
    CenteredSphere,
    Euclidean,
    KernelProduct,
    KernelShapeError,
    Oblique,
    Sphere,
    Stiefel,
    available,
    get_manifold,
)


@pytest.mark.parametrize("name,shape,needle", [
    ("sphere", (4, 1, 1, 1), "(4, 1, 1, 1)"),  # a single-entry filter
    ("sphere", (7,), "(7,)"),  # a bias, not a weight
    ("centered-sphere", (4, 2, 1, 1), "(4, 2, 1, 1)"),  # n = 2: two isolated points
    ("centered-sphere", (4, 1, 2), "(4, 1, 2)"),
    ("oblique", (8, 4, 1, 1), "(8, 4, 1, 1)"),  # 1x1 conv: columns of length 1
    ("oblique", (8, 4, 1, 3), "(8, 4, 1, 3)"),  # 1x3: columns of length 1
    ("oblique", (8, 4), "(8, 4)"),  # linear weight has no slices
    ("oblique-slice", (8, 4, 1, 1), "(8, 4, 1, 1)"),
    ("stiefel-slice", (8, 4, 1, 1), "(8, 4, 1, 1)"),
    ("stiefel", (3, 1, 1, 1), "(3, 1, 1, 1)"),  # St(1, 1)
    ("pi:2:sphere", (8, 1, 3, 3), "split"),  # one input channel cannot be split in two
    ("pi:2:sphere", (8, 2, 1, 1), "(8, 1, 1, 1)"),  # each block has single-entry filters
    ("pio:2x2:sphere+oblique", (8, 4, 1, 1), "(4, 2, 1, 1)"),
])
def test_kernel_shape_error_names_the_shape(name, shape, needle):
    m = get_manifold(name)
    with pytest.raises(KernelShapeError) as info:
        m.check_kernel_shape(shape)
    assert isinstance(info.value, ValueError)
    assert needle in str(info.value)
    assert m.name in str(info.value) or "block" in str(info.value) or "split" in needle
    with pytest.raises(KernelShapeError):
        m.random(shape)
    with pytest.raises(ValueError):  # geoopt's shape check reports our message
        geoopt.ManifoldParameter(torch.randn(shape), manifold=m)


@pytest.mark.parametrize("group_size", [5, 32, 0, -16])
def test_stiefel_bad_group_size(group_size):
    m = Stiefel(group_size=group_size)
    with pytest.raises(KernelShapeError, match=f"group_size={group_size}"):
        m.check_kernel_shape((64, 3, 3, 3))  # n = 27: 5 does not divide 64, 32 > 27


@pytest.mark.parametrize("factory,match", [
    (lambda: Stiefel(per="row"), "per"),
    (lambda: Stiefel(retraction="cayley"), "retraction"),
    (lambda: Stiefel(per="slice", group_size=4), "group_size"),
    (lambda: Oblique(per="row"), "per"),
    (lambda: Sphere(radius=0.0), "radius"),
    (lambda: Sphere(radius=-1.0), "radius"),
    (lambda: Sphere(radius=float("nan")), "radius"),
    (lambda: Sphere(radius=float("inf")), "radius"),
    (lambda: CenteredSphere(radius_scale="fan_out"), "radius_scale"),
    (lambda: KernelProduct([Sphere()], partition="diagonal"), "partition"),
    (lambda: KernelProduct([Sphere()], partition="both", groups=2), "groups"),
    (lambda: KernelProduct([Sphere()], partition="out", groups=(2, 2)), "groups"),
])
def test_bad_constructor_arguments(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


def test_bad_product_components():
    with pytest.raises(TypeError):
        KernelProduct([])
    with pytest.raises(TypeError):
        KernelProduct([Sphere(), "stiefel"])
    with pytest.raises(TypeError):
        KernelProduct([KernelProduct([Sphere()])])


@pytest.mark.parametrize("name", ["spheer", "stiefel-filter", "po", "", "bn2", "xx:sphere"])
def test_unknown_name_lists_valid_choices(name):
    with pytest.raises(ValueError) as info:
        get_manifold(name)
    msg = str(info.value)
    assert repr(name.strip().lower()) in msg or repr(name) in msg
    for valid in available():
        assert valid in msg
    assert "po:sphere+stiefel" in msg


@pytest.mark.parametrize("spec", ["po:", "po:2:", "po:2:3:sphere", "pio:2:sphere",
                                  "pio:ax2:sphere", "po:x:sphere", "pi:2x2:sphere",
                                  "po:sphere+nope", "po:2:sphere+"])
def test_bad_product_spec(spec):
    with pytest.raises(ValueError):
        get_manifold(spec)


@pytest.mark.parametrize("spec", ["po:0:sphere", "po:-1:sphere", "pio:0x2:sphere",
                                  "pi:3:sphere", "po:9:sphere"])
def test_impossible_product_grouping_is_a_value_error(spec):
    """Group counts that cannot partition an (8, 2, 3, 3) kernel: rejected at construction or,
    at the latest, by the shape check (before any tensor is touched)."""
    with pytest.raises(ValueError, match="split|group"):
        get_manifold(spec).check_kernel_shape((8, 2, 3, 3))


def test_registry_aliases_case_and_kwargs():
    for alias, target in ALIASES.items():
        assert get_manifold(alias).name == get_manifold(target).name
    assert isinstance(get_manifold("  Sphere "), Sphere)
    assert get_manifold("sphere", radius=2.0).radius == 2.0
    assert isinstance(get_manifold("euclidean", radius=2.0), Euclidean)
    st = get_manifold("stiefel", retraction="polar", group_size=4)
    assert (st.per, st.retraction, st.group_size) == ("filter", "polar", 4)
    m = Sphere()
    assert get_manifold(m) is m
    with pytest.raises(TypeError):
        get_manifold(3)
    prod = get_manifold("PIO:2X2:Sphere+Oblique")
    assert isinstance(prod, KernelProduct) and prod.grid == (2, 2)
    assert [type(c) for c in prod.components] == [Sphere, Oblique]
    assert all(c.radius == 3.0 for c in get_manifold("po:sphere+stiefel",
                                                     radius=3.0).components)


def test_radius_in_the_spec_text():
    from kernelgeo.manifolds import parse_geometry

    assert get_manifold("sphere@2").radius == 2.0
    assert get_manifold(" Stiefel @ 1.5 ").radius == 1.5
    assert all(c.radius == 0.5 for c in get_manifold("po:sphere+stiefel@0.5").components)
    g = parse_geometry("layer1.*=stiefel@1.4142135623730951,*=sphere")
    radii = {r.glob: r.manifold.radius for r in g.rules}
    assert radii == {"layer1.*": 2 ** 0.5, "*": 1.0}
    assert g.text == "layer1.*=stiefel@1.4142135623730951,*=sphere"  # what configs record
    # a point on the manifold has filters of that norm
    x = get_manifold("sphere@3").projx(torch.randn(4, 2, 3, 3, dtype=torch.float64))
    assert torch.allclose(x.flatten(1).norm(dim=1), torch.full((4,), 3.0, dtype=torch.float64))


@pytest.mark.parametrize("spec, match", [
    ("sphere@0", "finite r > 0"), ("sphere@-1", "finite r > 0"), ("sphere@nan", "finite r > 0"),
    ("sphere@inf", "finite r > 0"), ("sphere@", "finite r > 0"), ("sphere@two", "finite r > 0"),
    ("euclidean@2", "no radius"), ("none@2", "no radius"),
])
def test_bad_radius_in_the_spec_text(spec, match):
    from kernelgeo.manifolds import GeometryError, parse_geometry

    with pytest.raises(GeometryError, match=match):
        get_manifold(spec)
    with pytest.raises(GeometryError, match=match):
        parse_geometry(f"layer1.*={spec},*=euclidean")


def test_radius_given_twice_is_refused():
    with pytest.raises(ValueError, match="give it once"):
        get_manifold("sphere@2", radius=2.0)


# ------------------------------------------------------------------ numerical edge cases
@pytest.mark.parametrize("name", ["sphere", "centered-sphere", "oblique", "oblique-slice",
                                  "stiefel", "stiefel-slice"])
@pytest.mark.parametrize("dtype,amp", [(torch.float32, 1e-25), (torch.float32, 1e15),
                                       (torch.float64, 1e-200), (torch.float64, 1e100)])
def test_projx_extreme_but_representable_magnitudes(name, dtype, amp):
    m = get_manifold(name)
    w = amp * torch.randn((4, 3, 3, 3), dtype=dtype, generator=torch.Generator().manual_seed(0))
    p = m.projx(w)
    assert torch.isfinite(p).all() and m.constraint_error(p) < 1e-4


@pytest.mark.parametrize("name", ["sphere", "centered-sphere", "oblique", "oblique-slice"])
@pytest.mark.parametrize("dtype,amp", [(torch.float32, 1e20), (torch.float32, 1e36),
                                       (torch.float64, 1e160), (torch.float64, 1e300)])
def test_projx_does_not_overflow(name, dtype, amp):
    """Rows whose squared norm overflows still project onto the sphere (regression: zeros)."""
    m = get_manifold(name)
    w = amp * torch.randn((4, 3, 3, 3), dtype=dtype, generator=torch.Generator().manual_seed(0))
    p = m.projx(w)
    assert torch.isfinite(p).all() and m.constraint_error(p) < 1e-4


def test_check_point_on_manifold_explains():
    m = Sphere()
    ok, why = m.check_point_on_manifold(2 * m.random((4, 3, 3, 3)), explain=True)
    assert not ok and "constraint error" in why
    st = Stiefel()
    ok, why = st.check_point_on_manifold(torch.randn(8, 3, 3, 3), explain=True)
    assert not ok and why


@pytest.mark.parametrize("name", [*available(), "po:sphere+stiefel", "pio:2x2:sphere+oblique"])
def test_manifold_parameter_survives_deepcopy_and_pickle(name):
    m = get_manifold(name)
    p = geoopt.ManifoldParameter(m.random((4, 4, 3, 3)), manifold=m)
    q = copy.deepcopy(p)
    assert torch.equal(q, p) and type(q.manifold) is type(m)
    buf = io.BytesIO()
    torch.save(torch.nn.ParameterList([p]), buf)
    buf.seek(0)
    r = torch.load(buf, weights_only=False)[0]
    assert torch.equal(r, p) and r.manifold.describe((4, 4, 3, 3)) == m.describe((4, 4, 3, 3))


@pytest.mark.parametrize("name", ["sphere", "centered-sphere", "oblique", "oblique-slice"])
def test_retr_with_huge_step_does_not_overflow(name):
    """The batched retraction (optimizer fast path) is overflow-safe too (regression)."""
    m = get_manifold(name)
    gen = torch.Generator().manual_seed(0)
    x = m.random((4, 3, 3, 3), dtype=torch.float32, generator=gen)
    u = m.random_tangent(x, generator=gen)
    y = m.retr(x, 1e20 * u / u.abs().max())
    assert torch.isfinite(y).all() and m.constraint_error(y) < 1e-4


@pytest.mark.parametrize("name", ["sphere", "centered-sphere", "oblique", "oblique-slice",
                                  "euclidean", "pio:2x2:sphere+oblique"])
def test_dist_gradient_at_coincident_points_is_finite(name):
    m = get_manifold(name)
    x = m.random((4, 4, 3, 3), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = x.clone().requires_grad_(True)
    d = m.dist(x, y)
    d.backward()
    assert float(d.detach()) == 0.0
    assert torch.isfinite(y.grad).all()
    # and away from the diagonal the gradient is the unit vector -Log_y(x)/d (first variation)
    y2 = m.expmap(x, 0.3 * m.random_tangent(x, generator=torch.Generator().manual_seed(1)))
    y2 = y2.detach().requires_grad_(True)
    m.dist(x, y2).backward()
    want = -m.logmap(y2.detach(), x) / m.dist(x, y2.detach())
    torch.testing.assert_close(m.proju(y2.detach(), y2.grad), want, rtol=1e-6, atol=1e-8)
