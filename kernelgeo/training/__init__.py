"""Training package behind ``kernelgeo train`` (also importable as ``kernelgeo.train``).

Modules, in the order a run uses them:

==================  ==========================================================================
``config``          :class:`TrainConfig`, valid values, per-field checks, resume comparison
``loaders``         data loaders (through ``kernelgeo.data.make_loader``), augmentation policy
``optimizers``      optimizer (one small factory per ``--optimizer``) and learning-rate schedule
``rundir``          output-directory rules, atomic run files, default ``runs/<command>/<name>``
``environment``     device, threads, seeds, RNG states, machine description
``path``            path length travelled by the weights (per layer and in total)
``loop``            :func:`train`: build, check, resume, the epoch loop, summary
==================  ==========================================================================
"""

from ..manifolds import parse_geometry
from .config import (
    AMP_MODES,
    AUGMENTATIONS,
    DEFAULT_STEP_RULE,
    OPTIMIZERS,
    SCHEDULES,
    STEP_RULES,
    ConfigError,
    TrainConfig,
    validate,
)
from .environment import machine_info
from .loop import evaluate, train
from .optimizers import build_optimizer, build_scheduler
from .rundir import default_out

__all__ = ["TrainConfig", "train", "evaluate", "ConfigError", "validate", "build_optimizer",
           "build_scheduler", "OPTIMIZERS", "SCHEDULES", "STEP_RULES", "DEFAULT_STEP_RULE",
           "AMP_MODES", "AUGMENTATIONS", "machine_info", "default_out", "check_geometry",
           "geometry_slug"]


def check_geometry(spec: str) -> str:
    """Validate a geometry spec string (see :func:`kernelgeo.manifolds.parse_geometry`);
    returns it unchanged.

    Raises
    ------
    ConfigError
    """
    from ..manifolds import GeometryError

    try:
        parse_geometry(spec)
    except GeometryError as err:
        raise ConfigError(str(err)) from None
    return spec


def geometry_slug(spec) -> str:
    """File-system friendly name of a geometry spec, e.g. ``po-sphere+stiefel``."""
    return parse_geometry(spec).slug()
