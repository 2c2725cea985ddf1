"""What the torch-ops updates of every geometry share: hyper-parameters of a chunk's step and
the momentum recursion on a chunk's buffer (:mod:`kernelgeo.optim.geometries`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..batched import Chunk

#: dtypes whose factorisations (Cholesky, QR, SVD) torch lacks on the CPU: done in float32
HALF = (torch.float16, torch.bfloat16)


@dataclass
class Hyper:
    """Hyper-parameters of one chunk's step (the group's, with the layer multipliers in
    ``lr``)."""

    lr: object  # float or per-row tensor (layer scaling)
    momentum: float
    dampening: float
    nesterov: bool
    wd: float  # applied to the manifold gradient (decay_manifold or flat factor)
    short: bool = False  # every step is known (host-side bound) to be at most 3r long


def momentum_direction(chunk: Chunk, u: torch.Tensor, h: Hyper) -> torch.Tensor:
    """Update the chunk's buffer with the tangent vector ``u``; return the step direction."""
    b = chunk.buf
    if chunk.fresh is True:
        b.copy_(u)
    elif chunk.fresh is None:
        b.mul_(h.momentum).add_(u, alpha=1.0 - h.dampening)
    else:  # some rows start now: B = u there (torch's first-step rule), mu B + (1-d) u elsewhere
        # built in u's dtype: a float32 1 - dampening would be off by ~1e-8 in float64
        coef = torch.full(chunk.fresh.shape, 1.0 - h.dampening, dtype=u.dtype,
                          device=u.device).masked_fill_(chunk.fresh, 1.0)
        if not chunk.layout.soa:  # SoA masks are stored in their broadcast shape
            coef = coef.view((-1,) + (1,) * (u.dim() - 1))
        b.mul_(h.momentum).addcmul_(u, coef)
    return torch.add(u, b, alpha=h.momentum) if h.nesterov else b
