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

__all__ = ["GuaranteeWarning", "RobbinsMonroLR", "ScheduleWarning", "check_robbins_monro"]


class GuaranteeWarning(UserWarning):
    """The optimizer's configuration is outside the convergence theorem."""


class ScheduleWarning(GuaranteeWarning):
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


#: the schedule is probed at t = 2^j, j <= PROBE_DOUBLINGS (about 1.6e60 steps)
PROBE_DOUBLINGS = 200
#: slack of the condensed-series exponents (q <= 1 + tol: diverges; q > 1 + tol: converges)
PROBE_TOL = 0.05


def _probe_lambda(fn) -> tuple[bool, str]:
    r"""Robbins–Monro conditions of a factor :math:`\lambda(t)` = ``fn(t)``, by Cauchy
    condensation.

    For a non-increasing :math:`\lambda\ge0`, :math:`\sum_t\lambda(t)` converges iff
    :math:`\sum_j a_j` does, :math:`a_j = 2^j\lambda(2^j)`, and :math:`\sum_t\lambda(t)^2`
    iff :math:`\sum_j b_j`, :math:`b_j = 2^j\lambda(2^j)^2`.  Over the tail
    :math:`j\in[J/2, J]` the exponent :math:`q` of :math:`a_j\sim j^{-q}` (or of
    :math:`b_j`) is estimated from its two ends: :math:`\sum a_j = \infty` is accepted when
    :math:`q_a\le 1 + \text{tol}` (covers :math:`t^{-p}`, :math:`p\le1`, and
    :math:`1/(t\log t)`), :math:`\sum b_j<\infty` when :math:`q_b>1+\text{tol}`.  A factor
    that is 0, negative, not finite, or increasing somewhere in the tail is rejected.
    """
    jmax = PROBE_DOUBLINGS
    j0 = jmax // 2
    logs = {}
    try:
        prev = math.inf
        for j in range(j0, jmax + 1):
            for t in (1 << j, 3 << (j - 1)) if j < jmax else (1 << j,):
                v = float(fn(t))
                if not math.isfinite(v) or v <= 0:
                    return False, f"the factor is {v!r} at step {float(t):.3g} (sum lr < inf)"
                if v > prev * (1 + 1e-9):
                    return False, (f"the factor increases at step {float(t):.3g}; only "
                                   "eventually non-increasing schedules can be verified")
                prev = v
                if t == 1 << j:
                    logs[j] = math.log(v)
    except (ArithmeticError, ValueError, TypeError, RuntimeError) as e:
        return False, f"the factor cannot be evaluated at large steps ({e})"
    ln2 = math.log(2.0)

    def q(c):  # exponent of c_j ~ j^-q between j0 and jmax, c_j = 2^j lambda(2^j)^c
        la = j0 * ln2 + c * logs[j0]
        lb = jmax * ln2 + c * logs[jmax]
        return -(lb - la) / math.log(jmax / j0)

    qa, qb = q(1), q(2)
    if qa > 1 + PROBE_TOL:
        return False, f"sum lr < inf (condensed terms 2^j lr(2^j) decay like j^-{qa:.3g})"
    if qb <= 1 + PROBE_TOL:
        rate = f"decay only like j^-{qb:.3g}" if qb > 0 else "do not decay"
        return False, (f"sum lr^2 = inf (condensed terms 2^j lr(2^j)^2 {rate}; they must "
                       "decay faster than j^-1)")
    return True, ""


def check_robbins_monro(scheduler=None, *, warn: bool = True) -> bool:
    r"""Whether a schedule can satisfy :math:`\sum\lambda=\infty,\ \sum\lambda^2<\infty`.

    Parameters
    ----------
    scheduler : LRScheduler or None
        ``None`` means a constant learning rate.  Known schedulers are classified exactly;
        every ``lr_lambda`` of a ``LambdaLR`` (one per param group) is probed numerically
        up to step :math:`2^{200}` by Cauchy condensation: a factor that is 0 or increases
        there is rejected; :math:`t^{-p}` is misjudged only for :math:`p\in(1/2, 0.5103]`
        (rejected) or :math:`p\in(1, 1.0005]` (accepted); beyond :math:`2^{200}` nothing is
        checked.  Other schedulers cannot be verified.
    warn : bool
        Emit a :class:`ScheduleWarning` explaining the problem when the answer is ``False``.

    Returns
    -------
    bool
        ``True`` when the conditions hold (or are very likely to, for probed lambdas).

    Examples
    --------
    >>> import math, torch
    >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    >>> lam = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / ((t + 2) * math.log(t + 2)))
    >>> check_robbins_monro(lam)
    True
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
        bad = []
        for i, fn in enumerate(scheduler.lr_lambdas):
            good, reason = _probe_lambda(fn)
            if not good:
                bad.append(f"LambdaLR factor of param group {i}: {reason}")
        ok, why = not bad, "; ".join(bad)
    else:
        ok, why = False, f"cannot verify {type(scheduler).__name__}; use RobbinsMonroLR"
    if not ok and warn:
        warnings.warn(f"the learning-rate schedule cannot give the convergence guarantee: {why}",
                      ScheduleWarning, stacklevel=2)
    return ok
