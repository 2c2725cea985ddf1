r"""Length of the path the weights travel during training, per layer and for the whole model.

After every optimizer step the change of every weight tensor (parameters with at least two
dimensions: convolution kernels and linear weights, on a manifold or not) is measured and
accumulated:

.. math::

    L_\ell = \sum_t \|W_\ell^{(t+1)} - W_\ell^{(t)}\|_F, \qquad
    L = \sum_t \Big(\sum_\ell \|W_\ell^{(t+1)} - W_\ell^{(t)}\|_F^2\Big)^{1/2}.

This is the length, in the ambient Euclidean metric, of the polygon through the iterates.  For
kernels on a submanifold with the embedded metric, the Riemannian length of the piecewise
geodesic through the same iterates exceeds it by a factor :math:`1 + O(\delta^2)` per step of
length :math:`\delta` (chord against arc: :math:`2\sin(\theta/2)/\theta` on a circle of radius
1, i.e. less than 0.03 % for :math:`\theta = 0.05` rad); it is therefore comparable with the
geodesic distance between the initial and the trained weights, which it bounds from above up
to that factor.  Steps that an fp16 loss scaler skips change nothing and add nothing.

Cost per step: one copy of the tracked weights (kept between steps, and the only memory it
takes) and four multi-tensor operations; ``TrainConfig(track_path=False)`` (``kernelgeo train
--no-path-length``) turns it off.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["PathMeter"]


class PathMeter:
    """Accumulates the per-layer and whole-model path length of a model's weights.

    Parameters
    ----------
    model : nn.Module
        The model whose parameters with ``ndim >= 2`` are tracked, by their
        ``named_parameters`` names (the keys of the model's ``state_dict``).
    """

    def __init__(self, model: nn.Module):
        named = [(n, p) for n, p in model.named_parameters() if p.dim() >= 2]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        with torch.no_grad():
            self.prev = [p.detach().clone() for p in self.params]
        dev = self.params[0].device if self.params else torch.device("cpu")
        # float64 accumulators on the parameters' device: no host sync per step
        self.per_layer = torch.zeros(len(self.params), dtype=torch.float64, device=dev)
        self.total = torch.zeros((), dtype=torch.float64, device=dev)
        #: ``None`` while the lengths are complete; otherwise why they are not available
        self.unavailable: str | None = None

    @torch.no_grad()
    def update(self) -> None:
        """Add the step since the last call (or since construction) to the lengths."""
        if not self.params:
            return
        cur = [p.detach() for p in self.params]
        # prev - cur in place (a - b = -(b - a) exactly): no step-sized allocation
        torch._foreach_sub_(self.prev, cur)
        norms = torch.stack(torch._foreach_norm(self.prev)).double()
        self.per_layer += norms
        self.total += norms.square().sum().sqrt()
        torch._foreach_copy_(self.prev, cur)

    @torch.no_grad()
    def rebase(self) -> None:
        """Take the current weights as the last iterate (after a checkpoint is restored)."""
        torch._foreach_copy_(self.prev, [p.detach() for p in self.params])

    def state_dict(self) -> dict:
        return {"names": list(self.names), "per_layer": self.per_layer.cpu().tolist(),
                "total": float(self.total), "unavailable": self.unavailable}

    def load_state_dict(self, state: dict | None) -> None:
        """Restore the lengths of a checkpoint; a checkpoint without them (or with other
        weights) leaves the lengths marked unavailable rather than restarting them at 0."""
        if state is None:
            self.unavailable = ("the run was continued from a checkpoint that does not hold "
                                "the path length travelled before it")
        elif list(state["names"]) != self.names:
            self.unavailable = "the checkpoint's path lengths are of other weights"
        else:
            self.per_layer.copy_(torch.tensor(state["per_layer"], dtype=torch.float64))
            self.total.fill_(float(state["total"]))
            self.unavailable = state.get("unavailable")
        self.rebase()

    def total_length(self) -> float | None:
        """Whole-model path length so far (``None`` when unavailable)."""
        return None if self.unavailable else float(self.total)

    def layer_lengths(self) -> dict[str, float] | None:
        """Per-weight path lengths so far, by parameter name (``None`` when unavailable)."""
        if self.unavailable:
            return None
        return dict(zip(self.names, self.per_layer.cpu().tolist(), strict=True))
