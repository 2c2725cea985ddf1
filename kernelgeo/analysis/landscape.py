r"""Loss landscapes around trained models: 1-D interpolations and 2-D slices.

Two kinds of 2-D slice around weights :math:`\theta` (Li et al. 2018, "Visualizing the Loss
Landscape of Neural Nets"):

``"euclidean"``
    :math:`\theta + \alpha d_1 + \beta d_2` with *filter-normalised* Gaussian directions:
    each filter (slice along dim 0) of a direction is rescaled to the norm of the same filter
    of :math:`\theta`; parameters with fewer than 2 dims (biases, batch-norm) get direction 0.
    Constrained kernels leave their manifolds along such a slice.
``"manifold"``
    manifold-aware: for every kernel on a manifold, Gaussian directions projected onto
    :math:`T_\theta\mathcal M` and rescaled *per component* to the norm of that component of
    :math:`\theta` (for sphere kernels exactly Li's filter normalisation, now tangent; for
    Stiefel blocks the block norm :math:`r\sqrt p`, since rescaling single columns would leave
    the tangent space), moved by the exponential map (or retraction)
    :math:`\mathrm{Exp}_\theta(\alpha d_1 + \beta d_2)`; unconstrained parameters as in the
    Euclidean slice.

On a sphere of radius :math:`r` a unit of :math:`\alpha` along a normalised tangent direction
turns every filter by one radian.  The centre of every slice (:math:`\alpha=\beta=0`) is
exactly :math:`\theta`.  Evaluation is batched on a fixed subset (:class:`Evaluator`), with
the model in ``eval`` mode so batch-norm uses its running statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..manifolds import Euclidean, KernelManifold, KernelProduct
from .geodesics import interpolate_state_dict, parameter_manifolds

__all__ = [
    "torch_threads", "Evaluator", "li_directions", "tangent_directions", "slice_params", "Slice2D",
    "landscape_2d", "landscape_1d",
]


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Temporarily run torch's CPU ops on ``n`` threads (``None``: leave unchanged).

    Small models evaluated many times run fastest single-threaded on a busy CPU (on a shared
    2-core machine one thread was 5-10x faster than two for the digits CNN).
    """
    if n is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(old)


class Evaluator:
    r"""Loss and accuracy of a model on a fixed subset, for arbitrary parameter values.

    Parameters
    ----------
    model : nn.Module
        The model; its parameters are replaced functionally
        (:func:`torch.func.functional_call`), never modified.
    inputs, targets : torch.Tensor
        The fixed evaluation subset (e.g. 512 training images and their labels).
    loss_fn : callable
        ``loss_fn(logits, targets) -> scalar`` (default cross-entropy, mean over the subset).
    batch_size : int, optional
        Evaluate in chunks of this size (default: the whole subset at once).
    """

    def __init__(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, *,
                 loss_fn=F.cross_entropy, batch_size: int | None = None):
        self.model = model
        self.inputs, self.targets = inputs, targets
        self.loss_fn = loss_fn
        self.batch_size = batch_size or len(inputs)
        self.calls = 0

    def base_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def __call__(self, state: Mapping[str, torch.Tensor] | None = None) -> tuple[float, float]:
        """``(loss, accuracy)`` with the given parameters/buffers (missing ones: the model's)."""
        was_training = self.model.training
        self.model.eval()
        try:
            tot_loss, correct, n = 0.0, 0, 0
            for s in range(0, len(self.inputs), self.batch_size):
                xb = self.inputs[s:s + self.batch_size]
                yb = self.targets[s:s + self.batch_size]
                if state is None:
                    out = self.model(xb)
                else:
                    out = torch.func.functional_call(self.model, dict(state), (xb,),
                                                     strict=False)
                tot_loss += float(self.loss_fn(out, yb)) * len(xb)
                correct += int((out.argmax(1) == yb).sum())
                n += len(xb)
        finally:
            self.model.train(was_training)
        self.calls += 1
        return tot_loss / n, correct / n


def _filter_normalize(d: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    dn = d.flatten(1).norm(dim=1).clamp_min(torch.finfo(d.dtype).tiny)
    wn = w.flatten(1).norm(dim=1)
    return d * (wn / dn).reshape(-1, *([1] * (d.dim() - 1)))


def li_directions(model: torch.nn.Module, *, generator: torch.Generator | None = None
                  ) -> dict[str, torch.Tensor]:
    r"""Filter-normalised Gaussian direction of Li et al. (2018), one tensor per parameter.

    For a parameter with at least 2 dims, :math:`d_i \leftarrow d_i\,\|w_i\|/\|d_i\|` for
    every filter :math:`i` (slice along dim 0); biases and batch-norm parameters get 0.

    Returns
    -------
    dict
        ``{parameter name: direction}`` (same shapes and dtypes as the parameters).
    """
    out = {}
    for name, p in model.named_parameters():
        w = p.detach()
        if w.dim() < 2:
            out[name] = torch.zeros_like(w)
        else:
            d = torch.randn(w.shape, dtype=w.dtype, device=w.device, generator=generator)
            out[name] = _filter_normalize(d, w)
    return out


def _component_normalize(m: KernelManifold, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if isinstance(m, KernelProduct):
        out = torch.empty_like(u)
        for mi, idx in m.blocks(x.shape):
            out[idx] = _component_normalize(mi, x[idx], u[idx])
        return out
    if isinstance(m, Euclidean):
        return _filter_normalize(u, x) if x.dim() >= 2 else u
    xb, ub = m.to_batch(x), m.to_batch(u)
    scale = xb.flatten(1).norm(dim=1) / ub.flatten(1).norm(dim=1).clamp_min(
        torch.finfo(u.dtype).tiny)
    return m.from_batch(ub * scale.reshape(-1, *([1] * (ub.dim() - 1))), x.shape)


def tangent_directions(model: torch.nn.Module, *, generator: torch.Generator | None = None
                       ) -> dict[str, torch.Tensor]:
    """Manifold-aware random direction: tangent, component-normalised (see module docstring).

    Parameters that are not on a kernel manifold get the :func:`li_directions` treatment.
    """
    mans = parameter_manifolds(model)
    out = {}
    for name, p in model.named_parameters():
        w = p.detach()
        m = mans[name]
        if isinstance(m, Euclidean):
            d = torch.randn(w.shape, dtype=w.dtype, device=w.device, generator=generator)
            out[name] = _filter_normalize(d, w) if w.dim() >= 2 else torch.zeros_like(w)
        else:
            g = torch.randn(w.shape, dtype=w.dtype, device=w.device, generator=generator)
            out[name] = _component_normalize(m, w, m.proju(w, g))
    return out


def slice_params(base: Mapping[str, torch.Tensor], manifolds: Mapping[str, KernelManifold],
                 d1: Mapping[str, torch.Tensor], d2: Mapping[str, torch.Tensor] | None,
                 a: float, b: float = 0.0, *, mode: str = "euclidean", move: str = "expmap"
                 ) -> dict[str, torch.Tensor]:
    r"""Parameters at :math:`(\alpha, \beta)` of a slice; only the keys of ``d1`` change.

    ``mode="euclidean"``: :math:`\theta + \alpha d_1 + \beta d_2`; ``mode="manifold"``:
    manifold kernels by ``move`` (``"expmap"`` or ``"retr"``) of :math:`\alpha d_1+\beta d_2`.
    """
    out = dict(base)
    for k, u in d1.items():
        step = a * u if d2 is None else a * u + b * d2[k]
        m = manifolds.get(k)
        x = base[k]
        if mode == "manifold" and m is not None and not isinstance(m, Euclidean):
            out[k] = (m.expmap(x, step) if move == "expmap" else m.retr(x, step)) \
                if (a or b) else x
        else:
            out[k] = x + step
    return out


@dataclass
class Slice2D:
    """A 2-D landscape: ``loss[i, j]`` and ``acc[i, j]`` at ``(alphas[i], betas[j])``."""

    alphas: np.ndarray
    betas: np.ndarray
    loss: np.ndarray
    acc: np.ndarray
    mode: str
    seconds: float

    @property
    def center(self) -> tuple[float, float]:
        i, j = int(np.argmin(np.abs(self.alphas))), int(np.argmin(np.abs(self.betas)))
        return float(self.loss[i, j]), float(self.acc[i, j])


def landscape_2d(model: torch.nn.Module, evaluator: Evaluator, *, mode: str = "euclidean",
                 span: float = 1.0, points: int = 21, move: str = "expmap",
                 directions: tuple[Mapping, Mapping] | None = None,
                 generator: torch.Generator | None = None,
                 num_threads: int | None = None) -> Slice2D:
    """Loss/accuracy on a ``points x points`` grid over ``[-span, span]^2`` around ``model``.

    Parameters
    ----------
    model : nn.Module
    evaluator : Evaluator
        Built on the same model.
    mode : {"euclidean", "manifold"}
        Li et al. filter-normalised directions on straight lines, or tangent directions moved
        by ``move``.
    span, points
        Grid extent and size (use an odd ``points`` so that 0 is a grid point).
    directions : (d1, d2), optional
        Own directions (e.g. shared between models); default: drawn from ``generator``.
    num_threads : int, optional
        Torch CPU threads during the evaluation (see :func:`torch_threads`).
    """
    import time

    if mode not in ("euclidean", "manifold"):
        raise ValueError(f"mode must be 'euclidean' or 'manifold', got {mode!r}")
    if directions is None:
        draw = li_directions if mode == "euclidean" else tangent_directions
        directions = (draw(model, generator=generator), draw(model, generator=generator))
    d1, d2 = directions
    base = evaluator.base_state()
    mans = parameter_manifolds(model)
    alphas = np.linspace(-span, span, points)
    betas = np.linspace(-span, span, points)
    loss = np.empty((points, points))
    acc = np.empty((points, points))
    t0 = time.perf_counter()
    with torch.no_grad(), torch_threads(num_threads):
        for i, a in enumerate(alphas):
            for j, b in enumerate(betas):
                st = slice_params(base, mans, d1, d2, float(a), float(b), mode=mode, move=move)
                loss[i, j], acc[i, j] = evaluator(st)
    return Slice2D(alphas, betas, loss, acc, mode, time.perf_counter() - t0)


def landscape_1d(model: torch.nn.Module, evaluator: Evaluator, a, b,
                 ts: Sequence[float] | None = None, *, stiefel_metric: str = "euclidean"
                 ) -> dict[str, np.ndarray]:
    """Loss and accuracy along the geodesic and along the straight line from ``a`` to ``b``.

    Parameters
    ----------
    model : nn.Module
        Architecture (and manifolds) of both endpoints.
    evaluator : Evaluator
    a, b : nn.Module or state dict
        Endpoints (t = 0 and t = 1), e.g. two trained seeds or initial and final weights.
    ts : sequence of float
        Default: 21 points on ``[-0.25, 1.25]`` (a little beyond the endpoints).

    Returns
    -------
    dict
        ``{"t", "geodesic_loss", "geodesic_acc", "linear_loss", "linear_acc"}`` arrays.
    """
    ts = np.linspace(-0.25, 1.25, 21) if ts is None else np.asarray(ts, dtype=float)
    mans = parameter_manifolds(model)
    out = {"t": ts}
    for mode in ("geodesic", "linear"):
        logs: dict = {}
        ls, accs = [], []
        for t in ts:
            st = interpolate_state_dict(mans, a, b, float(t), mode=mode,
                                        stiefel_metric=stiefel_metric, logs=logs)
            loss, acc = evaluator(st)
            ls.append(loss)
            accs.append(acc)
        out[f"{mode}_loss"] = np.array(ls)
        out[f"{mode}_acc"] = np.array(accs)
    return out
