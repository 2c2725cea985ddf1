r"""The normalization report: what each kernel geometry does to the search space of a model.

:func:`normalization_report` trains one copy of a model per geometry (euclidean, sphere =
BN/WN, centred sphere = CWN, oblique, Stiefel = OWN and a product) on a small data set, and
writes ``report.md`` with figures into an output directory:

* per layer: dimension of the search space, analytic curvature bounds and a sampled range,
  injectivity radius, diameter (:mod:`~kernelgeo.analysis.curvature`);
* effective angular step per unit of learning rate, :math:`\|\mathrm{grad}_i\|/\|w_i\|` per
  filter :math:`i` (for a filter of norm :math:`r` the angle turned by a gradient step of size
  :math:`\eta` is :math:`\approx\eta\|\mathrm{grad}_i\|/r`), and gradient-norm statistics;
* distances travelled: geodesic path length through every optimizer step against the
  geodesic distance from the initialization (:mod:`~kernelgeo.analysis.geodesics`);
* landscapes around each trained solution: 2-D Euclidean (Li et al.) and manifold-aware
  slices with one colour scale, 1-D geodesic vs straight line from the initialization,
  sharpness (Riemannian vs Euclidean top Hessian eigenvalue).

The default model is a tiny CNN on scikit-learn's 8x8 digits, trained by a small
self-contained loop (so a full report takes about a minute on a CPU).  The command line is
``kernelgeo analyze`` (:func:`add_analyze_arguments`, :func:`main_analyze`) or the script
``analysis/normalization_report.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._compat import ManifoldParameter
from .curvature import curvature_table, rows_to_markdown
from .geodesics import PathRecorder, parameter_manifolds
from .hessian import sharpness
from .landscape import (
    Evaluator,
    landscape_1d,
    landscape_2d,
    li_directions,
    tangent_directions,
    torch_threads,
)
from .plotting import plot_bars, plot_curves_1d, plot_slices

__all__ = [
    "DEFAULT_GEOMETRIES", "DigitsCNN", "digits_tensors", "train_small", "GeometryRun",
    "normalization_report", "add_analyze_arguments", "main_analyze",
]

#: label -> geometry spec (for :func:`kernelgeo.constrain`)
DEFAULT_GEOMETRIES = {
    "euclidean": "euclidean",
    "sphere (BN/WN)": "sphere",
    "centered sphere (CWN)": "centered-sphere",
    "oblique": "oblique",
    "Stiefel (OWN)": "stiefel",
    "product po:sphere+stiefel": "po:sphere+stiefel",
}


class DigitsCNN(nn.Module):
    """Three 3x3 conv layers with batch norm, for 1x8x8 digits (about 7k parameters)."""

    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 2 * width, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def digits_tensors(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor]:
    """scikit-learn digits as float tensors ``(N, 1, 8, 8)`` in [0, 1] (standardised), labels;
    an 80/20 stratified split fixed by ``seed``: ``(x_train, y_train, x_test, y_test)``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    x = (x - x.mean()) / x.std()
    y = d.target.astype(np.int64)
    itr, ite = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y,
                                random_state=seed)
    t = torch.from_numpy
    return t(x[itr]), t(y[itr]), t(x[ite]), t(y[ite])


def _optimizer(params, lr: float, momentum: float):
    """kernelgeo's convergent RSGD with its default step rule, and its description."""
    from ..optim import ConvergentRSGD

    opt = ConvergentRSGD(params, lr=lr, momentum=momentum)
    return opt, f"kernelgeo ConvergentRSGD ({opt.defaults['step_rule']} rule)"


@dataclass
class GeometryRun:
    """Everything measured for one geometry."""

    label: str
    spec: str
    model: nn.Module
    init_state: dict
    optimizer_name: str = ""
    train_loss: float = math.nan
    test_acc: float = math.nan
    seconds: float = 0.0
    grad_norms: dict = field(default_factory=dict)      # layer -> list over steps
    angular_steps: dict = field(default_factory=dict)   # layer -> list (median per step)
    path: dict = field(default_factory=dict)            # layer -> path length
    endpoint: dict = field(default_factory=dict)        # layer -> distance from init
    sharp_riem: float = math.nan
    sharp_eucl: float = math.nan
    geometry_rows: list = field(default_factory=list)


def _kernel_params(model):
    return {k: p for k, p in model.named_parameters() if p.dim() >= 2}


def train_small(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int = 6,
                lr: float = 0.1, momentum: float = 0.9, batch_size: int = 64, seed: int = 0,
                run: GeometryRun | None = None) -> GeometryRun:
    """Train ``model`` (already constrained) with Riemannian SGD, recording the geometry.

    Records, per optimizer step and kernel: the Riemannian gradient norm, the median over
    filters of :math:`\\|\\mathrm{grad}_i\\|/\\|w_i\\|` (angular step per unit of learning
    rate) and the geodesic length of the step (:class:`PathRecorder`).
    """
    run = run or GeometryRun("model", "?", model, {})
    g = torch.Generator().manual_seed(seed)
    opt, run.optimizer_name = _optimizer(model.parameters(), lr, momentum)
    rec = PathRecorder(model, opt)
    kernels = _kernel_params(model)
    mans = parameter_manifolds(model)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for s in range(0, len(x), batch_size):
            idx = perm[s:s + batch_size]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            with torch.no_grad():
                for k, p in kernels.items():
                    rg = mans[k].proju(p.detach(), p.grad)
                    run.grad_norms.setdefault(k, []).append(float(rg.norm()))
                    ratio = rg.flatten(1).norm(dim=1) / p.detach().flatten(1).norm(dim=1)
                    run.angular_steps.setdefault(k, []).append(float(ratio.median()))
            opt.step()
    run.seconds = time.perf_counter() - t0
    rec.remove()
    run.path = dict(rec.length)
    run.endpoint = rec.endpoint()
    return run


def _md_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def f(v):
        if isinstance(v, float):
            return "-" if math.isnan(v) else ("inf" if math.isinf(v) else f"{v:.4g}")
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(f(v) for v in r) + " |" for r in rows]
    return "\n".join(out)


def normalization_report(out_dir: str | Path, *,
                         geometries: dict[str, str] | None = None,
                         model_fn: Callable[[], nn.Module] = DigitsCNN,
                         data: tuple | None = None, epochs: int = 6, lr: float = 0.1,
                         momentum: float = 0.9, seed: int = 0, points: int = 21,
                         span: float = 1.0, subset: int = 512, sharpness_subset: int = 256,
                         with_sharpness: bool = True, threads: int | None = None,
                         log: Callable[[str], None] = print) -> Path:
    """Train one model per geometry and write ``report.md`` with figures into ``out_dir``.

    Parameters
    ----------
    out_dir : str or Path
        Created if needed; receives ``report.md``, ``*.png`` and ``summary.json``.
    geometries : dict, optional
        ``{label: spec}`` (default :data:`DEFAULT_GEOMETRIES`); a spec is anything
        :func:`kernelgeo.constrain` accepts (a name, product string or per-layer mapping).
    model_fn : callable
        Builds a fresh model (same architecture for every geometry; seeded by ``seed``).
    data : tuple, optional
        ``(x_train, y_train, x_test, y_test)`` tensors; default: :func:`digits_tensors`.
    epochs, lr, momentum, seed
        Training of every copy (same initialization and batch order for all geometries).
    points, span
        2-D landscape grid (``points x points`` over ``[-span, span]^2``).
    subset, sharpness_subset
        Size of the fixed training subset for landscapes and for the Hessian.
    with_sharpness : bool
        Compute Riemannian and Euclidean top Hessian eigenvalues.
    threads : int, optional
        Torch CPU threads for the whole run (restored afterwards); 1 is fastest for the
        digits CNN on a busy CPU.

    Returns
    -------
    Path
        The written ``report.md``.
    """
    with torch_threads(threads):
        return _report(out_dir, geometries, model_fn, data, epochs, lr, momentum, seed,
                       points, span, subset, sharpness_subset, with_sharpness, log)


def _report(out_dir, geometries, model_fn, data, epochs, lr, momentum, seed, points, span,
            subset, sharpness_subset, with_sharpness, log) -> Path:
    from .. import constrain

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    geometries = dict(geometries or DEFAULT_GEOMETRIES)
    xtr, ytr, xte, yte = data if data is not None else digits_tensors(seed)
    sub_x, sub_y = xtr[:subset], ytr[:subset]
    runs: list[GeometryRun] = []
    for label, spec in geometries.items():
        torch.manual_seed(seed)
        model = model_fn()
        report = constrain(model, spec, on_invalid="skip")
        run = GeometryRun(label, spec, model,
                          {k: v.detach().clone() for k, v in model.state_dict().items()})
        train_small(model, xtr, ytr, epochs=epochs, lr=lr, momentum=momentum, seed=seed,
                    run=run)
        ev = Evaluator(model, sub_x, sub_y)
        run.train_loss = ev()[0]
        run.test_acc = Evaluator(model, xte, yte)()[1]
        run.geometry_rows = curvature_table(model, generator=torch.Generator().manual_seed(0))
        run.constrain_report = report
        if with_sharpness:
            sx, sy = xtr[:sharpness_subset], ytr[:sharpness_subset]
            run.sharp_riem = sharpness(model, sx, sy, riemannian=True)
            run.sharp_eucl = sharpness(model, sx, sy, riemannian=False)
        log(f"[{label}] trained in {run.seconds:.1f}s: train loss {run.train_loss:.4f}, "
            f"test acc {run.test_acc:.3f}")
        runs.append(run)

    # ---- landscapes: same random seed for the directions of every model
    slices_e, slices_m, curves = {}, {}, {}
    t_land = 0.0
    for run in runs:
        ev = Evaluator(run.model, sub_x, sub_y)
        ge = torch.Generator().manual_seed(seed + 1)
        de = (li_directions(run.model, generator=ge), li_directions(run.model, generator=ge))
        slices_e[run.label] = landscape_2d(run.model, ev, mode="euclidean", span=span,
                                           points=points, directions=de)
        gm = torch.Generator().manual_seed(seed + 1)
        dm = (tangent_directions(run.model, generator=gm),
              tangent_directions(run.model, generator=gm))
        slices_m[run.label] = landscape_2d(run.model, ev, mode="manifold", span=span,
                                           points=points, directions=dm)
        curves[run.label] = landscape_1d(run.model, ev, run.init_state,
                                         {k: v.detach() for k, v in
                                          run.model.state_dict().items()},
                                         stiefel_metric="canonical")
        t_land += slices_e[run.label].seconds + slices_m[run.label].seconds
    log(f"landscapes: {2 * len(runs)} slices of {points}x{points} in {t_land:.1f}s")
    figs = {
        "slices_euclidean": plot_slices(slices_e, out / "landscape_euclidean.png",
                                        title="Euclidean slices (Li et al. filter-normalised)"),
        "slices_manifold": plot_slices(slices_m, out / "landscape_manifold.png",
                                       title="Manifold-aware slices (tangent directions, Exp)"),
        "curves": plot_curves_1d(curves, out / "interpolation_1d.png",
                                 title="initialization (t=0) to trained (t=1)"),
    }
    layers = list(runs[0].grad_norms)
    figs["angular"] = plot_bars(
        {r.label: [float(np.mean(r.angular_steps.get(k, [np.nan]))) for k in layers]
         for r in runs}, layers, out / "angular_step.png",
        ylabel="median |grad_i|/|w_i|", title="angular step per unit learning rate", log=True)
    figs["travel"] = plot_bars(
        {r.label: [r.path.get(k, np.nan) for k in layers] for r in runs}, layers,
        out / "path_length.png", ylabel="geodesic path length", title="distance travelled")

    # ---- markdown
    md = ["# Normalization report", "",
          f"Model `{type(runs[0].model).__name__}`, {len(xtr)} training / {len(xte)} test "
          f"samples; {epochs} epochs of {runs[0].optimizer_name} (lr {lr}, momentum "
          f"{momentum}), seed {seed}; every geometry starts from the same initialization "
          "(projected onto its manifold) and sees the same batches.", "",
          "## Summary", "",
          _md_table(["geometry", "kernel search-space dim", "train loss", "test acc",
                     "sharpness (Riemannian)", "sharpness (Euclidean)", "path length",
                     "distance from init", "path / distance"],
                    [[r.label, sum(g.dim for g in r.geometry_rows), r.train_loss, r.test_acc,
                      r.sharp_riem, r.sharp_eucl, sum(r.path.values()),
                      math.sqrt(sum(v * v for v in r.endpoint.values())),
                      sum(r.path.values()) / max(1e-12, math.sqrt(
                          sum(v * v for v in r.endpoint.values())))] for r in runs]), "",
          "Sharpness is the top eigenvalue of the Hessian of the training loss on a fixed "
          f"subset of {sharpness_subset} samples: Riemannian (projected Hessian plus the "
          "Weingarten term, on the product of the kernels' tangent spaces) and Euclidean "
          "(all coordinates).  Path length sums the geodesic lengths of every optimizer step "
          "(Stiefel blocks: chordal step length); distance from init is geodesic (Stiefel: "
          "embedded-metric shooting logarithm, or the canonical-metric "
          "distance, with a warning, where shooting does not converge).", "",
          "## Search space per layer", ""]
    for r in runs:
        md += [f"### {r.label} (`{r.spec}`)", "", rows_to_markdown(r.geometry_rows), ""]
    md += ["K bounds are analytic (per component; 0 for flat factors), K sampled is the range "
           "over random tangent planes of single components at the trained kernels, "
           "injectivity radius and diameter are per component.", "",
           "## Step sizes and gradients", "",
           "Angular step per unit learning rate: median over filters of "
           "|grad_i| / |w_i|, averaged over training steps (the angle a filter turns per step "
           "is about lr times this).", "", f"![angular step]({figs['angular'].name})", ""]
    rows = []
    for r in runs:
        for k in layers:
            gn = np.asarray(r.grad_norms.get(k, [np.nan]))
            ang = np.asarray(r.angular_steps.get(k, [np.nan]))
            rows.append([r.label, k, float(ang.mean()), float(gn.mean()), float(gn.std()),
                         float(gn.max()), float(gn[-1]), r.path.get(k, math.nan),
                         r.endpoint.get(k, math.nan)])
    md += [_md_table(["geometry", "layer", "angular step / lr", "|grad| mean", "|grad| std",
                      "|grad| max", "|grad| last", "path length", "distance from init"], rows),
           "", f"![distance travelled]({figs['travel'].name})", "",
           "## Landscapes", "",
           f"2-D slices of the training loss (log10) over a {points}x{points} grid on "
           f"[-{span}, {span}]^2 around each trained solution (red cross), one colour scale "
           "for all panels.  Euclidean: straight lines along Li et al. filter-normalised "
           "Gaussian directions (biases and batch-norm parameters fixed); manifold-aware: "
           "tangent directions normalised per component, moved by the exponential map.", "",
           f"![Euclidean slices]({figs['slices_euclidean'].name})", "",
           f"![Manifold slices]({figs['slices_manifold'].name})", "",
           _md_table(["geometry", "centre loss", "max loss (Euclidean slice)",
                      "max loss (manifold slice)", "seconds (both)"],
                     [[r.label, slices_e[r.label].center[0],
                       float(np.nanmax(slices_e[r.label].loss)),
                       float(np.nanmax(slices_m[r.label].loss)),
                       slices_e[r.label].seconds + slices_m[r.label].seconds] for r in runs]),
           "", "1-D: loss and accuracy from the initialization (t=0) to the trained weights "
           "(t=1) along the geodesic of the kernels' manifolds (solid; Stiefel blocks along "
           "the canonical-metric geodesic) and along the straight line (dashed).", "",
           f"![1-D interpolation]({figs['curves'].name})", "",
           "## Reading the report", "",
           "A smaller constrained dimension and a bounded diameter mean a smaller search "
           "space; positive curvature makes nearby geodesics converge (a step taken along a "
           "sphere turns the filter by lr |grad_i| / r radians, so the radius sets the "
           "effective learning rate); the ratio path / distance shows how much SGD wandered; "
           "flatter slices and smaller sharpness mean a wider basin in the geometry the "
           "optimizer actually moves in.", ""]
    path = out / "report.md"
    path.write_text("\n".join(md))
    summary = {r.label: {"spec": r.spec, "train_loss": r.train_loss, "test_acc": r.test_acc,
                         "sharpness_riemannian": r.sharp_riem,
                         "sharpness_euclidean": r.sharp_eucl, "path": r.path,
                         "endpoint": r.endpoint, "train_seconds": r.seconds} for r in runs}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    log(f"wrote {path}")
    return path


# ----------------------------------------------------------------------------- command line
def add_analyze_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``kernelgeo analyze`` to ``parser`` (returns it)."""
    parser.add_argument("--out", default="analysis_out", help="output directory")
    parser.add_argument("--geometries", nargs="+", default=None, metavar="SPEC",
                        help="geometry specs (default: euclidean sphere centered-sphere "
                             "oblique stiefel po:sphere+stiefel)")
    parser.add_argument("--model", default="digits-cnn",
                        help="'digits-cnn' (default) or a kernelgeo.models name")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--points", type=int, default=21, help="landscape grid size")
    parser.add_argument("--span", type=float, default=1.0, help="landscape half-width")
    parser.add_argument("--subset", type=int, default=512,
                        help="training samples used for the landscapes")
    parser.add_argument("--no-sharpness", action="store_true",
                        help="skip the Hessian eigenvalues")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is fastest for small models on a busy CPU)")
    return parser


def _model_fn(name: str) -> Callable[[], nn.Module]:
    if name == "digits-cnn":
        return DigitsCNN
    try:
        from ..models import get_model
    except ImportError as err:
        raise SystemExit(f"model {name!r}: kernelgeo.models is not available ({err})") from None
    return lambda: get_model(name, num_classes=10, in_channels=1)


def main_analyze(args: argparse.Namespace) -> int:
    """Run the report from parsed :func:`add_analyze_arguments` options; returns 0."""
    geoms = None
    if args.geometries:
        inv = {v: k for k, v in DEFAULT_GEOMETRIES.items()}
        geoms = {inv.get(g, g): g for g in args.geometries}
    normalization_report(args.out, geometries=geoms, model_fn=_model_fn(args.model),
                         epochs=args.epochs, lr=args.lr, momentum=args.momentum,
                         seed=args.seed, points=args.points, span=args.span,
                         subset=args.subset, with_sharpness=not args.no_sharpness,
                         threads=args.threads)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m kernelgeo.analysis.report``."""
    p = add_analyze_arguments(argparse.ArgumentParser(
        prog="kernelgeo analyze", description=__doc__.split("\n\n")[0]))
    return main_analyze(p.parse_args(argv))


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())


_ = ManifoldParameter  # re-exported type for users inspecting GeometryRun.model
