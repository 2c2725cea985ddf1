r"""Layer-wise step scaling from the network's structure and the statistics of its data.

The AAAI version of the paper scales the kernel spaces "based on the structure of CNNs and
statistics of data"; its exact formula is not available offline.  **Our choice** (a
multiplier :math:`m_\ell` of the step :math:`\lambda(t)` of layer :math:`\ell`'s kernel,
equivalent to changing the radius of its manifold, since under a following batch norm a step
of length :math:`s` on a sphere of radius :math:`r` turns the filter by :math:`s/r`):

.. math::

    \tilde m_\ell = n_\ell^{-1/2}\ \text{(structure)}\ \times\ a_\ell^{-1}\ \text{(data)},
    \qquad
    m_\ell = \operatorname{clip}\!\Big(\tilde m_\ell \big/ \big(\textstyle\prod_j
    \tilde m_j\big)^{1/L},\ [m_{\min}, m_{\max}]\Big)

with :math:`n_\ell` the fan-in of one filter and :math:`a_\ell` the running root mean square
of the layer's input activations (exponential average over training forward passes, gathered
by a forward pre-hook: one reduction per layer and pass, no synchronisation).  Why: the
Euclidean gradient of a filter is a sum of input patches weighted by back-propagated errors,
so its norm grows like :math:`\|\text{patch}\| \approx a_\ell\sqrt{n_\ell}`; dividing by it
equalises the scale of the steps across layers.  The normalisation by the geometric mean keeps
:math:`\lambda` the network's typical step; the clip keeps :math:`m_\ell` in a fixed positive
interval, so :math:`\sum m_\ell\lambda(t)=\infty` and :math:`\sum m_\ell^2\lambda(t)^2<\infty`
still hold and the convergence guarantee is unchanged.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["StepScaling"]


class StepScaling:
    r"""Per-kernel step multipliers :math:`m_\ell` from fan-in and input-activation RMS.

    Parameters
    ----------
    model : nn.Module
        The network; every module with a ``weight`` that is a manifold parameter is scaled.
    structure : bool
        Use the fan-in factor :math:`n_\ell^{-1/2}`.
    data : bool
        Use the activation factor :math:`a_\ell^{-1}` (registers forward pre-hooks).
    momentum : float
        Exponential-average factor of the running mean square (0.9).
    clip : (float, float)
        Bounds of the multipliers (default ``(0.1, 10)``).

    Examples
    --------
    >>> import torch, kernelgeo
    >>> from kernelgeo.optim import ConvergentRSGD, StepScaling
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 8, 3))
    >>> _ = kernelgeo.constrain(net, "sphere")
    >>> sc = StepScaling(net)
    >>> opt = ConvergentRSGD(net.parameters(), lr=0.1, radius_scaling=sc)
    >>> net(torch.randn(2, 3, 9, 9)).sum().backward(); opt.step()
    >>> len(sc.state())
    2
    """

    def __init__(self, model: nn.Module, *, structure: bool = True, data: bool = True,
                 momentum: float = 0.9, clip: tuple[float, float] = (0.1, 10.0)):
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        if not 0 < clip[0] <= 1 <= clip[1]:
            raise ValueError(f"clip must satisfy 0 < low <= 1 <= high, got {clip!r}")
        self.structure, self.data, self.momentum, self.clip = structure, data, momentum, clip
        self.modules: dict[nn.Module, str] = {}
        self._ms: dict[nn.Module, torch.Tensor] = {}
        self._handles = []
        self._by_param: dict[int, nn.Module] = {}
        for name, mod in model.named_modules():
            w = getattr(mod, "weight", None)
            if isinstance(w, torch.Tensor) and getattr(w, "manifold", None) is not None:
                self.modules[mod] = name
                self._by_param[id(w)] = mod
                if data:
                    self._handles.append(mod.register_forward_pre_hook(self._hook))
        self._mult: dict[int, torch.Tensor] = {}

    def _hook(self, mod, inputs):
        if not mod.training or not inputs or not isinstance(inputs[0], torch.Tensor):
            return
        x = inputs[0].detach()
        ms = x.float().square().mean()
        old = self._ms.get(mod)
        self._ms[mod] = ms if old is None else torch.lerp(ms, old, self.momentum)

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
        logs = []
        for mod in mods:
            w = mod.weight
            lg = torch.zeros((), device=w.device)
            if self.structure:
                lg = lg - 0.5 * math.log(math.prod(w.shape[1:]))
            if self.data and mod in self._ms:
                lg = lg - 0.5 * torch.log(self._ms[mod].clamp_min(1e-30)).to(lg.device)
            logs.append(lg)
        dev = mods[0].weight.device
        lv = torch.stack([v.to(dev) for v in logs])
        m = torch.exp(lv - lv.mean()).clamp(*self.clip)
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
