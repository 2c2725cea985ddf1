"""Convolution layers whose kernels live on a manifold from construction.

>>> from kernelgeo.nn import Conv2d
>>> conv = Conv2d(3, 16, 3, padding=1, manifold="stiefel")
>>> conv.weight.manifold.describe(conv.weight.shape)
'1 x St(27,16)(r=1)'
"""

from __future__ import annotations

import torch
from torch import nn

from .constraints import (
    _install_load_hooks,
    _project,
    _radius_problem,
    _tensor_problem,
    _to_manifold,
)
from .manifolds import Euclidean, KernelManifold, KernelShapeError, get_manifold

__all__ = ["Conv1d", "Conv2d", "Conv3d", "ManifoldConvMixin"]


class ManifoldConvMixin:
    """Replaces ``self.weight`` by a :class:`geoopt.ManifoldParameter` on ``manifold``.

    ``reset_parameters`` draws torch's default initialisation and projects it onto the
    manifold (for spheres this is the uniform distribution on each sphere, since the default
    Kaiming-uniform law of a filter is invariant under sign flips and coordinate permutations
    only; projecting a Gaussian would be exactly uniform).

    The weight stays the ``nn.Parameter`` object the base layer created (it changes class,
    as in :func:`kernelgeo.constrain`), and loading a state dict goes through the same
    checks (NaN/Inf and shape refused, off-manifold entries projected with a warning); a
    model that merely contains such layers checks a load into itself before copying
    anything once :func:`kernelgeo.constrain` has been called on it (``spec=None`` changes
    nothing and installs the checks on every module).
    Refused with a :class:`ValueError` naming the shape: a kernel that cannot hold the
    manifold, the meta device, a non-floating dtype, a radius whose square or inverse
    square is not a finite normal number of the dtype.  Half-precision kernels are
    projected in float32 and rounded once.
    """

    def _setup_manifold(self, manifold, manifold_kwargs):
        m = get_manifold(manifold, **manifold_kwargs)
        shape = tuple(self.weight.shape)
        where = f"{type(self).__name__} with kernel shape {shape}"
        try:
            m.check_kernel_shape(shape)
        except KernelShapeError as err:
            raise ValueError(f"{where}: {err}") from None
        if isinstance(m, Euclidean):
            self.manifold = None
            return
        if self.weight.is_meta:
            raise ValueError(
                f"{where}: cannot be built on the meta device (its kernel would have no values "
                "to project, and Module.to_empty would replace the manifold parameter by a "
                "plain one); build it on a real device, or build torch.nn layers on meta and "
                "call kernelgeo.constrain once the model is materialised")
        problem = (_tensor_problem(self.weight, "its weight")
                   or _radius_problem(m, shape, self.weight.dtype))
        if problem:
            raise ValueError(f"{where} ({self.weight.dtype}): {problem}")
        self.manifold = m
        _to_manifold(self.weight, m)
        _install_load_hooks(self)

    def reset_parameters(self) -> None:
        super().reset_parameters()
        m = getattr(self, "manifold", None)
        if isinstance(m, KernelManifold):
            with torch.no_grad():
                self.weight.copy_(_project(m, self.weight))

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
