"""Kernel manifolds: geometries of convolution kernels, each a :class:`geoopt.Manifold`.

One module per geometry; :func:`get_manifold` builds one from its name.
"""

from .base import BATCHED_LAYOUTS, KernelManifold, KernelShapeError, radius_for_shape
from .euclidean import Euclidean
from .oblique import Oblique
from .product import KernelProduct
from .registry import (
    ALIASES,
    GeometryError,
    GeometryRule,
    GeometrySpec,
    available,
    get_manifold,
    parse_geometry,
)
from .sphere import CenteredSphere, RowSphere, Sphere
from .stiefel import Stiefel, stiefel_groups

__all__ = [
    "KernelManifold", "KernelShapeError", "radius_for_shape", "BATCHED_LAYOUTS",
    "Euclidean", "Sphere", "CenteredSphere", "RowSphere", "Oblique", "Stiefel",
    "stiefel_groups", "KernelProduct",
    "available", "get_manifold", "ALIASES", "parse_geometry", "GeometrySpec", "GeometryRule",
    "GeometryError",
]
