r"""Layer-wise step scaling from the network's structure and the statistics of its data.

What it is for: one learning rate :math:`\lambda(t)` for layers whose gradients have very
different scales.  A multiplier :math:`m_\ell` of the step of layer :math:`\ell`'s kernel is
equivalent to changing the radius of its manifold (under a following batch norm a step of
length :math:`s` on a sphere of radius :math:`r` turns the filter by :math:`s/r`), so it sets
how fast each layer's filters turn for a given :math:`\lambda`.

The AAAI version of the paper scales the kernel spaces "based on the structure of CNNs and
statistics of data"; its exact formula is not available.  **Our choice**:

.. math::

    m_\ell = \operatorname{clip}\!\Big(\frac{n_\ell^{-1/2}}{\big(\prod_j n_j^{-1/2}\big)^{1/L}}
    \cdot \delta_\ell,\ [m_{\min}, m_{\max}]\Big),
    \qquad
    \delta_\ell = \begin{cases} 1 & \text{a normalisation layer follows layer } \ell,\\
    a_\ell^{-1} & \text{otherwise,}\end{cases}

with :math:`n_\ell` the fan-in of one filter (fan-in only: the fan-out does not enter the
gradient of one filter), :math:`L` the number of scaled layers and :math:`a_\ell` the running
root mean square of the layer's input activations (exponential average over training forward
passes, gathered by a forward pre-hook).  Why: the Euclidean gradient of a filter is a sum of
input patches weighted by back-propagated errors.  Without a following normalisation the
errors do not depend on the input scale, so the gradient grows like the patch norm
:math:`a_\ell\sqrt{n_\ell}`, and both factors compensate it.  With a normalisation layer
(batch, group, instance or layer norm) applied directly to the layer's output, the layer is
*scale-invariant*: multiplying its input by :math:`c` multiplies the errors by :math:`1/c`,
so loss and gradient do not change, and neither may the step (:math:`\delta_\ell = 1`).
This is detected during training forward passes: a normalisation module whose input is the
very tensor the layer returned marks the layer as normalised.  The structural factor is
normalised by its geometric mean over the layers (a constant of the architecture), so that
:math:`\lambda` stays the network's typical step; the data factor is not normalised across
layers, so one layer's input statistics never change another layer's multiplier.  The clip
keeps :math:`m_\ell` in a fixed positive interval, so :math:`\sum m_\ell\lambda(t)=\infty` and
:math:`\sum m_\ell^2\lambda(t)^2<\infty` still hold; the data factors change with the batches,
which places them outside the convergence theorem (``guarantee=True`` warns;
``data=False`` gives constant multipliers).
"""

from __future__ import annotations

import math
import weakref

import torch
from torch import nn

__all__ = ["StepScaling"]


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LayerNorm)


class StepScaling:
    r"""Per-kernel step multipliers :math:`m_\ell` from fan-in and input-activation RMS.

    Parameters
    ----------
    model : nn.Module
        The network; every module with a ``weight`` that is a manifold parameter is scaled.
    structure : bool
        Use the fan-in factor :math:`n_\ell^{-1/2}` (normalised by its geometric mean).
    data : bool
        Use the activation factor :math:`a_\ell^{-1}` for layers that no normalisation
        layer follows (registers forward hooks).
    momentum : float
        Exponential-average factor of the running mean square (0.9).
    clip : (float, float)
        Bounds of the multipliers (default ``(0.1, 10)``).

    Attributes
    ----------
    normalised : set of str
        Names of the layers seen to feed a normalisation layer directly (scale-invariant).

    Examples
    --------
    >>> import torch, kernelgeo
    >>> from kernelgeo.optim import ConvergentRSGD, StepScaling
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8),
    ...                           torch.nn.Conv2d(8, 8, 3))
    >>> _ = kernelgeo.constrain(net, "sphere")
    >>> sc = StepScaling(net)
    >>> opt = ConvergentRSGD(net.parameters(), lr=0.1, radius_scaling=sc)
    >>> net(torch.randn(2, 3, 9, 9)).sum().backward(); opt.step()
    >>> len(sc.state()), sorted(sc.normalised)
    (2, ['0'])
    """

    def __init__(self, model: nn.Module, *, structure: bool = True, data: bool = True,
                 momentum: float = 0.9, clip: tuple[float, float] = (0.1, 10.0)):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not 0 < clip[0] <= 1 <= clip[1]:
            raise ValueError(f"clip must satisfy 0 < low <= 1 <= high, got {clip!r}")
        self.structure, self.data, self.momentum, self.clip = structure, data, momentum, clip
        self.modules: dict[nn.Module, str] = {}
        self.normalised: set[str] = set()
        self._ms: dict[nn.Module, torch.Tensor] = {}
        self._handles = []
        self._by_param: dict[int, nn.Module] = {}
        self._last_out: dict[nn.Module, weakref.ref] = {}
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and getattr(w, "manifold", None) is not None:
                self.modules[mod] = name
                self._by_param[id(w)] = mod
                if data:
                    self._handles.append(mod.register_forward_pre_hook(self._hook))
                    self._handles.append(mod.register_forward_hook(self._out_hook))
        if data:
            for mod in model.modules():
                if isinstance(mod, _NORMS):
                    self._handles.append(mod.register_forward_pre_hook(self._norm_hook))
        self._mult: dict[int, torch.Tensor] = {}

    def _hook(self, mod, inputs):
        if not mod.training or not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        x = inputs[0].detach()
        ms = x.float().square().mean()
        old = self._ms.get(mod)
        self._ms[mod] = ms if old is None else torch.lerp(ms, old, self.momentum)

    def _out_hook(self, mod, inputs, output):
        if mod.training and isinstance(output, torch.Tensor):
            self._last_out[mod] = weakref.ref(output)

    def _norm_hook(self, norm, inputs):
        if not norm.training or not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        for mod, ref in self._last_out.items():
            if ref() is inputs[0]:
                self.normalised.add(self.modules[mod])

    def remove(self) -> None:
        """Remove the forward hooks."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def refresh(self) -> None:
        """Recompute the multipliers from the current statistics (called by the optimizer)."""
        mods = list(self.modules)
        if not mods:
            return
        dev = mods[0].weight.device
        if self.structure:
            ls = torch.tensor([-0.5 * math.log(math.prod(m.weight.shape[1:])) for m in mods],
                              device=dev)
            ls = ls - ls.mean()
        else:
            ls = torch.zeros(len(mods), device=dev)
        logs = []
        for i, mod in enumerate(mods):
            lg = ls[i]
            if self.data and mod in self._ms and self.modules[mod] not in self.normalised:
                lg = lg - 0.5 * torch.log(self._ms[mod].clamp_min(1e-30)).to(dev)
            logs.append(lg)
        m = torch.exp(torch.stack(logs)).clamp(*self.clip)
        self._mult = {id(mod.weight): m[i].to(mod.weight.dtype) for i, mod in enumerate(mods)}
    def multiplier(self, p: torch.Tensor) -> torch.Tensor:
        """Multiplier of parameter ``p`` (1 for parameters of no scaled layer)."""
        if not self._mult:
            self.refresh()
        m = self._mult.get(id(p))
        return torch.ones((), dtype=p.dtype, device=p.device) if m is None else m

    def state(self) -> dict[str, float]:
        """Current multipliers by layer name (synchronises; for reports)."""
        self.refresh()
        return {self.modules[mod]: float(self._mult[id(mod.weight)]) for mod in self.modules}
