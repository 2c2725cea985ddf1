r"""Sectional curvature of kernel manifolds from the second fundamental form (Gauss equation).

Every kernel manifold :math:`\mathcal M` is an embedded submanifold of the Euclidean space of
kernels with the induced (embedded) metric, so its curvature follows from the *second
fundamental form* :math:`\mathrm{II}_x(u, v)`, the normal part of the ambient derivative of a
tangent field, by the Gauss equation

.. math::

    K_x(u, v) = \frac{\langle \mathrm{II}(u,u), \mathrm{II}(v,v)\rangle
                      - \|\mathrm{II}(u,v)\|^2}{\|u\|^2\|v\|^2 - \langle u, v\rangle^2}.

Closed forms of :math:`\mathrm{II}` used here (radius :math:`r`, rows/components independent):

* sphere :math:`S^{n-1}(r)` (each row): :math:`\mathrm{II}(u,v) = -\langle u,v\rangle\,x/r^2`;
* centred sphere: the same (it is a great sphere inside the hyperplane :math:`\mathbf 1^\perp`,
  which is flat and totally geodesic, so it adds nothing);
* oblique manifold: the sphere's, column by column (a product of spheres);
* Stiefel :math:`\{X : X^\top X = r^2 I\}`, embedded metric:
  :math:`\mathrm{II}(U,V) = -X\,\mathrm{sym}(U^\top V)/r^2`;
* Euclidean: 0; products: block by block (a Riemannian product of embedded submanifolds is
  embedded with block-diagonal second fundamental form).

Each closed form can be checked against the general identity
:math:`\mathrm{II}_x(u, v) = (\mathrm D_u P)_x[v]` for tangent :math:`v`, where :math:`P_x` is
the orthogonal projection onto :math:`T_x\mathcal M` (differentiate :math:`V = P_x V`), which
:func:`second_fundamental_form_autograd` evaluates with forward-mode autodiff of the manifold's
own ``proju``.

Known bounds (per component, radius 1; divide by :math:`r^2`): spheres :math:`K = 1`; products
of spheres :math:`0 \le K \le 1` (0 on planes mixing two factors); Stiefel
:math:`\mathrm{St}(n,p)` with the embedded metric, by shape (every end attained, see
:meth:`Stiefel.curvature_bounds <kernelgeo.manifolds.KernelManifold.curvature_bounds>` and
:doc:`/theory/stiefel`): :math:`[-\tfrac12, 1]` for :math:`n - p \ge 2,\ p\ge 2` (Zimmermann &
Stoye 2024, arXiv:2403.01879, "High curvature means low-rank"); :math:`[-\tfrac12, \tfrac12]`
for :math:`n = p + 1,\ p\ge 2` (upper end measured with :func:`optimize_curvature`);
:math:`O(p)` (:math:`n = p`, bi-invariant metric, :math:`K = \tfrac14\|[A,C]\|^2`): constant
:math:`\tfrac18` for :math:`p = 3` and :math:`0 \le K\le\tfrac14` for :math:`p\ge 4`
(:math:`\|[A,C]\|\le\|A\|\|C\|` for skew matrices, Bloch & Iserles 2005).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..manifolds import Euclidean, KernelManifold, KernelProduct, RowSphere, Stiefel

__all__ = [
    "second_fundamental_form", "second_fundamental_form_autograd", "sectional_curvature",
    "component_sectional_curvature", "product_of_spheres_curvature", "stiefel_curvature",
    "random_component_planes", "sampled_curvature_range", "optimize_curvature",
    "jacobi_curvature", "CurvatureRow", "curvature_table", "layer_geometry",
]


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def _check_same_shape(x, *others):
    for o in others:
        if o.shape != x.shape:
            raise ValueError(f"tangent vectors must have the point's shape {tuple(x.shape)}, "
                             f"got {tuple(o.shape)}")


# ------------------------------------------------------------------ second fundamental form
def _bII(manifold: KernelManifold, xb, ub, vb, r):
    """Second fundamental form on the canonical layout ``(B, *point_shape)``."""
    if isinstance(manifold, Euclidean):
        return torch.zeros_like(xb)
    if isinstance(manifold, RowSphere):
        return -((ub * vb).sum(-1, keepdim=True) / (r * r)) * xb
    if isinstance(manifold, Stiefel):
        return -xb @ _sym(ub.transpose(-1, -2) @ vb) / (r * r)
    raise TypeError  # handled by the caller (autograd fallback)


def second_fundamental_form(manifold: KernelManifold, x: torch.Tensor, u: torch.Tensor,
                            v: torch.Tensor) -> torch.Tensor:
    r"""Second fundamental form :math:`\mathrm{II}_x(u, v)` of a kernel manifold, closed form.

    Parameters
    ----------
    manifold : KernelManifold
        Any kernel manifold or :class:`~kernelgeo.manifolds.KernelProduct`.
    x : torch.Tensor
        Point, a kernel of shape ``(out, in, *k)`` on ``manifold``.
    u, v : torch.Tensor
        Tangent vectors at ``x``, same shape.

    Returns
    -------
    torch.Tensor
        Normal vector at ``x`` (same shape), symmetric and bilinear in ``u, v``.

    Notes
    -----
    Geometries without a closed form here (a user-defined subclass) fall back to
    :func:`second_fundamental_form_autograd`.
    """
    _check_same_shape(x, u, v)
    if isinstance(manifold, KernelProduct):
        out = torch.empty_like(x)
        for m, idx in manifold.blocks(x.shape):
            out[idx] = second_fundamental_form(m, x[idx], u[idx], v[idx])
        return out
    r = manifold.radius_of(x.shape)
    tb = manifold.to_batch
    try:
        b = _bII(manifold, tb(x), tb(u), tb(v), r)
    except TypeError:
        return second_fundamental_form_autograd(manifold, x, u, v)
    return manifold.from_batch(b, x.shape)


def second_fundamental_form_autograd(manifold: KernelManifold, x: torch.Tensor,
                                     u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    r"""Second fundamental form from the derivative of the tangent projection.

    For tangent :math:`v`, :math:`\mathrm{II}_x(u, v) = (\mathrm D_u P)_x[v]`, computed with
    forward-mode autodiff of ``manifold.proju`` (an independent check of the closed forms:
    it uses only the projection).  ``u`` and ``v`` must be tangent at ``x``.

    Returns
    -------
    torch.Tensor
        Same shape as ``x``.
    """
    _check_same_shape(x, u, v)
    _, dp = torch.func.jvp(lambda xx: manifold.proju(xx, v), (x,), (u,))
    return dp


# --------------------------------------------------------------------- sectional curvature
def _gauss(ii_uu, ii_vv, ii_uv, uu, vv, uv):
    num = (ii_uu * ii_vv).sum() - (ii_uv * ii_uv).sum()
    return num / (uu * vv - uv * uv)


def sectional_curvature(manifold: KernelManifold, x: torch.Tensor, u: torch.Tensor,
                        v: torch.Tensor, *, method: str = "closed") -> torch.Tensor:
    r"""Sectional curvature :math:`K_x(u, v)` of the plane spanned by ``u, v`` (Gauss equation).

    The plane lives in the tangent space of the *whole* kernel (the product of the layer's
    components), so e.g. on the oblique manifold a plane that mixes two columns has
    :math:`K = 0` and a plane inside one column has :math:`K = 1/r^2`.

    Parameters
    ----------
    manifold : KernelManifold
    x : torch.Tensor
        Point of shape ``(out, in, *k)``.
    u, v : torch.Tensor
        Linearly independent tangent vectors at ``x`` (projected here for safety).
    method : {"closed", "autograd"}
        Closed-form second fundamental form or the derivative of the projection.

    Returns
    -------
    torch.Tensor
        0-dim tensor.
    """
    u, v = manifold.proju(x, u), manifold.proju(x, v)
    ii = second_fundamental_form if method == "closed" else second_fundamental_form_autograd
    if method not in ("closed", "autograd"):
        raise ValueError(f"method must be 'closed' or 'autograd', got {method!r}")
    return _gauss(ii(manifold, x, u, u), ii(manifold, x, v, v), ii(manifold, x, u, v),
                  (u * u).sum(), (v * v).sum(), (u * v).sum())


def component_sectional_curvature(manifold: KernelManifold, x: torch.Tensor, u: torch.Tensor,
                                  v: torch.Tensor) -> torch.Tensor:
    r"""Sectional curvature of each component's own plane :math:`(u_k, v_k)`, shape ``(B,)``.

    ``B`` is :meth:`~kernelgeo.manifolds.KernelManifold.num_components` (products: the
    blocks' components concatenated in block order).  Components where :math:`u_k, v_k` are
    (numerically) dependent give NaN.
    """
    _check_same_shape(x, u, v)
    if isinstance(manifold, KernelProduct):
        return torch.cat([component_sectional_curvature(m, x[i], u[i], v[i])
                          for m, i in manifold.blocks(x.shape)])
    u, v = manifold.proju(x, u), manifold.proju(x, v)
    r = manifold.radius_of(x.shape)
    xb, ub, vb = (manifold.to_batch(t) for t in (x, u, v))
    try:
        iuu, ivv, iuv = (_bII(manifold, xb, a, b, r) for a, b in ((ub, ub), (vb, vb), (ub, vb)))
    except TypeError:
        iuu, ivv, iuv = (manifold.to_batch(second_fundamental_form_autograd(manifold, x, a, b))
                         for a, b in ((u, u), (v, v), (u, v)))

    def dot(a, b):
        return (a * b).flatten(1).sum(1)

    den = dot(ub, ub) * dot(vb, vb) - dot(ub, vb) ** 2
    scale = dot(ub, ub) * dot(vb, vb)
    num = dot(iuu, ivv) - dot(iuv, iuv)
    ok = den > 1e3 * torch.finfo(x.dtype).eps * scale
    return torch.where(ok, num / torch.where(ok, den, 1.0), torch.nan)


# --------------------------------------------------------------------------- closed forms
def product_of_spheres_curvature(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                                 r: float) -> torch.Tensor:
    r"""Closed-form curvature of a plane in a product of spheres :math:`S^{n-1}(r)^B`.

    With rows ``x, u, v`` of shape ``(B, n)`` (``u, v`` tangent row by row),

    .. math:: K = \frac{\sum_k \|u_k\|^2\|v_k\|^2 - \langle u_k,v_k\rangle^2}
                       {r^2\,(\|u\|^2\|v\|^2 - \langle u,v\rangle^2)},

    i.e. the area-weighted mean of the factors' curvature :math:`1/r^2` over the plane's
    projections onto the factors: 0 on mixed planes, :math:`1/r^2` inside one factor.
    """
    uu, vv, uv = (u * u).sum(-1), (v * v).sum(-1), (u * v).sum(-1)
    den = uu.sum() * vv.sum() - uv.sum() ** 2
    return (uu * vv - uv * uv).sum() / (r * r * den)


def stiefel_curvature(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor,
                      r: float = 1.0) -> torch.Tensor:
    r"""Closed-form sectional curvature of :math:`\mathrm{St}(n,p)` with the embedded metric.

    For a point :math:`X` (``(n, p)``, :math:`X^\top X = r^2 I`) and tangent :math:`U, V`,

    .. math:: K = \frac{\langle U^\top U, V^\top V\rangle - \|\mathrm{sym}(U^\top V)\|^2}
                       {r^2\,(\|U\|^2\|V\|^2 - \langle U,V\rangle^2)},

    which does not depend on :math:`X` beyond tangency (the Gauss equation with
    :math:`\mathrm{II}(U,V) = -X\mathrm{sym}(U^\top V)/r^2` and :math:`X^\top X = r^2 I`).
    """
    num = ((u.transpose(-1, -2) @ u) * (v.transpose(-1, -2) @ v)).sum() \
        - _sym(u.transpose(-1, -2) @ v).pow(2).sum()
    den = (u * u).sum() * (v * v).sum() - (u * v).sum() ** 2
    return num / (r * r * den)


# ------------------------------------------------------------------------------- sampling
def random_component_planes(manifold: KernelManifold, x: torch.Tensor, *,
                            generator: torch.Generator | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Two independent Gaussian tangent vectors at ``x`` (each component gets its own plane)."""
    return (manifold.random_tangent(x, generator=generator),
            manifold.random_tangent(x, generator=generator))


def sampled_curvature_range(manifold: KernelManifold, x: torch.Tensor, n_samples: int = 8, *,
                            generator: torch.Generator | None = None) -> tuple[float, float]:
    """Smallest and largest component curvature over ``n_samples`` random planes per component.

    Random planes are typical, not extreme: the range is an inner estimate of the true range
    (use :func:`optimize_curvature` to push towards the extremes).
    """
    ks = []
    with torch.no_grad():
        for _ in range(n_samples):
            u, v = random_component_planes(manifold, x, generator=generator)
            ks.append(component_sectional_curvature(manifold, x, u, v))
    k = torch.cat(ks)
    k = k[torch.isfinite(k)]
    if k.numel() == 0:
        return (math.nan, math.nan)
    return float(k.min()), float(k.max())


def optimize_curvature(manifold: KernelManifold, x: torch.Tensor, *, maximize: bool = True,
                       steps: int = 300, lr: float = 0.05, restarts: int = 4,
                       generator: torch.Generator | None = None) -> float:
    r"""Push the sectional curvature of a plane at ``x`` to its maximum or minimum.

    Gradient ascent (Adam) on :math:`K(P_x a, P_x b)` over free ambient matrices ``a, b``
    (:math:`K` is invariant to the basis of the plane, so no constraint is needed), with
    ``restarts`` random starts.  Meant for one component (e.g. one
    :math:`\mathrm{St}(n,p)` of shape ``(p, n)``): for a multi-component kernel the optimum is
    a plane inside one component anyway.

    Returns
    -------
    float
        The best curvature found (a lower bound of the max, or upper bound of the min).
    """
    sign = 1.0 if maximize else -1.0
    best = -math.inf
    x = x.detach()
    for _ in range(restarts):
        a = torch.randn(x.shape, dtype=x.dtype, generator=generator).requires_grad_(True)
        b = torch.randn(x.shape, dtype=x.dtype, generator=generator).requires_grad_(True)
        opt = torch.optim.Adam([a, b], lr=lr)
        for _ in range(steps):
            opt.zero_grad()
            loss = -sign * sectional_curvature(manifold, x, a, b)
            loss.backward()
            opt.step()
        with torch.no_grad():
            best = max(best, sign * float(sectional_curvature(manifold, x, a, b)))
    return sign * best


def jacobi_curvature(manifold: KernelManifold, x: torch.Tensor, u: torch.Tensor,
                     v: torch.Tensor, t: float = 1e-2) -> float:
    r"""Sectional curvature from the spreading of geodesics (Jacobi fields), no Gauss equation.

    With orthonormal tangent :math:`u, v` (orthonormalised here) the Jacobi field
    :math:`J(t) = \partial_s \mathrm{Exp}_x(t(u + s v))|_{s=0}` has
    :math:`\|J(t)\|^2 = t^2 - \tfrac{K}{3}t^4 + O(t^5)`.  :math:`J` is computed exactly by
    forward-mode autodiff of the manifold's ``expmap``; the estimate
    :math:`K(t) = 3(t^2 - \|J(t)\|^2)/t^4` is Richardson-extrapolated from :math:`t` and
    :math:`t/2`, leaving an :math:`O(t^2)` error.  Use float64.
    """
    u = manifold.proju(x, u)
    v = manifold.proju(x, v)
    u = u / u.norm()
    v = v - (u * v).sum() * u
    v = v / v.norm()

    def k_at(s):
        # d/dw Exp_x(s(u + w)) in direction v is dExp_{su}[s v] = J(s)
        _, j = torch.func.jvp(lambda w: manifold.expmap(x, s * (u + w)),
                              (torch.zeros_like(v),), (v,))
        return 3.0 * (s * s - (j * j).sum()) / s**4

    return float((4.0 * k_at(t / 2) - k_at(t)) / 3.0)


# ------------------------------------------------------------------------ per-layer table
@dataclass
class CurvatureRow:
    """Geometry of one layer's kernel manifold (one row of :func:`curvature_table`)."""

    name: str
    shape: tuple[int, ...]
    geometry: str
    dim: int
    components: int
    k_min: float
    k_max: float
    k_sampled_min: float
    k_sampled_max: float
    injectivity_radius: float
    diameter: float
    radius: float


def layer_geometry(name: str, manifold: KernelManifold, x: torch.Tensor, *,
                   n_samples: int = 4, generator: torch.Generator | None = None) -> CurvatureRow:
    """Facts and sampled curvature range of one kernel ``x`` on ``manifold``."""
    shape = tuple(x.shape)
    kmin, kmax = manifold.curvature_bounds(shape)
    smin, smax = sampled_curvature_range(manifold, x.detach().double(), n_samples,
                                         generator=generator)
    return CurvatureRow(name, shape, manifold.describe(shape), manifold.dim(shape),
                        manifold.num_components(shape), kmin, kmax, smin, smax,
                        manifold.injectivity_radius(shape), manifold.diameter(shape),
                        manifold.radius_of(shape))


def curvature_table(model: torch.nn.Module, *, n_samples: int = 4,
                    include_euclidean: bool = True,
                    generator: torch.Generator | None = None) -> list[CurvatureRow]:
    """One :class:`CurvatureRow` per kernel of ``model``.

    Manifold parameters are described by their manifold; with ``include_euclidean`` the
    remaining conv/linear weights (rank >= 2) appear as flat :math:`\\mathbb R^d` rows.
    Curvatures are sampled in float64 on the model's current kernels.
    """
    from .._compat import ManifoldParameter

    rows = []
    flat = Euclidean()
    for name, p in model.named_parameters():
        if isinstance(p, ManifoldParameter) and isinstance(p.manifold, KernelManifold):
            rows.append(layer_geometry(name, p.manifold, p, n_samples=n_samples,
                                       generator=generator))
        elif include_euclidean and p.dim() >= 2:
            rows.append(layer_geometry(name, flat, p, n_samples=1, generator=generator))
    return rows


def _fmt(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return f"{v:.4g}"


def rows_to_markdown(rows: Sequence[CurvatureRow]) -> str:
    """Markdown table of :func:`curvature_table` rows."""
    out = ["| layer | shape | geometry | dim | K bounds | K sampled | inj. radius | diameter |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.name} | {r.shape} | {r.geometry} | {r.dim} | "
                   f"[{_fmt(r.k_min)}, {_fmt(r.k_max)}] | "
                   f"[{_fmt(r.k_sampled_min)}, {_fmt(r.k_sampled_max)}] | "
                   f"{_fmt(r.injectivity_radius)} | {_fmt(r.diameter)} |")
    return "\n".join(out)


__all__.append("rows_to_markdown")
