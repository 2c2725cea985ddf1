"""Time one optimizer step on the parameters of ResNet-20 / ResNet-50.

Anchors measured in the same run: ``torch.optim.SGD(foreach=True)`` and ``(fused=True)`` on
the same parameters (plain tensors) and ``geoopt.optim.RiemannianSGD`` on the same manifold
parameters.  ConvergentRSGD is timed twice: with its default backend (``backend="auto"``: the
fused CPU kernels of :mod:`kernelgeo.optim.native` on the CPU, the Triton kernels of
:mod:`kernelgeo.optim.triton_backend` on CUDA, where they apply) and restricted to torch ops
(``backend="torch"``).  The SGD anchors and both ConvergentRSGD variants
run in alternating rounds, so that they see the same machine load.

    python bench/optimizer_step.py [--models resnet20 resnet50] [--manifolds sphere ...]
        [--device cpu] [--momentum 0.9] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import (  # noqa: E402
    build_model,
    constrain_model,
    fill_grads,
    publish,
    timeit,
    timeit_interleaved,
)
from kernelgeo._compat import geoopt  # noqa: E402
from kernelgeo.optim import ConvergentRSGD  # noqa: E402


def measure(model_name, manifolds, device, momentum, repeat, number, geoopt_max_s=2.0,
            rule="gsgd"):
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    base = build_model(model_name).to(device)
    fill_grads(base)
    anchors = {}
    for kind in ("foreach", "fused"):
        sm = copy.deepcopy(base)
        fill_grads(sm)
        anchors[kind] = torch.optim.SGD(sm.parameters(), lr=1e-3, momentum=momentum,
                                        foreach=kind == "foreach", fused=kind == "fused")
    rows = []
    for spec in manifolds:
        fns = {k: o.step for k, o in anchors.items()}
        for backend in ("auto", "torch"):  # default (fused C / Triton kernels), torch ops
            m = constrain_model(copy.deepcopy(base), spec)
            fill_grads(m)
            fns[f"ours-{backend}"] = ConvergentRSGD(m.parameters(), lr=1e-3, momentum=momentum,
                                                    step_rule=rule, stabilize=None,
                                                    backend=backend).step
        # anchors and both paths of ours in alternating rounds: the same load for all
        t = timeit_interleaved(fns, repeat=repeat, number=number, sync=sync)
        g = constrain_model(copy.deepcopy(base), spec)
        fill_grads(g)
        ref = geoopt.optim.RiemannianSGD(g.parameters(), lr=1e-3, momentum=momentum)
        # geoopt can take seconds per step (Stiefel): time it fewer times
        t1 = timeit(ref.step, repeat=1, number=1, sync=sync)
        t_geo = t1 if t1 > geoopt_max_s else timeit(ref.step, repeat=max(3, repeat // 2),
                                                    number=1, sync=sync)
        t_sgd, t_fused, t_ours, t_torch = (t["foreach"], t["fused"], t["ours-auto"],
                                           t["ours-torch"])
        rows.append([model_name, spec, f"{t_sgd * 1e3:.2f}", f"{t_fused * 1e3:.2f}",
                     f"{t_ours * 1e3:.2f}", f"{t_torch * 1e3:.2f}", f"{t_geo * 1e3:.2f}",
                     f"{t_ours / t_sgd:.2f}x", f"{t_ours / t_fused:.2f}x",
                     f"{t_geo / t_sgd:.1f}x", f"{t_geo / t_ours:.1f}x"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


HEADER = ["params of", "manifold", "torch SGD foreach (ms)", "torch SGD fused (ms)",
          "ConvergentRSGD, default backend (ms)", "ConvergentRSGD, torch ops only (ms)",
          "geoopt RSGD (ms)",
          "ours / SGD foreach", "ours / SGD fused", "geoopt / SGD foreach",
          "speed-up vs geoopt"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--models", nargs="+", default=["resnet20", "resnet50"])
    ap.add_argument("--manifolds", nargs="+", default=["sphere", "oblique", "stiefel"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--rule", default="gsgd")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--number", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: stable numbers on a shared machine)")
    ap.add_argument("--markdown", default=None, help="append the table to this file")
    a = ap.parse_args(argv)
    if a.threads and a.device == "cpu":
        torch.set_num_threads(a.threads)
    rows = []
    for mn in a.models:
        rows += measure(mn, a.manifolds, a.device, a.momentum, a.repeat, a.number, rule=a.rule)
    publish(rows, HEADER, heading=f"Optimizer step ({a.device}, momentum {a.momentum}, "
            f"rule {a.rule})", script="optimizer_step.py", argv=argv or sys.argv[1:],
            markdown=a.markdown)
    return rows


if __name__ == "__main__":
    main()
