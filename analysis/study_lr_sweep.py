"""Learning-rate sweep: final test error against the learning rate for each kernel geometry.

A grid of learning rates (log-spaced) x geometries x seeds, every other setting fixed (model,
cosine schedule, momentum 0.9, batch 128, the default step rule of ``ConvergentRSGD``).  For
each geometry it reports the *good-rate basin*: the learning rates whose mean final test error
(over seeds) is at most the geometry's own best mean error plus ``--margin`` (absolute, in
error-rate units), and its width in decades, ``log10(largest / smallest)`` of the contiguous run
of good grid points that contains the best one (0 when only the best rate qualifies; the
resolution is the grid spacing).  A diverged run (non-finite training loss) counts as chance
error, ``1 - 1/classes``, and is never good.

Digits (full 1437/360 split, seconds per run)::

    python analysis/study_lr_sweep.py --out analysis/results/lr_sweep_digits --resume

Fashion-MNIST subset::

    python analysis/study_lr_sweep.py --dataset fashion-mnist --train-subset 5000 \\
        --test-subset 2000 --epochs 10 --out analysis/results/lr_sweep_fmnist --resume

Writes ``runs.csv``, ``basins.csv``, ``error_vs_lr.png`` and ``report.md`` to ``--out``.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from studies import (  # noqa: E402
    Run,
    base_parser,
    collect,
    command_line,
    date_line,
    machine_line,
    run_grid,
    run_name,
    write_csv,
)

from kernelgeo.train import TrainConfig  # noqa: E402

STUDY = "lr_sweep"
GEOMETRIES = ["euclidean", "sphere", "oblique", "stiefel"]
LRS = [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0]


def build_runs(args) -> list[Run]:
    runs = []
    for g in args.geometries:
        for lr in args.lrs:
            for s in args.seeds:
                cfg = TrainConfig(dataset=args.dataset, train_subset=args.train_subset,
                                  test_subset=args.test_subset, image_size=args.image_size,
                                  model=args.model, geometry=g,
                                  epochs=args.epochs, lr=lr, seed=s, threads=args.threads,
                                  batch_size=args.batch_size, schedule="cosine")
                runs.append(Run(run_name(g, f"lr{lr:g}", f"s{s}"), cfg))
    return runs


def error_table(rows, chance: float) -> dict[str, dict[float, list[float]]]:
    """``{geometry: {lr: [final error per seed]}}``, diverged runs at chance error."""
    out: dict[str, dict[float, list[float]]] = {}
    for r in rows:
        e = r["final_test_error"] if r["status"] == "completed" else chance
        out.setdefault(r["geometry"], {}).setdefault(float(r["lr"]), []).append(float(e))
    return out


def basin(lrs: list[float], means: list[float], margin: float) -> dict:
    """The contiguous good-rate interval around the best mean error (see the module text)."""
    i = int(np.nanargmin(means))
    thr = means[i] + margin
    lo = hi = i
    while lo > 0 and means[lo - 1] <= thr:
        lo -= 1
    while hi < len(means) - 1 and means[hi + 1] <= thr:
        hi += 1
    return {"best_lr": lrs[i], "best_error": means[i], "threshold": thr,
            "lr_lo": lrs[lo], "lr_hi": lrs[hi], "decades": math.log10(lrs[hi] / lrs[lo]),
            "good_points": sum(m <= thr for m in means), "grid_points": len(means)}


def plot(table, path: Path, title: str, margin: float, chance: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    for k, (g, by_lr) in enumerate(table.items()):
        lrs = sorted(by_lr)
        a = [np.asarray(by_lr[lr]) * 100 for lr in lrs]
        mean = np.array([x.mean() for x in a])
        lo = np.array([x.min() for x in a])
        hi = np.array([x.max() for x in a])
        n = min(len(x) for x in a)
        col = f"C{k}"
        ax.plot(lrs, mean, "o-", color=col, ms=3, label=f"{g} (n = {n} seeds)")
        ax.fill_between(lrs, lo, hi, color=col, alpha=0.18, lw=0)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("final test error (%, log scale)")
    ax.axhline(chance * 100, color="0.5", ls=":", lw=1)
    ax.set_title(f"{title}\nline: mean over seeds, band: min–max; diverged = chance "
                 f"({chance:.0%})", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(args, rows, folder: Path, wall: float | None) -> str:
    chance = 1 - 1 / 10
    table = error_table(rows, chance)
    label = args.dataset + (f" (train subset {args.train_subset}, test subset "
                            f"{args.test_subset})" if args.train_subset else " (full split)")
    if args.image_size:
        label += f", {args.image_size}x{args.image_size}"
    basins = []
    for g, by_lr in table.items():
        lrs = sorted(by_lr)
        means = [float(np.mean(by_lr[lr])) for lr in lrs]
        b = basin(lrs, means, args.margin)
        basins.append({"geometry": g, **b})
    write_csv_rows(basins, folder / "basins.csv")
    plot(table, folder / "error_vs_lr.png",
         f"{label}, {rows[0]['model'] if rows else ''}, {args.epochs} epochs cosine",
         args.margin, chance)
    lines = [
        f"# Learning-rate sweep: {label}", "",
        f"- command: `{command_line()}`",
        f"- machine: {machine_line(rows)}",
        f"- date: {date_line(rows)}",
        f"- budget: {len(rows)} runs of {args.epochs} epochs; model `{rows[0]['model']}`; "
        f"batch {args.batch_size}; cosine schedule; momentum 0.9; weight decay 5e-4 on "
        "Euclidean parameters; default step rule"
        + f"; training time summed over runs {train_minutes(rows):.1f} min",
        f"- learning rates: {', '.join(f'{x:g}' for x in args.lrs)}; seeds "
        f"{', '.join(map(str, args.seeds))}",
        f"- good-rate basin: mean final test error <= the geometry's best mean + "
        f"{args.margin * 100:g} percentage points; width = log10(largest/smallest good lr) of "
        "the contiguous good interval around the best lr (grid resolution "
        f"{math.log10(args.lrs[1] / args.lrs[0]):.2f} decades); diverged runs count as chance "
        f"error ({chance:.0%})", "",
        "## Final test error (%) per learning rate: mean ± s.d. over seeds (n)", "",
        "| geometry | " + " | ".join(f"lr {x:g}" for x in sorted(args.lrs)) + " |",
        "|---|" + "---|" * len(args.lrs),
    ]
    for g, by_lr in table.items():
        cells = []
        for lr in sorted(args.lrs):
            v = np.asarray(by_lr.get(lr, []))
            n_div = sum(1 for r in rows if r["geometry"] == g and float(r["lr"]) == lr
                        and r["status"] == "diverged")
            if v.size == 0:
                cells.append("—")
                continue
            sd = v.std(ddof=1) * 100 if v.size > 1 else 0.0
            cells.append(f"{v.mean() * 100:.2f} ± {sd:.2f} ({v.size})"
                         + (f", {n_div} diverged" if n_div else ""))
        lines.append(f"| {g} | " + " | ".join(cells) + " |")
    lines += ["", "## Good-rate basin per geometry", "",
              "| geometry | best lr | best mean error (%) | good lrs | width (decades) | "
              "good grid points |", "|---|---|---|---|---|---|"]
    for b in basins:
        lines.append(f"| {b['geometry']} | {b['best_lr']:g} | {b['best_error'] * 100:.2f} | "
                     f"{b['lr_lo']:g} – {b['lr_hi']:g} | {b['decades']:.2f} | "
                     f"{b['good_points']}/{b['grid_points']} |")
    lines += ["", "![final test error against learning rate](error_vs_lr.png)", "",
              "Not measured here: other schedules, batch sizes, momentum values, step rules; "
              "learning rates outside the grid; a basin narrower than the grid spacing cannot "
              "be resolved.", ""]
    text = "\n".join(lines)
    (folder / "report.md").write_text(text)
    return text


def train_minutes(rows) -> float:
    """Training time summed over the completed runs (epochs x mean epoch time), minutes."""
    return sum(float(r["time_per_epoch"]) * int(r["epochs_done"]) for r in rows
               if r["status"] == "completed") / 60


def write_csv_rows(rows, path: Path) -> None:
    import csv

    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    p = base_parser(__doc__, "analysis/results/lr_sweep_digits")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--image-size", type=int, default=None, help="resize the images")
    p.add_argument("--model", default=None, help="default: resnet-digits")
    p.add_argument("--geometries", nargs="+", default=GEOMETRIES)
    p.add_argument("--lrs", nargs="+", type=float, default=LRS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--margin", type=float, default=0.01,
                   help="basin margin in error-rate units (default 0.01 = 1 point)")
    args = p.parse_args(argv)
    args.lrs = sorted(args.lrs)
    args.model = args.model or "resnet-digits"
    folder = Path(args.out)
    runs = build_runs(args)
    t0 = time.perf_counter()
    if args.report_only:
        rows = collect(STUDY, runs, folder)
        write_csv(rows, folder / "runs.csv")
    else:
        rows = run_grid(STUDY, runs, folder, resume=args.resume)
    if not rows:
        print("no finished runs")
        return 1
    print(report(args, rows, folder, None if args.report_only else time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
