r"""Robbins–Monro learning-rate schedules and a check of the convergence conditions.

Almost-sure convergence of Riemannian SGD (Bonnabel 2013, Thm. 1) needs step sizes with

.. math:: \sum_t \lambda(t) = \infty, \qquad \sum_t \lambda(t)^2 < \infty .

:class:`RobbinsMonroLR` implements :math:`\lambda(t) = \lambda_0/(1 + t/t_0)^p`, which satisfies
both exactly when :math:`p\in(1/2, 1]`.  :func:`check_robbins_monro` tells (and warns) whether a
scheduler can satisfy them; it is what :class:`~kernelgeo.optim.ConvergentRSGD` runs when a user
asks for the guarantee (``guarantee=True``).
"""

from __future__ import annotations

import math
import warnings

from torch.optim import lr_scheduler as lrs

__all__ = ["RobbinsMonroLR", "ScheduleWarning", "check_robbins_monro"]


class ScheduleWarning(UserWarning):
    """The learning-rate schedule cannot satisfy the Robbins–Monro conditions."""


class RobbinsMonroLR(lrs.LRScheduler):
    r"""Decay :math:`\lambda(t) = \lambda_0 / (1 + t/t_0)^p` (per param group).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    t0 : float
        Time scale (in scheduler steps) before the decay sets in; ``> 0``.
    power : float
        Exponent :math:`p`; :math:`p\in(1/2,1]` satisfies :math:`\sum\lambda=\infty`,
        :math:`\sum\lambda^2<\infty`.  Other positive values are accepted (with
        ``strict=False``) but lose the guarantee.
    last_epoch : int
        As in :class:`torch.optim.lr_scheduler.LRScheduler`.
    strict : bool
        Raise ``ValueError`` for :math:`p\notin(1/2,1]` (default) instead of warning.

    Examples
    --------
    >>> import torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> s = RobbinsMonroLR(opt, t0=10, power=1.0)
    >>> for _ in range(10):
    ...     opt.step(); s.step()
    >>> round(opt.param_groups[0]["lr"], 6)
    0.5
    """

    def __init__(self, optimizer, t0: float = 1.0, power: float = 1.0, last_epoch: int = -1,
                 strict: bool = True):
        if not (t0 > 0 and math.isfinite(t0)):
            raise ValueError(f"t0 must be a positive finite number, got {t0!r}")
        if not power > 0:
            raise ValueError(f"power must be positive, got {power!r}")
        if not 0.5 < power <= 1.0:
            msg = (f"power={power} violates the Robbins-Monro conditions (need 1/2 < p <= 1: "
                   "p <= 1/2 gives sum lr^2 = inf, p > 1 gives sum lr < inf)")
            if strict:
                raise ValueError(msg + "; pass strict=False to use it anyway")
            warnings.warn(msg, ScheduleWarning, stacklevel=2)
        self.t0 = float(t0)
        self.power = float(power)
        super().__init__(optimizer, last_epoch)
        if hasattr(optimizer, "set_schedule"):  # ConvergentRSGD: register for guarantee=True
            optimizer.set_schedule(self)

    def factor(self, t: int) -> float:
        """Multiplier :math:`(1 + t/t_0)^{-p}` of the initial learning rate at step ``t``."""
        return (1.0 + t / self.t0) ** (-self.power)

    def get_lr(self):
        f = self.factor(max(self.last_epoch, 0))
        return [base * f for base in self.base_lrs]

    def _get_closed_form_lr(self):
        return self.get_lr()


def _tail_exponent(fn, t1: float = 1e6, t2: float = 1e8) -> float | None:
    """Estimate p in lr ~ t^-p from two far points (None if the schedule reaches 0)."""
    a, b = float(fn(int(t1))), float(fn(int(t2)))
    if a <= 0 or b <= 0:
        return None
    return -math.log(b / a) / math.log(t2 / t1)


def check_robbins_monro(scheduler=None, *, warn: bool = True) -> bool:
    r"""Whether a schedule can satisfy :math:`\sum\lambda=\infty,\ \sum\lambda^2<\infty`.

    Parameters
    ----------
    scheduler : LRScheduler or None
        ``None`` means a constant learning rate.  Known schedulers are classified exactly;
        ``LambdaLR``/``MultiplicativeLR`` are probed numerically (tail exponent of the factor
        between steps :math:`10^6` and :math:`10^8`); others cannot be verified.
    warn : bool
        Emit a :class:`ScheduleWarning` explaining the problem when the answer is ``False``.

    Returns
    -------
    bool
        ``True`` when the conditions hold (or are very likely to, for probed lambdas).
    """
    ok, why = True, ""
    if scheduler is None or isinstance(scheduler, lrs.ConstantLR):
        ok, why = False, "a constant learning rate has sum lr^2 = inf"
    elif isinstance(scheduler, RobbinsMonroLR):
        ok = 0.5 < scheduler.power <= 1.0
        why = f"RobbinsMonroLR with power={scheduler.power} outside (1/2, 1]"
    elif isinstance(scheduler, (lrs.StepLR, lrs.MultiStepLR, lrs.ExponentialLR,
                                lrs.PolynomialLR, lrs.OneCycleLR)):
        ok, why = False, (f"{type(scheduler).__name__} decays geometrically or reaches a "
                          "final value in finite time (sum lr < inf, or lr^2 summed forever)")
    elif isinstance(scheduler, (lrs.CosineAnnealingLR, lrs.CosineAnnealingWarmRestarts,
                                lrs.CyclicLR)):
        ok, why = False, f"{type(scheduler).__name__} is periodic: sum lr^2 = inf"
    elif isinstance(scheduler, lrs.LambdaLR):
        fn = scheduler.lr_lambdas[0]
        p = _tail_exponent(fn)
        ok = p is not None and 0.5 < p <= 1.0 + 1e-3
        why = (f"LambdaLR factor decays like t^-{p:.3g} (need 1/2 < p <= 1)" if p is not None
               else "LambdaLR factor reaches 0 (sum lr < inf)")
    else:
        ok, why = False, f"cannot verify {type(scheduler).__name__}; use RobbinsMonroLR"
    if not ok and warn:
        warnings.warn(f"the learning-rate schedule cannot give the convergence guarantee: {why}",
                      ScheduleWarning, stacklevel=2)
    return ok


