r"""Riemannian and Euclidean Hessians of a loss, and sharpness (top Hessian eigenvalue).

For a function :math:`f` on an embedded submanifold :math:`\mathcal M\subset\mathbb R^N` with
the induced metric, the Riemannian gradient is :math:`\mathrm{grad} f(x) = P_x\nabla f(x)` and
the Riemannian Hessian is the projected derivative of the gradient (Absil, Mahony &
Sepulchre 2008, Prop. 5.3.2; Absil, Mahony & Trumpf 2013):

.. math::

    \mathrm{Hess} f(x)[u] = P_x\big(\nabla^2 f(x)\,u\big)
        + P_x\big((\mathrm D_u P)_x[\nabla f(x)]\big),

the second term being the Weingarten map applied to the normal part of the Euclidean
gradient.  On a sphere of radius :math:`r`:
:math:`\mathrm{Hess} f(x)[u] = P_x(\nabla^2 f(x)u) - \frac{x^\top\nabla f(x)}{r^2}u`; on
Stiefel: :math:`P_X(\nabla^2 f\,U) - P_X\big(U\,\mathrm{sym}(X^\top\nabla f)\big)/r^2`.
Both are what the general formula gives; it is evaluated here with autograd
(double backward for :math:`\nabla^2 f\,u`, forward-mode derivative of the manifold's own
``proju`` for :math:`\mathrm D_u P`), so it holds for every kernel manifold and product.

The sharpness of a model is the largest eigenvalue of the Hessian on the product of the
parameters' tangent spaces (unconstrained parameters are Euclidean factors), found with
Lanczos (``scipy.sparse.linalg.eigsh``) on the self-adjoint operator
:math:`u\mapsto\mathrm{Hess} f[P u]` (zero on the normal spaces).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..manifolds import Euclidean, KernelManifold
from .geodesics import parameter_manifolds

__all__ = ["weingarten", "riemannian_hvp", "hessian_operator", "top_eigenvalue", "sharpness"]


def weingarten(manifold: KernelManifold, x: torch.Tensor, u: torch.Tensor,
               egrad: torch.Tensor) -> torch.Tensor:
    r"""Curvature term :math:`P_x\big((\mathrm D_u P)_x[\nabla f]\big)` of the Riemannian Hessian.

    Parameters
    ----------
    manifold : KernelManifold
    x : torch.Tensor
        Point on the manifold.
    u : torch.Tensor
        Tangent vector at ``x``.
    egrad : torch.Tensor
        Euclidean gradient :math:`\nabla f(x)`.

    Returns
    -------
    torch.Tensor
        Tangent vector at ``x``.
    """
    if isinstance(manifold, Euclidean):
        return torch.zeros_like(x)
    _, d = torch.func.jvp(lambda xx: manifold.proju(xx, egrad), (x,), (u,))
    return manifold.proju(x, d)


def riemannian_hvp(manifold: KernelManifold, x: torch.Tensor, egrad: torch.Tensor,
                   ehvp_u: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    r""":math:`\mathrm{Hess} f(x)[u] = P_x(\nabla^2 f(x)u) + P_x((\mathrm D_u P)_x[\nabla f(x)])`.

    ``ehvp_u`` is the Euclidean Hessian-vector product :math:`\nabla^2 f(x)u` for the tangent
    ``u``.
    """
    return manifold.proju(x, ehvp_u) + weingarten(manifold, x, u, egrad)


def hessian_operator(loss_fn: Callable[[Sequence[torch.Tensor]], torch.Tensor],
                     params: Sequence[torch.Tensor],
                     manifolds: Sequence[KernelManifold | None], *, riemannian: bool = True):
    """Hessian-vector product on a list of tensors, as a closure ``hvp(vs) -> list``.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(params) -> scalar`` (a differentiable function of the list of tensors).
    params : sequence of torch.Tensor
        The point (detached tensors; copies with ``requires_grad`` are made here).
    manifolds : sequence of KernelManifold or None
        Manifold of each tensor (``None`` or :class:`Euclidean` for a flat factor).
    riemannian : bool
        Riemannian Hessian (projected, with the Weingarten term, applied to ``P u``) or the
        plain Euclidean Hessian on all coordinates.

    Returns
    -------
    callable
        ``hvp(vs: list[Tensor]) -> list[Tensor]``; also exposes ``.grad`` (Euclidean
        gradient) and ``.rgrad`` (Riemannian gradient).
    """
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    mans = [m if (m is not None and riemannian) else Euclidean() for m in manifolds]
    loss = loss_fn(ps)
    grads = torch.autograd.grad(loss, ps, create_graph=True)
    egrads = [g.detach() for g in grads]

    def hvp(vs):
        vt = [m.proju(p.detach(), v) for m, p, v in zip(mans, ps, vs)]
        hv = torch.autograd.grad(grads, ps, grad_outputs=vt, retain_graph=True,
                                 allow_unused=True)
        hv = [torch.zeros_like(p) if h is None else h for h, p in zip(hv, ps)]
        return [riemannian_hvp(m, p.detach(), g, h, v)
                for m, p, g, h, v in zip(mans, ps, egrads, hv, vt)]

    hvp.grad = egrads
    hvp.rgrad = [m.proju(p.detach(), g) for m, p, g in zip(mans, ps, egrads)]
    hvp.loss = float(loss.detach())
    return hvp


def top_eigenvalue(hvp, shapes: Sequence[torch.Size], *, dtype=torch.float64,
                   which: str = "LA", tol: float = 1e-6, maxiter: int | None = None,
                   seed: int = 0) -> float:
    """Extreme eigenvalue of a symmetric operator on a list of tensors by Lanczos.

    ``which="LA"`` (default) gives the largest algebraic eigenvalue, ``"SA"`` the smallest,
    ``"LM"`` the largest in magnitude.
    """
    from scipy.sparse.linalg import LinearOperator, eigsh

    sizes = [int(np.prod(s)) for s in shapes]
    n = sum(sizes)

    def matvec(v):
        v = torch.from_numpy(np.asarray(v, dtype=np.float64).reshape(-1))
        parts, off = [], 0
        for s, k in zip(shapes, sizes):
            parts.append(v[off:off + k].reshape(s).to(dtype))
            off += k
        out = hvp(parts)
        return torch.cat([o.reshape(-1).double() for o in out]).detach().numpy()

    op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
    v0 = np.random.default_rng(seed).standard_normal(n)
    vals = eigsh(op, k=1, which=which, tol=tol, v0=v0, maxiter=maxiter,
                 return_eigenvectors=False)
    return float(vals[0])


def sharpness(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
              riemannian: bool = True, loss_fn=F.cross_entropy, tol: float = 1e-4,
              which: str = "LA") -> float:
    r"""Top eigenvalue of the (Riemannian or Euclidean) Hessian of the loss at ``model``.

    The loss is ``loss_fn(model(inputs), targets)`` with the model in ``eval`` mode (batch
    norm on running statistics), as a function of all parameters that require gradients;
    kernels on manifolds use their manifold's geometry when ``riemannian``.
    """
    names, params, mans = [], [], []
    pm = parameter_manifolds(model)
    for name, p in model.named_parameters():
        if p.requires_grad:
            names.append(name)
            params.append(p.detach())
            mans.append(pm[name])
    buffers = {k: v for k, v in model.named_buffers()}
    was = model.training
    model.eval()
    try:
        def loss_of(ps):
            st = dict(zip(names, ps))
            st.update(buffers)
            return loss_fn(torch.func.functional_call(model, st, (inputs,)), targets)

        hvp = hessian_operator(loss_of, params, mans, riemannian=riemannian)
        return top_eigenvalue(hvp, [p.shape for p in params], dtype=params[0].dtype, tol=tol,
                              which=which)
    finally:
        model.train(was)
