r"""Spheres of filters: the geometry of batch norm's scale invariance and weight normalization.

A filter :math:`w\in\mathbb{R}^n` (one output channel, flattened; :math:`n` = fan-in) is
constrained to the sphere :math:`S^{n-1}(r)=\{w : \|w\|=r\}`; a layer with ``out`` filters
lives on the product :math:`S^{n-1}(r)^{\text{out}}` (the oblique manifold of its filters).

All operations are closed form, on the rows of a ``(B, n)`` canonical layout:

.. math::

    P_x(u) &= u - \frac{\langle x,u\rangle}{r^2}\,x, \\
    \mathrm{Exp}_x(u) &= \cos\!\big(\tfrac{\|u\|}{r}\big)\,x
        + r\,\sin\!\big(\tfrac{\|u\|}{r}\big)\frac{u}{\|u\|}, \\
    d(x,y) &= r\,\theta,\quad \theta = 2\,\mathrm{atan2}\big(\|x-y\|,\ \|x+y\|\big), \\
    \mathrm{Log}_x(y) &= \frac{r\,\theta}{\|w\|}\,w,\quad w = P_x(y-x).

The angle is computed with ``atan2`` of the chord and its complement rather than ``arccos`` of a
clipped dot product, which cannot resolve angles below about ``1.4e-2`` rad in float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .base import KernelManifold, KernelShapeError, _safe_sqrt

__all__ = ["RowSphere", "Sphere", "CenteredSphere"]


def _rownorm(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True)


def _rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(-1, keepdim=True)


class RowSphere(KernelManifold):
    r"""Product of spheres :math:`S^{n-1}(r)` over the rows of a canonical ``(B, n)`` layout.

    Subclasses choose the layout (which entries of the kernel form one row).  This class holds
    the closed-form geometry shared by :class:`Sphere`, :class:`CenteredSphere` and
    :class:`~kernelgeo.manifolds.oblique.Oblique`.
    """

    #: smallest row length for which the component manifold has positive dimension
    min_row = 2

    def row_length(self, shape: Sequence[int]) -> int:
        return self.point_shape(shape)[0]

    def check_kernel_shape(self, shape):
        super().check_kernel_shape(shape)
        n = self.to_batch(torch.empty(tuple(shape), device="meta")).shape[-1]
        if n < self.min_row:
            raise KernelShapeError(
                f"{self.name} needs rows of at least {self.min_row} entries, but a kernel of "
                f"shape {tuple(shape)} gives rows of {n} (the manifold would be a set of "
                "isolated points)"
            )

    # -- facts
    def component_dim(self, shape):
        return self.row_length(shape) - 1

    def curvature_bounds(self, shape):
        r = self.radius_of(shape)
        if self.component_dim(shape) < 2:  # a circle has no 2-planes
            return (0.0, 0.0)
        return (1.0 / r**2, 1.0 / r**2)

    def injectivity_radius(self, shape):
        return math.pi * self.radius_of(shape)

    def diameter(self, shape):
        return math.pi * self.radius_of(shape)

    def describe(self, shape):
        return (f"{self.num_components(shape)} x S^{self.component_dim(shape)}"
                f"(r={self.radius_of(shape):.4g})")

    # -- batched primitives on (B, n)
    def _center(self, x):
        return x

    def _bprojx(self, x, r):
        x = self._center(x)
        # divide by the largest entry first: the norm of a row with entries beyond ~1e19
        # (float32) overflows to inf and would turn the row into zeros
        x = x / x.detach().abs().amax(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        nrm = _rownorm(x)
        # A zero row has no nearest point: send it to the fixed unit vector (1, -1, 0, ...)/sqrt 2
        # (centred too) instead of writing NaN into the weights.
        fallback = x.new_zeros(x.shape[-1])
        if x.shape[-1] > 1:
            fallback[0], fallback[1] = 2**-0.5, -(2**-0.5)
        else:  # 1-entry rows (S^0, rejected by check_kernel_shape, but projx must not crash)
            fallback[0] = 1.0
        tiny = torch.finfo(x.dtype).tiny ** 0.5
        return r * torch.where(nrm > tiny, x / nrm.clamp_min(tiny), fallback)

    def _bproju(self, x, u, r):
        u = self._center(u)
        return u - (_rowdot(x, u) / (r * r)) * x

    def _bretr(self, x, u, r):
        return self._bprojx(x + u, r)

    def _bexpmap(self, x, u, r):
        t = _rownorm(u) / r
        # r sin(t)/|u| = sinc(t) with torch's normalised sinc(z) = sin(pi z)/(pi z)
        y = torch.cos(t) * x + torch.sinc(t / math.pi) * u
        # re-normalise: exact in exact arithmetic, removes drift in float32
        return r * y / _rownorm(y)

    def _bangle(self, x, y):
        # the chord's norm through a safe sqrt: d(x, y) is not differentiable at y = x, and
        # its zero subgradient there is better than NaN in an autograd graph
        chord = _safe_sqrt((x - y).square().sum(-1, keepdim=True))
        return 2.0 * torch.atan2(chord, _rownorm(x + y))

    def _blogmap(self, x, y, r):
        theta = self._bangle(x, y)
        w = self._bproju(x, y - x, r)
        wn = _rownorm(w)
        scale = torch.where(wn > 0, r * theta / wn.clamp_min(torch.finfo(x.dtype).tiny), 0.0)
        return scale * w

    def _bdist(self, x, y, r):
        return (r * self._bangle(x, y)).squeeze(-1)

    def _bconstraint_error(self, x, r):
        # Euclidean distance to the nearest point r Cx/|Cx|: the normal offset x - Cx and the
        # radial error |Cx| - r are orthogonal
        c = self._center(x)
        err = (_rownorm(c) - r).square()
        if c is not x:
            err = err + (x - c).square().sum(-1, keepdim=True)
        return err.sqrt().squeeze(-1)

    def parallel_transp(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Parallel transport of ``v`` along the geodesic :math:`t\mapsto\mathrm{Exp}_x(tu)`
        to :math:`t=1` (closed form on spheres; used by the analysis, the optimizer uses the
        cheaper projection transport).
        """
        shape = x.shape
        r = self.radius_of(shape)
        xb, ub, vb = self.to_batch(x), self.to_batch(u), self.to_batch(v)
        un = _rownorm(ub)
        e = torch.where(un > 0, ub / un.clamp_min(torch.finfo(xb.dtype).tiny), 0.0)
        t = un / r
        a = _rowdot(e, vb)
        out = vb + a * ((torch.cos(t) - 1.0) * e - torch.sin(t) * xb / r)
        return self.from_batch(out, shape)


class Sphere(RowSphere):
    r"""Each output filter on a sphere: :math:`W_d \in S^{n-1}(r)`, :math:`n` = fan-in.

    The geometry induced by batch normalisation's invariance to the scale of a filter and by
    weight normalisation :math:`w = g\,v/\|v\|` with the gain absorbed elsewhere.

    Parameters
    ----------
    radius : float
        Sphere radius :math:`r` (default 1).
    radius_scale : {None, "fan_in"}
        Use :math:`r\sqrt{n}` instead of :math:`r`.

    Notes
    -----
    Canonical layout: ``W.reshape(out, n)`` (a view), ``B = out``.  Dimension of a layer:
    ``out * (n - 1)``; sectional curvature of one component :math:`1/r^2`; injectivity radius
    and diameter :math:`\pi r`.
    """

    name = "sphere"
    #: the optimizers' fused sphere update applies (see :class:`KernelManifold`)
    batched_layout = "rows"

    def to_batch(self, x):
        return x.reshape(x.shape[0], -1)

    def from_batch(self, b, shape):
        return b.reshape(shape)


class CenteredSphere(Sphere):
    r"""Each filter centred and on a sphere: :math:`\mathbf 1^\top W_d = 0,\ \|W_d\| = r`.

    The geometry of centred weight normalisation (Huang et al. 2017): a great sphere
    :math:`S^{n-2}(r)` inside the hyperplane orthogonal to the all-ones vector.  Its geometry is
    that of the sphere with every vector first projected onto the hyperplane:
    :math:`P_x(u) = Cu - \langle x, Cu\rangle x / r^2` with
    :math:`C = I - \mathbf 1\mathbf 1^\top/n`.

    Notes
    -----
    Component dimension :math:`n-2` (needs :math:`n\ge 3`); curvature :math:`1/r^2`;
    injectivity radius and diameter :math:`\pi r` (it is a totally geodesic great sphere).
    """

    name = "centered-sphere"
    min_row = 3
    batched_layout = "rows"
    batched_centered = True

    def _center(self, x):
        return x - x.mean(-1, keepdim=True)

    def component_dim(self, shape):
        return self.row_length(shape) - 2

    def describe(self, shape):
        return (f"{self.num_components(shape)} x S^{self.component_dim(shape)}_c"
                f"(r={self.radius_of(shape):.4g})")
