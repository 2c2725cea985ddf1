r"""Products of kernel manifolds (POMs) inside one layer, mixed ones ("ensembles") included.

A layer's kernel ``W`` of shape ``(out, in, *k)`` is partitioned into a grid of blocks
``W[o_i, c_j]`` by output channels (``"out"``, PO), input channels (``"in"``, PI) or both
(``"both"``, PIO); each block lives on its own component manifold, which may differ between
blocks (e.g. half the filters on spheres, half on Stiefel).  The layer's manifold is the
Riemannian product

.. math:: \mathcal M = \mathcal M_1\times\cdots\times\mathcal M_K,\qquad
   \langle u, v\rangle_x = \sum_k \langle u_k, v_k\rangle_{x_k},\qquad
   d(x, y)^2 = \sum_k d_k(x_k, y_k)^2,

and every operation acts block by block.  The whole network is in turn the product of its
layers' manifolds and the Euclidean spaces of the remaining parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .._compat import ManifoldTensor
from .base import KernelManifold, KernelShapeError, _size
from .euclidean import Euclidean

__all__ = ["KernelProduct"]


def _split(n: int, k: int) -> list[slice]:
    if k < 1 or k > n:
        raise KernelShapeError(f"cannot split {n} channels into {k} non-empty groups")
    sizes = [n // k + (1 if i < n % k else 0) for i in range(k)]
    out, start = [], 0
    for s in sizes:
        out.append(slice(start, start + s))
        start += s
    return out


class KernelProduct(KernelManifold):
    r"""Product of kernel manifolds over a partition of a layer's channels.

    Parameters
    ----------
    components : sequence of KernelManifold
        Manifolds of the blocks, assigned to the blocks in row-major order (output group
        first) and cycled when there are fewer manifolds than blocks.
    partition : {"out", "in", "both"}
        Split output channels (PO), input channels (PI) or both (PIO).
    groups : int or (int, int), optional
        Number of groups (``"out"``/``"in"``) or ``(out_groups, in_groups)`` for ``"both"``;
        default: one group per component (``"both"``: ``(len(components), 1)``).  Groups are
        contiguous and as equal as possible (the first ``n % k`` are one larger).

    Examples
    --------
    Half of the filters on spheres, half on Stiefel:

    >>> from kernelgeo.manifolds import KernelProduct, Sphere, Stiefel
    >>> m = KernelProduct([Sphere(), Stiefel()], partition="out")
    >>> m.describe((16, 8, 3, 3))
    '[0:8, :] 8 x S^71(r=1) | [8:16, :] 1 x St(72,8)(r=1)'
    """

    name = "product"

    def __init__(self, components: Sequence[KernelManifold], partition: str = "out",
                 groups: int | tuple[int, int] | None = None):
        super().__init__()
        if partition not in ("out", "in", "both"):
            raise ValueError(f"partition must be 'out', 'in' or 'both', got {partition!r}")
        comps = list(components)
        if not comps or not all(isinstance(c, KernelManifold) for c in comps):
            raise TypeError("components must be a non-empty sequence of KernelManifold")
        if any(isinstance(c, KernelProduct) for c in comps):
            raise TypeError("nested KernelProduct is not supported; flatten the partition")
        if groups is None:
            groups = (len(comps), 1) if partition == "both" else len(comps)
        if partition == "both":
            if not (isinstance(groups, tuple) and len(groups) == 2):
                raise ValueError("partition='both' needs groups=(out_groups, in_groups)")
            self.grid = (int(groups[0]), int(groups[1]))
        else:
            if not isinstance(groups, int):
                raise ValueError(f"partition={partition!r} needs an int number of groups")
            self.grid = (groups, 1) if partition == "out" else (1, groups)
        if min(self.grid) < 1:
            raise ValueError(f"group counts must be at least 1, got {groups!r}")
        self.partition = partition
        self.components = torch.nn.ModuleList(comps)

    def blocks(self, shape):
        shape = tuple(shape)
        if len(shape) < 2:
            raise KernelShapeError(f"product kernels need (out, in, ...) weights; got {shape}")
        outs = _split(shape[0], self.grid[0])
        ins = _split(shape[1], self.grid[1])
        res = []
        for i, so in enumerate(outs):
            for j, si in enumerate(ins):
                k = i * len(ins) + j
                res.append((self.components[k % len(self.components)], (so, si)))
        return res

    @staticmethod
    def _sub(shape, idx):
        so, si = idx
        return (so.stop - so.start, si.stop - si.start) + tuple(shape[2:])

    def check_kernel_shape(self, shape):
        for m, idx in self.blocks(shape):
            sub = self._sub(shape, idx)
            try:
                m.check_kernel_shape(sub)
            except KernelShapeError as err:
                raise KernelShapeError(
                    f"block [{idx[0].start}:{idx[0].stop}, {idx[1].start}:{idx[1].stop}] "
                    f"of shape {sub}: {err}") from None

    # -- facts
    def num_components(self, shape):
        return sum(m.num_components(self._sub(shape, i)) for m, i in self.blocks(shape))

    def dim(self, shape):
        return sum(m.dim(self._sub(shape, i)) for m, i in self.blocks(shape))

    def component_dim(self, shape):
        return max(m.component_dim(self._sub(shape, i)) for m, i in self.blocks(shape))

    def curvature_bounds(self, shape):
        b = [m.curvature_bounds(self._sub(shape, i)) for m, i in self.blocks(shape)]
        return (min(lo for lo, _ in b), max(hi for _, hi in b))

    def injectivity_radius(self, shape):
        return min(m.injectivity_radius(self._sub(shape, i)) for m, i in self.blocks(shape))

    def diameter(self, shape):
        return max(m.diameter(self._sub(shape, i)) for m, i in self.blocks(shape))

    def radius_of(self, shape):
        return math.nan  # a product has one radius per block

    def describe(self, shape):
        parts = []
        for m, (so, si) in self.blocks(shape):
            tag = f"[{so.start}:{so.stop}, " + (
                ":" if si.start == 0 and si.stop == shape[1] else f"{si.start}:{si.stop}") + "]"
            parts.append(f"{tag} {m.describe(self._sub(shape, (so, si)))}")
        return " | ".join(parts)

    def batch_key(self, shape):
        raise TypeError("KernelProduct has no single batch layout; use blocks()")

    # -- operations, block by block
    def _map(self, fn, x, *others):
        out = torch.empty_like(x)
        for m, idx in self.blocks(x.shape):
            out[idx] = fn(m, x[idx], *(o[idx] for o in others))
        return out

    def _cat(self, fn, x, *others):
        return torch.cat([fn(m, x[idx], *(o[idx] for o in others))
                          for m, idx in self.blocks(x.shape)])

    def projx(self, x):
        return self._map(lambda m, a: m.projx(a), x)

    def proju(self, x, u):
        return self._map(lambda m, a, b: m.proju(a, b), x, u)

    egrad2rgrad = proju

    def retr(self, x, u):
        return self._map(lambda m, a, b: m.retr(a, b), x, u)

    def expmap(self, x, u):
        return self._map(lambda m, a, b: m.expmap(a, b), x, u)

    def logmap(self, x, y):
        return self._map(lambda m, a, b: m.logmap(a, b), x, y)

    def transp(self, x, y, v):
        return self._map(lambda m, a, b, c: m.transp(a, b, c), x, y, v)

    def component_dist(self, x, y):
        return self._cat(lambda m, a, b: m.component_dist(a, b), x, y)

    def component_norm(self, x, u):
        return self._cat(lambda m, a, b: m.component_norm(a, b), x, u)

    def constraint_error(self, x):
        return max(m.constraint_error(x[idx]) for m, idx in self.blocks(x.shape))

    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        for m, idx in self.blocks(x.shape):
            ok, why = m._check_point_on_manifold(x[idx], atol=atol, rtol=rtol)
            if not ok:
                return False, f"block {idx}: {why}"
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        if u.shape != x.shape:
            return False, f"`u` has shape {tuple(u.shape)}, the point {tuple(x.shape)}"
        for m, idx in self.blocks(x.shape):
            ok, why = m._check_vector_on_tangent(x[idx], u[idx], atol=atol, rtol=rtol)
            if not ok:
                return False, f"block {idx}: {why}"
        return True, None

    def component_inner(self, x, u, v=None):
        """Each block's :meth:`~KernelManifold.component_inner`, shape of ``x``."""
        if v is None:
            v = u
        return self._map(lambda m, a, b, c: m.component_inner(a, b, c), x, u, v)

    def _sample(self, method, size, dtype, device, **kw):
        size = _size(size)
        self.check_kernel_shape(size)
        out = torch.empty(size, dtype=dtype or torch.get_default_dtype(), device=device)
        for m, idx in self.blocks(size):
            out[idx] = getattr(m, method)(self._sub(size, idx), dtype=out.dtype, device=device,
                                          **kw)
        return ManifoldTensor(out, manifold=self)

    def random(self, *size, dtype=None, device=None, generator=None):
        """Each block's :meth:`~KernelManifold.random`, as one :class:`geoopt.ManifoldTensor`."""
        return self._sample("random", size, dtype, device, generator=generator)

    def random_uniform(self, *size, dtype=None, device=None, generator=None):
        """Each block's ``random_uniform`` (a block on ``euclidean`` has none and raises)."""
        return self._sample("random_uniform", size, dtype, device, generator=generator)

    def origin(self, *size, dtype=None, device=None, seed=42):
        """Each block's :meth:`~KernelManifold.origin`, from one private generator seeded with
        ``seed`` (fresh random blocks for ``seed=None``; zeros on ``euclidean`` blocks)."""
        if seed is None:
            return self.random(*size, dtype=dtype, device=device)
        size = _size(size)
        gen = torch.Generator(device=device if device is not None else "cpu")
        gen.manual_seed(seed)
        self.check_kernel_shape(size)
        out = torch.empty(size, dtype=dtype or torch.get_default_dtype(), device=device)
        for m, idx in self.blocks(size):
            sub = self._sub(size, idx)
            out[idx] = (m.origin(sub, dtype=out.dtype, device=device) if isinstance(m, Euclidean)
                        else m.random(sub, dtype=out.dtype, device=device, generator=gen))
        return ManifoldTensor(out, manifold=self)

    @property
    def ndim(self):
        return max(2, *(c.ndim for c in self.components))

    def extra_repr(self):
        comps = ", ".join(f"{c.name}({c.extra_repr()})" for c in self.components)
        return f"partition={self.partition!r}, grid={self.grid}, components=[{comps}]"
