"""Convergent Riemannian SGD and Riemannian Adam for kernel manifolds, schedules and step scaling.

>>> from kernelgeo.optim import ConvergentRSGD, RiemannianAdam, RobbinsMonroLR
"""

from .adam import RiemannianAdam
from .rsgd import ConvergentRSGD, NonFiniteGradientError
from .scaling import StepScaling
from .schedules import RobbinsMonroLR, ScheduleWarning, check_robbins_monro
from .step_rules import RULES, rule_constants, step_sizes, zeta

__all__ = [
    "ConvergentRSGD", "NonFiniteGradientError", "RiemannianAdam", "RobbinsMonroLR",
    "ScheduleWarning", "check_robbins_monro", "StepScaling", "RULES", "rule_constants",
    "step_sizes", "zeta",
]
