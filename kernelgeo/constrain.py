"""Declare the convolution kernels of any PyTorch model as manifold parameters, in one line.

>>> import torch, kernelgeo
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
>>> report = kernelgeo.constrain(model, "sphere")
>>> type(model[0].weight).__name__
'ManifoldParameter'

The weights are replaced by :class:`geoopt.ManifoldParameter` objects **in place** (same
attribute, same ``state_dict`` key and shape), projected onto their manifold.  Create the
optimizer after calling :func:`constrain`: an optimizer built before holds the old tensors.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ._compat import ManifoldParameter
from .manifolds import Euclidean, KernelManifold, KernelShapeError, available, get_manifold

__all__ = [
    "constrain", "ConstrainReport", "LayerEntry", "KernelProjectionWarning", "constraint_error",
    "manifold_parameters", "project_", "load_state_dict",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
Spec = str | KernelManifold | Mapping | Callable | None


class KernelProjectionWarning(UserWarning):
    """Kernels loaded from a checkpoint were off their manifolds and have been projected."""


@dataclass
class LayerEntry:
    """One row of a :class:`ConstrainReport`."""

    name: str
    kind: str
    shape: tuple[int, ...]
    geometry: str
    dim: int
    status: str  # "manifold" or "euclidean"
    reason: str = ""
    moved: float = 0.0  # relative distance the projection moved the initial kernel


class ConstrainReport:
    """What :func:`constrain` did to each layer: printable, and iterable over its entries."""

    def __init__(self, entries: list[LayerEntry]):
        self.entries = entries

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    @property
    def constrained(self) -> list[LayerEntry]:
        return [e for e in self.entries if e.status == "manifold"]

    @property
    def euclidean(self) -> list[LayerEntry]:
        return [e for e in self.entries if e.status == "euclidean"]

    def to_markdown(self) -> str:
        """The report as a Markdown table."""
        rows = ["| layer | kernel shape | geometry | dim | note |", "|---|---|---|---|---|"]
        for e in self.entries:
            note = e.reason or (f"projection moved {e.moved:.2%}" if e.moved else "")
            rows.append(f"| {e.name} | {tuple(e.shape)} | {e.geometry} | {e.dim} | {note} |")
        return "\n".join(rows)

    def __str__(self) -> str:
        w = max([len(e.name) for e in self.entries] + [5])
        lines = [f"{'layer':<{w}}  {'kernel shape':<18} {'dim':>8}  geometry"]
        for e in self.entries:
            line = f"{e.name:<{w}}  {str(tuple(e.shape)):<18} {e.dim:>8}  {e.geometry}"
            if e.reason:
                line += f"  ({e.reason})"
            lines.append(line)
        n_m = len(self.constrained)
        lines.append(f"{n_m} of {len(self.entries)} kernels on manifolds, "
                     f"{sum(e.dim for e in self.constrained)} constrained dimensions")
        return "\n".join(lines)

    __repr__ = __str__


def _candidates(model: nn.Module, include_linear: bool) -> list[tuple[str, nn.Module]]:
    kinds = _CONV + ((nn.Linear,) if include_linear else ())
    seen, out = set(), []
    for name, mod in model.named_modules():
        if isinstance(mod, kinds) and id(mod) not in seen and mod.weight is not None:
            seen.add(id(mod))
            out.append((name or "<root>", mod))
    return out


def _resolver(spec: Spec, names: list[str], **kwargs):
    """Turn ``spec`` into ``f(name, module) -> (manifold | None, rule description)``."""
    if spec is None or isinstance(spec, (str, KernelManifold)):
        m = None if spec is None else get_manifold(spec, **kwargs)
        return lambda name, mod: (m, f"spec {spec!r}")
    if isinstance(spec, Mapping):
        rules = [(str(g), get_manifold(v, **kwargs) if v is not None else None)
                 for g, v in spec.items()]
        unused = [g for g, _ in rules if not any(fnmatch.fnmatchcase(n, g) for n in names)]
        if unused:
            raise ValueError(
                f"constrain: rule(s) {unused} match no convolution layer; layers are: "
                f"{', '.join(names) or '(none)'}")

        def resolve(name, mod):
            for g, m in rules:
                if fnmatch.fnmatchcase(name, g):
                    return m, f"rule {g!r}"
            return None, "no rule matched"
        return resolve
    if callable(spec):
        def resolve(name, mod):
            m = spec(name, mod)
            return (None if m is None else get_manifold(m, **kwargs)), "callable spec"
        return resolve
    raise TypeError("constrain: spec must be a manifold name, a KernelManifold, a mapping "
                    f"from module-name glob to either, or a callable; got {type(spec).__name__}")


def constrain(model: nn.Module, spec: Spec, *, on_invalid: str = "raise",
              include_linear: bool = False, **manifold_kwargs) -> ConstrainReport:
    """Put the convolution kernels of ``model`` on kernel manifolds, in place.

    Parameters
    ----------
    model : torch.nn.Module
        Any model; its ``Conv1d``/``Conv2d``/``Conv3d`` weights of shape
        ``(out, in/groups, *kernel_size)`` (grouped and depthwise included) are candidates.
    spec : str, KernelManifold, mapping or callable
        A geometry name (see :func:`kernelgeo.manifolds.available`), a manifold object, a
        mapping from module-name glob (``fnmatch``; first match wins, in insertion order) to
        either, or a callable ``(name, module) -> manifold | name | None``.  ``None`` or
        ``"euclidean"`` leaves a layer unconstrained.
    on_invalid : {"raise", "skip"}
        What to do with a layer whose kernel cannot hold its manifold (e.g. oblique on a 1x1
        convolution): raise a :class:`ValueError` listing every such layer before anything is
        converted, or leave those layers Euclidean and say why in the report.
    include_linear : bool
        Also consider ``nn.Linear`` weights ``(out, in)`` (rows = output units).
    **manifold_kwargs
        Passed to :func:`~kernelgeo.manifolds.get_manifold` for names (e.g. ``radius=2.0``).

    Returns
    -------
    ConstrainReport
        Which layer got which manifold (with its dimension), which stayed Euclidean and why.

    Raises
    ------
    ValueError
        Unknown geometry name, a glob that matches no layer, or (``on_invalid="raise"``) a
        kernel that cannot hold its manifold; the model is left untouched.
    """
    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
    layers = _candidates(model, include_linear)
    resolve = _resolver(spec, [n for n, _ in layers], **manifold_kwargs)

    plan, errors = [], []
    for name, mod in layers:
        shape = tuple(mod.weight.shape)
        kind = type(mod).__name__
        manifold, why = resolve(name, mod)
        if isinstance(manifold, Euclidean):
            manifold, why = None, f"{why} -> euclidean"
        if manifold is None:
            plan.append((name, mod, None, LayerEntry(name, kind, shape, "euclidean",
                                                     mod.weight.numel(), "euclidean", why)))
            continue
        try:
            manifold.check_kernel_shape(shape)
        except KernelShapeError as err:
            msg = f"layer {name!r} ({kind}, kernel shape {shape}): {err}"
            if on_invalid == "raise":
                errors.append(msg)
            else:
                plan.append((name, mod, None, LayerEntry(
                    name, kind, shape, "euclidean", mod.weight.numel(), "euclidean",
                    f"{manifold.name} cannot hold it: {err}")))
            continue
        plan.append((name, mod, manifold, LayerEntry(
            name, kind, shape, manifold.describe(shape), manifold.dim(shape), "manifold", "")))
    if errors:
        raise ValueError(
            "constrain: some kernels cannot hold their manifold (nothing was converted):\n  "
            + "\n  ".join(errors)
            + f"\nChoose another geometry for these layers (valid: {', '.join(available())}), "
            "a rule mapping that leaves them euclidean, or on_invalid='skip'.")

    with torch.no_grad():
        for _name, mod, manifold, entry in plan:
            if manifold is None:
                continue
            w = mod.weight
            # contiguous: some layouts (oblique columns) come back transposed, and a strided
            # weight slows both the convolution and the optimizer
            target = manifold.projx(w.detach()).contiguous()
            scale = float(w.detach().norm()) or 1.0
            entry.moved = float((target - w.detach()).norm()) / scale
            new = ManifoldParameter(target, manifold=manifold, requires_grad=w.requires_grad)
            mod._parameters["weight"] = new
    if not getattr(model, "_kernelgeo_load_hook", False):
        model.register_load_state_dict_post_hook(_project_after_load)
        model._kernelgeo_load_hook = True
    return ConstrainReport([entry for *_, entry in plan])


def manifold_parameters(model: nn.Module) -> Iterable[tuple[str, ManifoldParameter]]:
    """``(name, parameter)`` for every kernel-manifold parameter of ``model``."""
    for name, p in model.named_parameters():
        if isinstance(p, ManifoldParameter) and isinstance(p.manifold, KernelManifold):
            yield name, p


def constraint_error(model: nn.Module) -> float:
    """Largest distance of any manifold parameter of ``model`` from its manifold (0 if none).

    NaN if any entry of any manifold parameter is NaN, else ``inf`` if any is infinite,
    whatever the other layers or product blocks measure (a corrupted kernel is never hidden
    behind a finite maximum).
    """
    worst = 0.0
    with torch.no_grad():
        for _, p in manifold_parameters(model):
            x = p.detach()
            if x.numel() and not bool(torch.isfinite(x).all()):
                if bool(torch.isnan(x).any()):
                    return math.nan
                worst = math.inf
                continue
            e = float(p.manifold.constraint_error(p))
            if e != e:
                return math.nan
            worst = max(worst, e)
    return worst


def project_(model: nn.Module, *, tol: float = 0.0) -> dict[str, float]:
    """Project every manifold parameter whose constraint error exceeds ``tol`` onto its
    manifold, in place.

    Returns
    -------
    dict
        ``{parameter name: constraint error before projection}`` for the projected ones.
    """
    moved = {}
    with torch.no_grad():
        for name, p in manifold_parameters(model):
            err = p.manifold.constraint_error(p)
            if not torch.isfinite(p).all():
                raise ValueError(f"parameter {name!r} (shape {tuple(p.shape)}) holds NaN/Inf; "
                                 "refusing to project it onto its manifold")
            if err > tol:
                p.copy_(p.manifold.projx(p))
                moved[name] = err
    return moved


def _warn_projected(moved: dict[str, float]) -> None:
    if moved:
        worst = sorted(moved.items(), key=lambda kv: -kv[1])
        listing = ", ".join(f"{k}: {v:.3g}" for k, v in worst[:8])
        more = f" (+{len(worst) - 8} more)" if len(worst) > 8 else ""
        warnings.warn(
            f"{len(moved)} loaded kernel(s) were off their manifolds and have been projected "
            f"onto them; constraint error before projection: {listing}{more}",
            KernelProjectionWarning, stacklevel=3)


# Relative tolerance under which a loaded kernel counts as already on its manifold: float32
# round-off of a constrained checkpoint stays far below it, so exact resumes are untouched.
_LOAD_TOL = 1e-4


def _project_off_manifold(module: nn.Module) -> dict[str, float]:
    moved = {}
    with torch.no_grad():
        for name, p in manifold_parameters(module):
            err = p.manifold.constraint_error(p)
            tol = _LOAD_TOL * max(1.0, float(p.detach().abs().max()))
            if err > tol and torch.isfinite(p).all():
                moved[name] = err
                p.copy_(p.manifold.projx(p))
    return moved


def _project_after_load(module: nn.Module, incompatible_keys) -> None:
    _warn_projected(_project_off_manifold(module))


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                    strict: bool = True):
    """Load a (possibly unconstrained) state dict into a constrained model.

    Every kernel is loaded, then projected onto its manifold if it is off it (beyond float
    round-off); a :class:`KernelProjectionWarning` says how far the loaded kernels were from
    their manifolds.  ``model.load_state_dict`` on a model prepared by :func:`constrain` does
    the same automatically (a load-state-dict post-hook); this function makes the step
    explicit, validates the kernels first and also serves models whose kernels were declared
    by hand.

    Returns
    -------
    torch.nn.modules.module._IncompatibleKeys

    Raises
    ------
    ValueError
        A kernel entry with the wrong shape or holding NaN/Inf (nothing is loaded).
    """
    params = dict(manifold_parameters(model))
    for key, t in state_dict.items():
        if key in params and tuple(t.shape) != tuple(params[key].shape):
            raise ValueError(f"state dict entry {key!r} has shape {tuple(t.shape)}, the model's "
                             f"kernel has {tuple(params[key].shape)}; nothing was loaded")
        if key in params and not torch.isfinite(t).all():
            raise ValueError(f"state dict entry {key!r} holds NaN/Inf; nothing was loaded")
    result = model.load_state_dict(state_dict, strict=strict)
    if not getattr(model, "_kernelgeo_load_hook", False):
        _warn_projected(_project_off_manifold(model))
    return result
