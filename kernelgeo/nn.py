"""Convolution layers whose kernels live on a manifold from construction.

>>> from kernelgeo.nn import Conv2d
>>> conv = Conv2d(3, 16, 3, padding=1, manifold="stiefel")
>>> conv.weight.manifold.describe(conv.weight.shape)
'1 x St(27,16)(r=1)'
"""

from __future__ import annotations

import torch
from torch import nn

from ._compat import ManifoldParameter
from .manifolds import Euclidean, KernelManifold, KernelShapeError, get_manifold

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ManifoldConvMixin"]


class ManifoldConvMixin:
    """Replaces ``self.weight`` by a :class:`geoopt.ManifoldParameter` on ``manifold``.

    ``reset_parameters`` draws torch's default initialisation and projects it onto the
    manifold (for spheres this is the uniform distribution on each sphere, since the default
    Kaiming-uniform law of a filter is invariant under sign flips and coordinate permutations
    only; projecting a Gaussian would be exactly uniform).
    """

    def _setup_manifold(self, manifold, manifold_kwargs):
        m = get_manifold(manifold, **manifold_kwargs)
        shape = tuple(self.weight.shape)
        try:
            m.check_kernel_shape(shape)
        except KernelShapeError as err:
            raise ValueError(f"{type(self).__name__} with kernel shape {shape}: {err}") from None
        if isinstance(m, Euclidean):
            self.manifold = None
            return
        self.manifold = m
        with torch.no_grad():
            self.weight = ManifoldParameter(m.projx(self.weight.detach()).contiguous(),
                                            manifold=m)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        m = getattr(self, "manifold", None)
        if isinstance(m, KernelManifold):
            with torch.no_grad():
                self.weight.copy_(m.projx(self.weight))

    def extra_repr(self) -> str:
        s = super().extra_repr()
        m = getattr(self, "manifold", None)
        return s + (f", manifold={m.describe(self.weight.shape)}" if m is not None else "")


def _make(base):
    class _Conv(ManifoldConvMixin, base):
        __doc__ = f"""{base.__name__} whose weight ``(out, in/groups, *kernel_size)`` lies on a
        kernel manifold.

        Parameters
        ----------
        *args, **kwargs
            As for :class:`torch.nn.{base.__name__}`.
        manifold : str or KernelManifold
            Geometry of the kernel (default ``"sphere"``); see
            :func:`kernelgeo.manifolds.get_manifold`.
        manifold_kwargs : dict, optional
            Passed to :func:`~kernelgeo.manifolds.get_manifold` (e.g. ``{{"radius": 2.0}}``).
        """

        def __init__(self, *args, manifold="sphere", manifold_kwargs=None, **kwargs):
            base.__init__(self, *args, **kwargs)
            self._setup_manifold(manifold, manifold_kwargs or {})

    _Conv.__name__ = _Conv.__qualname__ = base.__name__
    _Conv.__module__ = __name__
    return _Conv


Conv1d = _make(nn.Conv1d)
Conv2d = _make(nn.Conv2d)
Conv3d = _make(nn.Conv3d)
