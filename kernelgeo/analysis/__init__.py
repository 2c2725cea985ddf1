"""Geometric analysis of kernel normalizations: curvature, geodesics, landscapes, reports.

Submodules (``curvature`` and ``geodesics`` are imported here; the others on demand, as they
load scipy and matplotlib; none imports geomstats):

- :mod:`~kernelgeo.analysis.curvature`: second fundamental forms, sectional curvature (Gauss
  equation, Jacobi fields), per-layer geometry tables;
- :mod:`~kernelgeo.analysis.geodesics`: distances, logarithms (Stiefel by Zimmermann's
  algorithm and shooting), geodesic interpolation, distances travelled in training;
- :mod:`~kernelgeo.analysis.landscape`: 1-D and 2-D loss landscapes (Li et al. 2018 and
  manifold-aware directions);
- :mod:`~kernelgeo.analysis.hessian`: Riemannian and Euclidean Hessian-vector products and
  sharpness;
- :mod:`~kernelgeo.analysis.plotting` and :mod:`~kernelgeo.analysis.report`: figures and the
  Markdown normalization report (``kernelgeo analyze``).
"""

from . import curvature, geodesics
from .curvature import (
    component_sectional_curvature,
    curvature_table,
    second_fundamental_form,
    sectional_curvature,
)
from .geodesics import geodesic, kernel_dist, kernel_logmap, layer_distances, stiefel_log

__all__ = [
    "curvature", "geodesics", "second_fundamental_form", "sectional_curvature",
    "component_sectional_curvature", "curvature_table", "kernel_dist", "kernel_logmap",
    "geodesic", "stiefel_log", "layer_distances",
]
