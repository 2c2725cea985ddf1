r"""Names of the kernel geometries and the parser of product specifications.

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
With fewer component names than groups the names are cycled over the groups; more names than
groups is an error (the extra ones would never be used).

Geometry specifications (the ``--geometry`` option of the command line) are parsed by
:func:`parse_geometry`, once: the result holds the manifold objects that
:func:`kernelgeo.constrain` then uses.  Grammar::

    spec  := manifold | rule ("," rule)*
    rule  := glob "=" manifold          (fnmatch glob over module names; first match wins)
    manifold := (name | alias | product) ["@" radius]

``@radius`` sets the radius :math:`r > 0` of every factor (default 1), e.g. ``stiefel@1.4142``:
filters of norm :math:`\sqrt 2`, the expected norm of a He-initialised ReLU filter
(:math:`n \cdot 2/n`).  It is part of the text that run configurations record, so a run is
rebuilt with the radius it was trained with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from .base import KernelManifold
from .euclidean import Euclidean
from .oblique import Oblique
from .product import KernelProduct
from .sphere import CenteredSphere, Sphere
from .stiefel import Stiefel

__all__ = ["available", "get_manifold", "ALIASES", "parse_geometry", "GeometrySpec",
           "GeometryRule", "GeometryError"]


class GeometryError(ValueError):
    """A malformed geometry specification (the message says which part and what to write)."""

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
        raise GeometryError(f"unknown manifold {name!r}; {_valid_msg()}")
    if key == "euclidean":
        return Euclidean()
    try:
        return _FACTORIES[key](**kwargs)
    except TypeError as err:
        raise GeometryError(f"manifold {name!r} does not take the option(s) "
                         f"{sorted(kwargs)}: {err}") from None


def _product(spec: str, **kwargs) -> KernelProduct:
    parts = spec.split(":")
    kind = parts[0]
    if len(parts) not in (2, 3) or not parts[-1]:
        raise GeometryError(f"bad product spec {spec!r}: expected '<po|pi|pio>[:<groups>]:"
                            "<name>+<name>...', e.g. 'po:sphere+stiefel' or 'pio:2x2:sphere'")
    names = [n.strip() for n in parts[-1].split("+")]
    if not all(names):
        raise GeometryError(f"bad product spec {spec!r}: empty component name between '+' signs")
    comps = [_single(n, **kwargs) for n in names]
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
            raise GeometryError(f"bad group count {g!r} in {spec!r}: use an int for po/pi and "
                                "AxB for pio") from None
        n_groups = math.prod(groups) if isinstance(groups, tuple) else groups
        if min(groups if isinstance(groups, tuple) else (groups,)) < 1:
            raise GeometryError(f"bad group count {g!r} in {spec!r}: groups must be >= 1")
        if len(comps) > n_groups:
            raise GeometryError(
                f"product {spec!r} names {len(comps)} components for {n_groups} group(s): the "
                f"extra ones would never be used; give at most {n_groups} names or more groups")
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
    if "@" in s:
        s, r = (x.strip() for x in s.rsplit("@", 1))
        if "radius" in kwargs:
            raise GeometryError(f"{spec!r} gives a radius and radius={kwargs['radius']!r} is "
                                "passed too; give it once")
        try:
            radius = float(r)
        except ValueError:
            radius = math.nan
        if not (math.isfinite(radius) and radius > 0):
            raise GeometryError(f"bad radius {r!r} in {spec!r}: expected '<manifold>@<r>' "
                                "with a finite r > 0, e.g. 'sphere@1.4142'")
        if ALIASES.get(s, s) == "euclidean":
            raise GeometryError(f"{spec!r}: euclidean kernels have no radius; drop '@{r}'")
        kwargs = dict(kwargs, radius=radius)
    if s.split(":", 1)[0] in _PARTITIONS and ":" in s:
        return _product(s, **kwargs)
    return _single(s, **kwargs)


@dataclass(frozen=True)
class GeometryRule:
    """One entry of a :class:`GeometrySpec`: a module-name glob (``None`` for a spec that is a
    single manifold for every layer), the manifold text and the manifold built from it."""

    glob: str | None
    name: str
    manifold: KernelManifold


@dataclass(frozen=True)
class GeometrySpec:
    """A parsed geometry specification (see :func:`parse_geometry`).

    Attributes
    ----------
    text : str
        The specification as given (stripped): what configuration files record.
    rules : tuple of GeometryRule
        One rule without glob for a single manifold, else the rules in order.
    """

    text: str
    rules: tuple[GeometryRule, ...]

    @property
    def is_rules(self) -> bool:
        """Whether this is a list of ``glob=manifold`` rules (else one manifold for all)."""
        return self.rules[0].glob is not None

    def constrain_spec(self) -> KernelManifold | dict[str, KernelManifold]:
        """The argument for :func:`kernelgeo.constrain`: the manifold, or ``{glob: manifold}``
        in rule order (the manifold objects are the ones built by :func:`parse_geometry`)."""
        if not self.is_rules:
            return self.rules[0].manifold
        return {r.glob: r.manifold for r in self.rules}

    def names(self) -> str | dict[str, str]:
        """The manifold text, or ``{glob: manifold text}`` in rule order."""
        if not self.is_rules:
            return self.rules[0].name
        return {r.glob: r.name for r in self.rules}

    def slug(self) -> str:
        """File-system friendly name, e.g. ``po-sphere+stiefel``."""
        out = "".join(c if (c.isalnum() or c in "+-_.") else "-" for c in self.text)
        return out.strip("-") or "geometry"

    def __str__(self) -> str:
        return self.text


def _build(name: str, where: str, spec: str, **kwargs) -> KernelManifold:
    try:
        return get_manifold(name, **kwargs)
    except (ValueError, TypeError) as err:
        raise GeometryError(f"bad geometry {where}in {spec!r}: {err}") from None


def parse_geometry(spec: str | GeometrySpec, **kwargs) -> GeometrySpec:
    """Parse a geometry specification: one manifold, or rules ``glob=manifold,...``.

    Parameters
    ----------
    spec : str or GeometrySpec
        ``"sphere"``, ``"po:sphere+stiefel"`` or ``"layer1.*=sphere,*=euclidean"``
        (a :class:`GeometrySpec` is returned as is).
    **kwargs
        Passed to :func:`get_manifold` (e.g. ``radius=2.0``).

    Returns
    -------
    GeometrySpec
        With every manifold built once.

    Raises
    ------
    GeometryError
        Empty spec, malformed rules, repeated globs, unknown names, bad products (listing
        what is valid).

    Examples
    --------
    >>> g = parse_geometry("layer1.*=sphere, *=euclidean")
    >>> g.names()
    {'layer1.*': 'sphere', '*': 'euclidean'}
    >>> parse_geometry("po:2:sphere+stiefel+oblique")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    kernelgeo.manifolds.registry.GeometryError: ... names 3 components for 2 group(s)...
    """
    if isinstance(spec, GeometrySpec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"geometry spec must be a str, got {type(spec).__name__}")
    s = spec.strip()
    if not s:
        raise GeometryError("empty geometry spec; give a manifold name such as 'sphere' or "
                            "rules such as 'layer1.*=sphere,*=euclidean'")
    if "=" not in s:
        if "," in s:
            raise GeometryError(f"bad geometry {spec!r}: several entries need the form "
                                "'glob=name', e.g. 'layer1.*=sphere,*=euclidean'")
        return GeometrySpec(s, (GeometryRule(None, s, _build(s, "", spec, **kwargs)),))
    rules: list[GeometryRule] = []
    for i, part in enumerate(s.split(",")):
        part = part.strip()
        if part.count("=") != 1:
            raise GeometryError(f"bad geometry rule #{i + 1} {part!r} in {spec!r}: expected "
                                "'<module-name glob>=<geometry>', e.g. 'layer1.*=sphere'")
        glob, name = (x.strip() for x in part.split("="))
        if not glob or not name:
            raise GeometryError(f"bad geometry rule #{i + 1} {part!r} in {spec!r}: empty "
                                f"{'glob' if not glob else 'geometry'}")
        if any(r.glob == glob for r in rules):
            raise GeometryError(f"geometry rule glob {glob!r} given twice in {spec!r}")
        rules.append(GeometryRule(glob, name,
                                  _build(name, f"rule #{i + 1} {part!r} ", spec, **kwargs)))
    return GeometrySpec(s, tuple(rules))
