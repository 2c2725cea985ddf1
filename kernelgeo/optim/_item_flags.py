"""The flags word of an item of the Triton kernels' tables: one definition for the host code
that writes it (:mod:`~kernelgeo.optim.triton_backend`, :mod:`~kernelgeo.optim.stiefel_stack`)
and the jit helper that reads it (``_triton_kernels._flags``)."""

from __future__ import annotations

#: the rows are centred (centred sphere)
CENTER = 1
#: the momentum buffer is created by this step (it becomes the direction)
FRESH = 2
#: the step rule caps the step length (:data:`~kernelgeo.optim.step_rules.KERNEL_CAPPED`)
CAPPED = 4
#: the item has a momentum buffer
BUFFER = 8
#: Nesterov momentum
NESTEROV = 16


def encode(*, center: bool = False, fresh: bool, capped: bool, buffer: bool,
           nesterov: bool) -> int:
    """The flags word of one item."""
    return ((CENTER if center else 0) | (FRESH if fresh else 0) | (CAPPED if capped else 0)
            | (BUFFER if buffer else 0) | (NESTEROV if nesterov else 0))
