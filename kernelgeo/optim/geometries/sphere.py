r"""Sphere rows: :class:`~kernelgeo.manifolds.Sphere`,
:class:`~kernelgeo.manifolds.CenteredSphere` and :class:`~kernelgeo.manifolds.Oblique` (rows
of slices, or columns), and every manifold that declares
:attr:`~kernelgeo.manifolds.KernelManifold.batched_layout` ``"rows"`` or ``"columns"``
(uncentred columns).

One component is a vector :math:`x` on the sphere of radius :math:`r` (centred first on the
centred sphere); with :math:`G` its gradient, :math:`B` its momentum buffer and
:math:`g` the step size of the rule (:func:`~kernelgeo.optim.step_rules.step_sizes`):

.. math::

    u &= G_c - \frac{\langle x, G_c\rangle}{r^2}\,x \quad (G_c = G \text{ or } G - \bar G),
    \qquad B \leftarrow u \mid \mu B + (1-\tau) u,
    \qquad d = B \mid u + \mu B \mid u,\\
    x' &= r\,y/\|y\|,\quad y = x - g\,d,
    \qquad B' = B + \frac{c\,g\,\langle d, B\rangle}{r^2}\,x',\quad c = r/\|y\|

(the transport by projection :math:`B - \langle x', B\rangle x'/r^2` in closed form, as
:math:`\langle x, B\rangle = 0`).

Where the update is implemented:

reference (the oracle)
    :func:`kernelgeo.optim.geometries.reference_kernel_step` with the manifold's
    primitives (``RowSphere._bproju``, ``_bretr`` = ``_bprojx(x + u)``, projection
    transport), in float64.
torch ops (this module)
    :func:`sphere_prepare` and :func:`sphere_apply` on a chunk in the row layout
    (``(N, n)``) or the structure-of-arrays layout of oblique columns
    (:mod:`kernelgeo.optim.batched`).
C (CPU, float32/float64)
    ``kg_sphere_step_f32`` / ``kg_sphere_step_f64`` of ``kernelgeo/optim/native_kernels.c``
    (kernels ``rows``, ``short3_*``, ``short_any``, ``cols``), called by
    :func:`kernelgeo.optim.native.sphere_step_parallel` on the items that
    ``ConvergentRSGD._native_work`` builds from the plan's
    :class:`~kernelgeo.optim.batched.NativeMember` entries (with the step rule's
    :attr:`~kernelgeo.optim.step_rules.RuleConstants.code` and
    :attr:`~kernelgeo.optim.step_rules.RuleConstants.kernel_cap`).
Triton (CUDA)
    ``sphere_short`` and ``sphere_long`` of ``kernelgeo/optim/_triton_kernels.py``, launched
    by :func:`kernelgeo.optim.triton_backend.step`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..step_rules import step_sizes
from ._common import Hyper, momentum_direction

if TYPE_CHECKING:  # pragma: no cover
    from ..batched import Chunk

__all__ = ["sphere_prepare", "sphere_apply"]


def _dot(a: torch.Tensor, b: torch.Tensor, dim: int, out: torch.Tensor | None = None
         ) -> torch.Tensor:
    """Row-wise inner products along ``dim``, keepdim, without a full-size temporary.

    ``vecdot`` for rows; for the SoA layout (``dim=0``, a few long contiguous rows) a chain of
    ``addcmul`` over the rows, which beats ``(a*b).sum(0)``; a reduction over a short strided
    dim (slow in torch) is unrolled into a few adds of slices.  Full-size temporaries are
    avoided on purpose: a fresh multi-MB allocation costs page faults on every step; ``out``
    (flat scratch, at least ``a.numel()``) holds the products of rows when given.
    """
    if dim == -1 or (dim != 0 and a.shape[dim] > 8):
        if out is not None and out.numel() >= a.numel():
            return torch.mul(a, b, out=out[:a.numel()].view(a.shape)).sum(dim, keepdim=True)
        return torch.linalg.vecdot(a, b, dim=dim).unsqueeze(dim)
    if dim == 0:
        out = a[0] * b[0]
        for k in range(1, a.shape[0]):
            out.addcmul_(a[k], b[k])
        return out.unsqueeze(0)
    p = a * b
    parts = p.unbind(dim)
    out = parts[0] + parts[1] if len(parts) > 1 else parts[0].clone()
    for q in parts[2:]:
        out.add_(q)
    return out.unsqueeze(dim)


def _norm(a: torch.Tensor, dim: int) -> torch.Tensor:
    if dim == -1 or (dim != 0 and a.shape[dim] > 8):
        return torch.linalg.vector_norm(a, dim=dim, keepdim=True)
    return _dot(a, a, dim).sqrt_()


def sphere_prepare(chunk: Chunk, x, g):
    """The gradient (centred on the centred sphere) and :math:`\\langle x, G\\rangle` per
    component, keepdim."""
    lay = chunk.layout
    if lay.center:
        g = g - g.mean(-1 if lay.dim == -1 else -2, keepdim=True)
    return g, _dot(x, g, lay.dim, chunk.scratch)


def sphere_apply(chunk: Chunk, x, g, s, h: Hyper, stats: list | None):
    """The step of the chunk's components in place (``x``: the chunk view, ``s``:
    :math:`\\langle x, G\\rangle` from :func:`sphere_prepare`); returns ``x``."""
    lay = chunk.layout
    r2 = lay.r * lay.r
    a = s / r2
    fast = h.momentum > 0 and chunk.fresh is None and h.dampening == 0 and not h.nesterov
    if fast:  # B = mu B + G - a x: two passes, u never materialised
        b = chunk.buf
        torch.add(g, b, alpha=h.momentum, out=b)
        b.addcmul_(x, a, value=-1.0)
        d = b
    else:
        u = torch.addcmul(g, x, a, value=-1.0)
        d = momentum_direction(chunk, u, h) if h.momentum > 0 else u
    rn = _norm(d, lay.dim)
    n2 = rn.square()
    step = step_sizes(h.lr, rn, chunk.consts)
    if h.momentum > 0:
        db = n2 if d is chunk.buf else _dot(d, chunk.buf, lay.dim)
    x.addcmul_(d, step, value=-1.0)
    c = _norm(x, lay.dim).reciprocal_().mul_(lay.r)
    x.mul_(c)
    if h.momentum > 0:
        chunk.buf.addcmul_(x, c * step * db / r2)
    if stats is not None:
        stats.append((rn.flatten(), step.flatten(), chunk.consts))
    return x
