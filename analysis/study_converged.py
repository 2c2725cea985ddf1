"""Converged comparison on Fashion-MNIST: a small ResNet with every kernel geometry, several
seeds, trained until the training loss has plateaued, compared per seed with the Euclidean
baseline.

Geometries: Euclidean with batch norm (the baseline, ``resnet-digits``: stem + two basic blocks,
16/32 channels), Euclidean without batch norm (``resnet-digits-nobn``), sphere, centred sphere,
oblique, Stiefel and the product ``po:sphere+stiefel`` (output channels split between a sphere
and a Stiefel factor), all with batch norm.  Every run uses the same data, schedule,
learning rate (except a variant that names its own), momentum and batch size; seed ``s`` of
every geometry shares the data order and the initial Euclidean weights' random stream, so
the per-seed differences to the baseline are paired.

Plateau criterion: a run has plateaued when its epoch-mean training loss changed by less
than ``--plateau`` (relative, default 2 %) over its last 3 epochs,
``|L_E - L_{E-3}| / L_{E-3} < 0.02``.  With ``--schedule plateau`` the criterion is the
stopping rule (:class:`kernelgeo.training.plateau.PlateauLR`): the learning rate is divided by
10 at each plateau, and a run ends at the plateau after the second division (``--epochs`` is
then the most a run may take).  With the cosine schedule (a fixed budget of ``--epochs``) the
criterion is checked after the run; a run that fails it is flagged in the table.

Paired comparison: for each geometry and seed, ``d_s = error_s(geometry) - error_s(euclidean)``;
reported as mean ± s.d. over seeds and a two-sided 95 % Student-t interval (n - 1 degrees of
freedom).  With 3 seeds the interval is wide (t = 4.30); it says whether a difference is
resolved at this budget, not whether one exists.

Full study (GPU or many CPU cores; 60k/10k images at 28x28)::

    python analysis/study_converged.py --schedule plateau --epochs 100 --seeds 0 1 2 \
        --out analysis/results/converged_fmnist --resume

What fits a shared 2-core CPU in about an hour and a half (all images, downsampled to
14x14, each run trained to its plateau; two runs at once), and oblique kernels at their own
rate::

    python analysis/study_converged.py --image-size 14 --schedule plateau --epochs 60 \
        --concurrent 2 --out analysis/results/converged_fmnist_14px_plateau --resume
    python analysis/study_converged.py --image-size 14 --schedule plateau --epochs 60 \
        --concurrent 2 --variants euclidean "oblique (lr 1)" \
        --out analysis/results/converged_fmnist_14px_plateau --resume

Fixed cosine budgets of 20 epochs (three seeds) and 40 epochs (seed 0)::

    python analysis/study_converged.py --image-size 14 --epochs 20 --concurrent 2 \
        --out analysis/results/converged_fmnist_14px --resume
    python analysis/study_converged.py --image-size 14 --epochs 40 --seeds 0 --concurrent 2 \
        --out analysis/results/converged_fmnist_14px_40ep --resume

Writes ``runs.csv``, ``paired.csv``, ``test_error.png``, ``train_loss.png``, ``paired.png``
(and ``final_error.png`` with the plateau schedule) and ``report.md`` to ``--out``.
"""

from __future__ import annotations

import csv
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from studies import (  # noqa: E402
    Run,
    add_concurrency,
    base_parser,
    command_line,
    date_line,
    dispatch,
    machine_line,
    mean_std,
    run_name,
    t_interval,
    write_csv,
)

from kernelgeo.train import TrainConfig  # noqa: E402
from kernelgeo.training.plateau import relative_change  # noqa: E402

STUDY = "converged"
BASELINE = "euclidean"
NOBN = "euclidean (no batch norm)"
#: label -> (geometry, model)
VARIANTS = {
    BASELINE: ("euclidean", "resnet-digits"),
    NOBN: ("euclidean", "resnet-digits-nobn"),
    "sphere": ("sphere", "resnet-digits"),
    "centered-sphere": ("centered-sphere", "resnet-digits"),
    "oblique": ("oblique", "resnet-digits"),
    "stiefel": ("stiefel", "resnet-digits"),
    "po:sphere+stiefel": ("po:sphere+stiefel", "resnet-digits"),
}
#: variants run on request (``--variants``): label -> (geometry, model, lr, run-name stem).
#: Oblique kernels at lr 1: the top of their good-rate basin in the Fashion-MNIST sweep
#: (0.1 and 1 gave the same error there), to test whether their gap at the shared lr 0.1 is a
#: learning-rate effect.
EXTRA_VARIANTS = {
    "oblique (lr 1)": ("oblique", "resnet-digits", 1.0, "oblique-lr1"),
}


def build_runs(args) -> list[Run]:
    runs = []
    # seed by seed, so that an interrupted study has whole seeds of every geometry
    for s in args.seeds:
        for label in args.variants:
            if label in VARIANTS:
                geom, model = VARIANTS[label]
                lr, stem = args.lr, label.replace(" (no batch norm)", "-nobn")
            else:
                geom, model, lr, stem = EXTRA_VARIANTS[label]
            cfg = TrainConfig(dataset=args.dataset, train_subset=args.train_subset,
                              test_subset=args.test_subset, image_size=args.image_size,
                              model=model, geometry=geom, epochs=args.epochs, lr=lr,
                              seed=s, threads=args.threads, schedule=args.schedule,
                              batch_size=args.batch_size)
            if args.schedule == "plateau":  # only there is the criterion a setting of the run
                cfg.plateau_tol = args.plateau
            runs.append(Run(run_name(stem, f"s{s}"), cfg,
                            {"variant": label, "batch_norm": model != "resnet-digits-nobn"}))
    return runs


def plateau(history: list[dict], window: int = 3) -> float:
    """Relative change of the training loss over the last ``window`` epochs (nan if fewer):
    the criterion of the plateau schedule, :func:`kernelgeo.training.plateau.relative_change`."""
    return relative_change([h["train_loss"] for h in history], window)


def paired(rows, variants, key="final_test_error") -> list[dict]:
    base = {r["seed"]: r[key] for r in rows
            if r["variant"] == BASELINE and r["status"] == "completed"}
    out = []
    for v in variants:
        if v == BASELINE:
            continue
        d = [r[key] - base[r["seed"]] for r in rows if r["variant"] == v
             and r["status"] == "completed" and r["seed"] in base]
        if not d:
            continue
        m, lo, hi = t_interval(d)
        out.append({"variant": v, "n": len(d), "mean_diff": m,
                    "sd_diff": float(np.std(d, ddof=1)) if len(d) > 1 else 0.0,
                    "t95_lo": lo, "t95_hi": hi, "diffs": " ".join(f"{x:.4f}" for x in d)})
    return out


def _pm(ms: tuple, digits: int) -> str:
    """``mean ± s.d.``, or the value alone for one run (no spread to state)."""
    m, sd, n = ms
    return f"{m:.{digits}f} ± {sd:.{digits}f}" if n > 1 else f"{m:.{digits}f}"


def verdict(pairs) -> str:
    """One sentence per outcome: which geometries are resolved better or worse than the
    Euclidean baseline (95 % t-interval excluding 0) and which are not resolved."""
    better = [p["variant"] for p in pairs if p["t95_hi"] < 0]
    worse = [p["variant"] for p in pairs if p["t95_lo"] > 0]
    open_ = [p["variant"] for p in pairs if p["variant"] not in better + worse]
    out = ["**Verdict at this budget** (final test error against Euclidean kernels with batch "
           "norm, paired by seed, 95 % interval):"]
    out.append("lower error, resolved: " + (", ".join(better) if better else "none") + ";")
    out.append("higher error, resolved: " + (", ".join(worse) if worse else "none") + ";")
    out.append("not resolved: " + (", ".join(open_) if open_ else "none") + ".")
    if not better:
        out.append("No geometry beats the baseline measurably here.")
    return " ".join(out)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_paired(pairs, path: Path, title: str) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 0.5 * len(pairs) + 1.8), layout="constrained")
    for i, p in enumerate(pairs):
        d = np.array([float(x) for x in p["diffs"].split()]) * 100
        ax.plot(d, [i] * len(d), "o", color="0.4", ms=4)
        if math.isfinite(p["t95_lo"]):
            ax.plot([p["t95_lo"] * 100, p["t95_hi"] * 100], [i, i], "-", color="C0", lw=3,
                    alpha=0.5)
        ax.plot([p["mean_diff"] * 100], [i], "D", color="C3", ms=6)
    ax.axvline(0, color="k", lw=0.8)
    ax.set_yticks(range(len(pairs)), [f"{p['variant']} (n = {p['n']})" for p in pairs],
                  fontsize=8)
    ax.set_xlabel("test error minus Euclidean (percentage points, same seed)")
    ax.set_title(f"{title}\ndots: per-seed differences; diamond: mean; bar: 95 % t-interval",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_runs(curves: dict, divisions: dict, path: Path, *, ylabel: str, title: str,
              scale: float = 1.0, log: bool = False) -> None:
    """Runs of different lengths (plateau schedule): one line per seed, coloured by geometry,
    a dot where the run stopped and a tick where its rate was divided.  (A mean over seeds
    would have to be cut at the shortest run and would hide the ends being compared.)"""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.2, 4.6), layout="constrained")
    for k, (label, rs) in enumerate(curves.items()):
        col = f"C{k % 10}"
        for j, (ys, ds) in enumerate(zip(rs, divisions[label])):
            y = np.asarray(ys, dtype=float) * scale
            x = np.arange(1, len(y) + 1)
            ax.plot(x, y, color=col, lw=0.9, alpha=0.8,
                    label=f"{label} (n = {len(rs)})" if j == 0 else None)
            ax.plot(x[-1:], y[-1:], "o", color=col, ms=4)
            for d in ds:
                ax.plot([d], [y[d - 1]], "|", color=col, ms=9, mew=1.5)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel + (" (log scale)" if log else ""))
    ax.set_title(f"{title}\none line per seed; |: rate divided by 10; dot: run stopped",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_final(by: dict, path: Path, title: str) -> None:
    """Final test error per geometry: every seed, and mean ± s.d. (n stated)."""
    plt = _plt()
    labels = [v for v, rs in by.items() if any(r["status"] == "completed" for r in rs)]
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(labels) + 1.8), layout="constrained")
    for i, v in enumerate(labels):
        e = np.array([r["final_test_error"] * 100 for r in by[v] if r["status"] == "completed"])
        ax.plot(e, np.full(len(e), i), "o", color="C0", ms=5, alpha=0.7)
        sd = float(np.std(e, ddof=1)) if len(e) > 1 else 0.0
        ax.errorbar([e.mean()], [i], xerr=[sd], fmt="D", color="C3", ms=6, capsize=4)
    ax.set_yticks(range(len(labels)), [f"{v} (n = {sum(r['status'] == 'completed' for r in by[v])})"
                                      for v in labels], fontsize=8)
    ax.set_xlabel("final test error (%)")
    ax.set_title(f"{title}\ndots: seeds; diamond and bar: mean ± s.d.", fontsize=9)
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _epochs_cell(rs) -> str:
    e = [int(r["epochs_done"]) for r in rs]
    return f"{np.mean(e):.1f} ({min(e)}–{max(e)})" if len(e) > 1 else f"{e[0]}"


def report(args, rows, folder: Path) -> str:
    from kernelgeo.analysis.plotting import plot_error_curves, plot_seed_curves

    by_rule = args.schedule == "plateau"
    for r in rows:
        r["train_loss_rel_change_3"] = plateau(r["_summary"].get("history", []))
        sched = r["_summary"].get("plateau") or {}
        if by_rule:
            # the schedule's own decision: the criterion met with every epoch of the window
            # at the final rate
            r["plateaued"] = bool(sched.get("converged"))
            r["rate_divided_after"] = " ".join(str(e) for e in sched.get("decay_epochs", []))
        else:
            r["plateaued"] = r["train_loss_rel_change_3"] < args.plateau
    write_csv(rows, folder / "runs.csv")
    reduced = bool(args.train_subset or args.test_subset)
    size = (f"{args.train_subset or 'all 60,000'} training / {args.test_subset or 'all 10,000'}"
            " test images"
            + (f", downsampled from 28x28 to {args.image_size}x{args.image_size} (antialiased)"
               if args.image_size else ", 28x28"))
    name = "Fashion-MNIST" if args.dataset == "fashion-mnist" else args.dataset
    title = (f"{name}{' (reduced)' if reduced else ''}"
             + (f" {args.image_size}px" if args.image_size else "")
             + (", resnet-digits, trained to plateau" if by_rule
                else f", resnet-digits, {args.epochs} ep."))
    by = {v: [r for r in rows if r["variant"] == v] for v in args.variants}
    runs_err = {v: [[h["test_error"] for h in r["_summary"]["history"]] for r in rs
                    if r["status"] == "completed"] for v, rs in by.items()}
    runs_err = {k: v for k, v in runs_err.items() if v}
    runs_loss = {v: [[h["train_loss"] for h in r["_summary"]["history"]] for r in rs
                     if r["status"] == "completed"] for v, rs in by.items()}
    runs_loss = {k: v for k, v in runs_loss.items() if v}
    if runs_err and by_rule:
        divs = {v: [[int(e) for e in str(r["rate_divided_after"]).split()] for r in rs
                    if r["status"] == "completed"] for v, rs in by.items()}
        plot_runs(runs_err, divs, folder / "test_error.png", ylabel="test error (%)",
                  title=title, scale=100)
        plot_runs(runs_loss, divs, folder / "train_loss.png", ylabel="training loss",
                  title=title, log=True)
        plot_final(by, folder / "final_error.png", title)
    elif runs_err:
        plot_error_curves(runs_err, folder / "test_error.png", title=title, band="std")
        plot_seed_curves(runs_loss, folder / "train_loss.png", ylabel="training loss",
                         title=title, band="std", yscale="log")
    pairs = paired(rows, args.variants)
    if pairs:
        with open(folder / "paired.csv", "w", newline="") as fh:
            w = csv.DictWriter(fh, list(pairs[0]))
            w.writeheader()
            w.writerows(pairs)
        plot_paired(pairs, folder / "paired.png", title)
    minutes = sum(float(r["time_per_epoch"]) * int(r["epochs_done"]) for r in rows
                  if r["status"] == "completed") / 60
    lines = [
        f"# Converged comparison: {name}{' — REDUCED' if reduced else ''}"
        + (f", {args.image_size}x{args.image_size} images" if args.image_size else ""), "",
        f"- command: `{command_line()}`",
        f"- machine: {machine_line(rows)}",
        f"- date: {date_line(rows)}",
        f"- data: {size}",
        f"- budget: {len(rows)} runs; "
        + (f"plateau schedule (lr {args.lr:g}, divided by 10 at each plateau of the "
           "training loss, twice; a run ends at the plateau after the second division; at "
           f"most {args.epochs} epochs)" if by_rule else
           f"{args.epochs} epochs, cosine schedule, lr {args.lr:g}")
        + ("; a variant that names a learning rate starts at that rate"
           if any(v in EXTRA_VARIANTS for v in args.variants) else "")
        + f", momentum 0.9, batch {args.batch_size}, weight decay 5e-4 on Euclidean "
        f"parameters, default step rule; seeds {args.seeds}; training time summed over runs "
        f"{minutes:.1f} min"
        + (f" ({args.concurrent} runs at once)" if args.concurrent > 1 else ""),
        f"- plateau criterion: relative change of the epoch-mean training loss over the last "
        f"3 epochs < {args.plateau:.0%}, |L_E - L_(E-3)| / L_(E-3)"
        + (" (with all 4 epochs at one rate); it is the stopping rule of every run"
           if by_rule else "; checked after the fixed budget"),
        "- s/epoch: wall time on a shared machine (other runs and jobs at the same time), "
        "not a speed comparison of the geometries", "",
    ]
    if reduced:
        lines += ["**Reduced budget**: a subset of the data (and smaller images) so that the "
                  "study fits a shared 2-core CPU; the numbers are not those of the full "
                  "60k/10k Fashion-MNIST benchmark.", ""]
    lines += ["## Per geometry: mean ± s.d. over seeds (n)", "",
              "| geometry | final test error (%) | best test error (%) | final train loss | "
              "loss change, last 3 epochs | plateaued | diverged | "
              + ("epochs, mean (range) | " if by_rule else "")
              + "s/epoch | max constraint error |",
              "|---|---|---|---|---|---|---|---|---|" + ("---|" if by_rule else "")]
    for v, rs in by.items():
        ok = [r for r in rs if r["status"] == "completed"]
        if not rs:
            continue
        fe = mean_std([r["final_test_error"] * 100 for r in ok])
        be = mean_std([r["best_test_error"] * 100 for r in ok])
        tl = mean_std([r["final_train_loss"] for r in ok])
        pc = max((r["train_loss_rel_change_3"] for r in ok), default=math.nan)
        tp = mean_std([r["time_per_epoch"] for r in ok])
        ce = max((r["max_constraint_error"] for r in ok), default=math.nan)
        lines.append(f"| {v} | {_pm(fe, 2)} ({fe[2]}) | {_pm(be, 2)}"
                     f" | {_pm(tl, 4)} | ≤ {pc:.1%} | "
                     f"{sum(bool(r['plateaued']) for r in ok)}/{len(rs)} | "
                     f"{sum(r['status'] == 'diverged' for r in rs)}/{len(rs)} | "
                     + (f"{_epochs_cell(ok)} | " if by_rule and ok else "— | " if by_rule else "")
                     + f"{tp[0]:.2f} | {ce:.1e} |")
    if pairs:
        lines += ["", "## Paired against Euclidean (with batch norm), same seed: final test "
                  "error difference (percentage points)", "",
                  "| geometry | n | mean | s.d. | 95 % t-interval | per-seed |",
                  "|---|---|---|---|---|---|"]
        for p in pairs:
            ci = (f"[{p['t95_lo'] * 100:+.2f}, {p['t95_hi'] * 100:+.2f}]"
                  if math.isfinite(p["t95_lo"]) else "—")
            lines.append(f"| {p['variant']} | {p['n']} | {p['mean_diff'] * 100:+.2f} | "
                         f"{p['sd_diff'] * 100:.2f} | {ci} | "
                         + ", ".join(f"{float(x) * 100:+.2f}" for x in p["diffs"].split())
                         + " |")
        lines += ["", "An interval containing 0 means the difference is not resolved with "
                  "these seeds at this budget.", "", verdict(pairs), "",
                  "![test error](test_error.png)", "", "![training loss](train_loss.png)", "",
                  "![paired differences](paired.png)"]
        if by_rule:
            lines += ["", "![final test error](final_error.png)"]
    if by_rule:
        lines += ["", "## Runs", "",
                  "| run | epochs | rate divided after epoch | final train loss | "
                  "final test error (%) | plateaued |", "|---|---|---|---|---|---|"]
        for r in rows:
            if r["status"] != "completed":
                lines.append(f"| {r['run']} | {r['epochs_done']} | — | — | — | "
                             f"{r['status']} |")
                continue
            lines.append(f"| {r['run']} | {r['epochs_done']} | "
                         f"{r['rate_divided_after'] or '—'} | {r['final_train_loss']:.4f} | "
                         f"{r['final_test_error'] * 100:.2f} | "
                         f"{'yes' if r['plateaued'] else 'no (budget reached)'} |")
    lines += ["", "Not measured here: other learning rates per geometry (one shared lr; see the "
              "learning-rate sweep for the sensitivity), data augmentation, larger models"
              + ("." if by_rule else ", longer schedules.")
              + (" The full 60k/10k images." if reduced else "")
              + (" The 28x28 images." if args.image_size else ""), ""]
    text = "\n".join(lines)
    (folder / "report.md").write_text(text)
    return text


def main(argv=None) -> int:
    p = base_parser(__doc__, "analysis/results/converged_fmnist")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS),
                   choices=list(VARIANTS) + list(EXTRA_VARIANTS), metavar="GEOMETRY",
                   help=f"default: {', '.join(VARIANTS)}; also: {', '.join(EXTRA_VARIANTS)} "
                        "(its own learning rate)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30,
                   help="epochs of the cosine schedule; the most a run may take with "
                        "--schedule plateau (default: %(default)s)")
    p.add_argument("--schedule", choices=("cosine", "plateau"), default="cosine",
                   help="cosine: a fixed budget of --epochs; plateau: the rate is divided by "
                        "10 at each plateau of the training loss (the --plateau criterion) "
                        "and a run ends at its third plateau (default: %(default)s)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--plateau", type=float, default=0.02,
                   help="plateau criterion: relative change of the training loss over 3 "
                        "epochs (default: %(default)s)")
    add_concurrency(p, "runs trained at once, one worker process each (default: 1)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    if BASELINE not in args.variants:
        p.error(f"--variants must include {BASELINE!r} (the paired baseline)")
    folder = Path(args.out)
    runs = build_runs(args)
    rows = dispatch(STUDY, runs, folder, args, argv, __file__, p)
    if rows is None:  # a worker process
        return 0
    if not rows:
        print("no finished runs")
        return 1
    print(report(args, rows, folder))
    return 0


if __name__ == "__main__":
    sys.exit(main())
