r"""The normalization report: how each kernel geometry reshapes the search space of a trained run.

:func:`normalization_report` reads one or more ``kernelgeo train`` run directories (with
:func:`kernelgeo.runs.load_run`) and writes ``report.md`` with figures and ``summary.json``.  For
every kernel of every run it measures, at the trained weights:

* **invariance gap**: the per-layer symmetry the network really has (a convolution or linear
  layer whose output feeds a batch norm directly is invariant to a positive scale per output
  filter: ``out`` dimensions of flat directions; without batch norm, none) against the
  dimensions the constraint removes (``numel - dim``: sphere ``out``, Stiefel
  :math:`p(p+1)/2` per block...).  *Symmetry left* is the rank of the symmetry directions
  after projection onto the tangent space (directions the optimizer can still wander along
  without changing the loss); *restriction* is the number of removed dimensions that are not
  symmetries (they restrict the functions the layer can represent);
* **sectional curvature along the optimizer's plane**: :math:`K_x(g, m)` of the plane spanned
  by the Riemannian gradient :math:`g` of the training loss on one training batch (the model
  in training mode, as in a step) and the momentum buffer :math:`m` stored in the
  checkpoint's optimizer state (Gauss equation,
  :func:`~kernelgeo.analysis.curvature.sectional_curvature`);
* **normal curvature** :math:`\|\mathrm{II}(u,u)\|/\|u\|^2` for :math:`u = g` and
  :math:`u = m`: a retraction (or a straight Euclidean step) of length :math:`s` along
  :math:`u` leaves the geodesic by :math:`\tfrac12 s^2\|\mathrm{II}(u,u)\|/\|u\|^2 + O(s^3)`;
* **angular step**: median over filters of :math:`\|g_i\|/\|w_i\|` (a step of size
  :math:`\eta` turns filter :math:`i` by about :math:`\eta\|g_i\|/\|w_i\|` radians);
* **distance from the initialization**: geodesic distance to the re-created initial weights
  (:func:`~kernelgeo.analysis.geodesics.layer_distances`; NaN with the reason where a
  Stiefel distance cannot be computed and certified) next to the chordal (Euclidean)
  distance and the path length the weights travelled during training
  (:mod:`kernelgeo.training.path`; n/a with the reason for runs that did not measure it);
* **sharpness**: top eigenvalue of the Riemannian and of the Euclidean Hessian of the
  training loss on a fixed subset (:func:`~kernelgeo.analysis.hessian.sharpness`);
* **1-D interpolation** from the initialization (t=0) to the trained weights (t=1) along the
  geodesic and along the straight line, on a grid holding t=0 and t=1 exactly;
* **2-D slices**: manifold-aware (tangent directions moved by the exponential map) and
  Euclidean (Li et al.) slices of the training loss around the trained weights
  (:mod:`~kernelgeo.analysis.landscape`).

Several runs give side-by-side tables and figures.  The command line is ``kernelgeo analyze
RUN_DIR [RUN_DIR ...]`` (:func:`add_analyze_arguments`, :func:`main_analyze`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..manifolds import KernelManifold, KernelProduct
from .curvature import second_fundamental_form, sectional_curvature
from .geodesics import interpolate_state_dict, layer_distances, parameter_manifolds
from .hessian import sharpness
from .landscape import (
    Evaluator,
    landscape_2d,
    li_directions,
    tangent_directions,
    torch_threads,
)
from .plotting import plot_bars, plot_curves_1d, plot_slices

__all__ = ["LayerAnalysis", "RunAnalysis", "analyze_run", "invariance_gap",
           "scale_symmetric_layers", "optimizer_directions", "interpolation_grid",
           "normalization_report", "add_analyze_arguments", "main_analyze", "DEFAULTS"]

#: defaults of :func:`normalization_report` and ``kernelgeo analyze`` (fast on a CPU)
DEFAULTS = {"points": 11, "span": 1.0, "subset": 256, "sharpness_subset": 128,
            "interp_points": 13, "seed": 0}


@dataclass
class LayerAnalysis:
    """What :func:`analyze_run` measures for one kernel (one row of the layer tables)."""

    name: str
    shape: tuple
    geometry: str
    numel: int
    dim: int
    removed: int
    batch_norm: bool
    symmetry: int
    symmetry_left: int
    restriction: int
    grad_norm: float = math.nan
    momentum_norm: float = math.nan
    cos_grad_momentum: float = math.nan
    curvature: float = math.nan
    curvature_note: str = ""
    normal_grad: float = math.nan
    normal_momentum: float = math.nan
    angular_step: float = math.nan
    distance: float = math.nan
    distance_note: str = ""
    chordal: float = math.nan
    path_length: float = math.nan
    path_note: str = ""


@dataclass
class RunAnalysis:
    """Everything :func:`analyze_run` measures for one run."""

    label: str
    path: str
    geometry: str
    model: str
    optimizer: str
    epochs: int
    steps: int
    final_test_error: float
    train_loss: float
    train_acc: float
    init_note: str
    layers: list = field(default_factory=list)
    sharp_riem: float = math.nan
    sharp_eucl: float = math.nan
    sharp_note: str = ""
    curve: dict = field(default_factory=dict)
    curve_note: str = ""
    slice_manifold: object = None
    slice_euclidean: object = None
    seconds: float = 0.0


# ----------------------------------------------------------------- symmetry of the layers
def scale_symmetric_layers(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """Weights whose layer's output feeds a batch norm directly: ``{weight name: bn name}``.

    Found by running ``example`` through ``model`` with forward hooks: a convolution or
    linear layer whose output tensor is the input of a ``_BatchNorm`` module.  For those
    layers the loss (with batch statistics) is unchanged when output filter :math:`i` is
    multiplied by any :math:`c_i > 0`.  Symmetries spanning several layers (e.g. a scale moved
    through a ReLU into the next layer) are not counted.
    """
    outputs: dict[int, str] = {}
    found: dict[str, str] = {}
    hooks = []

    def after(name):
        def hook(mod, inp, out):
            if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                outputs[id(out)] = name
            elif isinstance(mod, nn.modules.batchnorm._BatchNorm) and inp:
                src = outputs.get(id(inp[0]))
                if src is not None:
                    found[f"{src}.weight" if src else "weight"] = name
        return hook

    for name, mod in model.named_modules():
        hooks.append(mod.register_forward_hook(after(name)))
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(example)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return found


def invariance_gap(manifold: KernelManifold, x: torch.Tensor, scale_invariant: bool
                   ) -> tuple[int, int, int, int]:
    """``(removed, symmetry, symmetry_left, restriction)`` in dimensions for one kernel.

    ``removed = numel - dim`` (dimensions the constraint takes away); ``symmetry`` is the
    number of per-filter scale directions :math:`e_i \\otimes w_i` (``out`` when the layer
    feeds a batch norm, else 0); ``symmetry_left`` is the rank of their projections onto
    :math:`T_x\\mathcal M` (flat directions still in the search space); ``restriction =
    removed - (symmetry - symmetry_left)`` (removed dimensions that are not symmetries).
    """
    # on the manifold in float64: float32 drift would make normal directions look tangent
    x = manifold.projx(x.detach().double())
    numel = x.numel()
    removed = numel - manifold.dim(tuple(x.shape))
    if not scale_invariant:
        return removed, 0, 0, removed
    out = x.shape[0]
    dirs = torch.zeros((out,) + tuple(x.shape), dtype=torch.float64)
    for i in range(out):
        dirs[i, i] = x[i]
    proj = torch.stack([manifold.proju(x, d) for d in dirs]).reshape(out, -1)
    scale = float(dirs.reshape(out, -1).norm(dim=1).max()) or 1.0
    left = int(torch.linalg.matrix_rank(proj, atol=1e-8 * scale))
    return removed, out, left, removed - (out - left)


# ------------------------------------------------------------ the optimizer's directions
def _momentum(opt: torch.optim.Optimizer, p: torch.Tensor, m: KernelManifold
              ) -> torch.Tensor | None:
    st = opt.state.get(p, {})
    if st.get("momentum_buffer") is not None:
        return st["momentum_buffer"].detach()
    blocks = st.get("momentum_blocks")
    if not blocks or any(b is None for b in blocks):
        return None
    if isinstance(m, KernelProduct) and len(blocks) > 1:
        full = torch.zeros_like(p.detach())
        for b, (_, idx) in zip(blocks, m.blocks(p.shape)):
            full[idx] = b.detach().reshape(full[idx].shape)
        return full
    return blocks[0].detach().reshape(p.shape)


def optimizer_directions(run, x: torch.Tensor, y: torch.Tensor
                         ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """Riemannian gradients of the training loss on ``(x, y)`` and the momentum buffers.

    The gradient is computed on a copy of ``run.model`` in training mode (batch statistics,
    as in a training step; the model's running statistics are untouched) and projected onto
    each kernel's tangent space (weight decay not included).  The momentum buffers come from
    the checkpoint's optimizer state (``None`` where the optimizer keeps none), projected onto
    the tangent space to remove float drift.
    """
    model = copy.deepcopy(run.model)
    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    mans = parameter_manifolds(run.model)
    opt = run.optimizer()
    params = dict(run.model.named_parameters())
    grads, moms = {}, {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        m = mans[name]
        w = params[name].detach()
        grads[name] = m.proju(w, p.grad.detach())
        buf = _momentum(opt, params[name], m)
        moms[name] = None if buf is None else m.proju(w, buf)
    return grads, moms


def interpolation_grid(n: int = 13, lo: float = -0.25, hi: float = 1.25) -> np.ndarray:
    """``n`` evenly spaced values on ``[lo, hi]`` (``lo <= 0``, ``hi >= 1``) in which the
    points nearest 0 and 1 are exactly 0.0 and 1.0."""
    if not (lo <= 0 and hi >= 1 and n >= 2):
        raise ValueError(f"the grid must contain [0, 1] and have n >= 2; got [{lo}, {hi}], {n}")
    ts = np.linspace(lo, hi, n)
    for v in (0.0, 1.0):
        ts[int(np.argmin(np.abs(ts - v)))] = v
    if len(set(ts.tolist())) != n:
        raise ValueError(f"n={n} is too small for a grid over [{lo}, {hi}] holding 0 and 1")
    return ts


# ------------------------------------------------------------------------- one run
def _layer_rows(run, grads, moms, sym_layers) -> list[LayerAnalysis]:
    mans = parameter_manifolds(run.model)
    rows = []
    dist_notes: dict[str, str] = {}
    dists: dict[str, float] = {}
    if run.init_state is not None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dists = layer_distances(mans, run.init_state, run.model)
        for w in caught:
            # "<name>: <metric> distance not computed, recorded as NaN: <reason>"
            name, _, rest = str(w.message).partition(": ")
            dist_notes[name] = "distance refused: " + rest.rpartition("recorded as NaN: ")[2]
    for name, p in run.model.named_parameters():
        if p.dim() < 2:
            continue
        m = mans[name]
        x = p.detach().double()
        shape = tuple(p.shape)
        removed, sym, left, restr = invariance_gap(m, x, name in sym_layers)
        row = LayerAnalysis(name, shape, m.describe(shape), x.numel(), m.dim(shape), removed,
                            name in sym_layers, sym, left, restr)
        g = grads.get(name)
        mo = moms.get(name)
        if g is not None:
            g = g.double()
            row.grad_norm = float(g.norm())
            if row.grad_norm > 0:
                row.normal_grad = float(second_fundamental_form(m, x, g, g).norm()) \
                    / row.grad_norm ** 2
            ratio = g.flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-300)
            row.angular_step = float(ratio.median())
        if mo is not None:
            mo = mo.double()
            row.momentum_norm = float(mo.norm())
            if row.momentum_norm > 0:
                row.normal_momentum = float(second_fundamental_form(m, x, mo, mo).norm()) \
                    / row.momentum_norm ** 2
        if g is None or mo is None:
            row.curvature_note = "no momentum buffer (momentum 0 or not kept by the optimizer)"
        elif row.grad_norm == 0 or row.momentum_norm == 0:
            row.curvature_note = "zero gradient or momentum"
        else:
            row.cos_grad_momentum = float((g * mo).sum()) / (row.grad_norm * row.momentum_norm)
            if abs(row.cos_grad_momentum) > 1 - 1e-6:
                row.curvature_note = "gradient and momentum are parallel: no plane"
            else:
                row.curvature = float(sectional_curvature(m, x, g, mo))
        if run.init_state is None:
            row.distance_note = run.init_note
        else:
            row.distance = dists.get(name, math.nan)
            row.distance_note = dist_notes.get(name, "")
            row.chordal = float((x - run.init_state[name].double()).norm())
        if run.path_lengths is None:
            row.path_note = "path length n/a: " + run.path_note
        else:
            row.path_length = float(run.path_lengths.get(name, math.nan))
        rows.append(row)
    return rows


def _curve(run, ev: Evaluator, ts) -> tuple[dict, str]:
    if run.init_state is None:
        return {}, run.init_note
    mans = parameter_manifolds(run.model)
    trained = {k: v.detach() for k, v in run.model.state_dict().items()}
    out, note = {"t": np.asarray(ts)}, ""
    for mode in ("geodesic", "linear"):
        logs: dict = {}
        ls, accs = [], []
        for t in ts:
            try:
                st = interpolate_state_dict(mans, run.init_state, trained, float(t), mode=mode,
                                            logs=logs)
                loss, acc = ev(st)
            except RuntimeError as err:  # StiefelLogError: refused, not replaced
                note = f"geodesic refused: {err}"
                loss, acc = math.nan, math.nan
            ls.append(loss)
            accs.append(acc)
        out[f"{mode}_loss"], out[f"{mode}_acc"] = np.array(ls), np.array(accs)
    return out, note


def analyze_run(run, *, label: str | None = None, points: int = DEFAULTS["points"],
                span: float = DEFAULTS["span"], subset: int = DEFAULTS["subset"],
                sharpness_subset: int = DEFAULTS["sharpness_subset"],
                interp_points: int = DEFAULTS["interp_points"], with_sharpness: bool = True,
                with_slices: bool = True, seed: int = DEFAULTS["seed"]) -> RunAnalysis:
    """Measure one loaded run (:func:`kernelgeo.runs.load_run`); see the module docstring.

    Parameters
    ----------
    run : kernelgeo.runs.Run
    label : str, optional
        Name in tables and figures (default: the run directory's name).
    points, span
        2-D slices: ``points x points`` grid over ``[-span, span]^2``.
    subset
        Training images (first ones, unaugmented) for losses, landscapes and interpolation.
    sharpness_subset
        Training images for the Hessian eigenvalues.
    interp_points
        Points of the 1-D interpolation grid on ``[-0.25, 1.25]`` (holds 0 and 1 exactly).
    seed
        Random directions of the 2-D slices.
    """
    t0 = time.perf_counter()
    cfg = run.config
    x, y = run.train_batch(max(subset, sharpness_subset))
    sub_x, sub_y = x[:subset], y[:subset]
    gx, gy = run.train_batch(cfg.batch_size)
    grads, moms = optimizer_directions(run, gx, gy)
    sym = scale_symmetric_layers(run.model, sub_x[:2])
    ev = Evaluator(run.model, sub_x, sub_y)
    loss, acc = ev()
    hist = run.history[-1] if run.history else {}
    res = RunAnalysis(label or run.name, str(run.path), run.geometry, str(cfg.model),
                      f"{cfg.optimizer} (lr {cfg.lr}, momentum {cfg.momentum}, "
                      f"{cfg.schedule})", run.epoch, run.step,
                      float(hist.get("test_error", math.nan)), loss, acc, run.init_note)
    res.layers = _layer_rows(run, grads, moms, sym)
    if with_sharpness:
        sx, sy = x[:sharpness_subset], y[:sharpness_subset]
        res.sharp_riem = sharpness(run.model, sx, sy, riemannian=True, tol=1e-3)
        res.sharp_eucl = sharpness(run.model, sx, sy, riemannian=False, tol=1e-3)
    else:
        res.sharp_note = "not computed (--no-sharpness)"
    res.curve, res.curve_note = _curve(run, ev, interpolation_grid(interp_points))
    if with_slices:
        gm = torch.Generator().manual_seed(seed)
        dm = (tangent_directions(run.model, generator=gm),
              tangent_directions(run.model, generator=gm))
        res.slice_manifold = landscape_2d(run.model, ev, mode="manifold", span=span,
                                          points=points, directions=dm)
        ge = torch.Generator().manual_seed(seed)
        de = (li_directions(run.model, generator=ge), li_directions(run.model, generator=ge))
        res.slice_euclidean = landscape_2d(run.model, ev, mode="euclidean", span=span,
                                           points=points, directions=de)
    res.seconds = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------------- markdown
def _fmt(v) -> str:
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.4g}")
    return str(v).replace("|", "\\|")  # product descriptions hold '|'; keep the columns


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def _notes(res: Sequence[RunAnalysis], attr: str) -> list[str]:
    out = []
    for r in res:
        for lay in r.layers:
            note = getattr(lay, attr)
            if note:
                out.append(f"- {r.label} / `{lay.name}`: {note}")
    return out


def _unique_labels(runs) -> list[str]:
    labels = [f"{r.name} ({r.geometry})" for r in runs]
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab} #{seen[lab]}")
    return out


def normalization_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *,
                         points: int = DEFAULTS["points"], span: float = DEFAULTS["span"],
                         subset: int = DEFAULTS["subset"],
                         sharpness_subset: int = DEFAULTS["sharpness_subset"],
                         interp_points: int = DEFAULTS["interp_points"],
                         with_sharpness: bool = True, with_slices: bool = True,
                         seed: int = DEFAULTS["seed"], threads: int | None = None,
                         log: Callable[[str], None] = print,
                         before_write: Callable[[], None] | None = None) -> Path:
    """Analyse trained runs and write ``report.md``, figures and ``summary.json``.

    Parameters
    ----------
    run_dirs : sequence of path
        Directories of ``kernelgeo train`` runs (loaded with :func:`kernelgeo.runs.load_run`).
    out_dir : str or Path
        Created if needed.
    points, span, subset, sharpness_subset, interp_points, seed
        See :func:`analyze_run`.
    with_sharpness, with_slices : bool
        Compute the Hessian eigenvalues / the 2-D slices.
    threads : int, optional
        Torch CPU threads for the analysis (restored afterwards).
    before_write : callable, optional
        Called once every run has been loaded and checked, before anything is written
        (the command line creates the output directory there).

    Returns
    -------
    Path
        The written ``report.md``.

    Raises
    ------
    kernelgeo.runs.RunError, kernelgeo.checkpoint.CheckpointError
        A directory that is not a loadable run (nothing is written).
    """
    from ..runs import load_run

    if not run_dirs:
        raise ValueError("normalization_report needs at least one run directory")
    with torch_threads(threads):
        runs = [load_run(p) for p in run_dirs]  # all loaded (and checked) before writing
        if before_write is not None:
            before_write()
        labels = _unique_labels(runs)
        res = []
        for run, lab in zip(runs, labels):
            r = analyze_run(run, label=lab, points=points, span=span, subset=subset,
                            sharpness_subset=sharpness_subset, interp_points=interp_points,
                            with_sharpness=with_sharpness, with_slices=with_slices, seed=seed)
            log(f"[{lab}] analysed in {r.seconds:.1f}s")
            res.append(r)
    return _write(res, Path(out_dir), dict(points=points, span=span, subset=subset,
                                           sharpness_subset=sharpness_subset,
                                           interp_points=interp_points), log)


def _write(res: list[RunAnalysis], out: Path, opts: dict, log) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    layers: list[str] = []
    for r in res:
        layers += [lay.name for lay in r.layers if lay.name not in layers]

    def per_layer(attr):
        return {r.label: [next((getattr(lay, attr) for lay in r.layers if lay.name == k),
                               math.nan) for k in layers] for r in res}

    figs = {
        "curvature": plot_bars(per_layer("curvature"), layers, out / "curvature_plane.png",
                               ylabel="K(grad, momentum)",
                               title="sectional curvature of the optimizer's plane"),
        "normal": plot_bars(per_layer("normal_grad"), layers, out / "normal_curvature.png",
                            ylabel="|II(g,g)| / |g|^2",
                            title="normal curvature along the gradient"),
        "angular": plot_bars(per_layer("angular_step"), layers, out / "angular_step.png",
                             ylabel="median over filters of |grad_i|/|w_i|",
                             title="angular step per unit learning rate (last gradient)",
                             log=True),
        "distance": plot_bars(per_layer("distance"), layers, out / "distance_from_init.png",
                              ylabel="geodesic distance", title="distance from initialization"),
    }
    paths, dists = per_layer("path_length"), per_layer("distance")
    detour = {k: [p / d if d > 0 else math.nan for p, d in zip(paths[k], dists[k], strict=True)]
              for k in paths}
    if any(math.isfinite(v) for vs in detour.values() for v in vs):
        figs["detour"] = plot_bars(detour, layers, out / "path_over_distance.png",
                                   ylabel="path length / geodesic distance", log=True,
                                   title="path travelled per unit of distance from init")
    curves = {r.label: r.curve for r in res if r.curve}
    if curves:
        figs["curves"] = plot_curves_1d(curves, out / "interpolation_1d.png",
                                        title="initialization (t=0) to trained (t=1)")
    if all(r.slice_manifold is not None for r in res):
        figs["slices_manifold"] = plot_slices(
            {r.label: r.slice_manifold for r in res}, out / "landscape_manifold.png",
            title="Manifold-aware slices (tangent directions, Exp)")
        figs["slices_euclidean"] = plot_slices(
            {r.label: r.slice_euclidean for r in res}, out / "landscape_euclidean.png",
            title="Euclidean slices (Li et al. filter-normalised)")

    md = ["# Normalization report", "",
          "How each run's kernel geometry reshapes its search space, measured at the trained "
          "weights (checkpoint of the last epoch).", "",
          "## Runs", "",
          _md_table(["run", "geometry", "model", "optimizer", "epochs", "steps",
                     "test error", f"train loss ({opts['subset']} imgs)",
                     "train acc", "search-space dim (kernels)", "analysis s"],
                    [[r.label, f"`{r.geometry}`", r.model, r.optimizer, r.epochs, r.steps,
                      r.final_test_error, r.train_loss, r.train_acc,
                      sum(lay.dim for lay in r.layers), r.seconds] for r in res]), "",
          "Initial weights: " + (res[0].init_note if len({r.init_note for r in res}) == 1
                                 else "; ".join(f"{r.label}: {r.init_note}" for r in res))
          + ".", "",
          "## Invariance gap", "",
          "Per kernel: dimensions of the weights (`numel`) and of the search space (`dim`); "
          "`removed` = numel - dim is what the constraint takes away; `symmetry` is the "
          "per-filter scale invariance the layer really has (out dimensions when its output "
          "feeds a batch norm directly, otherwise 0; symmetries across layers are not "
          "counted); `symmetry left` is how many of those flat directions remain in the "
          "search space (rank of their tangent projections); `restriction` = removed - "
          "(symmetry - symmetry left) counts removed dimensions that are not symmetries, i.e. "
          "that restrict what the layer can represent.", "",
          _md_table(["run", "layer", "shape", "geometry", "numel", "dim", "removed",
                     "batch norm", "symmetry", "symmetry left", "restriction"],
                    [[r.label, lay.name, lay.shape, lay.geometry, lay.numel, lay.dim,
                      lay.removed, "yes" if lay.batch_norm else "no", lay.symmetry,
                      lay.symmetry_left, lay.restriction]
                     for r in res for lay in r.layers]), "",
          "## Curvature along the optimizer's directions", "",
          "`g` is the Riemannian gradient of the training loss on the first batch of "
          "training images (model in training mode); `m` is the momentum buffer of the "
          "checkpoint's optimizer state.  K(g, m) is the sectional curvature of the plane "
          "they span (Gauss equation); |II(u,u)|/|u|^2 is the normal curvature along u: a "
          "retraction or Euclidean step of length s along u departs from the geodesic by "
          "about s^2/2 times it.  Angular step: median over filters of |g_i|/|w_i|.", "",
          _md_table(["run", "layer", "|g|", "|m|", "cos(g, m)", "K(g, m)",
                     "|II(g,g)|/|g|^2", "|II(m,m)|/|m|^2", "angular step / lr"],
                    [[r.label, lay.name, lay.grad_norm, lay.momentum_norm,
                      lay.cos_grad_momentum, lay.curvature, lay.normal_grad,
                      lay.normal_momentum, lay.angular_step]
                     for r in res for lay in r.layers]), ""]
    md += _notes(res, "curvature_note") + ["",
          f"![curvature of the optimizer's plane]({figs['curvature'].name})", "",
          f"![normal curvature]({figs['normal'].name})", "",
          f"![angular step]({figs['angular'].name})", "",
          "## Distance from initialization", "",
          "Geodesic distance from the re-created initial weights to the trained ones, per "
          "kernel (Stiefel blocks: embedded-metric logarithm, verified or refused), and the "
          "chordal (Euclidean) distance, beside the path length travelled during training "
          "(sum of the per-step changes of the weights; for small steps the Riemannian "
          "length of the same path).  Path / geodesic is 1 for a run that went straight "
          "to its endpoint along a geodesic and grows with every detour.", "",
          _md_table(["run", "layer", "path length", "geodesic distance", "chordal distance",
                     "path / geodesic", "chordal / geodesic"],
                    [[r.label, lay.name, lay.path_length, lay.distance, lay.chordal,
                      lay.path_length / lay.distance if lay.distance > 0 else math.nan,
                      lay.chordal / lay.distance if lay.distance > 0 else math.nan]
                     for r in res for lay in r.layers]), ""]
    md += _notes(res, "distance_note") + [
        f"- {r.label}: {note}" for r in res
        for note in dict.fromkeys(lay.path_note for lay in r.layers if lay.path_note)]
    md += ["", f"![distance from initialization]({figs['distance'].name})", ""]
    if "detour" in figs:
        md += [f"![path length over distance]({figs['detour'].name})", ""]
    md += [
          "## Sharpness", "",
          "Top eigenvalue of the Hessian of the training loss on the first "
          f"{opts['sharpness_subset']} training images (model in eval mode): Riemannian "
          "(projected Hessian plus the Weingarten term, on the product of the kernels' "
          "tangent spaces) and Euclidean (all coordinates).", "",
          _md_table(["run", "sharpness (Riemannian)", "sharpness (Euclidean)"],
                    [[r.label, r.sharp_riem, r.sharp_eucl] for r in res]), ""]
    md += [f"- {r.label}: {r.sharp_note}" for r in res if r.sharp_note] + [
          "", "## 1-D interpolation", "",
          "Loss and accuracy on the training subset from the initialization (t=0) to the "
          "trained weights (t=1) along the geodesic of the kernels' manifolds (solid; a "
          "Stiefel kernel whose distance is refused above follows a verified geodesic "
          "through both ends that need not be the shortest) and along the straight line "
          "(dashed, kernels leave their manifolds); t = "
          + ", ".join(f"{t:g}" for t in interpolation_grid(opts["interp_points"])) + ".", ""]
    rows = []
    for r in res:
        if r.curve:
            c = r.curve
            i0 = int(np.flatnonzero(c["t"] == 0.0)[0])
            i1 = int(np.flatnonzero(c["t"] == 1.0)[0])
            mid = int(np.argmin(np.abs(c["t"] - 0.5)))
            rows.append([r.label, float(c["geodesic_loss"][i0]), float(c["geodesic_loss"][mid]),
                         float(c["linear_loss"][mid]), float(c["geodesic_loss"][i1]),
                         float(np.nanmax(c["geodesic_loss"][i0:i1 + 1])),
                         float(np.nanmax(c["linear_loss"][i0:i1 + 1]))])
    md += [_md_table(["run", "loss t=0", "geodesic t=0.5", "straight t=0.5", "loss t=1",
                      "max on geodesic [0,1]", "max on straight line [0,1]"], rows), ""]
    md += [f"- {r.label}: {r.curve_note}" for r in res if r.curve_note]
    if "curves" in figs:
        md += ["", f"![1-D interpolation]({figs['curves'].name})"]
    md += ["", "## 2-D slices", ""]
    if "slices_manifold" in figs:
        md += [f"Training loss (log10) on a {opts['points']}x{opts['points']} grid over "
               f"[-{opts['span']}, {opts['span']}]^2 around each trained solution (marked), "
               "one colour scale per figure.  Manifold-aware: two random tangent directions, "
               "normalised per component, moved by the exponential map (every point is on "
               "the manifolds); Euclidean: Li et al. filter-normalised directions on straight "
               "lines.", "",
               f"![manifold-aware slices]({figs['slices_manifold'].name})", "",
               f"![Euclidean slices]({figs['slices_euclidean'].name})", "",
               _md_table(["run", "centre loss", "max loss (manifold slice)",
                          "max loss (Euclidean slice)", "seconds (both)"],
                         [[r.label, r.slice_manifold.center[0],
                           float(np.nanmax(r.slice_manifold.loss)),
                           float(np.nanmax(r.slice_euclidean.loss)),
                           r.slice_manifold.seconds + r.slice_euclidean.seconds]
                          for r in res]), ""]
    else:
        md += ["Not computed (--no-slices).", ""]
    path = out / "report.md"
    path.write_text("\n".join(md) + "\n")
    summary = {r.label: {"path": r.path, "geometry": r.geometry, "train_loss": r.train_loss,
                         "sharpness_riemannian": r.sharp_riem,
                         "sharpness_euclidean": r.sharp_eucl,
                         "layers": [vars(lay) for lay in r.layers],
                         "seconds": r.seconds} for r in res}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=_json_default))
    log(f"wrote {path}")
    return path


def _json_default(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, tuple):
        return list(v)
    return str(v)


# ----------------------------------------------------------------------------- command line
def _positive_int(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v!r}")
    return n


def _span(v: str) -> float:
    try:
        f = float(v)
    except ValueError:
        f = math.nan
    if not (math.isfinite(f) and f > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {v!r}")
    return f


def _grid(v: str) -> int:
    n = _positive_int(v)
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be an integer >= 2, got {v!r}")
    return n


def _seed(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        n = -1
    if not 0 <= n <= 2**63 - 1:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**63), got {v!r}")
    return n


def add_analyze_arguments(parser: argparse.ArgumentParser, *, runs_optional: bool = False
                          ) -> argparse.ArgumentParser:
    """Add the options of ``kernelgeo analyze`` to ``parser`` (returns it); with
    ``runs_optional`` the run directories may be omitted (``args.runs == []``)."""
    parser.add_argument("runs", nargs="*" if runs_optional else "+", metavar="RUN_DIR",
                        help="directories of `kernelgeo train` runs (with checkpoint.pt); "
                             "several runs are compared side by side")
    parser.add_argument("--out", default=None,
                        help="output directory (default: runs/analyze/<--name or start time>)")
    parser.add_argument("--points", type=_grid, default=DEFAULTS["points"],
                        help="2-D slices: points per axis (default: %(default)s)")
    parser.add_argument("--span", type=_span, default=DEFAULTS["span"],
                        help="2-D slices: half-width of the grid (default: %(default)s)")
    parser.add_argument("--subset", type=_positive_int, default=DEFAULTS["subset"],
                        help="training images for losses, slices and interpolation "
                             "(default: %(default)s)")
    parser.add_argument("--sharpness-subset", type=_positive_int,
                        default=DEFAULTS["sharpness_subset"],
                        help="training images for the Hessian eigenvalues "
                             "(default: %(default)s)")
    parser.add_argument("--interp-points", type=_grid, default=DEFAULTS["interp_points"],
                        help="1-D interpolation: points on [-0.25, 1.25], t=0 and t=1 "
                             "included exactly (default: %(default)s)")
    parser.add_argument("--seed", type=_seed, default=DEFAULTS["seed"],
                        help="seed of the random slice directions (default: %(default)s)")
    parser.add_argument("--no-sharpness", action="store_true",
                        help="skip the Hessian eigenvalues (default: computed)")
    parser.add_argument("--no-slices", action="store_true",
                        help="skip the 2-D slices (default: computed)")
    parser.add_argument("--threads", type=_positive_int, default=None,
                        help="torch CPU threads (default: torch's setting; 1 is fastest for "
                             "digits models on a busy CPU)")
    return parser


def main_analyze(args: argparse.Namespace,
                 before_write: Callable[[], None] | None = None) -> int:
    """Run the report from parsed :func:`add_analyze_arguments` options; returns 0.

    ``args.out`` must be set (the command line fills in ``runs/analyze/<name>``);
    ``before_write`` as for :func:`normalization_report`.
    """
    if args.out is None:
        raise ValueError("main_analyze needs args.out (the output directory)")
    normalization_report(args.runs, args.out, points=args.points, span=args.span,
                         subset=args.subset, sharpness_subset=args.sharpness_subset,
                         interp_points=args.interp_points, seed=args.seed,
                         with_sharpness=not args.no_sharpness,
                         with_slices=not args.no_slices, threads=args.threads,
                         before_write=before_write)
    return 0

