#!/usr/bin/env python
"""Loss landscapes of one digits model per geometry, trained by ``kernelgeo train`` (runs
kept in ``<out>/runs``): 2-D Euclidean (Li et al. 2018) and manifold-aware slices with one
colour scale, 1-D geodesic vs straight-line interpolation between two trained seeds, and
sharpness (Riemannian vs Euclidean top Hessian eigenvalue).

Writes ``landscape_euclidean.png``, ``landscape_manifold.png``, ``seeds_1d.png`` and
``landscapes.md`` (a table) into ``--out``.

The 1-D path between two independently trained seeds needs Stiefel logarithms between far
apart frames (up to St(288, 32) for ``resnet-digits``), which can take minutes; leave
``stiefel`` out of ``--geometries`` for a quick look.

Example::

    python analysis/landscapes.py --geometries sphere oblique --points 21 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from kernelgeo.analysis.hessian import sharpness  # noqa: E402
from kernelgeo.analysis.landscape import (  # noqa: E402
    Evaluator,
    landscape_1d,
    landscape_2d,
    li_directions,
    tangent_directions,
    torch_threads,
)
from kernelgeo.analysis.plotting import plot_curves_1d, plot_slices  # noqa: E402
from kernelgeo.runs import load_run  # noqa: E402
from kernelgeo.train import TrainConfig, geometry_slug, train  # noqa: E402


def _trained(spec: str, seed: int, out: Path, epochs: int, lr: float):
    """A `kernelgeo train` digits run (default model) in ``out/runs``, loaded."""
    d = out / "runs" / f"{geometry_slug(spec)}-seed{seed}"
    train(TrainConfig(dataset="digits", epochs=epochs, lr=lr, geometry=spec, seed=seed,
                      out=str(d), force=True, quiet=True))
    return load_run(d)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="results/landscapes")
    p.add_argument("--geometries", nargs="+",
                   default=["euclidean", "sphere", "centered-sphere", "oblique", "stiefel",
                            "po:sphere+stiefel"])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--points", type=int, default=21)
    p.add_argument("--span", type=float, default=1.0)
    p.add_argument("--subset", type=int, default=512)
    p.add_argument("--seeds", type=int, nargs=2, default=[0, 1],
                   help="two training seeds for the 1-D interpolation")
    p.add_argument("--threads", type=int, default=None)
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    se, sm, curves, rows = {}, {}, {}, []
    with torch_threads(a.threads):
        for spec in a.geometries:
            t0 = time.perf_counter()
            r0 = _trained(spec, a.seeds[0], out, a.epochs, a.lr)
            m0 = r0.model
            m1 = _trained(spec, a.seeds[1], out, a.epochs, a.lr).model
            xtr, ytr = r0.train_batch(max(a.subset, 256))
            sx, sy = xtr[:a.subset], ytr[:a.subset]
            ev = Evaluator(m0, sx, sy)
            g = torch.Generator().manual_seed(123)
            de = (li_directions(m0, generator=g), li_directions(m0, generator=g))
            g = torch.Generator().manual_seed(123)
            dm = (tangent_directions(m0, generator=g), tangent_directions(m0, generator=g))
            se[spec] = landscape_2d(m0, ev, mode="euclidean", span=a.span, points=a.points,
                                    directions=de)
            sm[spec] = landscape_2d(m0, ev, mode="manifold", span=a.span, points=a.points,
                                    directions=dm)
            curves[spec] = landscape_1d(m0, ev, m0, m1, stiefel_metric="canonical")
            sr = sharpness(m0, xtr[:256], ytr[:256], riemannian=True, tol=1e-3)
            sE = sharpness(m0, xtr[:256], ytr[:256], riemannian=False, tol=1e-3)
            c = curves[spec]
            mid = len(c["t"]) // 2
            rows.append((spec, se[spec].center[0], float(np.max(se[spec].loss)),
                         float(np.max(sm[spec].loss)), float(c["geodesic_loss"][mid]),
                         float(c["linear_loss"][mid]), sr, sE, time.perf_counter() - t0))
            print(f"{spec}: done in {rows[-1][-1]:.1f}s", flush=True)
    value = f"training loss ({len(sy)} images)"
    plot_slices(se, out / "landscape_euclidean.png", value=value,
                title="Euclidean slices (Li et al. filter-normalised directions), "
                      f"trained seed {a.seeds[0]}")
    plot_slices(sm, out / "landscape_manifold.png", value=value,
                title="Manifold-aware slices (tangent directions, exponential map), "
                      f"trained seed {a.seeds[0]}")
    plot_curves_1d(curves, out / "seeds_1d.png", value=value,
                   title=f"trained seed {a.seeds[0]} (t=0) to trained seed {a.seeds[1]} (t=1)")
    md = ["# Landscapes", "",
          "| geometry | centre loss | max loss (Euclidean) | max loss (manifold) | "
          "midpoint loss (geodesic) | midpoint loss (linear) | sharpness (Riem.) | "
          "sharpness (Eucl.) | seconds |", "|" + "---|" * 9]
    md += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r) + " |"
           for r in rows]
    md += ["", "![Euclidean](landscape_euclidean.png)", "",
           "![Manifold](landscape_manifold.png)", "", "![1-D](seeds_1d.png)", ""]
    (out / "landscapes.md").write_text("\n".join(md))
    print(f"wrote {out / 'landscapes.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
