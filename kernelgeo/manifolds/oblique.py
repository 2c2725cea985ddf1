r"""Oblique manifolds of kernel slices: unit-norm columns of every 2-D slice.

For a kernel slice :math:`W_{d,c}\in\mathbb{R}^{a\times b}` (one output and one input channel;
:math:`a\times b = k_h\times k_w` for a 2-D convolution) the oblique manifold
:math:`\mathcal{OB}(a,b)=\{X\in\mathbb{R}^{a\times b}:\operatorname{diag}(X^\top X)=r^2\mathbf 1\}`
constrains each column to the sphere :math:`S^{a-1}(r)`; a layer is the product over all
``out * in`` slices.  With ``per="slice"`` each whole slice (flattened, :math:`ab` entries) is on
:math:`S^{ab-1}(r)` instead.  The geometry is the sphere's, row by row (see
:mod:`kernelgeo.manifolds.sphere`).

Slice matrix of an N-d kernel ``(out, in, k_1, ..., k_N)``: rows :math:`a=k_1\cdots k_{N-1}`,
columns :math:`b=k_N` for :math:`N\ge 2`; a 1-D kernel ``(out, in, k)`` is one column of
length :math:`k`.
"""

from __future__ import annotations

import math

from .sphere import RowSphere

__all__ = ["Oblique"]


def _slice_matrix(shape) -> tuple[int, int]:
    k = tuple(shape[2:])
    if len(k) == 0:
        return 1, 1
    if len(k) == 1:
        return k[0], 1
    return math.prod(k[:-1]), k[-1]


class Oblique(RowSphere):
    r"""Unit-norm columns of every kernel slice (``per="column"``) or unit-norm slices
    (``per="slice"``).

    Parameters
    ----------
    per : {"column", "slice"}
        What is normalised: each column of each slice :math:`W_{d,c}` (default, the oblique
        manifold :math:`\mathcal{OB}(k_h,k_w)` per slice) or each slice as a whole.
    radius, radius_scale
        As for :class:`~kernelgeo.manifolds.sphere.Sphere`; ``"fan_in"`` scales by the square
        root of the row length here.

    Notes
    -----
    Canonical layout ``(out * in * b, a)`` for columns (a permuted copy), ``(out * in, a b)``
    for slices (a view).  A 1x1 convolution has columns of length 1: its oblique manifold is a
    finite set of points, and :meth:`check_kernel_shape` rejects it.
    """

    min_rank = 3

    def __init__(self, per: str = "column", radius: float = 1.0, radius_scale=None):
        if per not in ("column", "slice"):
            raise ValueError(f"Oblique per must be 'column' or 'slice', got {per!r}")
        super().__init__(radius=radius, radius_scale=radius_scale)
        self.per = per
        self.name = "oblique" if per == "column" else "oblique-slice"

    @property
    def batched_layout(self) -> str:
        """``"columns"`` (``per="column"``) or ``"rows"`` (``per="slice"``): the optimizers'
        fused sphere update applies (see :class:`~kernelgeo.manifolds.KernelManifold`)."""
        return "columns" if self.per == "column" else "rows"

    def check_kernel_shape(self, shape):
        if len(shape) < 3:
            from .base import KernelShapeError

            raise KernelShapeError(
                f"{self.name} needs a conv weight (out, in, *kernel_size); got {tuple(shape)}"
            )
        super().check_kernel_shape(shape)

    def radius_of(self, shape):
        if self.radius_scale == "fan_in":
            a, b = _slice_matrix(shape)
            return self.radius * math.sqrt(a if self.per == "column" else a * b)
        return self.radius

    def to_batch(self, x):
        o, i = x.shape[0], x.shape[1]
        a, b = _slice_matrix(x.shape)
        if self.per == "slice":
            return x.reshape(o * i, a * b)
        return x.reshape(o, i, a, b).transpose(-1, -2).reshape(o * i * b, a)

    def from_batch(self, y, shape):
        o, i = shape[0], shape[1]
        a, b = _slice_matrix(shape)
        if self.per == "slice":
            return y.reshape(shape)
        return y.reshape(o, i, b, a).transpose(-1, -2).reshape(shape)

    def extra_repr(self):
        return f"per={self.per!r}, " + super().extra_repr()
