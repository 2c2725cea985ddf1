"""kernelgeo: optimization on submanifolds of convolution kernels.

Declare the kernels of any PyTorch model on sphere, centred-sphere, oblique or Stiefel
manifolds (and products of them) with :func:`constrain`, train them with
:class:`kernelgeo.optim.ConvergentRSGD`, and study the geometry with
:mod:`kernelgeo.analysis`.
"""

__version__ = "0.1.0"

from . import manifolds  # noqa: E402  (also installs the geoopt import-warning filter)
from .constrain import (  # noqa: E402
    ConstrainReport,
    KernelProjectionWarning,
    LayerEntry,
    constrain,
    constraint_error,
    load_state_dict,
    manifold_parameters,
    project_,
)
from .manifolds import available, get_manifold  # noqa: E402
from .runs import load_run  # noqa: E402

__all__ = [
    "__version__", "manifolds", "constrain", "ConstrainReport", "LayerEntry",
    "KernelProjectionWarning", "constraint_error", "manifold_parameters", "project_",
    "load_state_dict", "available", "get_manifold", "load_run",
]
