"""Compatibility module: the training code lives in :mod:`kernelgeo.training`.

``from kernelgeo.train import TrainConfig, train, ConfigError, ...`` keeps working.
"""

from .manifolds import GeometrySpec, parse_geometry  # noqa: F401
from .training import (  # noqa: F401
    AMP_MODES,
    AUGMENTATIONS,
    DEFAULT_STEP_RULE,
    OPTIMIZERS,
    SCHEDULES,
    STEP_RULES,
    ConfigError,
    TrainConfig,
    build_optimizer,
    build_scheduler,
    check_geometry,
    evaluate,
    geometry_slug,
    machine_info,
    train,
    validate,
)

__all__ = ["TrainConfig", "train", "ConfigError", "parse_geometry", "check_geometry",
           "build_optimizer", "build_scheduler", "OPTIMIZERS", "SCHEDULES", "STEP_RULES",
           "machine_info", "geometry_slug"]
