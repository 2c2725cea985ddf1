"""Declare the convolution kernels of any PyTorch model as manifold parameters, in one line.

>>> import torch, kernelgeo
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
>>> w = model[0].weight
>>> report = kernelgeo.constrain(model, "sphere")
>>> type(model[0].weight).__name__, model[0].weight is w
('ManifoldParameter', True)
>>> _ = kernelgeo.unconstrain(model)
>>> type(model[0].weight).__name__, model[0].weight is w
('Parameter', True)

Each weight stays **the same parameter object**: :func:`constrain` turns the existing
``nn.Parameter`` into a :class:`geoopt.ManifoldParameter` in place (same attribute, same
``state_dict`` key and shape) and gives it the projection of its values onto the manifold
(in a new storage).  An optimizer built before :func:`constrain` therefore keeps training
the kernel, and a Riemannian one (:class:`~kernelgeo.optim.ConvergentRSGD`,
:class:`geoopt.optim.RiemannianSGD`) sees the manifold at its next step; a Euclidean optimizer
(``torch.optim.SGD``) would move the kernel off its manifold.  Tied weights (one tensor used
by several modules) stay tied: they become one manifold parameter.
:func:`unconstrain` turns manifold parameters back into plain parameters, keeping values,
identity and keys.  When either changes the geometry of a kernel, the state that optimizers
hold for it (momentum built for the old manifold, or Euclidean momentum) is discarded, with
an :class:`OptimizerStateResetWarning`: it would not be tangent to the new manifold, and
per-block buffers would not match the new manifold's blocks.  This covers every optimizer
that has taken a step since kernelgeo was imported (a global optimizer step pre-hook keeps
a weak reference to each); state loaded afterwards, as when a run resumes, is kept.

Loading a state dict into a constrained model (``model.load_state_dict`` or any of its
submodules) goes through a pre-hook installed by :func:`constrain` that checks every kernel
entry first: a wrong shape or a NaN/Inf entry is refused with a :class:`ValueError` naming the
key, before anything is loaded; an entry off its manifold (beyond float round-off) is loaded
projected onto it, with a :class:`KernelProjectionWarning`.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re
import sys
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.optim.optimizer import register_optimizer_step_pre_hook

from ._compat import ManifoldParameter
from .manifolds import Euclidean, KernelManifold, KernelShapeError, available, get_manifold
from .manifolds.product import KernelProduct

__all__ = [
    "constrain", "unconstrain", "ConstrainReport", "LayerEntry", "KernelProjectionWarning",
    "UnusedRuleWarning", "OptimizerStateResetWarning", "constraint_error",
    "manifold_parameters", "project_", "load_state_dict",
]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
Spec = str | KernelManifold | Mapping | Callable | None
_HALF = (torch.float16, torch.bfloat16)
#: error lines shown in one message before the rest is counted
_MAX_LINES = 20
_INTERNAL = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


class KernelProjectionWarning(UserWarning):
    """Kernels loaded from a checkpoint were off their manifolds and have been projected."""


class UnusedRuleWarning(UserWarning):
    """A rule of a :func:`constrain` mapping decides no layer: every layer it matches is
    caught by an earlier rule."""


@dataclass
class LayerEntry:
    """One row of a :class:`ConstrainReport`: one kernel tensor.

    ``aliases`` lists the other ``state_dict`` keys of the same tensor when it is tied
    (shared by several modules); the entry stands for all of them.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    geometry: str
    dim: int
    status: str  # "manifold" or "euclidean"
    reason: str = ""
    moved: float = 0.0  # relative distance the projection moved the initial kernel
    aliases: tuple[str, ...] = ()


class ConstrainReport:
    """What :func:`constrain` or :func:`unconstrain` did to each kernel: printable, and
    iterable over its entries (one per kernel tensor; tied modules share one entry)."""

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

    @staticmethod
    def _note(e: LayerEntry) -> str:
        parts = [e.reason] if e.reason else []
        if e.moved and not e.reason:
            parts.append(f"projection moved {e.moved:.2%}")
        if e.aliases:
            parts.append("tied with " + ", ".join(e.aliases))
        return "; ".join(parts)

    def to_markdown(self) -> str:
        """The report as a Markdown table."""
        rows = ["| layer | kernel shape | geometry | dim | note |", "|---|---|---|---|---|"]
        for e in self.entries:
            rows.append(f"| {e.name} | {tuple(e.shape)} | {e.geometry} | {e.dim} | "
                        f"{self._note(e)} |")
        return "\n".join(rows)

    def __str__(self) -> str:
        w = max([len(e.name) for e in self.entries] + [5])
        lines = [f"{'layer':<{w}}  {'kernel shape':<18} {'dim':>8}  geometry"]
        for e in self.entries:
            line = f"{e.name:<{w}}  {str(tuple(e.shape)):<18} {e.dim:>8}  {e.geometry}"
            note = e.reason
            if e.aliases:
                note = "; ".join([*([note] if note else []), "tied with " + ", ".join(e.aliases)])
            if note:
                line += f"  ({note})"
            lines.append(line)
        n_m = len(self.constrained)
        lines.append(f"{n_m} of {len(self.entries)} kernels on manifolds, "
                     f"{sum(e.dim for e in self.constrained)} constrained dimensions")
        return "\n".join(lines)

    __repr__ = __str__


# ----------------------------------------------------------------------- checks


def _is_kernel(p) -> bool:
    return isinstance(p, ManifoldParameter) and isinstance(getattr(p, "manifold", None),
                                                           KernelManifold)


def _snake(cls_name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", cls_name.lstrip("_")).lower()


def _parametrization(mod: nn.Module) -> tuple[str, str] | None:
    """``(what computes the weight, how to remove it)`` when ``mod.weight`` is not a stored
    parameter but computed from others; ``None`` for a plain weight."""
    if parametrize.is_parametrized(mod, "weight"):
        kinds = "+".join(_snake(type(p).__name__) for p in mod.parametrizations.weight)
        return (f"a parametrization ({kinds})",
                "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight', "
                "leave_parametrized=True)")
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in mod._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            return "torch.nn.utils.weight_norm", "torch.nn.utils.remove_weight_norm(module)"
        if isinstance(hook, SpectralNorm) and hook.name == "weight":
            return "torch.nn.utils.spectral_norm", "torch.nn.utils.remove_spectral_norm(module)"
    if "weight" not in mod._parameters:
        return (f"something else (weight is a {type(mod.weight).__name__}, not an "
                "nn.Parameter of the module)", "")
    return None


def _remove_parametrization(mod: nn.Module) -> None:
    if parametrize.is_parametrized(mod, "weight"):
        parametrize.remove_parametrizations(mod, "weight", leave_parametrized=True)
        return
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    for hook in list(mod._forward_pre_hooks.values()):
        if isinstance(hook, WeightNorm) and hook.name == "weight":
            torch.nn.utils.remove_weight_norm(mod)
            return
        if isinstance(hook, SpectralNorm) and hook.name == "weight":
            torch.nn.utils.remove_spectral_norm(mod)
            return


_REINIT = ("re-initialise the layer (module.reset_parameters()) or load finite weights "
           "first")


def _tensor_problem(w, what: str, fix_nonfinite: str = _REINIT) -> str | None:
    """Why the tensor ``w`` cannot become (or hold values of) a manifold parameter."""
    if isinstance(w, nn.parameter.UninitializedParameter):
        return (f"{what} is not initialised yet (lazy module); run one forward pass with a "
                "sample input first")
    if not isinstance(w, torch.Tensor):
        return f"{what} is a {type(w).__name__}, not a tensor"
    if w.layout != torch.strided:
        return (f"{what} has layout {w.layout}; kernel manifolds need a dense tensor: "
                "convert it with .to_dense()")
    if w.is_meta:
        return (f"{what} is on the meta device, so it has no values to project; materialise "
                "the model first (model.to_empty(device=...) and initialise it, or "
                "model.load_state_dict(state_dict, assign=True)), then constrain it")
    if not w.is_floating_point():
        return (f"{what} has dtype {w.dtype}; kernel manifolds need floating-point values "
                "(float16, bfloat16, float32 or float64): convert the model, e.g. model.float()")
    bad = int((~torch.isfinite(w.detach())).sum())
    if bad:
        return (f"{what} holds {bad} NaN/Inf value(s); projecting it would spread them over "
                f"whole filters: {fix_nonfinite}")
    return None


def _param_problem(p) -> str | None:
    if isinstance(p, nn.parameter.UninitializedParameter):
        return _tensor_problem(p, "its weight")
    if type(p) not in (nn.Parameter, ManifoldParameter):
        return (f"its weight is a {type(p).__module__}.{type(p).__name__}; only plain "
                "torch.nn.Parameter weights can be turned into manifold parameters")
    return _tensor_problem(p, "its weight")


def _block_shapes(m: KernelManifold, shape) -> list[tuple[KernelManifold, tuple[int, ...]]]:
    if isinstance(m, KernelProduct):
        return [(b, KernelProduct._sub(shape, idx)) for b, idx in m.blocks(shape)]
    return [(m, tuple(shape))]


def _radius_range(dtype: torch.dtype) -> tuple[float, float]:
    fi = torch.finfo(dtype)
    return (max(math.sqrt(fi.tiny), 1.0 / math.sqrt(fi.max)),
            min(math.sqrt(fi.max), 1.0 / math.sqrt(fi.tiny)))


def _radius_problem(m: KernelManifold, shape, dtype: torch.dtype) -> str | None:
    r"""Why the radius of ``m`` on a kernel of ``shape`` does not fit ``dtype``.

    The updates divide by :math:`r^2` (tangent projections) and multiply by it, so both
    :math:`r^2` and :math:`1/r^2` must be finite normal numbers of the parameter's dtype;
    otherwise a step silently yields ``inf``/``0`` instead of the kernel.
    """
    tiny = torch.finfo(dtype).tiny
    for b, sub in _block_shapes(m, shape):
        if isinstance(b, Euclidean):
            continue
        r = b.radius_of(sub)
        t = torch.tensor(r, dtype=dtype)
        sq = t * t
        inv = 1.0 / sq
        ok = all(bool(torch.isfinite(v)) and float(v) >= tiny for v in (t, sq, inv))
        if not ok:
            lo, hi = _radius_range(dtype)
            return (f"radius {r:.6g} of its {b.name} manifold is outside the range where r^2 and "
                    f"1/r^2 are finite normal {str(dtype).replace('torch.', '')} numbers "
                    f"(r in [{lo:.3g}, {hi:.3g}]); choose a radius in that range")
    return None


def _project(m: KernelManifold, w: torch.Tensor) -> torch.Tensor:
    """Projection of ``w`` onto ``m`` in a new contiguous tensor of ``w``'s dtype (half
    precision kernels are projected in float32 and rounded once)."""
    src = w.detach()
    work = src.float() if src.dtype in _HALF else src
    # contiguous: some layouts (oblique columns) come back transposed, and a strided
    # weight slows both the convolution and the optimizer
    out = m.projx(work).to(src.dtype).contiguous()
    if out.data_ptr() == src.data_ptr():
        out = out.clone()
    return out


def _manifold_key(m: KernelManifold | None):
    """Equal for manifolds that act identically (same class, options and components)."""
    if m is None:
        return None
    if isinstance(m, KernelProduct):
        comps = tuple(_manifold_key(c) for c in m.components)
        return (type(m).__qualname__, m.extra_repr(), comps)
    return (type(m).__qualname__, m.extra_repr(), m.name)


def _describe_safe(m: KernelManifold, shape) -> str:
    try:
        return m.describe(shape)
    except (KernelShapeError, ValueError):
        return repr(m)


# ---------------------------------------------------------------- resolution


def _candidates(model: nn.Module, include_linear: bool) -> list[tuple[str, nn.Module]]:
    kinds = _CONV + ((nn.Linear,) if include_linear else ())
    seen, out = set(), []
    for name, mod in model.named_modules():
        if isinstance(mod, kinds) and id(mod) not in seen and mod.weight is not None:
            seen.add(id(mod))
            out.append((name or "<root>", mod))
    return out


class _Rules:
    """``spec`` turned into ``resolve(name, module) -> (manifold | None, description)``.

    ``None`` means "leave the layer as it is"; a :class:`Euclidean` manifold means "make it
    (or keep it) a plain parameter".
    """

    def __init__(self, spec: Spec, **kwargs):
        self.rules: list[tuple[str, KernelManifold | None]] | None = None
        self.won: set[int] = set()
        self.matched: set[int] = set()
        if spec is None or isinstance(spec, (str, KernelManifold)):
            m = None if spec is None else get_manifold(spec, **kwargs)
            self._resolve = lambda name, mod: (m, f"spec {spec!r}")
        elif isinstance(spec, Mapping):
            self.rules = [(str(g), get_manifold(v, **kwargs) if v is not None else None)
                          for g, v in spec.items()]
            self._resolve = self._by_rules
        elif callable(spec):
            def resolve(name, mod):
                m = spec(name, mod)
                try:
                    return (None if m is None else get_manifold(m, **kwargs)), "callable spec"
                except TypeError as err:
                    raise TypeError(f"constrain: the spec callable returned {m!r} for layer "
                                    f"{name!r}: {err}") from None
            self._resolve = resolve
        else:
            raise TypeError("constrain: spec must be a manifold name, a KernelManifold, a "
                            "mapping from module-name glob to either, or a callable; got "
                            f"{type(spec).__name__}")

    def __call__(self, name, mod):
        return self._resolve(name, mod)

    def _by_rules(self, name, mod):
        hit = None
        for i, (g, m) in enumerate(self.rules):
            if fnmatch.fnmatchcase(name, g):
                self.matched.add(i)
                if hit is None:
                    hit = (i, g, m)
        if hit is None:
            return None, "no rule matched"
        i, g, m = hit
        self.won.add(i)
        return m, f"rule {g!r}"

    def check_used(self, names: list[str], strict: bool, linear: list[str]) -> None:
        """Refuse rules that match no layer; warn about (or, ``strict``, refuse) rules
        shadowed by earlier ones.  ``linear``: names of Linear layers left out."""
        if self.rules is None:
            return
        unused = [g for i, (g, _) in enumerate(self.rules) if i not in self.matched]
        if unused:
            lin = [n for n in linear if any(fnmatch.fnmatchcase(n, g) for g in unused)]
            hint = (f"; Linear layer(s) {', '.join(lin)} need include_linear=True" if lin
                    else "")
            raise ValueError(
                f"constrain: rule(s) {unused} match no convolution layer; layers are: "
                f"{', '.join(names) or '(none)'}{hint}; nothing was converted")
        shadowed = []
        for i, (g, _) in enumerate(self.rules):
            if i in self.won:
                continue
            layers = [n for n in names if fnmatch.fnmatchcase(n, g)]
            earlier = sorted({h for h, _ in self.rules[:i]
                              if any(fnmatch.fnmatchcase(n, h) for n in layers)})
            shadowed.append(f"rule {g!r} matches {', '.join(layers)}, all caught first by "
                            f"earlier rule(s) {', '.join(map(repr, earlier))}")
        if shadowed:
            msg = ("constrain: rule(s) decide no layer (the first matching rule wins, in "
                   "insertion order): " + "; ".join(shadowed)
                   + "; put specific rules before general ones")
            if strict:
                raise ValueError(msg + "; nothing was converted")
            warnings.warn(msg, UnusedRuleWarning, stacklevel=3)


def _owners(model: nn.Module) -> dict[int, list[str]]:
    """``id(parameter) -> every state_dict key holding it`` (several when tied)."""
    out: dict[int, list[str]] = {}
    for key, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(id(p), []).append(key)
    return out


def _key(name: str, pname: str = "weight") -> str:
    return pname if name == "<root>" else f"{name}.{pname}"


def _holders(model: nn.Module) -> dict[int, list[tuple[str, nn.Module]]]:
    """``id(parameter) -> [(attribute name, module)]`` for every module holding it."""
    out: dict[int, list] = {}
    for mod in model.modules():
        for pname, q in mod._parameters.items():
            if q is not None:
                out.setdefault(id(q), []).append((pname, mod))
    return out


# --------------------------------------------------------------- conversion


class OptimizerStateResetWarning(UserWarning):
    """An optimizer's state for a kernel was discarded because :func:`constrain` or
    :func:`unconstrain` changed the kernel's geometry after the state was built."""


# Optimizers that have taken a step since kernelgeo was imported (weakly held).  When
# constrain/unconstrain changes a kernel's geometry, the state these optimizers hold for it
# was built for the old geometry (momentum per block of the old manifold, or Euclidean
# momentum off the tangent space): ConvergentRSGD would index per-block buffers by the new
# manifold's blocks.  That state is discarded at the change; state loaded or built later is
# kept (a resumed run loads its optimizer state after constrain).
_OPTIMIZERS: weakref.WeakSet = weakref.WeakSet()


def _seen_optimizer(optimizer, args, kwargs) -> None:
    _OPTIMIZERS.add(optimizer)


register_optimizer_step_pre_hook(_seen_optimizer)


def _drop_optimizer_state(changed: list[tuple[torch.Tensor, str]]) -> None:
    """Discard every tracked optimizer's state for the kernels in ``changed``."""
    if not changed:
        return
    for opt in list(_OPTIMIZERS):
        state = getattr(opt, "state", None)
        if not isinstance(state, dict):
            continue
        dropped = [label or f"shape {tuple(p.shape)}" for p, label in changed if state.get(p)]
        for p, _ in changed:
            state.pop(p, None)
        if dropped:
            warnings.warn(
                f"{type(opt).__name__}: the state (momentum) it held for {', '.join(dropped)} "
                "was built for the previous geometry of these kernels and has been discarded; "
                "their momentum restarts from zero", OptimizerStateResetWarning,
                stacklevel=_user_stacklevel())


def _projection(m: KernelManifold, w: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Projection of ``w`` onto ``m`` and the relative distance it moves ``w``."""
    with torch.no_grad():
        target = _project(m, w)
        scale = float(w.detach().double().norm()) or 1.0
        moved = float((target.double() - w.detach().double()).norm()) / scale
    return target, moved


def _to_manifold(p: nn.Parameter, m: KernelManifold, label: str = "",
                 changes: list | None = None,
                 projected: tuple[torch.Tensor, float] | None = None) -> float:
    """Turn ``p`` into a manifold parameter on ``m`` in place; relative distance moved.
    ``(p, label)`` is appended to ``changes`` when the geometry of ``p`` changed."""
    target, moved = projected if projected is not None else _projection(m, p)
    with torch.no_grad():
        changed = not (_is_kernel(p) and _manifold_key(p.manifold) == _manifold_key(m))
        if type(p) is not ManifoldParameter:
            p.__class__ = ManifoldParameter
        p.manifold = m
        # a new storage: optimizers that cache views of their parameters (ConvergentRSGD's
        # batched plans are keyed on data_ptr) rebuild them and see the manifold
        p.data = target
    if changed and changes is not None:
        changes.append((p, label))
    return moved


def _to_euclidean(p: ManifoldParameter, label: str = "", changes: list | None = None) -> None:
    with torch.no_grad():
        p.__class__ = nn.Parameter
        p.__dict__.pop("manifold", None)
        p.data = p.data.clone()  # new storage, as in _to_manifold
    if changes is not None:
        changes.append((p, label))


def _sync_modules(holders: dict, p, m: KernelManifold | None) -> None:
    """Keep the ``manifold`` attribute of :mod:`kernelgeo.nn` layers holding ``p`` in step."""
    from .nn import ManifoldConvMixin

    for pname, mod in holders.get(id(p), ()):
        if isinstance(mod, ManifoldConvMixin) and pname == "weight":
            mod.manifold = m


def _describe(p, shape) -> str:
    if _is_kernel(p):
        return p.manifold.describe(shape)
    if isinstance(p, ManifoldParameter):  # declared by hand on another geoopt manifold
        return f"geoopt {p.manifold!r}"
    return "euclidean"


def _check_model(model, who: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{who}: model must be a torch.nn.Module, got {type(model).__name__}"
                        + ("; to load a state dict use kernelgeo.load_state_dict(model, sd)"
                           if isinstance(model, Mapping) else ""))


def _fail(header: str, errors: list[str], hint: str = "") -> ValueError:
    shown = errors[:_MAX_LINES]
    more = [f"... and {len(errors) - _MAX_LINES} more"] if len(errors) > _MAX_LINES else []
    return ValueError(header + "\n  " + "\n  ".join(shown + more) + (f"\n{hint}" if hint else ""))


def constrain(model: nn.Module, spec: Spec, *, on_invalid: str = "raise",
              include_linear: bool = False, parametrized: str = "raise",
              strict: bool = False, **manifold_kwargs) -> ConstrainReport:
    """Put the convolution kernels of ``model`` on kernel manifolds, in place.

    Parameters
    ----------
    model : torch.nn.Module
        Any model; its ``Conv1d``/``Conv2d``/``Conv3d`` weights of shape
        ``(out, in/groups, *kernel_size)`` (grouped and depthwise included) are candidates.
    spec : str, KernelManifold, mapping or callable
        A geometry name (see :func:`kernelgeo.manifolds.available`), a manifold object, a
        mapping from module-name glob (``fnmatch``; first match wins, in insertion order) to
        either, or a callable ``(name, module) -> manifold | name | None``.  ``"euclidean"``
        makes a layer a plain parameter (turning a kernel constrained earlier back, as
        :func:`unconstrain`); ``None`` and layers that no rule matches are left as they are.
    on_invalid : {"raise", "skip"}
        What to do with a layer whose kernel cannot hold its manifold (e.g. oblique on a 1x1
        convolution): raise a :class:`ValueError` listing every such layer before anything is
        converted, or leave those layers as they are and say why in the report.
    include_linear : bool
        Also consider ``nn.Linear`` weights ``(out, in)`` (rows = output units).
    parametrized : {"raise", "skip", "remove"}
        What to do with a layer to be constrained whose weight is computed rather than stored
        (``torch.nn.utils.parametrizations.weight_norm``/``orthogonal``/``spectral_norm``,
        the older ``torch.nn.utils.weight_norm``/``spectral_norm`` hooks): its forward pass
        rebuilds the weight from other parameters, so a manifold parameter in its place would
        never be used.  ``"raise"`` (default) refuses, naming the layer and the call that
        removes the parametrization; ``"skip"`` leaves the layer as it is (with the reason in
        the report); ``"remove"`` removes the parametrization keeping the current weight
        (``leave_parametrized=True``), then constrains that weight.  After a removal the
        layer's ``state_dict`` keys become ``<layer>.weight`` and the parameters the
        parametrization held (and an optimizer built before) are gone.
    strict : bool
        Also refuse (instead of warning with :class:`UnusedRuleWarning`) a mapping rule that
        matches only layers caught by earlier rules.  A rule that matches no layer at all is
        always refused.
    **manifold_kwargs
        Passed to :func:`~kernelgeo.manifolds.get_manifold` for names (e.g. ``radius=2.0``).

    Returns
    -------
    ConstrainReport
        One entry per kernel tensor (tied modules share one, listing the other keys in
        ``aliases``): its manifold and dimension, or why it stayed Euclidean.

    Raises
    ------
    ValueError
        Before anything is changed, listing every offending layer with its kernel shape and
        what to do: an unknown geometry name; a rule matching no layer (or, ``strict``, a
        shadowed rule); tied modules given different geometries; a kernel that cannot hold
        its manifold (``on_invalid="raise"``); a parametrized weight
        (``parametrized="raise"``); a weight that is lazy, on the meta device, sparse, not
        floating point or holding NaN/Inf; a radius whose square or inverse square is not a
        finite normal number of the kernel's dtype.

    Notes
    -----
    Every weight keeps its identity (the same ``nn.Parameter`` object becomes a
    :class:`geoopt.ManifoldParameter`; its projected values go to a new storage), its
    ``state_dict`` key and its shape.  Half-precision kernels (float16, bfloat16) are
    projected in float32 and rounded once, so they sit on their manifold to within the
    rounding of their dtype.  Calling :func:`constrain` again re-projects or changes the
    geometry of the selected kernels in place; optimizers' state for a kernel whose geometry
    changed is discarded (:class:`OptimizerStateResetWarning`).
    """
    _check_model(model, "constrain")
    if on_invalid not in ("raise", "skip"):
        raise ValueError(f"on_invalid must be 'raise' or 'skip', got {on_invalid!r}")
    if parametrized not in ("raise", "skip", "remove"):
        raise ValueError("parametrized must be 'raise', 'skip' or 'remove', got "
                         f"{parametrized!r}")
    layers = _candidates(model, include_linear)
    names = [n for n, _ in layers]
    rules = _Rules(spec, **manifold_kwargs)
    resolved = [(name, mod, *rules(name, mod)) for name, mod in layers]
    linear = [] if include_linear else [n for n, mod in model.named_modules()
                                        if isinstance(mod, nn.Linear)]
    rules.check_used(names, strict, linear)
    owners = _owners(model)

    # one group per kernel tensor: tied modules hold the same parameter object
    groups: dict[int, list] = {}
    for name, mod, m, why in resolved:
        p = mod._parameters.get("weight")
        gid = id(p) if p is not None else id(mod)
        groups.setdefault(gid, []).append((name, mod, m, why))

    plan, errors, shape_errors, entries = [], [], [], []
    for members in groups.values():
        name, mod, _, _ = members[0]
        kind = type(mod).__name__
        lazy = isinstance(mod.weight, nn.parameter.UninitializedParameter)
        shape = () if lazy else tuple(mod.weight.shape)
        numel = 0 if lazy else mod.weight.numel()
        wanted = [(n, m, why) for n, _, m, why in members if m is not None]
        keys = {_manifold_key(m) for _, m, _ in wanted}
        if len(keys) > 1:
            errors.append(
                f"layers {', '.join(repr(n) for n, _, _ in wanted)} share one weight tensor "
                f"(tied, shape {shape}) but get different geometries: "
                + ", ".join(f"{n!r} -> {_describe_safe(m, shape)} ({why})" for n, m, why in wanted)
                + "; give them the same geometry, or untie them")
            continue
        m, why = (wanted[0][1], wanted[0][2]) if wanted else (None, members[0][3])
        p = mod._parameters.get("weight")
        aliases = tuple(k for k in owners.get(id(p), []) if k != _key(name)) if p is not None \
            else ()
        aliases += tuple(_key(n) for n, *_ in members[1:] if _key(n) not in aliases)
        where = f"layer {name!r} ({kind}, kernel shape {shape})"
        if m is None:  # left as it is
            entries.append(LayerEntry(
                name, kind, shape, _describe(p, shape), p.manifold.dim(shape) if _is_kernel(p)
                else numel, "manifold" if _is_kernel(p) else "euclidean",
                why + ("; left as it is" if _is_kernel(p) else ""), aliases=aliases))
            continue
        if isinstance(m, Euclidean):
            was = f" (was {_describe(p, shape)})" if isinstance(p, ManifoldParameter) else ""
            entry = LayerEntry(name, kind, shape, "euclidean", numel, "euclidean",
                               f"{why} -> euclidean{was}", aliases=aliases)
            plan.append((members, p, None, entry))
            entries.append(entry)
            continue
        computed = _parametrization(mod)
        if computed is not None and parametrized != "remove":
            what, how = computed
            msg = (f"its weight is computed by {what}, so a manifold parameter in its place "
                   "would never be used")
            if parametrized == "skip":
                entries.append(LayerEntry(name, kind, shape, "euclidean", numel,
                                          "euclidean", f"{msg}; left as it is", aliases=aliases))
            else:
                errors.append(f"{where}: {msg}; remove it keeping the current weight with "
                              f"{how or 'the call that undoes it'} (or pass "
                              "parametrized='remove'), or constrain the tensor it is "
                              "computed from yourself")
            continue
        problem = _tensor_problem(mod.weight, "its weight") if computed is not None \
            else _param_problem(p)
        if problem:
            errors.append(f"{where}: {problem}")
            continue
        try:
            m.check_kernel_shape(shape)
        except KernelShapeError as err:
            if on_invalid == "raise":
                shape_errors.append(f"{where}: {err}")
            else:
                entries.append(LayerEntry(
                    name, kind, shape, _describe(p, shape) if p is not None else "euclidean",
                    numel, "manifold" if _is_kernel(p) else "euclidean",
                    f"{m.name} cannot hold it: {err}", aliases=aliases))
            continue
        radius = _radius_problem(m, shape, mod.weight.dtype)
        if radius:
            errors.append(f"{where}, {mod.weight.dtype}: {radius}")
            continue
        entry = LayerEntry(name, kind, shape, m.describe(shape), m.dim(shape), "manifold",
                           "", aliases=aliases)
        if computed is not None:
            entry.reason = f"{computed[0]} removed, weight kept"
        plan.append((members, p, m, entry))
        entries.append(entry)
    if errors or shape_errors:
        hint = ""
        if shape_errors:
            hint = (f"Choose another geometry for the layers whose kernel cannot hold it "
                    f"(valid: {', '.join(available())}), a rule mapping that leaves them "
                    "euclidean, or on_invalid='skip'.")
        raise _fail("constrain: nothing was converted; these kernels cannot be put on their "
                    "manifolds as asked:", errors + shape_errors, hint)

    # every projection is computed before the model is touched: a failure changes nothing
    projected = [None if m is None else _projection(m, members[0][1].weight)
                 for members, p, m, _entry in plan]
    bad = [entry.name for (_, _, m, entry), pr in zip(plan, projected, strict=True)
           if pr is not None and not bool(torch.isfinite(pr[0]).all())]
    if bad:
        raise ValueError(f"constrain: the projection of layer(s) {', '.join(bad)} is not "
                         "finite (the weight's scale overflows its dtype); nothing was "
                         "converted: rescale or cast the weights first")
    for members, p, m, _entry in plan:
        if p is None and m is not None:  # parametrized="remove": the computed weight
            _remove_parametrization(members[0][1])  # becomes the module's parameter
    holders, changes = _holders(model), []
    for (members, p, m, entry), pr in zip(plan, projected, strict=True):
        p = members[0][1]._parameters.get("weight")
        if m is None:
            if isinstance(p, ManifoldParameter):
                _to_euclidean(p, _key(entry.name), changes)
                _sync_modules(holders, p, None)
            continue
        entry.moved = _to_manifold(p, m, _key(entry.name), changes, projected=pr)
        _sync_modules(holders, p, m)
    _install_load_hooks(model)
    _drop_optimizer_state(changes)
    return ConstrainReport(entries)


def unconstrain(model: nn.Module, layers: str | Iterable[str] | None = None) -> ConstrainReport:
    """Turn kernel manifold parameters back into plain ``nn.Parameter`` objects, in place.

    Values, parameter identity (the same object changes class; its values are copied to a
    new storage so that optimizers caching views rebuild them), ``requires_grad`` and
    ``state_dict`` keys are kept.  A tied tensor is one parameter: reverting it through one
    of its modules reverts it for all (the report lists the other keys).

    Parameters
    ----------
    model : torch.nn.Module
    layers : str or iterable of str, optional
        Module-name globs (``fnmatch``) selecting the modules whose kernels to revert;
        ``None`` reverts every kernel manifold parameter of ``model``.

    Returns
    -------
    ConstrainReport
        One entry per reverted kernel (``reason`` says what it was on), and one per selected
        convolution that was already Euclidean.

    Raises
    ------
    ValueError
        A glob that matches no module holding a kernel (nothing is changed).
    """
    _check_model(model, "unconstrain")
    globs = None if layers is None else ([layers] if isinstance(layers, str) else list(layers))
    owners = _owners(model)
    holding = []
    for name, mod in model.named_modules():
        name = name or "<root>"
        for pname, p in mod._parameters.items():
            if _is_kernel(p) or (pname == "weight" and isinstance(mod, _CONV) and p is not None):
                holding.append((name, mod, pname, p))
    if globs is not None:
        unused = [g for g in globs if not any(fnmatch.fnmatchcase(n, g) for n, *_ in holding)]
        if unused:
            have = sorted({n for n, _, _, p in holding if _is_kernel(p)})
            raise ValueError(f"unconstrain: glob(s) {unused} match no module holding a kernel; "
                             f"modules with manifold kernels: {', '.join(have) or '(none)'}; "
                             "nothing was changed")
        holding = [h for h in holding if any(fnmatch.fnmatchcase(h[0], g) for g in globs)]
    entries, done, holders, changes = [], set(), _holders(model), []
    for name, mod, pname, p in holding:
        if id(p) in done:
            continue
        done.add(id(p))
        shape = tuple(p.shape)
        key = _key(name, pname)
        aliases = tuple(k for k in owners.get(id(p), []) if k != key)
        label = name if pname == "weight" else key
        if _is_kernel(p):
            was = p.manifold.describe(shape)
            _to_euclidean(p, key, changes)
            _sync_modules(holders, p, None)
            entries.append(LayerEntry(label, type(mod).__name__, shape, "euclidean", p.numel(),
                                      "euclidean", f"was {was}", aliases=aliases))
        else:
            entries.append(LayerEntry(label, type(mod).__name__, shape, "euclidean", p.numel(),
                                      "euclidean", "already euclidean", aliases=aliases))
    _drop_optimizer_state(changes)
    return ConstrainReport(entries)


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


def _user_stacklevel() -> int:
    """``stacklevel`` of the first caller outside torch and kernelgeo (hooks run deep
    inside ``Module.load_state_dict``)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def _warn_projected(moved: dict[str, float]) -> None:
    if moved:
        worst = sorted(moved.items(), key=lambda kv: -kv[1])
        listing = ", ".join(f"{k}: {v:.3g}" for k, v in worst[:8])
        more = f" (+{len(worst) - 8} more)" if len(worst) > 8 else ""
        warnings.warn(
            f"{len(moved)} loaded kernel(s) were off their manifolds and have been projected "
            f"onto them; constraint error before projection: {listing}{more}",
            KernelProjectionWarning, stacklevel=_user_stacklevel())


# Relative tolerance under which a loaded kernel counts as already on its manifold: float32
# round-off of a constrained checkpoint stays far below it, so exact resumes are untouched.
# Half-precision kernels get a tolerance of 50 units of their own round-off instead.
_LOAD_TOL = 1e-4


def _load_tol(dtype: torch.dtype) -> float:
    return max(_LOAD_TOL, 50 * torch.finfo(dtype).eps)


#: attribute marking a state-dict value this module already checked during one load
_CHECKED = "_kernelgeo_checked"


def _check_entries(module: nn.Module, state_dict: dict, prefix: str, assign: bool) -> dict:
    """Check (and replace, projected where needed) the kernel entries of ``state_dict`` for
    the manifold parameters of ``module``; raise before anything is loaded.

    Replaced values carry a marker so that the hooks of submodules, which see the same
    values during the same load, do not check them again.
    """
    moved, done = {}, {}
    for name, p in module.named_parameters(remove_duplicate=False):
        key = prefix + name
        if not _is_kernel(p) or key not in state_dict:
            continue
        v = state_dict[key]
        if not isinstance(v, torch.Tensor) or getattr(v, _CHECKED, False):
            continue
        if id(v) in done:  # tied keys of one tensor: one replacement keeps them tied
            state_dict[key] = done[id(v)]
            continue
        m = p.manifold
        if tuple(v.shape) != tuple(p.shape):
            raise ValueError(f"state dict entry {key!r} has shape {tuple(v.shape)}, the model's "
                             f"kernel has {tuple(p.shape)} ({m.describe(p.shape)}); nothing was "
                             "loaded")
        problem = _tensor_problem(v, f"state dict entry {key!r} (shape {tuple(v.shape)})",
                                  "load a checkpoint saved before training diverged")
        if problem:
            raise ValueError(f"{problem}; nothing was loaded")
        with torch.no_grad():
            x = v.detach().to(p.dtype)
            err = m.constraint_error(x)
            tol = _load_tol(p.dtype) * max(1.0, float(x.abs().max()))
            if err > tol:
                moved[key] = err
                new = _project(m, x)
            else:
                new = v.detach()
        if assign:  # load_state_dict(assign=True) installs the value itself: keep the class
            new = ManifoldParameter(new, manifold=m, requires_grad=p.requires_grad)
        setattr(new, _CHECKED, True)
        state_dict[key] = done[id(v)] = new
    return moved


def _load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                   unexpected_keys, error_msgs) -> None:
    assign = bool(local_metadata.get("assign_to_params_buffers", False))
    _warn_projected(_check_entries(module, state_dict, prefix, assign))


def _install_load_hooks(model: nn.Module) -> None:
    """Give every module holding a kernel manifold parameter (itself or in a submodule) the
    checking pre-hook, so that a load into any of them is checked before anything is
    copied."""
    for mod in model.modules():
        if getattr(mod, "_kernelgeo_load_checks", False):
            continue
        if any(_is_kernel(p) for p in mod.parameters()):
            mod.register_load_state_dict_pre_hook(_load_pre_hook)
            mod._kernelgeo_load_checks = True


def _project_after_load(module: nn.Module, incompatible_keys) -> None:
    """Load post-hook of models constrained by kernelgeo 0.1.0 before the pre-hook checks
    existed; kept so that such pickled models still load (it projects off-manifold kernels,
    as it did).  :func:`constrain` on such a model installs the checks."""
    moved = {}
    with torch.no_grad():
        for name, p in manifold_parameters(module):
            err = p.manifold.constraint_error(p)
            if err > _load_tol(p.dtype) * max(1.0, float(p.detach().abs().max())) and \
                    torch.isfinite(p).all():
                moved[name] = err
                p.copy_(_project(p.manifold, p))
    _warn_projected(moved)


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                    strict: bool = True):
    """Load a (possibly unconstrained) state dict into a model with manifold kernels.

    Every kernel entry is checked first: a wrong shape or a NaN/Inf entry raises (nothing is
    loaded); an entry off its manifold (beyond float round-off) is loaded projected onto
    it, and a :class:`KernelProjectionWarning` says how far the entries were from their
    manifolds.  ``model.load_state_dict`` on a model prepared by :func:`constrain` does the
    same (a load-state-dict pre-hook); this function makes the step explicit and also
    serves models whose kernels were declared by hand.

    Returns
    -------
    torch.nn.modules.module._IncompatibleKeys

    Raises
    ------
    ValueError
        A kernel entry with the wrong shape, a non-floating dtype, or holding NaN/Inf.
    """
    sd = OrderedDict(state_dict)
    meta = getattr(state_dict, "_metadata", None)
    if meta is not None:
        sd._metadata = meta
    _warn_projected(_check_entries(model, sd, "", False))
    return model.load_state_dict(sd, strict=strict)
