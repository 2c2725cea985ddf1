"""Time one training step (forward, backward, optimizer step) of a CIFAR ResNet-20.

Compares plain ``torch.optim.SGD(foreach=True)`` on the unconstrained network with
ConvergentRSGD and geoopt's RiemannianSGD on the constrained network, in the same run.

    python bench/train_step.py [--batch 128] [--manifolds sphere oblique stiefel]
        [--device cpu] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import build_model, constrain_model, publish, timeit  # noqa: E402
from kernelgeo._compat import geoopt  # noqa: E402
from kernelgeo.optim import ConvergentRSGD  # noqa: E402


def _step_fn(model, opt, x, y):
    lossf = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        lossf(model(x), y).backward()
        opt.step()

    return step


def measure(model_name, manifolds, device, batch, repeat, number):
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(10, (batch,), generator=g).to(device)
    base = build_model(model_name).to(device)
    m0 = copy.deepcopy(base)
    sgd = torch.optim.SGD(m0.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    t_sgd = timeit(_step_fn(m0, sgd, x, y), repeat=repeat, number=number, sync=sync)
    rows = []
    for spec in manifolds:
        mo = constrain_model(copy.deepcopy(base), spec)
        ours = ConvergentRSGD(mo.parameters(), lr=1e-3, momentum=0.9, stabilize=None)
        t_ours = timeit(_step_fn(mo, ours, x, y), repeat=repeat, number=number, sync=sync)
        mg = constrain_model(copy.deepcopy(base), spec)
        ref = geoopt.optim.RiemannianSGD(mg.parameters(), lr=1e-3, momentum=0.9)
        t_geo = timeit(_step_fn(mg, ref, x, y), repeat=repeat, number=number, sync=sync)
        rows.append([model_name, batch, spec, f"{t_sgd * 1e3:.1f}", f"{t_ours * 1e3:.1f}",
                     f"{t_geo * 1e3:.1f}", f"{t_ours / t_sgd:.2f}x", f"{t_geo / t_sgd:.2f}x"])
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


HEADER = ["model", "batch", "manifold", "plain SGD step (ms)", "ConvergentRSGD step (ms)",
          "geoopt RSGD step (ms)", "ours / SGD", "geoopt / SGD"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--manifolds", nargs="+", default=["sphere", "oblique", "stiefel"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--number", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--markdown", default=None, help="append the table to this file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = measure(a.model, a.manifolds, a.device, a.batch, a.repeat, a.number)
    publish(rows, HEADER, heading=f"Training step ({a.device})", script="train_step.py",
            argv=argv or sys.argv[1:], markdown=a.markdown)
    return rows


if __name__ == "__main__":
    main()
