#!/usr/bin/env python
"""Normalization report on trained runs: how each run's kernel geometry reshapes its search
space (invariance gap, curvature along the optimizer's gradient and momentum, normal
curvature, distance from the initialization, sharpness, 1-D and 2-D landscapes).  Same
options as ``kernelgeo analyze``; without run directories it first trains one digits run per
geometry of ``--geometries`` with ``kernelgeo train`` (kept in ``<out>/runs``).

Example::

    python analysis/normalization_report.py --out results/normalization --threads 1
    python analysis/normalization_report.py runs/train/sphere runs/train/stiefel
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

from kernelgeo.analysis.report import add_analyze_arguments, main_analyze  # noqa: E402

#: geometries trained when no run directory is given
GEOMETRIES = ("euclidean", "sphere", "centered-sphere", "oblique", "stiefel",
              "po:sphere+stiefel")


def train_examples(out: Path, geometries, epochs: int, threads: int | None) -> list[str]:
    """One digits run per geometry (existing finished runs are reused)."""
    from kernelgeo.train import TrainConfig, geometry_slug, train

    dirs = []
    for g in geometries:
        d = out / "runs" / geometry_slug(g)
        if not (d / "summary.json").is_file():
            train(TrainConfig(dataset="digits", epochs=epochs, geometry=g, out=str(d),
                              threads=threads, force=True, quiet=True))
        dirs.append(str(d))
    return dirs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    # run directories are optional here: without them, example runs are trained first
    add_analyze_arguments(parser, runs_optional=True)
    parser.add_argument("--geometries", nargs="+", default=list(GEOMETRIES), metavar="SPEC",
                        help="geometries of the example runs (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=6,
                        help="epochs of the example runs (default: %(default)s)")
    parser.set_defaults(out="results/normalization_report")
    args = parser.parse_args(argv)
    if not args.runs:
        args.runs = train_examples(Path(args.out), args.geometries, args.epochs,
                                   args.threads)
    elif "--geometries" in (argv if argv is not None else sys.argv[1:]):
        parser.error("--geometries only applies without RUN_DIR (example runs)")
    return main_analyze(args)


if __name__ == "__main__":
    sys.exit(main())
