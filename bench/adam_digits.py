"""kernelgeo's RiemannianAdam against geoopt's RiemannianAdam on scikit-learn's digits.

A small CNN (three 3x3 convolutions with batch norm, as in the test suite) with its kernels on
the given geometries, trained from the same initialisation, on the same mini-batches, for the
same number of steps by

* ``kernelgeo``: :class:`kernelgeo.optim.RiemannianAdam` (one second moment per component);
* ``geoopt``: :class:`geoopt.optim.RiemannianAdam` on the same manifold parameters (it asks
  the manifold for ``component_inner``, which kernelgeo's manifolds answer per component, so
  it runs the same algorithm one kernel at a time);
* ``torch``: :class:`torch.optim.Adam` on the unconstrained network (a reference point).

Printed per optimizer and seed: final test error, mean training loss of the last 20 steps,
median wall time of ``optimizer.step()`` and of a whole training step (forward, backward,
step), single-threaded.  The three run in lockstep (one step of each in turn on the same
batch), so that their timings see the same machine load.

With ``--resnet20 GEOMETRY``: instead, the time of one ``step()`` of each optimizer on the
parameters of ResNet-20 (its kernels on GEOMETRY, random gradients), in alternating rounds.

    python bench/adam_digits.py [--steps 400] [--seeds 0 1 2] [--lr 0.01]
        [--geometry mixed|stiefel] [--resnet20 sphere]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernelgeo  # noqa: E402
from bench.common import (  # noqa: E402, I001
    build_model,
    constrain_model,
    fill_grads,
    timeit_interleaved,  # noqa: E402
)
from kernelgeo._compat import geoopt  # noqa: E402
from kernelgeo.data import load_digits  # noqa: E402
from kernelgeo.optim import RiemannianAdam  # noqa: E402

SPECS = {
    "mixed": {"0": "sphere", "3": "oblique", "6": "centered-sphere"},
    "stiefel": {"0": "stiefel", "3": "stiefel", "6": "stiefel"},
}


def make_net(seed: int, geometry: str | None) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(16 * 6 * 6, 10))
    if geometry is not None:
        kernelgeo.constrain(net, SPECS[geometry])
    return net


def make_opt(kind: str, net: torch.nn.Module, lr: float):
    if kind == "kernelgeo":
        return RiemannianAdam(net.parameters(), lr=lr)
    if kind == "geoopt":
        return geoopt.optim.RiemannianAdam(net.parameters(), lr=lr, stabilize=None)
    return torch.optim.Adam(net.parameters(), lr=lr)


KINDS = ("kernelgeo", "geoopt", "torch")


def run(seed: int, steps: int, lr: float, geometry: str, data) -> dict:
    """The three optimizers in lockstep (same batch, one step each, in turn), so that their
    timings see the same machine load."""
    xtr, ytr, xte, yte = data
    nets = {k: make_net(seed, None if k == "torch" else geometry) for k in KINDS}
    opts = {k: make_opt(k, nets[k], lr) for k in KINDS}
    gen = torch.Generator().manual_seed(1000 + seed)
    losses = {k: [] for k in KINDS}
    t_step = {k: [] for k in KINDS}
    t_all = {k: [] for k in KINDS}
    for _ in range(steps):
        idx = torch.randint(len(ytr), (64,), generator=gen)
        for k in KINDS:
            net, opt = nets[k], opts[k]
            t0 = time.perf_counter()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            loss.backward()
            t1 = time.perf_counter()
            opt.step()
            t2 = time.perf_counter()
            losses[k].append(loss.item())
            t_step[k].append(t2 - t1)
            t_all[k].append(t2 - t0)
    skip = steps // 10  # first steps include allocations and warm-up
    res = {}
    for k in KINDS:
        nets[k].eval()
        with torch.no_grad():
            err = (nets[k](xte).argmax(1) != yte).float().mean().item()
        res[k] = dict(err=err, loss=statistics.fmean(losses[k][-20:]),
                      step_ms=1e3 * statistics.median(t_step[k][skip:]),
                      train_ms=1e3 * statistics.median(t_all[k][skip:]))
    return res


def time_resnet20(geometry: str) -> None:
    import copy

    base = build_model("resnet20")
    fns = {}
    for kind in KINDS:
        net = copy.deepcopy(base) if kind == "torch" else \
            constrain_model(copy.deepcopy(base), geometry)
        fill_grads(net)
        if kind == "kernelgeo":
            opt = RiemannianAdam(net.parameters(), lr=1e-3)
        elif kind == "geoopt":
            opt = geoopt.optim.RiemannianAdam(net.parameters(), lr=1e-3, stabilize=None)
        else:
            opt = torch.optim.Adam(net.parameters(), lr=1e-3, foreach=True)
        fns[kind] = opt.step
    t = timeit_interleaved(fns, repeat=7, number=5)
    print(f"ResNet-20, {geometry} kernels, one step() (median, 1 thread):")
    for kind, s in t.items():
        print(f"  {kind:9s} {1e3 * s:.2f} ms")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--geometry", choices=sorted(SPECS), default="mixed")
    ap.add_argument("--resnet20", metavar="GEOMETRY", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.resnet20:
        time_resnet20(args.resnet20)
        return
    d = load_digits()
    norm = lambda t: (t.float() / 255.0 - 0.3) / 0.35  # noqa: E731
    data = (norm(d.x_train), d.y_train, norm(d.x_test), d.y_test)
    print(f"digits: {len(d.y_train)} train / {len(d.y_test)} test images; "
          f"{args.steps} steps of 64, lr {args.lr}, geometry {args.geometry}; torch "
          f"{torch.__version__}, geoopt {geoopt.__version__}, 1 thread")
    print("| optimizer | seed | test error | loss (last 20) | step (ms) | train step (ms) |")
    print("|---|---:|---:|---:|---:|---:|")
    summary = {}
    for seed in args.seeds:
        for kind, r in run(seed, args.steps, args.lr, args.geometry, data).items():
            summary.setdefault(kind, []).append(r)
            print(f"| {kind} | {seed} | {r['err']:.2%} | {r['loss']:.4f} | "
                  f"{r['step_ms']:.2f} | {r['train_ms']:.2f} |", flush=True)
    print("\nmean over seeds:")
    for kind, rs in summary.items():
        print(f"  {kind:9s} test error {statistics.fmean(r['err'] for r in rs):.2%}  "
              f"step {statistics.fmean(r['step_ms'] for r in rs):.2f} ms  "
              f"train step {statistics.fmean(r['train_ms'] for r in rs):.2f} ms")


if __name__ == "__main__":
    main()
