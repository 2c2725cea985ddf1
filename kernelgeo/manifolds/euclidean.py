r"""The unconstrained factor :math:`\mathbb{R}^{\text{shape}}`, for mixed products."""

from __future__ import annotations

import math

import torch

from .._compat import ManifoldTensor
from .base import KernelManifold, _size

__all__ = ["Euclidean"]


class Euclidean(KernelManifold):
    r"""No constraint: the flat space of kernels of a given shape.

    Notes
    -----
    One component (the whole tensor, layout ``(1, numel)``); curvature 0; injectivity radius
    and diameter :math:`\infty`.  The radius parameter is ignored.

    As in geoopt's :class:`~geoopt.manifolds.Euclidean`, :meth:`component_inner` treats every
    entry as its own factor :math:`\mathbb{R}` (so :class:`geoopt.optim.RiemannianAdam` is
    plain Adam here), :meth:`origin` is the zero kernel, and there is no
    :meth:`random_uniform` (:math:`\mathbb{R}^n` has no uniform probability measure;
    :meth:`random` draws standard normal entries).
    """

    name = "euclidean"
    #: retr(x, u) = x + u and the identity transport: stepping back along -u returns exactly
    reversible = True
    min_rank = 1

    def to_batch(self, x):
        return x.reshape(1, -1)

    def from_batch(self, b, shape):
        return b.reshape(shape)

    def component_dim(self, shape):
        return int(math.prod(shape))

    def curvature_bounds(self, shape):
        return (0.0, 0.0)

    def injectivity_radius(self, shape):
        return math.inf

    def diameter(self, shape):
        return math.inf

    def describe(self, shape):
        return f"R^{self.component_dim(shape)}"

    def component_inner(self, x, u, v=None):
        r"""Elementwise :math:`u_i v_i`: each entry is a factor :math:`\mathbb{R}` (geoopt's
        convention for Euclidean space), shape of ``x``."""
        return u * (u if v is None else v)

    def random_uniform(self, *size, dtype=None, device=None, generator=None):
        raise NotImplementedError(
            "euclidean: R^n has no uniform probability measure; use random() (standard "
            "normal entries) or origin() (zeros)")

    def origin(self, *size, dtype=None, device=None, seed=42):
        """The zero kernel of shape ``size`` (``seed`` is ignored), as geoopt's Euclidean."""
        size = _size(size)
        self.check_kernel_shape(size)
        return ManifoldTensor(torch.zeros(size, dtype=dtype or torch.get_default_dtype(),
                                          device=device), manifold=self)

    def _bprojx(self, x, r):
        return x

    def _bproju(self, x, u, r):
        return u

    def _bretr(self, x, u, r):
        return x + u

    def _blogmap(self, x, y, r):
        return y - x

    def _bdist(self, x, y, r):
        return torch.linalg.vector_norm(x - y, dim=-1)

    def _btransp(self, x, y, v, r):
        return v

    def _bconstraint_error(self, x, r):
        return x.new_zeros(x.shape[0])

    def _brandom(self, shape_b, r, *, dtype, device, generator=None):
        return torch.randn(shape_b, dtype=dtype, device=device, generator=generator)
