"""Depth study: plain CNNs without batch norm (``plain-<D>``: D 3x3 conv + ReLU layers, 16
channels, no residual connections) of increasing depth, Euclidean kernels against kernels on
the sphere, the oblique and the Stiefel manifold.

Measured per run: trainability (final training loss and error, test error) and, on the initial
model and after every epoch, the norm of the gradient of the training loss with respect to
each convolution kernel, on one fixed batch of ``--grad-batch`` training images (the first ones
of the unshuffled training set, normalised as in training).  For a kernel on a manifold the
norm is that of the Riemannian gradient (the Euclidean gradient projected onto the tangent
space, ``manifold.egrad2rgrad``), the direction the optimizer actually follows; for a
Euclidean kernel it is the plain gradient.  Both are recorded (``rgrad`` and ``egrad``).

Digits (full split)::

    python analysis/study_depth.py --out analysis/results/depth_digits --resume

Fashion-MNIST subset (3,000 training / 1,000 test images at 14x14)::

    python analysis/study_depth.py --dataset fashion-mnist --train-subset 3000 \
        --test-subset 1000 --image-size 14 --lrs 0.1 --seeds 0 1 \
        --out analysis/results/depth_fmnist_reduced --resume

Writes ``runs.csv``, ``grad_norms.csv``, ``grad_norm_vs_layer.png``, ``train_loss.png`` and
``report.md`` to ``--out``.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from studies import (  # noqa: E402
    Run,
    base_parser,
    collect,
    command_line,
    date_line,
    extra_file,
    machine_line,
    mean_std,
    run_grid,
    run_name,
    write_csv,
)

from kernelgeo._compat import ManifoldParameter  # noqa: E402
from kernelgeo.data import make_loader  # noqa: E402
from kernelgeo.train import TrainConfig  # noqa: E402

STUDY = "depth"
GEOMETRIES = ["euclidean", "sphere", "oblique", "stiefel"]


def conv_grad_norms(model: torch.nn.Module, data, n: int) -> dict[str, list[float]]:
    """Per-conv-layer gradient norms (module order) of the loss on the first ``n`` training
    images: ``{"egrad": [...], "rgrad": [...], "loss": float}``."""
    xb, yb = next(iter(make_loader(data, "train", n, shuffle=False)))
    model.train()
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(xb), yb)
    loss.backward()
    eg, rg = [], []
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                w = m.weight
                g = w.grad
                eg.append(float(g.norm()))
                r = w.manifold.egrad2rgrad(w, g) if isinstance(w, ManifoldParameter) else g
                rg.append(float(r.norm()))
    model.zero_grad(set_to_none=True)
    return {"egrad": eg, "rgrad": rg, "loss": float(loss.detach())}


def build_runs(args) -> list[Run]:
    runs = []
    for d in args.depths:
        for g in args.geometries:
            for lr in args.lrs:
                for s in args.seeds:
                    cfg = TrainConfig(dataset=args.dataset, train_subset=args.train_subset,
                                      test_subset=args.test_subset,
                                      image_size=args.image_size, model=f"plain-{d}",
                                      geometry=g, epochs=args.epochs, lr=lr, seed=s,
                                      threads=args.threads, schedule="cosine")
                    runs.append(Run(run_name(f"d{d}", g, f"lr{lr:g}", f"s{s}"), cfg,
                                    {"depth": d}))
    return runs


def grad_rows(runs, folder: Path) -> list[dict]:
    import json

    out = []
    for run in runs:
        p = extra_file(folder / "runs" / run.name)
        if not p.exists():
            continue
        extra = json.loads(p.read_text())
        for ep, v in extra.items():
            for i, (e, r) in enumerate(zip(v["egrad"], v["rgrad"])):
                out.append({"run": run.name, "depth": run.tags["depth"],
                            "geometry": str(run.cfg.geometry), "lr": run.cfg.lr,
                            "seed": run.cfg.seed, "epoch": int(ep), "layer": i,
                            "egrad_norm": e, "rgrad_norm": r, "batch_loss": v["loss"]})
    return out


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_grads(grows, depths, geometries, lr, epochs, path: Path) -> None:
    plt = _plt()
    last = max((r["epoch"] for r in grows), default=0)
    moments = [(0, "initialisation"), (last, f"after epoch {last}")]
    fig, axes = plt.subplots(2, len(depths), figsize=(4.2 * len(depths), 6.4),
                             layout="constrained", squeeze=False)
    for row, (ep, what) in enumerate(moments):
        for col, d in enumerate(depths):
            ax = axes[row][col]
            for k, g in enumerate(geometries):
                sel = [r for r in grows if r["depth"] == d and r["geometry"] == g
                       and r["lr"] == lr and r["epoch"] == ep]
                seeds = sorted({r["seed"] for r in sel})
                if not seeds:
                    continue
                a = np.array([[r["rgrad_norm"] for r in sorted(sel, key=lambda r: r["layer"])
                               if r["seed"] == s] for s in seeds])
                x = np.arange(1, a.shape[1] + 1)
                ax.plot(x, a.mean(0), "-", color=f"C{k}", lw=1.4,
                        label=f"{g} (n = {len(seeds)})")
                if len(seeds) > 1:
                    ax.fill_between(x, a.min(0), a.max(0), color=f"C{k}", alpha=0.18, lw=0)
            ax.set_yscale("log")
            ax.set_title(f"plain-{d}, {what}", fontsize=9)
            ax.set_xlabel("conv layer (1 = input side)")
            if col == 0:
                ax.set_ylabel("kernel gradient norm (Riemannian), log")
            ax.grid(alpha=0.3, which="both")
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(f"Per-layer gradient norm, lr {lr:g}; line: mean over seeds, band: min–max",
                 fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_loss(rows, depths, geometries, lr, path: Path) -> None:
    from kernelgeo.analysis.plotting import draw_seed_curves

    plt = _plt()
    fig, axes = plt.subplots(1, len(depths), figsize=(4.2 * len(depths), 3.6),
                             layout="constrained", squeeze=False)
    for col, d in enumerate(depths):
        runs = {}
        for g in geometries:
            h = [[x["train_loss"] for x in r["_summary"]["history"]] for r in rows
                 if r["depth"] == d and r["geometry"] == g and r["lr"] == lr
                 and r["_summary"].get("history")]
            if h:
                runs[g] = h
        if runs:
            draw_seed_curves(axes[0][col], runs, ylabel="training loss", yscale="log")
        axes[0][col].set_title(f"plain-{d}, lr {lr:g}", fontsize=9)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args, runs, rows, folder: Path) -> str:
    grows = grad_rows(runs, folder)
    if grows:
        with open(folder / "grad_norms.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, list(grows[0]))
            w.writeheader()
            w.writerows(grows)
        for lr in args.lrs:
            suffix = "" if lr == args.lrs[0] else f"_lr{lr:g}"
            plot_grads(grows, args.depths, args.geometries, lr, args.epochs,
                       folder / f"grad_norm_vs_layer{suffix}.png")
            plot_loss(rows, args.depths, args.geometries, lr, folder / f"train_loss{suffix}.png")
    minutes = sum(float(r["time_per_epoch"]) * int(r["epochs_done"]) for r in rows
                  if r["status"] == "completed") / 60
    lines = [
        f"# Depth study: plain CNNs without batch norm on {args.dataset}"
        + (f" (train subset {args.train_subset}, test subset {args.test_subset})"
           if args.train_subset or args.test_subset else "")
        + (f", {args.image_size}x{args.image_size}" if args.image_size else ""), "",
        f"- command: `{command_line()}`",
        f"- machine: {machine_line(rows)}",
        f"- date: {date_line(rows)}",
        f"- budget: {len(rows)} runs of {args.epochs} epochs (cosine, momentum 0.9, batch 128, "
        f"default step rule); depths {args.depths}; learning rates {args.lrs}; seeds "
        f"{args.seeds}; training time summed over runs {minutes:.1f} min",
        f"- gradient norms: one fixed batch of {args.grad_batch} training images, at "
        "initialisation and after every epoch (`grad_norms.csv`)", "",
        "## Trainability: mean ± s.d. over seeds (n)", "",
        "| depth | geometry | lr | final train loss | final train error (%) | "
        "final test error (%) | diverged |", "|---|---|---|---|---|---|---|"]
    for d in args.depths:
        for g in args.geometries:
            for lr in args.lrs:
                sel = [r for r in rows if r["depth"] == d and r["geometry"] == g
                       and r["lr"] == lr]
                if not sel:
                    continue
                ok = [r for r in sel if r["status"] == "completed"]
                tl = mean_std([r["final_train_loss"] for r in ok])
                te = mean_std([r["final_train_error"] * 100 for r in ok])
                ts = mean_std([r["final_test_error"] * 100 for r in ok])
                cells = (f"{tl[0]:.3f} ± {tl[1]:.3f} ({tl[2]}) | {te[0]:.2f} ± {te[1]:.2f} | "
                         f"{ts[0]:.2f} ± {ts[1]:.2f}") if ok else "— | — | —"
                lines.append(f"| {d} | {g} | {lr:g} | {cells} | {len(sel) - len(ok)}/{len(sel)}"
                             " |")
    if grows:
        lines += ["", "## Gradient norm of the first and last conv layer "
                  f"(lr {args.lrs[0]:g}, mean over seeds)", "",
                  "| depth | geometry | epoch | layer 1 | last layer | ratio first/last |",
                  "|---|---|---|---|---|---|"]
        last_ep = max(r["epoch"] for r in grows)
        for d in args.depths:
            for g in args.geometries:
                for ep in (0, last_ep):
                    sel = [r for r in grows if r["depth"] == d and r["geometry"] == g
                           and r["lr"] == args.lrs[0] and r["epoch"] == ep]
                    if not sel:
                        continue
                    first = np.mean([r["rgrad_norm"] for r in sel if r["layer"] == 0])
                    lastl = np.mean([r["rgrad_norm"] for r in sel if r["layer"] == d - 1])
                    with np.errstate(invalid="ignore"):  # inf / inf for an overflowed net
                        ratio = first / lastl if lastl > 0 else (
                            math.nan if first == 0 else math.inf)
                    lines.append(f"| {d} | {g} | {ep} | {first:.3g} | {lastl:.3g} | "
                                 f"{ratio:.3g} |")
        lines += ["", "![gradient norm against layer](grad_norm_vs_layer.png)", "",
                  "![training loss](train_loss.png)"]
    lines += ["", "Not measured here: depths beyond the grid, wider networks, other data sets, "
              "initialisations other than Kaiming fan-in (projected onto the manifold for "
              "constrained kernels), learning-rate tuning per geometry beyond the grid; the "
              "Riemannian and Euclidean gradient norms of different geometries are norms of "
              "different quantities (a unit-norm kernel against an unnormalised one) and are "
              "compared in their profile across layers, not in absolute size.", ""]
    text = "\n".join(lines)
    (folder / "report.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = base_parser(__doc__, "analysis/results/depth_digits")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None,
                   help="resize the images to this size (default: keep)")
    p.add_argument("--depths", nargs="+", type=int, default=[8, 20, 32])
    p.add_argument("--geometries", nargs="+", default=GEOMETRIES)
    p.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.1])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--grad-batch", type=int, default=256)
    args = p.parse_args(argv)
    folder = Path(args.out)
    runs = build_runs(args)

    def after_epoch(run, model, data, epoch):
        return conv_grad_norms(model, data, args.grad_batch)

    if args.report_only:
        rows = collect(STUDY, runs, folder)
        write_csv(rows, folder / "runs.csv")
    else:
        rows = run_grid(STUDY, runs, folder, resume=args.resume, after_epoch=after_epoch)
    if not rows:
        print("no finished runs")
        return 1
    print(report(args, runs, rows, folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
