"""Momentum state of :class:`~kernelgeo.optim.ConvergentRSGD`: the one place that writes it.

State per parameter ``p`` (the format of ``state_dict()``):

``state[p]["momentum_buffer"]``
    Euclidean parameters and parameters on foreign manifolds, as in :class:`torch.optim.SGD`.
``state[p]["momentum_blocks"]``
    Kernels: a list with one entry per block of the kernel's manifold (one for a plain
    manifold), each a tensor in the block's own shape, tangent at the current point, or
    ``None`` while the block has no momentum yet.

Every path (reference, torch ops, fused C kernels) binds, creates, replaces and publishes
these tensors through the functions below; the updates themselves write into the bound
tensors in place.  (The Triton backend, :mod:`kernelgeo.optim.triton_backend`, publishes the
new buffers of its items itself, in the same format.)
"""

from __future__ import annotations

import torch

__all__ = ["euclid_buffer", "set_euclid_buffer", "kernel_blocks", "kernel_block",
           "set_kernel_block"]


def euclid_buffer(state, p) -> torch.Tensor | None:
    """``p``'s momentum buffer (Euclidean or foreign-manifold parameter), or None."""
    return state[p].get("momentum_buffer")


def set_euclid_buffer(state, p, buf: torch.Tensor) -> None:
    """Make ``buf`` the momentum buffer of ``p``."""
    state[p]["momentum_buffer"] = buf


def kernel_blocks(state, p) -> list | None:
    """The list of ``p``'s momentum blocks (``None`` entries: no momentum yet), or None."""
    return state[p].get("momentum_blocks")


def kernel_block(state, p, block: int) -> torch.Tensor | None:
    """Momentum of block ``block`` of kernel ``p``, or None."""
    bl = state[p].get("momentum_blocks")
    return None if bl is None else bl[block]


def set_kernel_block(state, p, block: int, buf: torch.Tensor, nblocks: int | None = None
                     ) -> None:
    """Make ``buf`` (the block's shape) the momentum of block ``block`` of kernel ``p``, which
    has ``nblocks`` blocks (needed for the first block that gets momentum: it creates the
    list)."""
    bl = state[p].get("momentum_blocks")
    if bl is None:
        if nblocks is None:
            raise ValueError("the first momentum block of a kernel needs nblocks")
        bl = state[p]["momentum_blocks"] = [None] * nblocks
    bl[block] = buf
