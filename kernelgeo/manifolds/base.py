r"""Base class of the kernel manifolds.

A convolution weight :math:`W` has shape ``(out, in/groups, *kernel_size)``.  Every kernel
manifold works on that tensor **in its own shape**, so a :class:`geoopt.ManifoldParameter`
can replace ``conv.weight`` in place.  Internally each manifold views :math:`W` as a batch of
``B`` *components* in a canonical layout (``to_batch``), e.g. ``(out, n)`` rows for spheres or
``(G, n, p)`` matrices for Stiefel, and implements every operation once, batched, on that
layout.  The optimizer's fast path concatenates the canonical layouts of many parameters that
share a :meth:`KernelManifold.batch_key` and calls the same batched operations.

The manifold of a whole layer is the product of its components; the metric is the sum of the
components' metrics, distances combine as :math:`d(x,y)^2=\sum_k d_k(x_k,y_k)^2`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._compat import Manifold, ManifoldTensor

__all__ = ["KernelManifold", "KernelShapeError", "radius_for_shape", "BATCHED_LAYOUTS"]

#: Values of :attr:`KernelManifold.batched_layout` (besides ``None``), see its docstring.
BATCHED_LAYOUTS = ("rows", "columns", "matrices")

#: The maths a layout declaration covers: a class that defines (or replaces) one of these
#: after the class that declared the layout has not declared anything (see
#: :meth:`KernelManifold.effective_batched_layout`).
_LAYOUT_MATHS = ("to_batch", "from_batch", "_center", "_bprojx", "_bproju", "_bretr",
                 "_btransp", "_binner", "batched_projx", "batched_proju", "batched_retr",
                 "batched_transp", "batched_inner")


def _safe_sqrt(t: torch.Tensor) -> torch.Tensor:
    """``sqrt`` whose gradient at 0 is 0 instead of NaN (distances at coincident points)."""
    pos = t > 0
    return torch.where(pos, t.clamp_min(torch.finfo(t.dtype).tiny).sqrt(), 0.0)


def _size(size) -> tuple[int, ...]:
    """``(8, 4, 3, 3)`` from ``random(8, 4, 3, 3)`` or ``random((8, 4, 3, 3))``."""
    if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
        size = size[0]
    return tuple(int(s) for s in size)


class KernelShapeError(ValueError):
    """A kernel tensor cannot hold the requested manifold (names shape and reason)."""


def _fan_in(shape: Sequence[int]) -> int:
    return int(math.prod(shape[1:]))


def radius_for_shape(radius: float, scale: str | None, shape: Sequence[int]) -> float:
    r"""Radius of a layer's kernel manifold.

    Parameters
    ----------
    radius : float
        Base radius :math:`r_0 > 0`.
    scale : {None, "fan_in"}
        ``None`` keeps :math:`r = r_0`; ``"fan_in"`` uses :math:`r = r_0\sqrt{n}` with
        :math:`n` the fan-in of one filter, i.e. the norm of a filter whose entries have unit
        variance (the scale of a Kaiming-initialised filter up to a constant).
    shape : sequence of int
        Kernel shape ``(out, in/groups, *kernel_size)``.

    Returns
    -------
    float
    """
    if scale is None:
        return float(radius)
    if scale == "fan_in":
        return float(radius) * math.sqrt(_fan_in(shape))
    raise ValueError(f"unknown radius scale {scale!r}; use None or 'fan_in'")


class KernelManifold(Manifold):
    r"""Abstract kernel manifold working on conv weights of shape ``(out, in, *k)``.

    Subclasses provide the canonical layout (:meth:`to_batch`, :meth:`from_batch`), the
    batched primitives ``_b*`` on it (public entry points: :meth:`batched_projx`,
    :meth:`batched_proju`, :meth:`batched_retr`, :meth:`batched_transp`,
    :meth:`batched_inner`), the geometric facts, and optionally a
    :attr:`batched_layout` declaration that lets optimizers use a fused update.  All public
    geoopt methods (``projx``, ``proju``, ``egrad2rgrad``, ``inner``, ``norm``, ``retr``,
    ``expmap``, ``logmap``, ``dist``, ``transp``, ``retr_transp``, ``random``) are
    implemented here once on top of those.

    Parameters
    ----------
    radius : float
        Radius :math:`r` of every component (default 1).  Under batch normalisation the radius
        does not change the network's function (the following BN divides it out) but scales
        the effective learning rate of the layer by :math:`1/r^2` in angle per step.
    radius_scale : {None, "fan_in"}
        Optionally multiply the radius by :math:`\sqrt{\text{fan-in}}` of the layer.

    Notes
    -----
    **geoopt's Manifold contract.**  Kept: every public method of
    :class:`geoopt.manifolds.Manifold` with its signature and meaning; ``egrad2rgrad`` is
    ``proju`` (embedded metric); ``inner``, ``norm``, ``dist`` and ``dist2`` reduce over the
    whole kernel and ``keepdim=True`` keeps every dim as 1; :meth:`component_inner` is the
    inner product of each component (sphere row, oblique column or slice, Stiefel block)
    broadcast to the kernel's shape, the second moment of
    :class:`geoopt.optim.RiemannianAdam`; :meth:`random`, :meth:`random_uniform` and
    :meth:`origin` return a :class:`geoopt.ManifoldTensor` whose ``.manifold`` is this
    manifold; ``check_point*`` and ``check_vector*`` check the kernel shape (a ``ValueError``
    naming the reason) and the constraint; :class:`geoopt.Scaled` wraps a kernel manifold
    like any other.  Deliberately different:

    * *No batch dimensions.*  Every dim of a tensor belongs to the kernel (``(out, in, *k)``
      or a linear ``(out, in)``), so a tensor with a leading batch dim is a different,
      larger kernel and geoopt's broadcasting over leading dims does not apply; :attr:`ndim`
      is the smallest rank accepted.
    * ``reversible = False``: the retractions (row normalisation, QR, polar) followed by the
      projection transport are not undone by stepping back along the transported vector
      (as for geoopt's own Sphere and Stiefel); :class:`~kernelgeo.manifolds.Euclidean` is
      reversible.
    * :meth:`projx` of a point already on the manifold returns it up to rounding (entries
      move by at most about ``1e-15`` times the radius in float64 and ``3e-7`` in float32),
      so geoopt's assumption that re-projecting a point changes it does not hold.
    * :meth:`transp` is the projection transport (Absil et al. 8.1.3), not parallel
      transport (spheres offer :meth:`~kernelgeo.manifolds.RowSphere.parallel_transp`).
    * ``logmap``, ``dist`` and ``dist2`` raise :class:`NotImplementedError` where a geometry
      has no closed form, as geoopt's Stiefel does.
    * :meth:`origin` has no distinguished point: it is :meth:`random` from a private
      generator seeded with ``seed`` (the zero kernel on ``euclidean``).
    * :meth:`random` also takes a ``generator``.
    * Two kernel manifolds compare by identity (``nn.Module`` semantics, as in geoopt), so
      ``ManifoldParameter(m.random(shape), manifold=m2)`` with another instance ``m2`` raises
      geoopt's "Manifolds do not match"; pass the same instance or omit ``manifold``.

    **Batched protocol.**  The ``batched_*`` methods take canonical tensors ``(B,
    *point_shape)`` (:meth:`to_batch`) and the radius ``r`` of the kernel's shape
    (:meth:`radius_of`); :class:`~kernelgeo.optim.ConvergentRSGD` and
    :class:`~kernelgeo.optim.RiemannianAdam` update any kernel manifold through them (the
    *generic* path).  A fused update, which does not call them, is used only for a manifold
    that declares its geometry and memory layout with :attr:`batched_layout`:

    ``"rows"``
        every component is a row of ``x.reshape(B, n)`` (a view of the kernel), on the
        sphere of radius ``r`` (centred first when :attr:`batched_centered`): projection
        :math:`u - \langle x, Cu\rangle x/r^2`, retraction :math:`r\,C y/\|C y\|`,
        projection transport, embedded metric;
    ``"columns"``
        the same sphere geometry on the columns of every 2-D slice ``(a, b)`` of the kernel
        (``kernelgeo.manifolds.oblique._slice_matrix``): ``x.reshape(o, i, a, b)[..., j]``;
    ``"matrices"``
        every component is an ``(n, p)`` frame with :math:`X^\top X = r^2 I` (the layout of
        :class:`~kernelgeo.manifolds.Stiefel`, whose ``per`` and ``retraction`` attributes it
        reads): projection :math:`U - X\,\mathrm{sym}(X^\top U)/r^2`, retraction
        :math:`r\,\mathrm{qf}((X + U)/r)` (``retraction="qr"``, fused) or the polar factor
        (``"polar"``, generic path), projection transport.

    Each declared retraction is invariant to positive scaling of :math:`x + u`, which the
    optimizer's overflow-safe reference path relies on.  The declaration covers the maths of
    the class that makes it: a subclass that overrides a batched primitive, the centring or
    the canonical layout (or code that replaces one on the class) without declaring
    :attr:`batched_layout` again gets ``None`` from :meth:`effective_batched_layout` and is
    updated by the generic path, with its own maths.
    """

    name = "kernel"
    #: geoopt's ``retr_transp`` round trip is not an identity for these retractions
    reversible = False
    #: smallest tensor rank accepted (a conv weight has at least 3 dims, a linear weight 2)
    min_rank = 2
    #: fused-update declaration: ``"rows"``, ``"columns"``, ``"matrices"`` or ``None`` (the
    #: generic path only); see the class docstring.  Subclasses may make it a property.
    batched_layout: str | None = None
    #: with a ``"rows"`` or ``"columns"`` layout: whether vectors are centred (zero mean over
    #: the component) before the sphere's projection
    batched_centered: bool = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "batched_layout" in cls.__dict__:  # record the maths this declaration covers
            cls._batched_declared = (cls, {n: getattr(cls, n, None) for n in _LAYOUT_MATHS})

    def effective_batched_layout(self) -> str | None:
        """:attr:`batched_layout` if the maths it was declared for is still this object's
        (same batched primitives, centring and canonical layout as the declaring class had
        when it was defined), else ``None``: optimizers then use the generic path."""
        layout = self.batched_layout
        if layout is None:
            return None
        if layout not in BATCHED_LAYOUTS:
            raise ValueError(f"{type(self).__name__}.batched_layout={layout!r}; use one of "
                             f"{BATCHED_LAYOUTS} or None")
        decl = getattr(type(self), "_batched_declared", None)
        if decl is None:
            return None
        cls = type(self)
        if any(getattr(cls, n, None) is not f for n, f in decl[1].items()):
            return None
        return layout

    @property
    def ndim(self) -> int:
        """geoopt's number of trailing dims that form one point: every dim of a kernel does,
        so this is the smallest rank accepted (:attr:`min_rank`)."""
        return self.min_rank

    def __init__(self, radius: float = 1.0, radius_scale: str | None = None):
        super().__init__()
        if not (radius > 0 and math.isfinite(radius)):
            raise ValueError(f"radius must be a positive finite number, got {radius!r}")
        if radius_scale not in (None, "fan_in"):
            raise ValueError(f"radius_scale must be None or 'fan_in', got {radius_scale!r}")
        self.radius = float(radius)
        self.radius_scale = radius_scale

    # ------------------------------------------------------------------ layout
    def radius_of(self, shape: Sequence[int]) -> float:
        """Radius :math:`r` used for a kernel of this shape."""
        return radius_for_shape(self.radius, self.radius_scale, shape)

    def check_kernel_shape(self, shape: Sequence[int]) -> None:
        """Raise :class:`KernelShapeError` if a kernel of ``shape`` cannot hold this manifold."""
        if len(shape) < self.min_rank:
            raise KernelShapeError(
                f"{self.name} needs a weight with at least {self.min_rank} dims "
                f"(out, in, *kernel_size); got shape {tuple(shape)}"
            )

    def point_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of one component in the canonical layout (without the batch dim)."""
        return tuple(self.to_batch(torch.empty(tuple(shape), device="meta")).shape[1:])

    def num_components(self, shape: Sequence[int]) -> int:
        """Number ``B`` of component manifolds of a kernel of ``shape``."""
        return int(self.to_batch(torch.empty(tuple(shape), device="meta")).shape[0])

    def to_batch(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """View ``x`` (``(out, in, *k)``) as ``(B, *point_shape)`` (a view when possible)."""
        raise NotImplementedError

    def from_batch(self, b: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
        """Inverse of :meth:`to_batch`: ``(B, *point_shape)`` back to ``shape``."""
        raise NotImplementedError  # pragma: no cover - abstract

    def batch_key(self, shape: Sequence[int]) -> tuple:
        """Hashable key: kernels with equal keys can be concatenated along the batch dim and
        updated by one call of the batched primitives."""
        return (type(self).__name__, self.point_shape(shape), self.radius_of(shape))

    def blocks(self, shape: Sequence[int]) -> list[tuple[KernelManifold, tuple[slice, ...]]]:
        """Sub-tensors of a kernel and the (non-product) manifold each lives on.

        A plain manifold returns itself with the full index; a product returns one entry per
        group (see :class:`~kernelgeo.manifolds.product.KernelProduct`).
        """
        return [(self, (slice(None),))]

    # ------------------------------------------------------------ geometric facts
    def dim(self, shape: Sequence[int]) -> int:
        """Dimension of the manifold of a whole kernel of ``shape`` (sum over components)."""
        return self.num_components(shape) * self.component_dim(shape)

    def component_dim(self, shape: Sequence[int]) -> int:  # pragma: no cover - abstract
        """Dimension of one component manifold."""
        raise NotImplementedError

    def curvature_bounds(self, shape: Sequence[int]) -> tuple[float, float]:
        """Lower and upper bound of the sectional curvature of one component."""
        raise NotImplementedError  # pragma: no cover - abstract

    def injectivity_radius(self, shape: Sequence[int]) -> float:
        """Injectivity radius of one component (``inf`` for flat factors)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def diameter(self, shape: Sequence[int]) -> float:
        """Diameter (largest geodesic distance) of one component (``inf`` if unbounded)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self, shape: Sequence[int]) -> str:
        """One-line description for reports, e.g. ``"64 x S^26(r=1)"``."""
        return f"{self.num_components(shape)} x {self.name}{self.point_shape(shape)}"

    # ---------------------------------------------------------- batched protocol
    def batched_projx(self, x: torch.Tensor, r: float) -> torch.Tensor:
        """Metric projection of canonical points ``x`` ``(B, *point_shape)`` (radius ``r``)."""
        return self._bprojx(x, r)

    def batched_proju(self, x: torch.Tensor, u: torch.Tensor, r: float) -> torch.Tensor:
        """Tangent projection :math:`P_{x_k}(u_k)` of every component, ``(B, *point_shape)``."""
        return self._bproju(x, u, r)

    def batched_retr(self, x: torch.Tensor, u: torch.Tensor, r: float) -> torch.Tensor:
        """Retraction :math:`R_{x_k}(u_k)` of every component, ``(B, *point_shape)``."""
        return self._bretr(x, u, r)

    def batched_transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor,
                       r: float) -> torch.Tensor:
        """Vector transport of ``v`` from :math:`T_{x_k}` to :math:`T_{y_k}` per component."""
        return self._btransp(x, y, v, r)

    def batched_inner(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        r"""Per-component inner product :math:`\langle u_k, v_k\rangle_{x_k}`, shape ``(B,)``."""
        return self._binner(x, u, v)

    # ---------------------------------------------------------- batched primitives
    # Every primitive takes canonical tensors of shape (B, *point_shape) and the radius r;
    # subclasses implement these (the public batched_* methods above call them).
    def _bprojx(self, x, r):  # pragma: no cover - abstract
        raise NotImplementedError

    def _bproju(self, x, u, r):  # pragma: no cover - abstract
        raise NotImplementedError

    def _bretr(self, x, u, r):  # pragma: no cover - abstract
        raise NotImplementedError

    def _bexpmap(self, x, u, r):
        return self._bretr(x, u, r)

    def _blogmap(self, x, y, r):
        raise NotImplementedError(f"{self.name} has no closed-form logarithm")

    def _bdist(self, x, y, r):
        """Per-component geodesic distance, shape ``(B,)``."""
        raise NotImplementedError(f"{self.name} has no closed-form geodesic distance")

    def _btransp(self, x, y, v, r):
        # vector transport by projection onto the target tangent space (Absil et al. 8.1.3)
        return self._bproju(y, v, r)

    def _binner(self, x, u, v):
        """Per-component inner product (embedded metric), shape ``(B,)``."""
        return (u * v).flatten(1).sum(1)

    def _bconstraint_error(self, x, r):
        """Per-component distance of ``x`` from the constraint set, shape ``(B,)``."""
        return (x - self._bprojx(x, r)).flatten(1).norm(dim=1)

    def _btangent_error(self, x, u, r):
        """Per-component norm of the normal part of ``u``, shape ``(B,)``."""
        return (u - self._bproju(x, u, r)).flatten(1).norm(dim=1)

    def _brandom(self, shape_b, r, *, dtype, device, generator=None):
        g = torch.randn(shape_b, dtype=dtype, device=device, generator=generator)
        return self._bprojx(g, r)

    # ------------------------------------------------------------- geoopt contract
    def _lift(self, op, x, *others):
        shape = x.shape
        r = self.radius_of(shape)
        out = op(self.to_batch(x), *(self.to_batch(o) for o in others), r)
        return self.from_batch(out, shape)

    def _check_shape(self, shape, name):
        try:
            self.check_kernel_shape(tuple(shape))
        except KernelShapeError as err:
            return False, f"`{name}`: {err}"
        return True, None

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        err = self.constraint_error(x)
        tol = atol + rtol * self.radius_of(x.shape)
        if err > tol:
            return False, f"constraint error {err:.3g} > {tol:.3g}"
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        if u.shape != x.shape:  # no broadcasting: every dim belongs to the kernel
            return False, f"`u` has shape {tuple(u.shape)}, the point {tuple(x.shape)}"
        r = self.radius_of(x.shape)
        err = float(self._btangent_error(self.to_batch(x), self.to_batch(u), r).max())
        tol = atol + rtol * float(u.detach().abs().max().clamp_min(1.0))
        if err > tol:
            return False, f"normal component {err:.3g} > {tol:.3g}"
        return True, None

    def constraint_error(self, x: torch.Tensor) -> float:
        """Largest per-component distance of ``x`` from the manifold (0 on the manifold)."""
        with torch.no_grad():
            # measured in float64 so that the check reports the point's error, not its own
            xb = self.to_batch(x.detach()).to(torch.float64)
            e = self._bconstraint_error(xb, self.radius_of(x.shape))
        return float(e.max()) if e.numel() else 0.0

    def projx(self, x: torch.Tensor) -> torch.Tensor:
        """Metric projection of ``x`` (any shape the manifold accepts) onto the manifold."""
        shape = x.shape
        return self.from_batch(self._bprojx(self.to_batch(x), self.radius_of(shape)), shape)

    def proju(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Orthogonal projection of ``u`` onto the tangent space :math:`T_x\\mathcal{M}`."""
        return self._lift(self._bproju, x, u)

    egrad2rgrad = proju

    def inner(self, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor | None = None, *,
              keepdim: bool = False) -> torch.Tensor:
        """Riemannian (embedded) inner product :math:`\\langle u, v\\rangle_x`, a scalar."""
        if v is None:
            v = u
        val = (u * v).sum()
        return val.reshape((1,) * x.dim()) if keepdim else val

    def component_inner(self, x: torch.Tensor, u: torch.Tensor,
                        v: torch.Tensor | None = None) -> torch.Tensor:
        r"""Inner product of each component, broadcast over the component's entries.

        geoopt's per-component inner product (``inner(x, u, v, keepdim=True)`` of each factor
        of a product), the second moment :class:`geoopt.optim.RiemannianAdam` adapts its step
        size to: entry :math:`i` of the result is :math:`\langle u_k, v_k\rangle_{x_k}` of the
        component :math:`k` holding entry :math:`i` (a sphere row, an oblique column, a
        Stiefel block, ...).  A step scaled by it stays in the tangent space of every
        component; an elementwise second moment would rescale the entries of one component
        differently and leave it.

        Parameters
        ----------
        x : torch.Tensor
            Point, kernel shape ``(out, in, *k)``.
        u, v : torch.Tensor
            Tangent vectors at ``x``, same shape (``v`` defaults to ``u``).

        Returns
        -------
        torch.Tensor
            Shape of ``x``, constant on every component.
        """
        if v is None:
            v = u
        shape = x.shape
        xb, ub, vb = self.to_batch(x), self.to_batch(u), self.to_batch(v)
        val = self._binner(xb, ub, vb)
        val = val.reshape(val.shape + (1,) * (ub.dim() - 1)).expand(ub.shape)
        return self.from_batch(val, shape).contiguous()

    def norm(self, x: torch.Tensor, u: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        return self.inner(x, u, keepdim=keepdim).clamp_min(0).sqrt()

    def component_norm(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Per-component Riemannian norms of a tangent vector, shape ``(B,)``."""
        ub = self.to_batch(u)
        return self._binner(self.to_batch(x), ub, ub).clamp_min(0).sqrt()

    def retr(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Retraction :math:`R_x(u)` (stays on the manifold)."""
        return self._lift(self._bretr, x, u)

    def expmap(self, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Exponential map :math:`\\mathrm{Exp}_x(u)`."""
        return self._lift(self._bexpmap, x, u)

    def logmap(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Logarithm :math:`\\mathrm{Log}_x(y)`, defined below the injectivity radius."""
        return self._lift(self._blogmap, x, y)

    def component_dist(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-component geodesic distances, shape ``(B,)``."""
        return self._bdist(self.to_batch(x), self.to_batch(y), self.radius_of(x.shape))

    def dist(self, x: torch.Tensor, y: torch.Tensor, *, keepdim: bool = False) -> torch.Tensor:
        """Geodesic distance of the product: :math:`\\sqrt{\\sum_k d_k^2}`."""
        return _safe_sqrt(self.dist2(x, y, keepdim=keepdim))

    def dist2(self, x, y, *, keepdim=False):
        r"""Squared geodesic distance :math:`\sum_k d_k^2`."""
        d = self.component_dist(x, y).pow(2).sum()
        return d.reshape((1,) * x.dim()) if keepdim else d

    def transp(self, x: torch.Tensor, y: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Vector transport of ``v`` from :math:`T_x` to :math:`T_y` (by projection)."""
        shape = x.shape
        r = self.radius_of(shape)
        tb = self.to_batch
        return self.from_batch(self._btransp(tb(x), tb(y), tb(v), r), shape)

    def retr_transp(self, x, u, v):
        y = self.retr(x, u)
        return y, self.transp(x, y, v)

    def expmap_transp(self, x, u, v):
        y = self.expmap(x, u)
        return y, self.transp(x, y, v)

    def transp_follow_retr(self, x, u, v):
        return self.retr_transp(x, u, v)[1]

    def transp_follow_expmap(self, x, u, v):
        return self.expmap_transp(x, u, v)[1]

    def random(self, *size, dtype=None, device=None, generator=None) -> ManifoldTensor:
        """Random point of shape ``size`` (uniform for spheres, oblique and Stiefel).

        Parameters
        ----------
        *size : int or tuple of int
            Kernel shape, as ``random(8, 4, 3, 3)`` or ``random((8, 4, 3, 3))``.
        dtype, device : optional
            Of the result (default dtype: torch's default).
        generator : torch.Generator, optional
            Source of the random numbers (default: torch's global generator).

        Returns
        -------
        geoopt.ManifoldTensor
            On this manifold (``.manifold is self``).

        Raises
        ------
        KernelShapeError
            (a ``ValueError``) if a kernel of this shape cannot hold the manifold.
        """
        size = _size(size)
        self.check_kernel_shape(size)
        dtype = dtype or torch.get_default_dtype()
        meta = self.to_batch(torch.empty(size, device="meta"))
        b = self._brandom(tuple(meta.shape), self.radius_of(size), dtype=dtype, device=device,
                          generator=generator)
        return ManifoldTensor(self.from_batch(b, size), manifold=self)

    def random_uniform(self, *size, dtype=None, device=None, generator=None) -> ManifoldTensor:
        """Uniformly distributed random point (normalised Riemannian volume); see :meth:`random`."""
        return self.random(*size, dtype=dtype, device=device, generator=generator)

    def origin(self, *size, dtype=None, device=None, seed: int | None = 42) -> ManifoldTensor:
        """A fixed point of shape ``size``: :meth:`random` drawn from a generator seeded with
        ``seed`` (a fresh random point for ``seed=None``).

        Unlike geoopt's default, which reseeds torch's global generator and restores its CPU
        state afterwards, a private :class:`torch.Generator` is used, so no global random
        state (CUDA's included) is touched.  The kernel manifolds have no distinguished point
        that would fit every layout (geoopt's Stiefel origin, the identity block, is not a
        conv kernel of orthonormal filters in general).
        """
        if seed is None:
            return self.random(*size, dtype=dtype, device=device)
        gen = torch.Generator(device=device if device is not None else "cpu")
        gen.manual_seed(seed)
        return self.random(*size, dtype=dtype, device=device, generator=gen)

    def random_tangent(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """Gaussian vector projected onto :math:`T_x\\mathcal{M}`."""
        g = torch.randn(x.shape, dtype=x.dtype, device=x.device, generator=generator)
        return self.proju(x, g)

    def extra_repr(self) -> str:
        s = f"radius={self.radius}"
        if self.radius_scale:
            s += f", radius_scale={self.radius_scale!r}"
        return s
