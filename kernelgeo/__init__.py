"""kernelgeo: optimization on submanifolds of convolution kernels.

Declare the kernels of any PyTorch model on sphere, centred-sphere, oblique or Stiefel
manifolds (and products of them) with :func:`constrain`, train them with
:class:`kernelgeo.optim.ConvergentRSGD`, and study the geometry with
:mod:`kernelgeo.analysis`.

The subpackages are attributes of the package: ``kernelgeo.manifolds`` and ``kernelgeo.nn``
are imported with it, ``kernelgeo.optim``, ``kernelgeo.analysis`` and ``kernelgeo.models``
on first access (``import kernelgeo`` stays light and never imports geomstats).
"""

__version__ = "0.1.0"

import importlib  # noqa: E402

# manifolds first: it also installs the geoopt import-warning filter
from . import manifolds, nn  # noqa: E402
from .constraints import (  # noqa: E402
    ConstrainReport,
    KernelProjectionWarning,
    LayerEntry,
    OptimizerStateResetWarning,
    UnusedRuleWarning,
    constrain,
    constraint_error,
    load_state_dict,
    manifold_parameters,
    project_,
    unconstrain,
)
from .manifolds import available, get_manifold  # noqa: E402
from .runs import load_run  # noqa: E402

#: subpackages imported on first attribute access
_LAZY = ("optim", "analysis", "models")

__all__ = [
    "__version__", "manifolds", "nn", "constrain", "unconstrain", "ConstrainReport",
    "LayerEntry", "KernelProjectionWarning", "UnusedRuleWarning", "OptimizerStateResetWarning",
    "constraint_error",
    "manifold_parameters", "project_", "load_state_dict", "available", "get_manifold",
    "load_run",
]


def __getattr__(name: str):
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
