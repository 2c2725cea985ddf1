"""The update of :class:`~kernelgeo.optim.ConvergentRSGD`, one module per geometry.

Each module holds its geometry's torch-ops batched update and says, in its docstring, where
the same update is implemented elsewhere: the reference formula (the oracle, float64, per
parameter), the C kernel of ``kernelgeo/optim/native_kernels.c`` and the Triton kernel of
``kernelgeo/optim/_triton_kernels.py``.  :data:`GEOMETRIES` records the same, by the
``kind`` of a chunk (:func:`kernelgeo.optim.batched.build_group_plan` chooses the kind of a
kernel from its manifold's declared
:attr:`~kernelgeo.manifolds.KernelManifold.batched_layout`):

``sphere``
    layouts ``"rows"`` and ``"columns"`` (spheres, centred spheres, oblique): torch ops
    :mod:`.sphere`; C ``kg_sphere_step_f32`` / ``kg_sphere_step_f64``; Triton
    ``sphere_short`` / ``sphere_long``.
``stiefel``
    layout ``"matrices"`` with the QR retraction: torch ops :mod:`.stiefel`; no C kernel;
    Triton: :mod:`kernelgeo.optim.stiefel_stack` (stacked classes, four Triton kernels and
    batched torch linear algebra).
``generic``
    every other kernel manifold: torch ops :mod:`.generic` (the manifold's own batched
    primitives), which also holds the reference update of every kernel geometry.
``euclidean``
    tensors without a kernel manifold: torch ops :mod:`.euclidean` (``torch.optim.SGD``'s
    recursion), C: torch's fused SGD kernel.

The step rule of every backend comes from :mod:`kernelgeo.optim.step_rules`; the momentum
state is bound and published by :mod:`kernelgeo.optim.momentum`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from . import euclidean, generic, sphere, stiefel
from ._common import Hyper
from .euclidean import euclid_foreach, euclid_fused, fused_sgd_available, reference_euclid_step
from .generic import (
    foreign_step,
    generic_apply,
    generic_prepare,
    reference_kernel_step,
    reproject,
    scale_invariant,
)
from .sphere import sphere_apply, sphere_prepare
from .stiefel import stiefel_apply, stiefel_prepare

__all__ = [
    "Geometry", "GEOMETRIES", "Hyper", "euclidean", "generic", "sphere", "stiefel",
    "sphere_prepare", "sphere_apply", "stiefel_prepare", "stiefel_apply", "generic_prepare",
    "generic_apply", "reference_kernel_step", "foreign_step", "scale_invariant",
    "reproject",
    "euclid_foreach", "euclid_fused", "fused_sgd_available", "reference_euclid_step",
]


def _generic_prepare(chunk, x, g, h):
    return generic_prepare(chunk, x, g, h)


def _generic_apply(chunk, x, g, c, h, stats):
    return generic_apply(chunk, x, c, h, stats)


@dataclass(frozen=True)
class Geometry:
    """Where the update of one geometry lives.

    Attributes
    ----------
    kind : str
        The chunk kind (``"sphere"``, ``"stiefel"``, ``"generic"``, ``"euclidean"``).
    layouts : tuple of str
        Declared :attr:`~kernelgeo.manifolds.KernelManifold.batched_layout` values it serves.
    prepare, apply : callable or None
        The torch-ops update of a chunk: ``prepare(chunk, x, g, hyper) -> (g, c)`` (before any
        write), ``apply(chunk, x, g, c, hyper, stats) -> new points``.
    reference : str
        The reference formula (the oracle).
    native, triton : str or None
        The C and Triton kernels (None: the torch ops run there).
    """

    kind: str
    layouts: tuple
    prepare: Callable | None
    apply: Callable | None
    reference: str
    native: str | None
    triton: str | None


#: the geometries by chunk kind
GEOMETRIES: dict[str, Geometry] = {g.kind: g for g in (
    Geometry("sphere", ("rows", "columns"),
             lambda chunk, x, g, h: sphere_prepare(chunk, x, g), sphere_apply,
             "kernelgeo.optim.geometries.generic.reference_kernel_step",
             "native_kernels.c: kg_sphere_step_f32 / kg_sphere_step_f64 "
             "(kernelgeo.optim.native.sphere_step_parallel)",
             "_triton_kernels.py: sphere_short / sphere_long "
             "(kernelgeo.optim.triton_backend.step)"),
    Geometry("stiefel", ("matrices",),
             lambda chunk, x, g, h: stiefel_prepare(chunk, x, g), stiefel_apply,
             "kernelgeo.optim.geometries.generic.reference_kernel_step", None,
             "_triton_kernels.py: stiefel_gather / stiefel_direction / stiefel_displace / "
             "stiefel_scatter (kernelgeo.optim.stiefel_stack.run)"),
    Geometry("generic", (), _generic_prepare, _generic_apply,
             "kernelgeo.optim.geometries.generic.reference_kernel_step", None, None),
    Geometry("euclidean", (), None, None,
             "kernelgeo.optim.geometries.euclidean.reference_euclid_step",
             "torch._fused_sgd_ (kernelgeo.optim.geometries.euclidean.euclid_fused)", None),
)}
