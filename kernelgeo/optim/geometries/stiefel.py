r"""Stiefel frames: :class:`~kernelgeo.manifolds.Stiefel` with the QR retraction, and every
manifold that declares :attr:`~kernelgeo.manifolds.KernelManifold.batched_layout`
``"matrices"`` with ``retraction="qr"`` (the polar retraction takes the generic path).

In the row layout :math:`X^\top` (``(G, p, n)``, a view of a per-filter kernel):
:math:`u = G - X\,\mathrm{sym}(X^\top G)/r^2` by one ``baddbmm``, and the QR retraction
computed as Cholesky-QR: :math:`M = X - g\,d`, :math:`M^\top M = r^2 LL^\top`,
:math:`\mathrm{qf}(M) = M L^{-\top}/r`, which equals the sign-corrected Householder ``qf``
of :mod:`kernelgeo.manifolds.stiefel` (the Cholesky factor is the unique positive-diagonal
R factor) and is well conditioned because :math:`M^\top M \succeq r^2 I` for a tangent step;
the momentum is transported by projection, :math:`B' = B - X'\,\mathrm{sym}(X'^\top B)/r^2`.

Where the update is implemented:

reference (the oracle)
    :func:`kernelgeo.optim.geometries.reference_kernel_step` with
    :class:`~kernelgeo.manifolds.Stiefel`'s primitives (Householder QR with sign correction),
    in float64.
torch ops (this module)
    :func:`stiefel_prepare` and :func:`stiefel_apply`.
C
    none (the torch ops are dominated by the batched factorisations).
Triton
    :mod:`kernelgeo.optim.stiefel_stack`: blocks stacked in zero-padded classes of one width,
    ``stiefel_gather`` / ``stiefel_direction`` / ``stiefel_displace`` / ``stiefel_scatter`` of
    ``kernelgeo/optim/_triton_kernels.py`` around nine batched torch operations per class
    (projection, Cholesky-QR retraction, transport); blocks whose row layout is not a view
    of the parameter keep these torch ops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ...manifolds.stiefel import _qf
from ..step_rules import step_sizes
from ._common import HALF, Hyper, momentum_direction

if TYPE_CHECKING:  # pragma: no cover
    from ..batched import Chunk

__all__ = ["stiefel_prepare", "stiefel_apply"]


def stiefel_prepare(chunk: Chunk, x, g):
    """The gradient and :math:`X^\\top G` per frame, ``(G, p, p)``."""
    # the chunk layout is already the row layout X^T (G, p, n)
    return g, x @ g.transpose(-1, -2)  # X^T G, (G, p, p)


def stiefel_apply(chunk: Chunk, x, gt, a, h: Hyper, stats: list | None):
    """Row-layout Stiefel step; ``x`` is the chunk view, ``gt`` the row-layout gradient.

    Returns the new points: written into ``x`` when the chunk works in place on the
    parameter, else a fresh tensor for ``kernelgeo.optim.batched.scatter`` (saves one
    copy).
    """
    lay = chunk.layout
    r2 = lay.r * lay.r
    xt, bt = x, chunk.buf
    # sym(A)/r^2 = (A + A^T) * (0.5/r^2): the factor goes into the baddbmm's alpha
    sm = a + a.mT
    fast = h.momentum > 0 and chunk.fresh is None and h.dampening == 0 and not h.nesterov
    if fast:
        torch.add(gt, bt, alpha=h.momentum, out=bt)
        bt.baddbmm_(sm, xt, alpha=-0.5 / r2)
        d = bt
    else:
        u = torch.baddbmm(gt, sm, xt, alpha=-0.5 / r2)
        d = momentum_direction(chunk, u, h) if h.momentum > 0 else u
    rn = torch.linalg.vector_norm(d, dim=(-1, -2))
    step = step_sizes(h.lr, rn, chunk.consts)
    m = torch.addcmul(xt, step.view(-1, 1, 1), d, value=-1.0)
    # half precision: the factorisation in float32 (torch has no half Cholesky/QR on the CPU)
    wm = m.float() if m.dtype in HALF else m
    gram = torch.bmm(wm, wm.mT)
    if r2 != 1.0:
        gram.div_(r2)
    low, info = torch.linalg.cholesky_ex(gram)
    # Cholesky-QR loses orthogonality like eps * cond(M^T M) <= eps * (1 + (g|d|/r)^2): a
    # failed factorisation or a long step (huge learning rate, rule "none") takes Householder
    # QR instead (one synchronisation per chunk, unless the optimizer's bounds show that
    # every step is short: then M^T M has condition <= 10 and the factorisation succeeds)
    if not h.short and bool(info.any() | ((step * rn).max() > 3.0 * lay.r)):
        xn = (lay.r * _qf(wm.mT / lay.r)).mT
    else:
        # L^{-1} M as (M^T L^{-T})^T: on the transposed views the solve runs on column-major
        # operands without copies (2-3x faster than solving L X = M on row-major M, measured)
        xn = torch.linalg.solve_triangular(low.mT, wm.mT, upper=True, left=False).mT
    xn = xn.to(m.dtype)
    if h.momentum > 0:
        c = torch.bmm(xn, bt.mT)
        bt.baddbmm_(c + c.mT, xn, alpha=-0.5 / r2)
    if stats is not None:
        stats.append((rn, step, chunk.consts))
    if chunk.inplace:
        xt.copy_(xn)
        return x
    return xn
