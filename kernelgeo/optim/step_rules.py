r"""Step-size rules :math:`g_k(t) = \lambda(t)/\max(1, \Gamma_k(t))` per component manifold.

Every constrained kernel is a product of *components* (rows of a sphere/oblique layout, Stiefel
blocks, ...).  For component :math:`k` with update direction :math:`d_k` (the Riemannian
stochastic gradient, or the momentum direction when momentum is on) of norm
:math:`R_k = \|d_k\|_{x_k}`, the step is :math:`x_k \leftarrow R_{x_k}(-g_k d_k)`; its
*length* (the norm of the tangent vector handed to the retraction, an upper bound of the
geodesic distance travelled by the projection retractions used here) is
:math:`\ell_k = g_k R_k`.

Rules
-----
``"gsgd"`` (default)
    Geometry-aware cap of the step length:

    .. math::

        \Gamma_k = \frac{\lambda R_k}{c_k},\qquad
        c_k = \theta\, r_{c,k},\qquad
        r_{c,k} = \tfrac12 \min\Big(\mathrm{inj}_k,\ \frac{\pi}{\sqrt{K_{\max,k}}}\Big),

    with :math:`\theta` = ``max_step`` :math:`\in(0,1)` (default 0.5), :math:`\mathrm{inj}_k`
    the injectivity radius and :math:`K_{\max,k}` the largest sectional curvature of the
    component (:math:`\pi/\sqrt{K_{\max}} = \infty` when :math:`K_{\max}\le 0`).
    :math:`r_c` is the classical lower bound of the convexity radius.  So
    :math:`\ell_k = \min(\lambda R_k,\ c_k)`: plain Riemannian SGD while the step is
    shorter than :math:`c_k`, clipped to :math:`c_k` otherwise.  On a sphere of radius
    :math:`r`, :math:`c = \theta\pi r/2` (45° at :math:`\theta=1/2`).
``"bounded"``
    The same clip with the cap :math:`c_k = \theta\,\mathrm{inj}_k` (kept with this meaning
    from earlier versions; on a sphere twice the ``"gsgd"`` cap).
``"none"``
    :math:`\Gamma_k = 0`: plain Riemannian SGD, :math:`g_k = \lambda`.

Properties (tested): :math:`\ell_k\le c_k` for every :math:`\lambda` and gradient scale;
:math:`\Gamma_k` compares two lengths, so rescaling the loss by :math:`s>0` rescales small
steps by exactly :math:`s`; :math:`g_k = \lambda\,\min(1, c_k/(\lambda R_k))` and, with
:math:`R_k\le G` and :math:`\lambda\le\lambda_0`,
:math:`\min(1, c_k/(\lambda_0 G))\le g_k/\lambda\le 1`, with :math:`g_k=\lambda` as soon as
:math:`\lambda(t)G\le c_k`, i.e. after finitely many steps of a decreasing schedule.  See
``docs/optimization.rst`` for the convergence statement and proof.

Flat components (Euclidean blocks, infinite injectivity radius) always use
:math:`g_k=\lambda` (Robbins–Monro SGD).

The table
---------
:data:`STEP_RULES` is the single definition of the rules: their reference radius, the
default :math:`\theta` (:data:`DEFAULT_MAX_STEP`) and the integer codes
(:data:`KERNEL_UNCAPPED`, :data:`KERNEL_CAPPED`) with which the fused kernels receive a
component's rule.  Every backend reads it: the torch paths call :func:`step_sizes`; the C
kernels (``native_kernels.c``) get the codes as ``KG_RULE_*`` macros of the header that
:func:`kernelgeo.optim.native.c_header` generates from this table, and every item's
``rule`` and ``cap`` fields from :attr:`RuleConstants.code` and
:attr:`RuleConstants.kernel_cap`; the Triton kernels get the cap in their item table.  A
kernel never sees :math:`\theta` or the radii: only the cap :math:`c_k` computed here.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["RULES", "STEP_RULES", "StepRule", "DEFAULT_MAX_STEP", "KERNEL_UNCAPPED",
           "KERNEL_CAPPED", "RuleConstants", "check_rule_args", "convexity_radius",
           "rule_constants", "step_sizes"]

#: default :math:`\theta`, the cap as a fraction of the rule's reference radius
DEFAULT_MAX_STEP = 0.5
#: code of a component whose step is not capped (rule ``"none"``, flat components): g = lr
KERNEL_UNCAPPED = 0
#: code of a component whose step length is capped at its ``cap``
KERNEL_CAPPED = 1


def convexity_radius(inj: float, k_max: float) -> float:
    r"""Lower bound :math:`\tfrac12\min(\mathrm{inj}, \pi/\sqrt{K_{\max}})` of the convexity radius.

    Parameters
    ----------
    inj : float
        Injectivity radius (``inf`` for flat factors).
    k_max : float
        Upper bound of the sectional curvature (:math:`\le 0`: no curvature limit).
    """
    conj = math.pi / math.sqrt(k_max) if k_max > 0 else math.inf
    return 0.5 * min(inj, conj)


@dataclass(frozen=True)
class StepRule:
    """One step rule of :data:`STEP_RULES`.

    Attributes
    ----------
    name : str
    radius : callable or None
        ``radius(inj, k_max)``: the reference radius whose fraction :math:`\theta` caps the
        step length of a curved component (``None``: no cap).
    summary : str
    """

    name: str
    radius: Callable[[float, float], float] | None
    summary: str


#: the step rules, by name (the ``step_rule`` argument of the optimizer)
STEP_RULES: dict[str, StepRule] = {r.name: r for r in (
    StepRule("gsgd", convexity_radius,
             "step length capped at max_step times the convexity-radius bound "
             "1/2 min(inj, pi/sqrt(K_max))"),
    StepRule("bounded", lambda inj, k_max: inj,
             "step length capped at max_step times the injectivity radius"),
    StepRule("none", None, "plain Riemannian SGD, g = lr"),
)}
#: names of the step rules
RULES = tuple(STEP_RULES)


def check_rule_args(rho, max_step) -> None:
    """Raise ``ValueError`` for a ``rho`` other than None or ``max_step`` outside (0, 1)."""
    if rho is not None:
        raise ValueError(
            f"rho={rho!r}: the step rules no longer use a distance bound (the 'gsgd' cap is "
            "set by the injectivity radius and the curvature of each component); remove rho, "
            "and use max_step to change the cap")
    if not (isinstance(max_step, numbers.Real) and 0 < max_step < 1):
        raise ValueError(f"max_step must be a number in (0, 1), got {max_step!r}")


@dataclass(frozen=True)
class RuleConstants:
    """Per-component constants of a step rule (equal for all components of a batch key)."""

    rule: str
    cap: float  # largest step length c_k (inf: no cap)
    inj: float  # injectivity radius (for logging)
    flat: bool  # Euclidean component: g = lambda

    @property
    def code(self) -> int:
        """The rule as the fused kernels receive it: :data:`KERNEL_CAPPED` or
        :data:`KERNEL_UNCAPPED`."""
        return KERNEL_CAPPED if math.isfinite(self.cap) else KERNEL_UNCAPPED

    @property
    def kernel_cap(self) -> float:
        """The cap as the fused kernels receive it (finite: 1.0 when not capped)."""
        return self.cap if self.code == KERNEL_CAPPED else 1.0


def rule_constants(rule: str, manifold, shape, *, rho: float | None = None,
                   max_step: float = DEFAULT_MAX_STEP) -> RuleConstants:
    r"""Constants of ``rule`` for one component of a kernel of ``shape`` on ``manifold``.

    Parameters
    ----------
    rule : {"gsgd", "bounded", "none"}
    manifold : KernelManifold
        A non-product kernel manifold (a block of a product).
    shape : tuple of int
        Shape of the (sub-)kernel.
    rho : None
        Must be ``None``: the former distance bound of ``"gsgd"`` is no longer used (the cap
        depends on the geometry only; see ``docs/optimization.rst``).
    max_step : float
        Fraction :math:`\theta\in(0,1)` of the reference radius (convexity radius bound for
        ``"gsgd"``, injectivity radius for ``"bounded"``).
    """
    if rule not in RULES:
        raise ValueError(f"unknown step_rule {rule!r}; use one of {RULES}")
    check_rule_args(rho, max_step)
    inj = float(manifold.injectivity_radius(shape))
    flat = not math.isfinite(inj)
    radius = STEP_RULES[rule].radius
    if flat or radius is None:
        cap = math.inf
    else:
        cap = max_step * radius(inj, float(manifold.curvature_bounds(shape)[1]))
    return RuleConstants(rule=rule, cap=cap, inj=inj, flat=flat)


def step_sizes(lr, rnorm: torch.Tensor, c: RuleConstants) -> torch.Tensor:
    r"""Per-component step sizes :math:`g_k = \lambda/\max(1,\Gamma_k)`, :math:`\Gamma_k =
    \lambda R_k/c_k`.

    Parameters
    ----------
    lr : float or Tensor
        :math:`\lambda(t)`, a scalar or a per-component tensor broadcastable to ``rnorm``
        (layer-wise scaling).
    rnorm : Tensor, shape (B,)
        Norms :math:`R_k` of the update directions.
    c : RuleConstants

    Returns
    -------
    Tensor, shape (B,)
    """
    if c.code == KERNEL_UNCAPPED:
        return torch.ones_like(rnorm) * lr
    gamma = rnorm * (lr / c.cap)
    return lr / gamma.clamp_min(1.0)
