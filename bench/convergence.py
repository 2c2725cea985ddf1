"""Convergence of the step rules on problems with known minimisers (float64, one thread).

Every optimizer sees the same stochastic samples (one generator per run, seeded the same way,
drawn independently of the iterate) and the same schedule
:math:`\\lambda(t) = \\lambda_0 (1 + t/100)^{-3/4}`, from the same starting point:

* ``rayleigh``: leading eigenvector of :math:`A = \\mathbb E[zz^\\top]` on :math:`S^{19}`
  (Oja's stochastic gradient :math:`-zz^\\top x`, :math:`z\\sim N(0, A)`, eigengap 1);
  distance: angle to :math:`\\pm v` in degrees;
* ``procrustes``: :math:`\\min_X \\mathbb E\\|X^\\top a - b\\|^2` on :math:`\\mathrm{St}(12,4)`,
  :math:`b = X_*^\\top a + 0.1\\,\\epsilon`, one sample :math:`(a, b)` per step; distance
  :math:`\\|X - X_*\\|_F`;
* ``karcher-sphere`` / ``karcher-oblique``: Karcher mean of 20 points on :math:`S^9` / of the
  columns of a :math:`2\\times2\\times3\\times3` oblique kernel, gradient
  :math:`-\\mathrm{Log}_x(y_i)` of one random point; the mean from a deterministic
  fixed-point iteration; distance: largest geodesic distance of a component;
* ``product``: ``po:sphere+stiefel`` kernel (8, 6), linear cost :math:`-\\langle W,T\\rangle` plus
  Gaussian noise; minimiser in closed form (normalised rows, polar factor); distance
  :math:`\\|W - W_*\\|_F`.

Optimizers: :class:`kernelgeo.optim.ConvergentRSGD` with each rule, and geoopt's
``RiemannianSGD`` (``stabilize=None``), each with momentum 0 and 0.9.

    python bench/convergence.py [--steps 20000] [--seeds 0 1 2] [--problems ...]
        [--checkpoints 1000 20000] [--lr0-scale 1] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernelgeo._compat import RiemannianSGD, geoopt  # noqa: E402
from kernelgeo.manifolds import get_manifold  # noqa: E402
from kernelgeo.optim import ConvergentRSGD, RobbinsMonroLR  # noqa: E402

DT = torch.float64
#: lr0 per problem (the Rayleigh value is the one of the original report)
LR0 = {"rayleigh": 0.1, "procrustes": 0.02, "karcher-sphere": 0.5, "karcher-oblique": 0.5,
       "product": 0.1}
OPTIMIZERS = ("gsgd", "none", "bounded", "geoopt")


def rayleigh(gen):
    n = 20
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=DT, generator=gen))
    ev = torch.cat([torch.linspace(0.5, 1.0, n - 1, dtype=DT), torch.tensor([2.0], dtype=DT)])
    root = q @ torch.diag(ev.sqrt())  # z = root @ e has covariance A = q diag(ev) q^T
    v = q[:, -1]
    m = get_manifold("sphere")
    x0 = m.random((1, n), generator=gen, dtype=DT)

    def grad(x, g):
        z = root @ torch.randn(n, dtype=DT, generator=g)
        return -(x @ z)[:, None] * z[None, :]

    def dist(x):
        return math.degrees(float(torch.arccos((x[0] @ v).abs().clamp(max=1))))

    return m, x0, grad, dist


def procrustes(gen):
    n, k = 12, 4
    xs, _ = torch.linalg.qr(torch.randn(n, k, dtype=DT, generator=gen))
    m = get_manifold("stiefel")
    w0 = m.random((k, n), generator=gen, dtype=DT)  # kernel (k, n): X = W^T

    def grad(w, g):  # d/dW of |W a - b|^2 / 2
        a = torch.randn(n, dtype=DT, generator=g)
        b = xs.T @ a + 0.1 * torch.randn(k, dtype=DT, generator=g)
        return torch.outer(w @ a - b, a)

    def dist(w):
        return float((w.T - xs).norm())

    return m, w0, grad, dist


def _karcher(spec, shape, spread, gen):
    m = get_manifold(spec)
    center = m.random(shape, generator=gen, dtype=DT)
    data = torch.stack([m.expmap(center, spread * m.random_tangent(center, generator=gen))
                        for _ in range(20)])
    mean = center.clone()
    for _ in range(300):  # fixed point x <- Exp_x(mean_i Log_x(y_i))
        mean = m.expmap(mean, torch.stack([m.logmap(mean, y) for y in data]).mean(0))
    x0 = m.random(shape, generator=gen, dtype=DT)

    def grad(x, g):
        i = int(torch.randint(len(data), (1,), generator=g))
        return -m.logmap(x, data[i])

    def dist(x):
        return float(m.component_dist(x, mean).max())

    return m, x0, grad, dist


def karcher_sphere(gen):
    return _karcher("sphere", (1, 10), 0.5, gen)


def karcher_oblique(gen):
    return _karcher("oblique", (2, 2, 3, 3), 0.4, gen)


def product(gen):
    m = get_manifold("po:sphere+stiefel")
    shape = (8, 6)
    t = torch.randn(shape, dtype=DT, generator=gen)
    t = 3 * t / t.norm()
    best = torch.empty_like(t)
    best[:4] = t[:4] / t[:4].norm(dim=1, keepdim=True)
    u, _, vh = torch.linalg.svd(t[4:].T, full_matrices=False)
    best[4:] = (u @ vh).T
    x0 = m.random(shape, generator=gen, dtype=DT)

    def grad(w, g):
        return -t + 0.3 * torch.randn(shape, dtype=DT, generator=g)

    def dist(w):
        return float((w - best).norm())

    return m, x0, grad, dist


PROBLEMS = {"rayleigh": rayleigh, "procrustes": procrustes, "karcher-sphere": karcher_sphere,
            "karcher-oblique": karcher_oblique, "product": product}


def run(problem: str, opt_name: str, momentum: float, seed: int, steps: int,
        checkpoints: list[int], lr0: float | None = None) -> dict[int, float]:
    """Distance to the minimiser at each checkpoint (NaN once the iterate is not finite)."""
    m, x0, grad, dist = PROBLEMS[problem](torch.Generator().manual_seed(seed))
    p = geoopt.ManifoldParameter(x0.clone(), manifold=m)
    lr = LR0[problem] if lr0 is None else lr0
    if opt_name == "geoopt":
        opt = RiemannianSGD([p], lr=lr, momentum=momentum, stabilize=None)
    else:
        opt = ConvergentRSGD([p], lr=lr, momentum=momentum, step_rule=opt_name,
                             stabilize=None)
    sched = RobbinsMonroLR(opt, t0=100, power=0.75)
    g = torch.Generator().manual_seed(10_000 + seed)  # the samples: the same for every run
    out = {}
    for t in range(1, steps + 1):
        p.grad = grad(p.detach(), g)
        opt.step()
        sched.step()
        if t in checkpoints:
            d = dist(p.detach())
            out[t] = d if math.isfinite(d) else math.nan
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--checkpoints", type=int, nargs="+", default=[1000, 20000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--problems", nargs="+", default=list(PROBLEMS), choices=list(PROBLEMS))
    ap.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    ap.add_argument("--momenta", type=float, nargs="+", default=[0.0, 0.9])
    ap.add_argument("--lr0-scale", type=float, default=1.0,
                    help="multiply every lr0 (large values show what the caps do)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cps = sorted(c for c in args.checkpoints if c <= args.steps)
    head = "| problem | lr0 | momentum | " + " | ".join(
        f"{o} @{c}" for c in cps for o in args.optimizers) + " |"
    lines = [head, "|" + "---|" * (3 + len(cps) * len(args.optimizers))]
    t0 = time.time()
    for prob in args.problems:
        for mu in args.momenta:
            lr0 = LR0[prob] * args.lr0_scale
            res = {o: [run(prob, o, mu, s, args.steps, cps, lr0) for s in args.seeds]
                   for o in args.optimizers}
            cells = []
            for c in cps:
                for o in args.optimizers:
                    vals = [r[c] for r in res[o]]
                    mean = sum(vals) / len(vals)
                    cells.append(f"{mean:.3g}" if math.isfinite(mean) else "diverged")
            lines.append(f"| {prob} | {lr0:g} | {mu} | " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    lines.append("")
    lines.append(f"mean distance to the minimiser over seeds {args.seeds}; {args.steps} steps; "
                 f"{time.time() - t0:.0f} s")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
