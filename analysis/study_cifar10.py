"""CIFAR-10 (JPEG q75 copy): CIFAR ResNets with every kernel geometry, several seeds — a GPU
study.

Grid: ``--geometries`` (default: euclidean, sphere, centered-sphere, oblique, stiefel,
po:sphere+stiefel) x ``--seeds`` (default 0 1 2), model ``--model`` (``resnet20`` or
``resnet56``), the standard recipe (batch 128, lr 0.1, momentum 0.9, weight decay 5e-4 on
Euclidean parameters, random crop with 4 px padding and horizontal flips) with a cosine
schedule over ``--epochs`` (default 30) or ``--schedule step --epochs 160`` (He et al. 2016:
lr / 10 at epochs 80 and 120).

``--concurrent K`` runs the grid as K worker processes at once on one GPU (each takes every
K-th run; models this small leave most of an H200 idle when run one at a time); the parent
waits for them and then writes the one ``runs.csv``, figures and ``report.md``.  ``--amp bf16``
trains under bfloat16 autocast.  Every run is resumable: after an interruption (a device time
limit), the same command with ``--resume`` continues each run from its last epoch.

GPU run (e.g. one H200)::

    python analysis/study_cifar10.py --model resnet20 --epochs 30 --concurrent 12 --amp bf16 \\
        --out analysis/results/cifar10_resnet20 --resume

Not meant for a CPU (a ResNet-20 epoch takes minutes there); ``--train-subset`` and
``--test-subset`` exist for smoke tests.

Writes ``runs.csv``, ``test_error.png`` and ``report.md`` to ``--out``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

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
)

from kernelgeo.train import TrainConfig  # noqa: E402

STUDY = "cifar10"
GEOMETRIES = ["euclidean", "sphere", "centered-sphere", "oblique", "stiefel",
              "po:sphere+stiefel"]


def build_runs(args) -> list[Run]:
    runs = []
    for g in args.geometries:
        for s in args.seeds:
            cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir,
                              train_subset=args.train_subset,
                              test_subset=args.test_subset, model=args.model, geometry=g,
                              epochs=args.epochs, lr=args.lr, seed=s, schedule=args.schedule,
                              amp=args.amp, device=args.device, threads=args.threads,
                              batch_size=args.batch_size, augment="crop+flip")
            runs.append(Run(run_name(args.model, g, f"s{s}"), cfg))
    return runs


def report(args, rows, folder: Path) -> str:
    from kernelgeo.analysis.plotting import plot_error_curves

    curves = {}
    for g in args.geometries:
        rs = [[h["test_error"] for h in r["_summary"]["history"]] for r in rows
              if r["geometry"] == g and r["_summary"].get("history")]
        if rs:
            curves[g] = rs
    title = f"CIFAR-10 (JPEG q75), {args.model}, {args.schedule} {args.epochs} ep."
    if curves:
        plot_error_curves(curves, folder / "test_error.png", title=title, band="std")
    base = {r["seed"]: r["final_test_error"] for r in rows
            if r["geometry"] == "euclidean" and r["status"] == "completed"}
    lines = [f"# {title}", "",
             f"- command: `{command_line()}`", f"- machine: {machine_line(rows)}",
             f"- date: {date_line(rows)}",
             f"- budget: {len(rows)} runs, lr {args.lr:g}, batch {args.batch_size}, amp "
             f"{args.amp}, {args.concurrent} concurrent process(es)", "",
             "| geometry | final test error (%) | best test error (%) | completed | "
             "epochs done | s/epoch | paired diff. vs euclidean (pp, 95 % t) |",
             "|---|---|---|---|---|---|---|"]
    for g in args.geometries:
        rs = [r for r in rows if r["geometry"] == g]
        if not rs:
            continue
        ok = [r for r in rs if r["status"] == "completed"]
        fe = mean_std([r["final_test_error"] * 100 for r in ok])
        be = mean_std([r["best_test_error"] * 100 for r in ok])
        tp = mean_std([r["time_per_epoch"] for r in ok])
        d = [r["final_test_error"] - base[r["seed"]] for r in ok if r["seed"] in base]
        pd = "—"
        if g != "euclidean" and d:
            m, lo, hi = t_interval(d)
            ci = f" [{lo * 100:+.2f}, {hi * 100:+.2f}]" if len(d) > 1 else ""
            pd = f"{m * 100:+.2f}{ci} (n = {len(d)})"
        lines.append(f"| {g} | {fe[0]:.2f} ± {fe[1]:.2f} ({fe[2]}) | {be[0]:.2f} ± {be[1]:.2f}"
                     f" | {len(ok)}/{len(rs)} | "
                     f"{min(int(r['epochs_done']) for r in rs)}–"
                     f"{max(int(r['epochs_done']) for r in rs)} | {tp[0]:.1f} | {pd} |")
    lines += ["", "![test error](test_error.png)", ""]
    text = "\n".join(lines)
    (folder / "report.md").write_text(text)
    return text


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = base_parser(__doc__, "analysis/results/cifar10")
    p.add_argument("--dataset", default="cifar10-jpeg")
    p.add_argument("--data-dir", default=None,
                   help="where cifar10_jpeg_q75.npz is (default: $KERNELGEO_DATA, ../shared/data)")
    p.add_argument("--train-subset", type=int, default=None)
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--model", default="resnet20", choices=["resnet20", "resnet56"])
    p.add_argument("--geometries", nargs="+", default=GEOMETRIES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--schedule", default="cosine", choices=["cosine", "step"])
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    p.add_argument("--device", default="auto")
    add_concurrency(p, "worker processes at once (on one GPU)")
    args = p.parse_args(argv)
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
