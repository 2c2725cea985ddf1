r"""Euclidean parameters (BN, biases, FC, and every tensor without a kernel manifold):
:class:`torch.optim.SGD`'s recursion exactly (weight decay, momentum, dampening, Nesterov; no
step rule: flat factors need none).

Where the update is implemented:

reference (the oracle)
    :func:`reference_euclid_step`, in float64.
torch ops (this module)
    :func:`euclid_foreach`: ``torch._foreach_*`` ops in the order of
    ``torch.optim.SGD(foreach=True)``.
C (CPU, float32/float64)
    torch's own fused SGD kernel (``torch._fused_sgd_``, that of
    ``torch.optim.SGD(fused=True)``): :func:`euclid_fused`, when the fused CPU kernels are in
    use (:mod:`kernelgeo.optim.native`); the optimizer's pre-pass checks these gradients with
    ``kg_amax_arrays`` of ``native_kernels.c``.
Triton
    none: :func:`kernelgeo.optim.triton_backend.step` calls the torch ops (its
    ``check_finite`` kernel checks the gradients).
"""

from __future__ import annotations

from functools import partial

import torch

from .. import momentum as mom
from ..native import DTYPES

__all__ = ["euclid_foreach", "euclid_fused", "fused_sgd_available", "reference_euclid_step"]

_FUSED_SGD: bool | None = None


def fused_sgd_available() -> bool:
    """Whether this torch has a CPU ``_fused_sgd_`` (probed once on a scratch tensor)."""
    global _FUSED_SGD
    if _FUSED_SGD is None:
        try:
            t, g = torch.zeros(2), torch.ones(2)
            torch._fused_sgd_([t], [g], [], weight_decay=0.0, momentum=0.0, lr=0.5,
                              dampening=0.0, nesterov=False, maximize=False,
                              is_first_step=False, grad_scale=None, found_inf=None)
            _FUSED_SGD = bool(torch.allclose(t, torch.full((2,), -0.5)))
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            _FUSED_SGD = False
    return _FUSED_SGD


def euclid_fused(state, group, params) -> bool:
    """``torch.optim.SGD(fused=True)``'s kernel on CPU float parameters (one call instead
    of three multi-tensor passes; the same recursion).  False: not applicable here (nothing
    written)."""
    if not fused_sgd_available() or \
            not all(p.is_cpu and p.dtype in DTYPES for p in params):
        return False
    wd, mu, damp = group["weight_decay"], group["momentum"], group["dampening"]
    kw = dict(weight_decay=wd, momentum=mu, lr=group["lr"], dampening=damp,
              nesterov=group["nesterov"], maximize=False, grad_scale=None, found_inf=None)
    if not mu:
        torch._fused_sgd_(params, [p.grad for p in params], [], is_first_step=False, **kw)
        return True
    old, old_b, fresh = [], [], []
    for p in params:
        b = mom.euclid_buffer(state, p)
        if b is None:
            fresh.append(p)
        else:
            old.append(p)
            old_b.append(b)
    if old:
        torch._fused_sgd_(old, [p.grad for p in old], old_b, is_first_step=False, **kw)
    if fresh:  # the kernel stores B = G (after weight decay) into these
        bufs = [torch.empty_like(p.grad) for p in fresh]
        torch._fused_sgd_(fresh, [p.grad for p in fresh], bufs, is_first_step=True, **kw)
        for p, b in zip(fresh, bufs, strict=True):
            mom.set_euclid_buffer(state, p, b)
    return True



def euclid_foreach(state, group, params, fused: bool = True) -> None:
    """``torch.optim.SGD``'s multi-tensor update (same operations, same order), or its
    fused CPU kernel when ``fused`` (see :func:`euclid_fused`)."""
    if not params or (fused and euclid_fused(state, group, params)):
        return
    grads = [p.grad for p in params]
    wd, mu, damp = group["weight_decay"], group["momentum"], group["dampening"]
    if wd:
        grads = torch._foreach_add(grads, params, alpha=wd)
    if mu:
        bufs, fresh_p, fresh_g, old_b, old_g = [], [], [], [], []
        for p, g in zip(params, grads, strict=True):
            b = mom.euclid_buffer(state, p)
            if b is None:
                fresh_p.append(p)
                fresh_g.append(g)
            else:
                old_b.append(b)
                old_g.append(g)
        if old_b:
            torch._foreach_mul_(old_b, mu)
            torch._foreach_add_(old_b, old_g, alpha=1 - damp)
        for p, g in zip(fresh_p, fresh_g, strict=True):
            mom.set_euclid_buffer(state, p, torch.clone(g).detach())
        bufs = [mom.euclid_buffer(state, p) for p in params]
        if group["nesterov"]:
            grads = torch._foreach_add(grads, bufs, alpha=mu)
        else:
            grads = bufs
    torch._foreach_add_(params, grads, alpha=-group["lr"])



def reference_euclid_step(state, group, p, name, commits) -> None:
    """The reference update of a Euclidean parameter: ``torch.optim.SGD``'s recursion in
    float64, appended to ``commits`` (written by the optimizer once every value is
    finite)."""
    dt = p.dtype
    x = p.detach().double()
    g = p.grad.double()
    wd, mu, damp = group["weight_decay"], group["momentum"], group["dampening"]
    if wd:
        g = g.add(x, alpha=wd)
    if mu:
        buf = mom.euclid_buffer(state, p)
        if buf is None:
            nb = g.clone()
            commits.append(("state", partial(mom.set_euclid_buffer, state, p), None,
                            nb.to(dt), name, "momentum buffer", p))
        else:
            nb = buf.double().mul_(mu).add_(g, alpha=1 - damp)
            commits.append(("copy", buf, None, nb.to(dt), name, "momentum buffer", p))
        g = g.add(nb, alpha=mu) if group["nesterov"] else nb
    commits.append(("copy", p, None, x.add_(g, alpha=-float(group["lr"])).to(dt), name,
                    "value", p))
