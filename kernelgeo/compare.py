"""Side-by-side comparison of kernel geometries: ``kernelgeo compare`` and ``kernelgeo demo``.

:func:`run_compare` trains the same model on the same data with the same schedule for every
geometry x seed (the data are decoded once), then writes to the output directory::

    <out>/<geometry>/seed<k>/...   each run's own files (see kernelgeo.training.rundir)
    <out>/runs.csv                 one row per run
    <out>/results.csv              one row per geometry: mean +- std over seeds
    <out>/report.md                the table, settings, command, machine and date
    <out>/loss.png, error.png      training/test loss (seed means) and test error per epoch
                                   (seed means with min-max bands)
"""

from __future__ import annotations

import csv
import dataclasses
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .data import load_dataset
from .manifolds import GeometryError, GeometrySpec, parse_geometry
from .training import ConfigError, TrainConfig, machine_info, rundir, train, validate

__all__ = ["run_compare", "aggregate", "write_report", "plot_curves", "format_table",
           "DEMO_GEOMETRIES", "run_demo"]

DEMO_GEOMETRIES = ("euclidean", "sphere", "oblique", "stiefel", "po:sphere+stiefel")

_RUN_FIELDS = ("geometry", "seed", "final_test_error", "best_test_error", "best_epoch",
               "final_train_loss", "time_per_epoch", "max_constraint_error", "epochs_done",
               "out")
_AGG_FIELDS = ("geometry", "seeds", "final_test_error_mean", "final_test_error_std",
               "best_test_error_mean", "best_test_error_std", "final_train_loss_mean",
               "time_per_epoch_mean", "max_constraint_error")


def aggregate(summaries: Sequence[dict], geometries: Sequence[str]) -> list[dict[str, Any]]:
    """Per-geometry mean and sample std (ddof=1; 0 for one seed) over the runs' summaries."""
    rows = []
    for g in geometries:
        runs = [s for s in summaries if s["geometry"] == g]
        if not runs:
            continue

        def col(key, runs=runs):
            return np.array([r[key] for r in runs if r.get(key) is not None], dtype=float)

        def std(a):
            return float(a.std(ddof=1)) if len(a) > 1 else 0.0

        fe, be = col("final_test_error"), col("best_test_error")
        rows.append({
            "geometry": g, "seeds": len(runs),
            "final_test_error_mean": float(fe.mean()), "final_test_error_std": std(fe),
            "best_test_error_mean": float(be.mean()), "best_test_error_std": std(be),
            "final_train_loss_mean": float(col("final_train_loss").mean()),
            "time_per_epoch_mean": float(col("time_per_epoch").mean()),
            "max_constraint_error": float(col("max_constraint_error").max()),
        })
    return rows


def format_table(rows: Sequence[dict], dataset_label: str) -> str:
    """Markdown table of :func:`aggregate` rows; errors in percent."""
    head = ("| geometry | seeds | final test error (%) | best test error (%) | final train loss "
            "| time / epoch (s) | max constraint error |\n"
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |\n")
    lines = []
    for r in rows:
        pm = (lambda m, s: f"{100 * m:.2f} ± {100 * s:.2f}") if r["seeds"] > 1 else (
            lambda m, s: f"{100 * m:.2f}")
        lines.append(
            f"| {r['geometry']} | {r['seeds']} | "
            f"{pm(r['final_test_error_mean'], r['final_test_error_std'])} | "
            f"{pm(r['best_test_error_mean'], r['best_test_error_std'])} | "
            f"{r['final_train_loss_mean']:.4f} | {r['time_per_epoch_mean']:.2f} | "
            f"{r['max_constraint_error']:.1e} |")
    return f"Data: {dataset_label}\n\n" + head + "\n".join(lines) + "\n"


def plot_curves(summaries: Sequence[dict], geometries: Sequence[str], out: Path,
                title: str = "") -> list[Path]:
    """Write ``loss.png`` (train solid, test dashed; seed means) and ``error.png`` (test error:
    seed mean, min-max band and n, :func:`~kernelgeo.analysis.plotting.plot_error_curves`).

    Returns
    -------
    list of Path
        The files written.
    """
    import matplotlib

    from .analysis.plotting import plot_error_curves, seed_runs

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    def mean_curve(runs, key):
        n = min(len(r["history"]) for r in runs)
        a = np.array([[h[key] for h in r["history"][:n]] for r in runs], dtype=float)
        return np.arange(1, n + 1), a.mean(0)

    written = []
    for fname, keys, ylabel in (("loss.png", ("train_loss", "test_loss"), "cross-entropy"),):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
        for i, g in enumerate(geometries):
            runs = [s for s in summaries if s["geometry"] == g and s["history"]]
            if not runs:
                continue
            color = f"C{i % 10}"
            for key, ls in zip(keys, ("-", "--")):
                x, y = mean_curve(runs, key)
                lab = g if key == "train_loss" else None
                ax.plot(x, y, ls, color=color, label=lab)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
        ax.set_title((title + "\n" if title else "") + "train (solid) and test (dashed) loss, "
                     "seed means", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / fname
        fig.savefig(p)
        plt.close(fig)
        written.append(p)
    # test error with its spread over seeds and n
    written.append(plot_error_curves(seed_runs(summaries, geometries), out / "error.png",
                                     title=title))
    return written


def write_report(out: Path, summaries: Sequence[dict], geometries: Sequence[str],
                 base: TrainConfig, *, dataset_label: str, title: str, command: str,
                 notes: str = "") -> Path:
    """Write ``runs.csv``, ``results.csv``, ``report.md`` and the plots; returns the report."""
    rows = aggregate(summaries, geometries)
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_RUN_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(summaries)
    with open(out / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("dataset", *_AGG_FIELDS))
        w.writeheader()
        for r in rows:
            w.writerow({"dataset": dataset_label, **r})
    from .analysis.plotting import join_title

    plots = plot_curves(summaries, geometries, out, title=join_title(title, dataset_label))
    mach = machine_info()
    s0 = summaries[0] if summaries else {}
    md = [f"# {title}", "",
          format_table(rows, dataset_label),
          "Errors are test-set errors after the last epoch (final) and the lowest over epochs "
          "(best); mean ± sample standard deviation over seeds. Constraint error: largest "
          "distance of a kernel from its manifold over all epochs.", "",
          "## Settings", "",
          f"- data: {dataset_label}, {s0.get('train_images')} train / "
          f"{s0.get('test_images')} test images",
          f"- model: {s0.get('model', base.model)} ({s0.get('parameters')} parameters)",
          f"- optimizer: {base.optimizer} (step rule {base.step_rule}), lr {base.lr}, momentum "
          f"{base.momentum}, weight decay {base.weight_decay} (Euclidean parameters), "
          f"{base.manifold_weight_decay} (manifold kernels)",
          f"- schedule: {base.schedule}, {base.epochs} epochs, batch {base.batch_size}, "
          f"augmentation {base.augment}",
          f"- seeds: {sorted({s['seed'] for s in summaries})}",
          f"- command: `{command}`",
          f"- machine: {mach.get('platform')}, CPU {mach.get('cpu', mach.get('processor'))} "
          f"x{mach.get('cpu_count')}, device {s0.get('device')}, torch {mach.get('torch')}",
          f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %z')}", ""]
    if notes:
        md += ["## Notes", "", notes.strip(), ""]
    md += ["## Curves", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    md += ["## Runs", "", "| geometry | seed | final error (%) | best error (%) | "
           "time / epoch (s) | directory |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for s in summaries:
        md.append(f"| {s['geometry']} | {s['seed']} | {100 * s['final_test_error']:.2f} | "
                  f"{100 * s['best_test_error']:.2f} | {s['time_per_epoch']:.2f} | "
                  f"{Path(s['out']).relative_to(out) if s.get('out') else ''} |")
    report = out / "report.md"
    report.write_text("\n".join(md) + "\n")
    return report


def run_compare(base: TrainConfig, geometries: Sequence[str | GeometrySpec], seeds: Sequence[int],
                out: str | Path, *, title: str = "Kernel geometry comparison",
                notes: str = "", command: str | None = None,
                log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train every geometry x seed with ``base``'s other settings and write the report.

    Parameters
    ----------
    base : TrainConfig
        Settings shared by all runs (``geometry``, ``seed`` and ``out`` are overridden).
    geometries : sequence of str or GeometrySpec
        Geometry specs (names, products or rule strings), each parsed once.
    seeds : sequence of int
    out : path
        Output directory.  Every run directory ``<out>/<geometry>/seed<k>`` that exists is
        refused before anything is written, unless ``base.resume`` (continue those runs);
        ``base.force`` moves a non-empty ``out`` aside first (see
        :mod:`kernelgeo.training.rundir`).  The command line also refuses a non-empty
        ``--out`` without ``--resume`` or ``--force``.
    title, notes : str
        Report heading and an optional notes section.
    command : str, optional
        Command line recorded in the report (default: ``sys.argv``).
    log : callable
        Progress messages.

    Returns
    -------
    dict
        ``report`` (path), ``rows`` (aggregated), ``summaries`` (per run), ``table`` (Markdown).
    """
    if not geometries or not seeds:
        raise ConfigError("need at least one geometry and one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"seeds must be distinct, got {list(seeds)}")
    try:
        specs = [parse_geometry(g) for g in geometries]
    except GeometryError as err:
        raise ConfigError(str(err)) from None
    if len({s.slug() for s in specs}) != len(specs):
        raise ConfigError(f"geometries must be distinct, got {[str(s) for s in specs]}")
    validate(base)
    out = Path(out)
    action = rundir.check_out(out, force=base.force, what="comparison", container=True)
    plan = [(spec, s, out / spec.slug() / f"seed{s}") for spec in specs for s in seeds]
    if action != "move":
        # every run directory is checked before anything is written
        for _, _, run_dir in plan:
            rundir.check_out(run_dir, resume=base.resume)
    command = command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    data = load_dataset(base.dataset, base.data_dir, download=base.download,
                        split_seed=base.split_seed, train_subset=base.train_subset,
                        test_subset=base.test_subset, image_size=base.image_size)
    moved = rundir.prepare_out(out, action)
    if moved is not None:
        log(f"moved the previous contents of {out} to {moved} (--force)")
    summaries = []
    t0 = time.perf_counter()
    for spec, s, run_dir in plan:
        cfg = dataclasses.replace(base, geometry=spec, seed=s, out=str(run_dir), force=False,
                                  command=command, extra=dict(base.extra))
        t = time.perf_counter()
        summ = train(cfg, data=data)
        summ["out"] = str(run_dir)
        summaries.append(summ)
        log(f"  {str(spec):<24s} seed {s}: final test error "
            f"{100 * summ['final_test_error']:.2f}%  best {100 * summ['best_test_error']:.2f}%  "
            f"({summ['time_per_epoch']:.2f} s/epoch, {time.perf_counter() - t:.1f} s)")
    names = [str(spec) for spec in specs]
    report = write_report(out, summaries, names, base, dataset_label=data.label,
                          title=title, command=command, notes=notes)
    rows = aggregate(summaries, names)
    rundir.write_json(out / "compare.json", {"rows": rows, "total_time":
                                             time.perf_counter() - t0, "command": command})
    return {"report": report, "rows": rows, "summaries": summaries,
            "table": format_table(rows, data.label), "total_time": time.perf_counter() - t0}


def run_demo(out: str | Path, *, epochs: int = 20, seeds: Sequence[int] = (0,),
             geometries: Sequence[str] = DEMO_GEOMETRIES, quiet: bool = False,
             **overrides) -> dict[str, Any]:
    """``kernelgeo demo``: :func:`run_compare` on digits for the five demo geometries."""
    command = overrides.pop("command", None)
    base = TrainConfig(dataset="digits", model="resnet-digits", epochs=epochs, batch_size=64,
                       lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine", quiet=True,
                       device="cpu", **overrides)
    return run_compare(base, geometries, seeds, out, command=command,
                       title="kernelgeo demo: kernel geometries on UCI digits",
                       log=(lambda *_: None) if quiet else print)
