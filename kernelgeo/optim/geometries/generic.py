r"""Every other kernel manifold (and the reference update of all of them): the manifold's own
batched primitives (:meth:`~kernelgeo.manifolds.KernelManifold.batched_proju`,
``batched_inner``, ``batched_retr``, ``batched_transp``) in its canonical layout.

Used for manifolds without an effective
:attr:`~kernelgeo.manifolds.KernelManifold.batched_layout` (a subclass that overrides the
maths without declaring one included), :class:`~kernelgeo.manifolds.Stiefel` with the polar
retraction, :class:`~kernelgeo.manifolds.Euclidean` blocks of products and centred columns.

Where the update is implemented:

reference (the oracle, for every kernel geometry)
    :func:`reference_kernel_step`: per parameter and block, in float64 with rescaled
    gradients and buffers, written only when every new value is finite.
torch ops (this module)
    :func:`generic_prepare` and :func:`generic_apply` on a chunk in the canonical layout.
C, Triton
    none.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

import torch

from ...manifolds import KernelProduct
from ...manifolds.stiefel import _qf
from .. import momentum as mom
from ..step_rules import rule_constants, step_sizes
from ._common import HALF, Hyper, momentum_direction

if TYPE_CHECKING:  # pragma: no cover
    from ..batched import Chunk

__all__ = ["generic_prepare", "generic_apply", "reference_kernel_step", "foreign_step",
           "scale_invariant", "reproject"]


def generic_prepare(chunk: Chunk, x, g, h: Hyper):
    """The Riemannian gradient (of the weight-decayed gradient when ``h.wd``), twice: the
    direction and what :func:`generic_apply` takes."""
    m, r = chunk.layout.m, chunk.layout.r
    if h.wd:
        g = g + h.wd * x
    u = m.batched_proju(x, g, r)
    return u, u


def generic_apply(chunk: Chunk, x, u, h: Hyper, stats: list | None):
    """The step of a chunk with the manifold's primitives; returns the new points (a new
    tensor, for ``kernelgeo.optim.batched.scatter``)."""
    m, r = chunk.layout.m, chunk.layout.r
    d = momentum_direction(chunk, u, h) if h.momentum > 0 else u
    rn = m.batched_inner(x, d, d).clamp_min(0).sqrt()
    step = step_sizes(h.lr, rn, chunk.consts)
    v = -step.view((-1,) + (1,) * (d.dim() - 1)) * d
    if x.dtype in HALF:  # retractions factorise (QR, SVD): float32, as torch has no half
        xn = m.batched_retr(x.float(), v.float(), r).to(x.dtype)
    else:
        xn = m.batched_retr(x, v, r)
    if h.momentum > 0:
        chunk.buf.copy_(m.batched_transp(x, xn, chunk.buf, r))
        if chunk.buf_param is not None:  # layout was a copy: publish into the state tensor
            chunk.buf_param.copy_(chunk.layout.to_shape(chunk.buf, chunk.members[0].shape))
    if stats is not None:
        stats.append((rn, step, chunk.consts))
    return xn


def scale_invariant(m) -> bool:
    """Whether ``m.batched_retr(x, u, r)`` depends on ``x + u`` only up to positive scaling:
    every declared batched layout promises it (the metric projections of spheres, the QR and
    polar factors of Stiefel frames; see :class:`~kernelgeo.manifolds.KernelManifold`)."""
    return m.effective_batched_layout() is not None


def reference_kernel_step(state, group, p, m, lr: float, stats, name, commits) -> None:
    r"""The reference update (the oracle) of kernel ``p`` on manifold ``m``, every block, with
    the manifolds' batched primitives, appended to ``commits``.

    Computed in float64 with the gradient and buffer divided by their largest entry (the
    direction is linear in them); the rule sees the true norm; for manifolds with a declared
    batched layout (retractions invariant to positive scaling of :math:`x + u`) the
    retraction's argument is divided by :math:`\max(1, \|g d\|/r)`.  ``lr`` includes the
    layer multiplier; ``stats`` (or None) collects ``(R, g, constants)`` per group.
    """
    mu, damp = group["momentum"], group["dampening"]
    blocks = m.blocks(p.shape) if isinstance(m, KernelProduct) else [(m, None)]
    bl = mom.kernel_blocks(state, p)  # (creates the state entry, as torch's SGD)
    bl = bl if mu else None
    wd = group["weight_decay"]
    for b, (bm, bidx) in enumerate(blocks):
        bidx = None if bidx is None or len(blocks) == 1 else bidx
        shape = tuple(p.shape) if bidx is None else KernelProduct._sub(p.shape, bidx)
        psub = p.detach() if bidx is None else p.detach()[bidx]
        r = bm.radius_of(shape)
        x = bm.to_batch(psub).double()
        gr = bm.to_batch(p.grad if bidx is None else p.grad[bidx]).double()
        consts = rule_constants(group["step_rule"], bm, shape, rho=group["rho"],
                                max_step=group["max_step"])
        decay = bool(wd) and (consts.flat or group["decay_manifold"])
        old = None if not mu or bl is None or bl[b] is None else bl[b]
        b0 = None if old is None else bm.to_batch(old).double()
        # divide gradient and buffer by their largest entry: u, B and d are linear in them
        sc = float(gr.abs().max()) if gr.numel() else 0.0
        if b0 is not None and b0.numel():
            sc = max(sc, float(b0.abs().max()))
        if decay and x.numel():
            sc = max(sc, wd * float(x.abs().max()))
        sc = sc if 0.0 < sc < math.inf else 1.0
        gs = gr / sc
        if decay:
            gs = gs + (wd / sc) * x
        u = bm.batched_proju(x, gs, r)
        if mu:
            nb = u.clone() if b0 is None else (b0 / sc).mul_(mu).add_(u, alpha=1 - damp)
            d = u.add(nb, alpha=mu) if group["nesterov"] else nb
        else:
            d = u
        rn_s = bm.batched_inner(x, d, d).clamp_min(0).sqrt()
        # the rule sees the true norm (float64: finite for any float32 data; a float64
        # norm beyond its range refuses the step)
        rn = rn_s * sc
        commits.append(("check", None, None, rn, name, "direction norm", p))
        g = step_sizes(lr, rn, consts)
        a = g * sc  # displacement = a * d (scaled units); may overflow float64
        shape_b = (-1,) + (1,) * (d.dim() - 1)
        pos = rn_s > 0
        if scale_invariant(bm):
            # R(x - a d) = R(x/t - (a/t) d), t = max(1, a |d| / r): arguments stay O(r)
            coef = torch.where(pos, torch.minimum(a, r / rn_s.clamp_min(1e-300)), 0.0)
            tinv = torch.where(pos, torch.clamp(r / (a * rn_s), max=1.0), 1.0)
            tinv = torch.nan_to_num(tinv, nan=1.0)
            xn = bm.batched_retr(x * tinv.view(shape_b), -coef.view(shape_b) * d, r)
        else:
            xn = bm.batched_retr(x, -a.view(shape_b) * d, r)
        commits.append(("copy", psub, None, bm.from_batch(xn, shape).to(p.dtype), name,
                        "value", p))
        if mu:
            nbt = bm.batched_transp(x, xn, nb, r) * sc
            nb_new = bm.from_batch(nbt, shape).to(p.dtype).contiguous()
            if old is not None:
                commits.append(("copy", old, None, nb_new, name, "momentum", p))
            else:
                setter = partial(mom.set_kernel_block, state, p, b,
                                 nblocks=len(blocks))
                commits.append(("state", setter, None, nb_new, name, "momentum", p))
        if stats is not None:
            stats.setdefault(id(group), []).append(
                (rn.to(p.dtype), g.to(p.dtype), consts))


def foreign_step(state, group, p, m, name, commits) -> None:
    """Parameters on other geoopt manifolds: plain Riemannian SGD with the manifold's own
    ``egrad2rgrad``, ``retr`` and ``retr_transp`` (no step rule, no batching), appended to
    ``commits``."""
    mu, damp = group["momentum"], group["dampening"]
    u = m.egrad2rgrad(p, p.grad.clone())
    if mu:
        buf = mom.euclid_buffer(state, p)
        nb = u.clone() if buf is None else buf.mul(mu).add_(u, alpha=1 - damp)
        d = u.add(nb, alpha=mu) if group["nesterov"] else nb
        new, nbuf = m.retr_transp(p, -group["lr"] * d, nb)
        if buf is None:
            commits.append(("state", partial(mom.set_euclid_buffer, state, p), None,
                            nbuf, name, "momentum buffer", p))
        else:
            commits.append(("copy", buf, None, nbuf, name, "momentum buffer", p))
    else:
        new = m.retr(p, -group["lr"] * u)
    commits.append(("copy", p, None, new, name, "value", p))


def reproject(m, x):
    """Re-projection of a (sub-)kernel ``x`` onto manifold ``m`` (the optimizer's
    ``stabilize``): the metric projection, except for Stiefel frames (declared layout
    ``"matrices"``): the QR factor (as close, up to O(error), and without the float64 SVD
    that the exact polar projection of a large kernel would cost)."""
    if m.effective_batched_layout() == "matrices":
        r = m.radius_of(x.shape)
        xb = m.to_batch(x)
        w = xb.float() if xb.dtype in HALF else xb  # no half-precision QR on the CPU
        return m.from_batch((r * _qf(w / r)).to(x.dtype), x.shape)
    return m.projx(x)


