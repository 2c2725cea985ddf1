r"""Stiefel manifolds of kernels: orthonormal filters (orthogonal weight normalization).

:math:`\mathrm{St}(n,p)=\{X\in\mathbb{R}^{n\times p} : X^\top X = r^2 I_p\}` with the metric
inherited from :math:`\mathbb{R}^{n\times p}` (the *embedded* or Euclidean metric).  Two ways to
put a conv weight ``(out, in, *k)`` on it:

``per="filter"`` (default)
    the ``out`` filters, flattened to length :math:`n` (fan-in), are the columns of
    :math:`X = W_{\text{flat}}^\top\in\mathrm{St}(n,\text{out})`.  When ``out > n`` the output
    channels are split into ``G`` equal groups of :math:`p\le n` (the smallest ``G`` dividing
    ``out``), each on its own :math:`\mathrm{St}(n,p)` (group orthogonalisation, as in Huang et
    al.'s OWN).  Layout ``(G, n, p)``.
``per="slice"``
    each 2-D slice :math:`W_{d,c}` (``a x b``, see :mod:`~kernelgeo.manifolds.oblique`) is on
    :math:`\mathrm{St}(a,b)` (transposed when :math:`a<b`).  Layout ``(out * in, max, min)``.

Operations (unit radius; radius :math:`r` by scaling :math:`X = rY`):

.. math::

    P_Y(U) &= U - Y\,\mathrm{sym}(Y^\top U),\qquad \mathrm{sym}(A) = (A + A^\top)/2, \\
    R_Y(U) &= \mathrm{qf}(Y + U)\quad\text{(QR with } \operatorname{diag}(R) > 0\text{)}
        \ \text{or}\ \mathrm{polar}(Y+U), \\
    \mathrm{Exp}_Y(U) &= [Y\ U]\,\exp\!\begin{pmatrix}A & -S\\ I & A\end{pmatrix}
        \begin{pmatrix}e^{-A}\\ 0\end{pmatrix},\quad A = Y^\top U,\ S = U^\top U

(Edelman, Arias & Smith 1998, eq. 2.45).  There is no closed-form logarithm or distance for
the embedded metric (except on :math:`O(p)`); :mod:`kernelgeo.manifolds.stiefel_log`
computes verified ones, used by :meth:`Stiefel.logmap` and :meth:`Stiefel.component_dist`.
"""

from __future__ import annotations

import math

import torch

from .base import KernelManifold, KernelShapeError
from .oblique import _slice_matrix

__all__ = ["Stiefel", "stiefel_groups", "stiefel_log_batch", "stiefel_dist_batch"]


def _sym(a: torch.Tensor) -> torch.Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


def stiefel_groups(out: int, n: int, group_size: int | None = None) -> int:
    """Number of equal groups of output channels for per-filter Stiefel kernels.

    Parameters
    ----------
    out : int
        Number of filters (columns).
    n : int
        Fan-in (length of a column).
    group_size : int, optional
        Requested columns per group; must divide ``out`` and be at most ``n``.

    Returns
    -------
    int
        The smallest ``G`` with ``out % G == 0`` and ``out // G <= n`` (or ``out // group_size``).
    """
    if group_size is not None:
        if group_size < 1 or out % group_size or group_size > n:
            raise KernelShapeError(
                f"group_size={group_size} must divide out={out} and be at most the fan-in n={n}"
            )
        return out // group_size
    for g in range(1, out + 1):
        if out % g == 0 and out // g <= n:
            return g
    raise KernelShapeError(f"no grouping of {out} filters into Stiefel blocks with n={n}")


def _qf(m: torch.Tensor) -> torch.Tensor:
    q, r = torch.linalg.qr(m)
    # sign correction makes the factor unique (diag(R) > 0) and the retraction smooth
    d = torch.diagonal(r, dim1=-2, dim2=-1)
    s = torch.where(d < 0, -1.0, 1.0).to(m.dtype)
    return q * s.unsqueeze(-2)


def _polar(m: torch.Tensor, precise: bool = False) -> torch.Tensor:
    if precise and m.dtype in (torch.float16, torch.bfloat16, torch.float32):
        # a float32 SVD of a 2304x512 kernel leaves ~3e-5 of orthogonality error; the
        # projection is off the hot path, so do it in float64
        return _polar(m.double()).to(m.dtype)
    u, _, vh = torch.linalg.svd(m, full_matrices=False)
    return u @ vh


def _unit64(x: torch.Tensor, r: float) -> torch.Tensor:
    # float32 kernels are orthonormal only to ~1e-7: project in float64 so that the endpoint
    # tolerance measures the method, not the inputs' round-off
    return _polar(x.detach().to("cpu", torch.float64) / r)


def stiefel_log_batch(x: torch.Tensor, y: torch.Tensor, r: float = 1.0, *,
                      metric: str = "euclidean", tol: float = 1e-9, max_iter: int = 100,
                      certify: bool = True, return_info: bool = False):
    r"""Riemannian logarithm :math:`\mathrm{Log}_X(Y)` on :math:`\mathrm{St}(n,p)` of radius r.

    Parameters
    ----------
    x, y : torch.Tensor
        Points ``(G, n, p)`` with :math:`X^\top X = Y^\top Y = r^2 I` (to round-off).
    r : float
        Radius.
    metric : {"euclidean", "canonical"}
        Embedded (Euclidean) metric, the one kernels are trained with, or the canonical metric.
    tol : float
        Bound on the endpoint error :math:`\|\mathrm{Exp}_X(\Delta) - Y\|_F/r`, checked.
    max_iter : int
        Iteration cap of the inner solvers.
    certify : bool
        Refuse (``True``) logarithms longer than the radius within which geodesics are
        certainly minimising (:math:`\pi r` embedded, :math:`\sqrt{4/5}\pi r` canonical).
    return_info : bool
        Also return ``{"residual", "methods", "lengths"}``.

    Returns
    -------
    torch.Tensor
        ``(G, n, p)`` in ``x``'s dtype (computed in float64 on the polar projections).

    Raises
    ------
    ~kernelgeo.manifolds.stiefel_log.StiefelLogError
        With the reason; see :mod:`kernelgeo.manifolds.stiefel_log`.
    """
    from .stiefel_log import stiefel_log_unit

    u, info = stiefel_log_unit(_unit64(x, r), _unit64(y, r), metric=metric, tol=tol,
                               max_iter=max_iter, certify=certify, return_info=True)
    out = (r * u).to(dtype=x.dtype, device=x.device)
    if return_info:
        info["lengths"] = r * info["lengths"]
        return out, info
    return out


def stiefel_dist_batch(x: torch.Tensor, y: torch.Tensor, r: float = 1.0, *,
                       metric: str = "euclidean", **kwargs) -> torch.Tensor:
    r"""Geodesic distances ``(G,)`` on :math:`\mathrm{St}(n,p)` of radius r (``x``'s dtype).

    Closed form on :math:`O(p)` (``inf`` between its two components); otherwise the length of
    the verified, certified logarithm (:func:`stiefel_log_batch`, same keywords).
    """
    from .stiefel_log import stiefel_dist_unit

    d = stiefel_dist_unit(_unit64(x, r), _unit64(y, r), metric=metric, **kwargs)
    return (r * d).to(dtype=x.dtype, device=x.device)


class Stiefel(KernelManifold):
    r"""Orthonormal kernels on :math:`\mathrm{St}(n,p)` with the embedded metric.

    Parameters
    ----------
    per : {"filter", "slice"}
        Filters as columns (default) or each 2-D slice as a matrix.
    group_size : int, optional
        Columns per Stiefel block for ``per="filter"`` (default: as large as possible).
    retraction : {"qr", "polar"}
        QR-based retraction with sign correction (default, cheapest) or the polar retraction
        (the metric projection of :math:`Y + U`).
    radius, radius_scale
        :math:`X^\top X = r^2 I`; ``"fan_in"`` uses :math:`r\sqrt{n}`.

    Notes
    -----
    Facts for one component :math:`\mathrm{St}(n,p)`, radius 1 (divide curvatures by :math:`r^2`,
    multiply lengths by :math:`r`); :doc:`/theory/stiefel` has the derivations and sources.

    * dimension :math:`np - p(p+1)/2`;
    * sectional curvature :math:`K = \|UV^\top\|^2 - \|\mathrm{sym}(U^\top V)\|^2` for
      orthonormal tangent :math:`U, V` (Gauss equation).  Range by shape, every end attained:
      :math:`[-\tfrac12, 1]` for :math:`n-p\ge 2,\ p\ge 2`; :math:`[-\tfrac12, \tfrac12]` for
      :math:`n = p+1,\ p\ge 2` (the upper end measured by optimisation, no proof here);
      :math:`1` for :math:`p = 1` (a sphere); :math:`O(p)` (:math:`n=p`): flat circles for
      :math:`p=2`, constant :math:`\tfrac18` for :math:`p=3`, :math:`[0,\tfrac14]` for
      :math:`p\ge 4`;
    * injectivity radius :math:`\pi` for :math:`p<n` (Zimmermann & Stoye 2024),
      :math:`\pi\sqrt2` for :math:`O(p)`;
    * diameter :math:`\pi\sqrt p` for :math:`p<n`, :math:`\pi\sqrt{2\lfloor p/2\rfloor}` for
      each component of :math:`O(p)` (points of different components are at distance
      :math:`+\infty`: :meth:`component_dist` returns ``inf``, :meth:`logmap` raises).

    ``logmap`` and ``component_dist`` are those of the embedded metric, computed numerically
    (:mod:`kernelgeo.manifolds.stiefel_log`: verified endpoint, certified minimality; they
    raise :class:`~kernelgeo.manifolds.stiefel_log.StiefelLogError` otherwise) in float64 on
    the float64 polar projections of the inputs, and are not differentiable.
    """

    #: ``(G, n, p)`` frames: the optimizers' fused Stiefel update applies with
    #: ``retraction="qr"`` (see :class:`~kernelgeo.manifolds.KernelManifold`)
    batched_layout = "matrices"

    def __init__(self, per: str = "filter", group_size: int | None = None,
                 retraction: str = "qr", radius: float = 1.0, radius_scale=None):
        if per not in ("filter", "slice"):
            raise ValueError(f"Stiefel per must be 'filter' or 'slice', got {per!r}")
        if retraction not in ("qr", "polar"):
            raise ValueError(f"Stiefel retraction must be 'qr' or 'polar', got {retraction!r}")
        if group_size is not None and per != "filter":
            raise ValueError("group_size applies to per='filter' only")
        super().__init__(radius=radius, radius_scale=radius_scale)
        self.per = per
        self.group_size = group_size
        self.retraction = retraction
        self.name = "stiefel" if per == "filter" else "stiefel-slice"

    # -- layout
    def _np(self, shape) -> tuple[int, int, int]:
        """(G, n, p) of the canonical layout."""
        if self.per == "filter":
            out = shape[0]
            n = math.prod(shape[1:])
            g = stiefel_groups(out, n, self.group_size)
            return g, n, out // g
        a, b = _slice_matrix(shape)
        return shape[0] * shape[1], max(a, b), min(a, b)

    def check_kernel_shape(self, shape):
        super().check_kernel_shape(shape)
        if self.per == "slice" and len(shape) < 3:
            raise KernelShapeError(
                f"stiefel-slice needs a conv weight (out, in, *kernel_size); got {tuple(shape)}"
            )
        _, n, p = self._np(shape)
        if n < 2:
            raise KernelShapeError(
                f"{self.name} on a kernel of shape {tuple(shape)} gives St({n},{p}), a finite set "
                "of points; use a geometry with a larger component"
            )

    def radius_of(self, shape):
        if self.radius_scale == "fan_in":
            return self.radius * math.sqrt(self._np(shape)[1])
        return self.radius

    def to_batch(self, x):
        shape = x.shape
        g, n, p = self._np(shape)
        if self.per == "filter":
            return x.reshape(g, p, n).transpose(-1, -2)
        a, b = _slice_matrix(shape)
        m = x.reshape(g, a, b)
        return m if a >= b else m.transpose(-1, -2)

    def from_batch(self, y, shape):
        if self.per == "filter":
            return y.transpose(-1, -2).reshape(shape)
        a, b = _slice_matrix(shape)
        return (y if a >= b else y.transpose(-1, -2)).reshape(shape)

    def batch_key(self, shape):
        return (type(self).__name__, self.point_shape(shape), self.radius_of(shape),
                self.retraction)

    # -- facts
    def component_dim(self, shape):
        _, n, p = self._np(shape)
        return n * p - p * (p + 1) // 2

    def curvature_bounds(self, shape):
        _, n, p = self._np(shape)
        r2 = self.radius_of(shape) ** 2
        if self.component_dim(shape) < 2:  # a circle (St(2,1), O(2)) has no 2-planes
            return (0.0, 0.0)
        if p == 1:
            return (1.0 / r2, 1.0 / r2)
        if n == p:  # O(p), bi-invariant: K = |[A, C]|^2 / 4 for orthonormal skew A, C
            return (0.125 / r2, 0.125 / r2) if p == 3 else (0.0, 0.25 / r2)
        if n == p + 1:  # K = 1 needs two orthonormal directions normal to span(Y)
            return (-0.5 / r2, 0.5 / r2)
        return (-0.5 / r2, 1.0 / r2)

    def injectivity_radius(self, shape):
        _, n, p = self._np(shape)
        r = self.radius_of(shape)
        if n == p:  # O(p): shortest geodesic loops have length 2 pi sqrt 2 (O(2) included)
            return math.pi * math.sqrt(2.0) * r
        return math.pi * r

    def diameter(self, shape):
        _, n, p = self._np(shape)
        if n == p:  # one component of O(p): all rotation angles pi, |Omega|^2 = 2 sum theta^2
            return math.pi * math.sqrt(2 * (p // 2)) * self.radius_of(shape)
        return math.pi * math.sqrt(p) * self.radius_of(shape)

    def describe(self, shape):
        g, n, p = self._np(shape)
        return f"{g} x St({n},{p})(r={self.radius_of(shape):.4g})"

    # -- batched primitives on (G, n, p)
    def _bprojx(self, x, r):
        return r * _polar(x, precise=True)

    def _bproju(self, x, u, r):
        return u - x @ _sym(x.transpose(-1, -2) @ u) / (r * r)

    def _bretr(self, x, u, r):
        m = (x + u) / r
        return r * (_qf(m) if self.retraction == "qr" else _polar(m))

    def _bexpmap(self, x, u, r):
        y, v = x / r, u / r
        p = y.shape[-1]
        a = y.transpose(-1, -2) @ v
        s = v.transpose(-1, -2) @ v
        eye = torch.eye(p, dtype=x.dtype, device=x.device).expand_as(a)
        top = torch.cat([a, -s], dim=-1)
        bot = torch.cat([eye, a], dim=-1)
        e = torch.linalg.matrix_exp(torch.cat([top, bot], dim=-2))
        ema = torch.linalg.matrix_exp(-a)
        z = torch.cat([y, v], dim=-1) @ (e[..., :, :p] @ ema)
        return r * z

    def _blog(self, x, y, r, metric="euclidean", **kwargs):
        """Verified logarithm on ``(G, n, p)`` batches (see :func:`stiefel_log_batch`)."""
        return stiefel_log_batch(x, y, r, metric=metric, **kwargs)

    def _blogmap(self, x, y, r):
        return self._blog(x, y, r)

    def _bdist(self, x, y, r):
        return stiefel_dist_batch(x, y, r)

    def _bconstraint_error(self, x, r):
        # ||Y^T Y - I||_F / 2 equals the Frobenius distance to the nearest point r*polar(X),
        # r ||sigma - 1||, to first order; a Gram matrix is far cheaper than an SVD
        y = x / r
        eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device)
        return torch.linalg.matrix_norm(y.transpose(-1, -2) @ y - eye) * (0.5 * r)

    def _brandom(self, shape_b, r, *, dtype, device, generator=None):
        g = torch.randn(shape_b, dtype=dtype, device=device, generator=generator)
        return r * _qf(g)  # QR of a Gaussian with sign correction is Haar-distributed

    def extra_repr(self):
        s = f"per={self.per!r}, retraction={self.retraction!r}"
        if self.group_size:
            s += f", group_size={self.group_size}"
        return s + ", " + super().extra_repr()
