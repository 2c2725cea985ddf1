r"""Geodesic distances, logarithms and interpolation between kernels, layers and models.

Closed forms (spheres, centred spheres, oblique manifolds, Euclidean factors and products of
them) come from the manifolds themselves (``component_dist``, ``logmap``, ``expmap``).  The
Stiefel manifold has no closed-form logarithm (except on :math:`O(p)`); the one numerical
implementation is :mod:`kernelgeo.manifolds.stiefel_log`, shared with
:meth:`Stiefel.logmap <kernelgeo.manifolds.KernelManifold.logmap>`, for two metrics:

``metric="euclidean"`` (default, the embedded metric the kernels are trained with)
    from the canonical logarithm, single shooting while it contracts, then Gauss–Newton
    with the exact differential of the exponential; numerical continuation as fallback;
``metric="canonical"``
    Zimmermann's algorithm (2017) with a full orthogonal completion, Gauss–Newton polishing;
    distance :math:`\sqrt{\|\Delta\|^2 - \tfrac12\|X^\top\Delta\|^2}`.

Every logarithm is verified (:math:`\|\mathrm{Exp}_X(\mathrm{Log}_XY) - Y\|_F\le` ``tol``
:math:`\cdot r`) and certified minimising (length at most :math:`\pi r`, resp.
:math:`\sqrt{4/5}\,\pi r`); otherwise
:class:`~kernelgeo.manifolds.stiefel_log.StiefelLogError` is raised with the reason.  On
:math:`O(p)` the distance between the two components is :math:`+\infty`.  No metric is ever
replaced by another: :func:`layer_distances` records NaN (with a warning naming the parameter
and the reason) for a parameter whose distance cannot be certified.

Two cheap, clearly named surrogates: ``"chordal"`` (:math:`\|X - Y\|_F`, a lower bound of
every geodesic distance of the embedded metric) and ``"procrustes"``
(:math:`\min_{R\in O(p)}\|XR - Y\|_F`, the chordal distance of the column spans).

All Stiefel distances scale with the radius :math:`r` (computed on :math:`X/r, Y/r`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping

import torch

from .._compat import ManifoldParameter
from ..manifolds import Euclidean, KernelManifold, KernelProduct, Stiefel
from ..manifolds.stiefel import stiefel_dist_batch, stiefel_log_batch
from ..manifolds.stiefel_log import StiefelLogError  # noqa: F401 (re-exported name)

__all__ = [
    "stiefel_log", "stiefel_dist", "stiefel_exp_canonical", "kernel_dist", "kernel_logmap",
    "geodesic", "parameter_manifolds", "layer_distances", "path_lengths", "PathRecorder",
    "interpolate_state_dict",
]


def stiefel_exp_canonical(y: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    r"""Canonical-metric exponential on unit-radius batches ``(G, n, p)``.

    :math:`\mathrm{Exp}^c_Y(\Delta) = [Y\ Q]\exp\begin{pmatrix}A & -B^\top\\ B & 0\end{pmatrix}
    \begin{pmatrix}I\\0\end{pmatrix}` with :math:`A = Y^\top\Delta`,
    :math:`QB = (I - YY^\top)\Delta` (Edelman, Arias & Smith 1998, eq. 2.42).
    """
    p = y.shape[-1]
    a = y.transpose(-1, -2) @ delta
    q, b = torch.linalg.qr(delta - y @ a)
    z = torch.zeros_like(a)
    blk = torch.cat([torch.cat([a, -b.transpose(-1, -2)], -1), torch.cat([b, z], -1)], -2)
    e = torch.linalg.matrix_exp(blk)[..., :, :p]
    return torch.cat([y, q], -1) @ e


# ------------------------------------------------------------------------ public Stiefel log
def stiefel_log(x: torch.Tensor, y: torch.Tensor, *, r: float = 1.0, metric: str = "euclidean",
                tol: float = 1e-9, max_iter: int = 100, certify: bool = True,
                return_info: bool = False):
    r"""Riemannian logarithm :math:`\mathrm{Log}_X(Y)` on :math:`\mathrm{St}(n,p)` of radius r.

    Parameters
    ----------
    x, y : torch.Tensor
        Points in the canonical layout, shape ``(G, n, p)`` (or ``(n, p)``), with
        :math:`X^\top X = Y^\top Y = r^2 I`.
    r : float
        Radius.
    metric : {"euclidean", "canonical"}
        Embedded (Euclidean) or canonical metric (see the module docstring).
    tol : float
        Bound on the endpoint error :math:`\|\mathrm{Exp}_X(\Delta) - Y\|_F / r`, checked on
        every result.
    max_iter : int
        Iteration cap of the inner solvers.
    certify : bool
        Refuse logarithms longer than the radius within which geodesics are certainly
        minimising (default).  ``False`` returns any verified geodesic (its length is then
        only an upper bound of the distance).
    return_info : bool
        Also return ``{"residual": float, "methods": [...], "lengths": tensor}``.

    Returns
    -------
    torch.Tensor
        Tangent vector at ``x`` of the same shape (computed in float64 on the float64 polar
        projections of ``x`` and ``y``, returned in x's dtype).

    Raises
    ------
    ~kernelgeo.manifolds.stiefel_log.StiefelLogError
        Points in different components of :math:`O(p)`, no convergence, endpoint error above
        ``tol``, or a geodesic longer than the certified radius.
    """
    squeeze = x.dim() == 2
    xb = x.reshape(-1, *x.shape[-2:])
    yb = y.reshape(-1, *y.shape[-2:])
    out = stiefel_log_batch(xb, yb, r, metric=metric, tol=tol, max_iter=max_iter,
                            certify=certify, return_info=return_info)
    u, info = out if return_info else (out, None)
    u = u[0] if squeeze else u.reshape(x.shape)
    return (u, info) if return_info else u


def stiefel_dist(x: torch.Tensor, y: torch.Tensor, *, r: float = 1.0,
                 metric: str = "euclidean", **kwargs) -> torch.Tensor:
    r"""Per-component Stiefel distance, shape ``(G,)`` for ``(G, n, p)`` inputs.

    ``metric`` is ``"euclidean"`` (geodesic distance of the embedded metric),
    ``"canonical"`` (:math:`\sqrt{\|\Delta\|^2-\tfrac12\|X^\top\Delta\|^2}` for the canonical
    log :math:`\Delta`), both by :func:`stiefel_log` (``kwargs`` go there; closed form and
    ``inf`` between components on :math:`O(p)`), ``"chordal"`` (:math:`\|X - Y\|_F`) or
    ``"procrustes"`` (:math:`\min_{R\in O(p)}\|XR - Y\|_F = \sqrt{2pr^2 - 2\|X^\top Y\|_*}`).
    """
    xb = x.reshape(-1, *x.shape[-2:])
    yb = y.reshape(-1, *y.shape[-2:])
    if metric == "chordal":
        return (xb - yb).flatten(1).norm(dim=1)
    if metric == "procrustes":
        p = xb.shape[-1]
        nuc = torch.linalg.svdvals(xb.transpose(-1, -2) @ yb).sum(-1)
        return (2 * p * r * r - 2 * nuc).clamp_min(0).sqrt()
    if metric not in ("euclidean", "canonical"):
        raise ValueError("metric must be 'euclidean', 'canonical', 'chordal' or 'procrustes', "
                         f"got {metric!r}")
    return stiefel_dist_batch(xb, yb, r, metric=metric, **kwargs)


# ------------------------------------------------------------------- any kernel manifold
def _blocks(manifold: KernelManifold, shape):
    return manifold.blocks(shape) if isinstance(manifold, KernelProduct) \
        else [(manifold, (slice(None),))]


def kernel_dist(manifold: KernelManifold, x: torch.Tensor, y: torch.Tensor, *,
                stiefel_metric: str = "euclidean", per_component: bool = False) -> torch.Tensor:
    r"""Geodesic distance between two kernels on ``manifold`` (products block by block).

    Parameters
    ----------
    manifold : KernelManifold
    x, y : torch.Tensor
        Kernels of shape ``(out, in, *k)`` on ``manifold``.
    stiefel_metric : str
        Method for Stiefel blocks, see :func:`stiefel_dist`.
    per_component : bool
        Return the per-component distances ``(B,)`` instead of
        :math:`\sqrt{\sum_k d_k^2}`.
    """
    parts = []
    for m, idx in _blocks(manifold, x.shape):
        xi, yi = x[idx], y[idx]
        if isinstance(m, Stiefel):
            r = m.radius_of(xi.shape)
            parts.append(stiefel_dist(m.to_batch(xi), m.to_batch(yi), r=r,
                                      metric=stiefel_metric))
        else:
            parts.append(m.component_dist(xi, yi))
    d = torch.cat([p.reshape(-1).to(x.dtype) for p in parts])
    return d if per_component else d.pow(2).sum().sqrt()


def kernel_logmap(manifold: KernelManifold, x: torch.Tensor, y: torch.Tensor, *,
                  stiefel_metric: str = "euclidean", certify: bool = True) -> torch.Tensor:
    """Logarithm :math:`\\mathrm{Log}_x(y)` block by block (Stiefel: :func:`stiefel_log`).

    ``certify=False`` accepts, for Stiefel blocks, a verified geodesic longer than the radius
    within which geodesics are certainly minimising (see :func:`stiefel_log`).
    """
    out = torch.empty_like(x)
    for m, idx in _blocks(manifold, x.shape):
        xi, yi = x[idx], y[idx]
        if isinstance(m, Stiefel):
            r = m.radius_of(xi.shape)
            u = stiefel_log(m.to_batch(xi), m.to_batch(yi), r=r, metric=stiefel_metric,
                            certify=certify)
            out[idx] = m.from_batch(u, xi.shape)
        else:
            out[idx] = m.logmap(xi, yi)
    return out


def geodesic(manifold: KernelManifold, x: torch.Tensor, y: torch.Tensor,
             t: float | Iterable[float], *, stiefel_metric: str = "euclidean",
             log: torch.Tensor | None = None, certify: bool = True) -> torch.Tensor:
    r"""Point(s) :math:`\gamma(t)` of the geodesic from ``x`` (t=0) to ``y`` (t=1).

    :math:`\gamma(t) = \mathrm{Exp}_x(t\,\mathrm{Log}_x y)` block by block; for Stiefel blocks
    with ``stiefel_metric="canonical"`` the canonical exponential is used, so that the curve
    is the canonical geodesic.  Pass ``log`` (from :func:`kernel_logmap`) to reuse it.  With
    ``certify=True`` (default) the geodesic is the minimising one; ``certify=False`` also
    accepts a verified Stiefel geodesic beyond the certified radius (then it joins ``x`` and
    ``y`` but need not be the shortest curve).

    Returns
    -------
    torch.Tensor
        Shape of ``x``, or ``(len(t), *x.shape)`` for a sequence of ``t``.
    """
    many = not isinstance(t, (int, float))
    ts = list(t) if many else [float(t)]
    if log is None:
        log = kernel_logmap(manifold, x, y, stiefel_metric=stiefel_metric, certify=certify)
    outs = []
    for ti in ts:
        out = torch.empty_like(x)
        for m, idx in _blocks(manifold, x.shape):
            xi, ui = x[idx], log[idx]
            if isinstance(m, Stiefel) and stiefel_metric == "canonical":
                r = m.radius_of(xi.shape)
                z = stiefel_exp_canonical(m.to_batch(xi).double() / r,
                                          ti * m.to_batch(ui).double() / r)
                out[idx] = m.from_batch((r * z).to(x.dtype), xi.shape)
            else:
                out[idx] = m.expmap(xi, ti * ui)
        outs.append(out)
    return torch.stack(outs) if many else outs[0]


# ---------------------------------------------------------------- models and training runs
def parameter_manifolds(model: torch.nn.Module) -> dict[str, KernelManifold]:
    """``{parameter name: manifold}`` for every parameter (Euclidean for the unconstrained)."""
    flat = Euclidean()
    return {name: (p.manifold if isinstance(p, ManifoldParameter)
                   and isinstance(p.manifold, KernelManifold) else flat)
            for name, p in model.named_parameters()}


def _as_state(obj) -> Mapping[str, torch.Tensor]:
    if isinstance(obj, torch.nn.Module):
        return {k: v.detach() for k, v in obj.state_dict().items()}
    return obj


def layer_distances(manifolds: Mapping[str, KernelManifold], a, b, *,
                    stiefel_metric: str = "euclidean", kernels_only: bool = True
                    ) -> dict[str, float]:
    r"""Geodesic distance per parameter between two models or state dicts.

    Parameters
    ----------
    manifolds : mapping
        ``{name: manifold}`` (from :func:`parameter_manifolds`); names absent from it are
        skipped.
    a, b : nn.Module or mapping
        Two models or state dicts with the same keys (e.g. initial and trained weights, or two
        trained seeds of one architecture).
    stiefel_metric : str
        See :func:`stiefel_dist`.  A parameter whose Stiefel distance cannot be computed and
        certified (:class:`~kernelgeo.manifolds.stiefel_log.StiefelLogError`) gets NaN, with
        a warning naming it and the reason; no other metric is substituted.
    kernels_only : bool
        Only parameters with at least 2 dims (kernels and linear weights).
    """
    sa, sb = _as_state(a), _as_state(b)
    out = {}
    for name, m in manifolds.items():
        if name not in sa or name not in sb:
            continue
        xa, xb = sa[name].detach(), sb[name].detach()
        if kernels_only and xa.dim() < 2:
            continue
        try:
            out[name] = float(kernel_dist(m, xa.double(), xb.double(),
                                          stiefel_metric=stiefel_metric))
        except StiefelLogError as err:
            warnings.warn(f"{name}: {stiefel_metric} distance not computed, recorded as NaN: "
                          f"{err}", stacklevel=2)
            out[name] = math.nan
    return out


def path_lengths(manifolds: Mapping[str, KernelManifold], checkpoints: Iterable, *,
                 stiefel_metric: str = "euclidean") -> dict[str, dict[str, float]]:
    """Length of the path travelled through a sequence of checkpoints, per parameter.

    The path is approximated by the geodesic polygon through the checkpoints (exact when
    every optimizer step is a checkpoint, as with :class:`PathRecorder`).

    Returns
    -------
    dict
        ``{name: {"path": sum of consecutive distances, "endpoint": first-to-last distance,
        "ratio": path / endpoint}}``.
    """
    cps = [_as_state(c) for c in checkpoints]
    if len(cps) < 2:
        raise ValueError("path_lengths needs at least two checkpoints")
    total: dict[str, float] = {}
    for prev, cur in zip(cps[:-1], cps[1:]):
        for k, v in layer_distances(manifolds, prev, cur, stiefel_metric=stiefel_metric).items():
            total[k] = total.get(k, 0.0) + v
    end = layer_distances(manifolds, cps[0], cps[-1], stiefel_metric=stiefel_metric)
    return {k: {"path": total[k], "endpoint": end[k],
                "ratio": total[k] / end[k] if end[k] > 0 else math.nan} for k in total}


class PathRecorder:
    r"""Optimizer hook: per-parameter length of the path travelled, step by step.

    Registers a pre-step and a post-step hook on ``optimizer``; after each step adds
    :math:`d(x_{t}, x_{t+1})` (geodesic for manifold kernels, Stiefel blocks by the cheap
    chordal distance by default since consecutive iterates are close and chordal and geodesic
    distances agree to :math:`O(d^3)`) and the squared Riemannian gradient norm of the step.

    Parameters
    ----------
    model : nn.Module
        Whose kernels are tracked (parameters with at least 2 dims).
    optimizer : torch.optim.Optimizer
    stiefel_metric : str
        Distance for Stiefel blocks (default ``"chordal"``).

    Attributes
    ----------
    length : dict
        ``{name: accumulated path length}``.
    start : dict
        ``{name: parameter value at the first recorded step}`` (for endpoint distances).
    steps : int
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
                 stiefel_metric: str = "chordal"):
        self.manifolds = {k: m for k, m in parameter_manifolds(model).items()}
        self.params = {k: p for k, p in model.named_parameters() if p.dim() >= 2}
        self.stiefel_metric = stiefel_metric
        self.length = {k: 0.0 for k in self.params}
        self.start = {k: p.detach().clone() for k, p in self.params.items()}
        self.steps = 0
        self._before: dict[str, torch.Tensor] = {}
        self._handles = [optimizer.register_step_pre_hook(self._pre),
                         optimizer.register_step_post_hook(self._post)]

    def _pre(self, opt, args, kwargs):
        self._before = {k: p.detach().clone() for k, p in self.params.items()}

    def _post(self, opt, args, kwargs):
        with torch.no_grad():
            for k, p in self.params.items():
                d = kernel_dist(self.manifolds[k], self._before[k].double(), p.detach().double(),
                                stiefel_metric=self.stiefel_metric)
                self.length[k] += float(d)
        self.steps += 1

    def endpoint(self, *, stiefel_metric: str = "euclidean") -> dict[str, float]:
        """Distance of each tracked parameter from where recording started."""
        cur = {k: p.detach() for k, p in self.params.items()}
        return layer_distances(self.manifolds, self.start, cur, stiefel_metric=stiefel_metric)

    def remove(self) -> None:
        """Detach the hooks from the optimizer."""
        for h in self._handles:
            h.remove()


def interpolate_state_dict(manifolds: Mapping[str, KernelManifold], a, b, t: float, *,
                           mode: str = "geodesic", stiefel_metric: str = "euclidean",
                           logs: dict | None = None) -> dict[str, torch.Tensor]:
    r"""State dict at :math:`t\in[0,1]` between ``a`` (t=0) and ``b`` (t=1).

    ``mode="geodesic"``: manifold kernels along their geodesics (:func:`geodesic`), the other
    parameters and float buffers on the straight line (the Euclidean geodesic);
    ``mode="linear"``: every tensor on the straight line :math:`(1-t)a + tb` (kernels leave
    their manifolds in between).  Integer buffers are taken from ``a``.  ``logs`` caches the
    logarithms across calls (pass the same dict for every ``t``).  Stiefel kernels follow a
    verified geodesic through both endpoints, the minimising one when it is shorter than the
    certified radius (:func:`stiefel_log`, ``certify=False``): far-apart kernels (a trained
    layer and its initialisation) still get a geodesic path.
    """
    if mode not in ("geodesic", "linear"):
        raise ValueError(f"mode must be 'geodesic' or 'linear', got {mode!r}")
    sa, sb = _as_state(a), _as_state(b)
    out = {}
    for k, va in sa.items():
        vb = sb[k]
        if not torch.is_floating_point(va):
            out[k] = va.clone()
            continue
        m = manifolds.get(k)
        if mode == "geodesic" and m is not None and not isinstance(m, Euclidean):
            if logs is not None and k in logs:
                log = logs[k]
            else:
                log = kernel_logmap(m, va.double(), vb.double(), stiefel_metric=stiefel_metric,
                                    certify=False)
                if logs is not None:
                    logs[k] = log
            out[k] = geodesic(m, va.double(), vb.double(), float(t),
                              stiefel_metric=stiefel_metric, log=log).to(va.dtype)
        else:
            out[k] = torch.lerp(va, vb.to(va.dtype), float(t))
    return out
