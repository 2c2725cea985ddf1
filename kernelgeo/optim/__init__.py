"""Convergent Riemannian SGD and Riemannian Adam for kernel manifolds, schedules and step scaling.

>>> from kernelgeo.optim import ConvergentRSGD, RiemannianAdam, RobbinsMonroLR
"""

from .adam import RiemannianAdam
from .rsgd import ConvergentRSGD, NonFiniteGradientError, StepOverflowError
from .scaling import StepScaling
from .schedules import GuaranteeWarning, RobbinsMonroLR, ScheduleWarning, check_robbins_monro
from .step_rules import RULES, convexity_radius, rule_constants, step_sizes

__all__ = [
    "ConvergentRSGD", "GuaranteeWarning", "NonFiniteGradientError", "RiemannianAdam",
    "RobbinsMonroLR", "ScheduleWarning", "StepOverflowError", "check_robbins_monro",
    "StepScaling", "RULES", "convexity_radius", "rule_constants", "step_sizes",
]
