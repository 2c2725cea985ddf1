"""Names of the kernel geometries and the parser of product specifications.

Names (aliases in brackets name the normalisation method that induces the geometry):

================================  ===================================================
``euclidean`` (``none``)          no constraint
``sphere`` (``bn``, ``wn``)       each filter on :math:`S^{n-1}(r)`
``centered-sphere`` (``cwn``)     each filter centred, on :math:`S^{n-2}(r)`
``oblique``                       unit-norm columns of each 2-D slice
``oblique-slice``                 each 2-D slice on a sphere
``stiefel`` (``own``)             orthonormal filters, grouped when out > fan-in
``stiefel-slice``                 each 2-D slice on St(kh, kw)
================================  ===================================================

Products: ``<partition>[:<groups>]:<name>+<name>+...`` with partition ``po`` (output
channels), ``pi`` (input channels) or ``pio`` (both; groups ``AxB``), e.g.
``po:sphere+stiefel`` (half the filters on spheres, half on Stiefel) or ``pio:2x2:sphere``.
"""

from __future__ import annotations

from collections.abc import Callable

from .base import KernelManifold
from .euclidean import Euclidean
from .oblique import Oblique
from .product import KernelProduct
from .sphere import CenteredSphere, Sphere
from .stiefel import Stiefel

__all__ = ["available", "get_manifold", "ALIASES"]

_FACTORIES: dict[str, Callable[..., KernelManifold]] = {
    "euclidean": Euclidean,
    "sphere": Sphere,
    "centered-sphere": CenteredSphere,
    "oblique": lambda **kw: Oblique(per="column", **kw),
    "oblique-slice": lambda **kw: Oblique(per="slice", **kw),
    "stiefel": lambda **kw: Stiefel(per="filter", **kw),
    "stiefel-slice": lambda **kw: Stiefel(per="slice", **kw),
}

#: normalisation methods and the geometry they induce
ALIASES = {"none": "euclidean", "bn": "sphere", "wn": "sphere", "cwn": "centered-sphere",
           "own": "stiefel", "unit-norm": "oblique-slice", "orthonormal": "stiefel"}

_PARTITIONS = {"po": "out", "pi": "in", "pio": "both"}


def available() -> list[str]:
    """Names accepted by :func:`get_manifold` (aliases and product syntax aside)."""
    return list(_FACTORIES)


def _valid_msg() -> str:
    return (f"valid names: {', '.join(available())}; aliases: "
            f"{', '.join(f'{k}={v}' for k, v in ALIASES.items())}; products like "
            "'po:sphere+stiefel', 'pi:2:sphere', 'pio:2x2:sphere+oblique'")


def _single(name: str, **kwargs) -> KernelManifold:
    key = ALIASES.get(name, name)
    if key not in _FACTORIES:
        raise ValueError(f"unknown manifold {name!r}; {_valid_msg()}")
    if key == "euclidean":
        return Euclidean()
    try:
        return _FACTORIES[key](**kwargs)
    except TypeError as err:
        raise ValueError(f"manifold {name!r} does not take the option(s) "
                         f"{sorted(kwargs)}: {err}") from None


def _product(spec: str, **kwargs) -> KernelProduct:
    parts = spec.split(":")
    kind = parts[0]
    if len(parts) not in (2, 3) or not parts[-1]:
        raise ValueError(f"bad product spec {spec!r}; expected e.g. 'po:sphere+stiefel' "
                         "or 'pio:2x2:sphere'")
    comps = [_single(n.strip(), **kwargs) for n in parts[-1].split("+")]
    groups = None
    if len(parts) == 3:
        g = parts[1]
        try:
            if kind == "pio":
                a, b = g.lower().split("x")
                groups = (int(a), int(b))
            else:
                groups = int(g)
        except ValueError:
            raise ValueError(f"bad group count {g!r} in {spec!r}: use an int for po/pi and "
                             "AxB for pio") from None
    return KernelProduct(comps, partition=_PARTITIONS[kind], groups=groups)


def get_manifold(spec: str | KernelManifold, **kwargs) -> KernelManifold:
    """Build a kernel manifold from a name, an alias or a product spec.

    Parameters
    ----------
    spec : str or KernelManifold
        A name from :func:`available`, an alias from :data:`ALIASES`, a product string, or a
        manifold instance (returned as is).
    **kwargs
        Passed to the manifold's constructor (e.g. ``radius=2.0``); ignored by ``euclidean``.

    Returns
    -------
    KernelManifold

    Raises
    ------
    ValueError
        For an unknown name, listing the valid ones.
    """
    if isinstance(spec, KernelManifold):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"manifold spec must be a str or KernelManifold, got {type(spec).__name__}")
    s = spec.strip().lower()
    if s.split(":", 1)[0] in _PARTITIONS and ":" in s:
        return _product(s, **kwargs)
    return _single(s, **kwargs)
