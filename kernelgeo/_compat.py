"""Imports of third-party packages that need care.

geoopt 0.5.1 decorates functions with ``torch.jit.script``, which recent torch
releases deprecate with a ``FutureWarning`` at import time; so does torch's own module of
forward-mode AD decompositions, which ``torch.func.jvp`` (used by the analysis) loads on
first use.  The filter below is scoped to that one message and to these imports, so that
every other warning still reaches the user.
geomstats is imported lazily because it changes torch's default dtype.
"""

from __future__ import annotations

import contextlib
import warnings

with warnings.catch_warnings():
    warnings.filterwarnings(
        "ignore", message=r"`torch\.jit\.script(_method)?` is deprecated", category=FutureWarning
    )
    warnings.filterwarnings(
        "ignore", message=r".*torch\.jit\.script.*", category=DeprecationWarning
    )
    import geoopt  # noqa: F401
    from geoopt import ManifoldParameter, ManifoldTensor  # noqa: F401
    from geoopt.manifolds.base import Manifold  # noqa: F401
    from geoopt.optim import RiemannianSGD  # noqa: F401

    try:  # a private torch module: absent in other releases, then nothing to silence
        import torch._decomp.decompositions_for_jvp  # noqa: F401
    except ImportError:
        pass

__all__ = ["geoopt", "Manifold", "ManifoldParameter", "ManifoldTensor", "RiemannianSGD",
           "geomstats"]


@contextlib.contextmanager
def _keep_default_dtype():
    import torch

    dtype = torch.get_default_dtype()
    try:
        yield
    finally:
        torch.set_default_dtype(dtype)


def geomstats(backend: str = "pytorch"):
    """Import geomstats lazily, on the given backend, keeping torch's default dtype.

    geomstats 2.8 sets ``torch.set_default_dtype(torch.float64)`` when its pytorch
    backend is imported; that would silently change every model built afterwards.

    Returns
    -------
    module
        The ``geomstats`` package (``geomstats.backend`` already initialised).
    """
    import os

    os.environ.setdefault("GEOMSTATS_BACKEND", backend)
    with _keep_default_dtype(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import geomstats as gs
        import geomstats.backend  # noqa: F401
    return gs
