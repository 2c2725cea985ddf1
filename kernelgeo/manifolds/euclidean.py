r"""The unconstrained factor :math:`\mathbb{R}^{\text{shape}}`, for mixed products."""

from __future__ import annotations

import math

import torch

from .base import KernelManifold

__all__ = ["Euclidean"]


class Euclidean(KernelManifold):
    r"""No constraint: the flat space of kernels of a given shape.

    Notes
    -----
    One component (the whole tensor, layout ``(1, numel)``); curvature 0; injectivity radius
    and diameter :math:`\infty`.  The radius parameter is ignored.
    """

    name = "euclidean"
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
