"""Convergent Riemannian SGD for kernel manifolds, its schedules and step scaling.

>>> from kernelgeo.optim import ConvergentRSGD, RobbinsMonroLR
"""

from .rsgd import ConvergentRSGD, NonFiniteGradientError, StepOverflowError
from .scaling import StepScaling
from .schedules import RobbinsMonroLR, ScheduleWarning, check_robbins_monro
from .step_rules import RULES, rule_constants, step_sizes, zeta

__all__ = [
    "ConvergentRSGD", "NonFiniteGradientError", "StepOverflowError", "RobbinsMonroLR",
    "ScheduleWarning", "check_robbins_monro", "StepScaling", "RULES", "rule_constants",
    "step_sizes", "zeta",
]
