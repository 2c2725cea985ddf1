"""Count the operations of one optimizer step: ATen ops (about one GPU kernel launch each,
~4-6 us on a current GPU) and Triton kernel launches.

For each model (parameters of ResNet-20 / ResNet-110 of :mod:`kernelgeo.models`, torchvision's
ResNet-50) and geometry, one step with momentum 0.9 (after a first step that creates the
buffers and plans) is counted for ``torch.optim.SGD(foreach=True)`` on the plain model,
geoopt's ``RiemannianSGD`` and :class:`~kernelgeo.optim.ConvergentRSGD` with each backend:
``torch`` (torch ops only: the path a GPU took before the Triton backend), ``native`` (fused C
kernels on CPU tensors: the C calls are not counted, only the ATen ops around them) and
``triton``.  Deterministic: the counts depend only on the parameter shapes and the code.

Triton kernels are counted at launch and, with ``--execute`` off (the default), not run: the
interpreter would take minutes on ResNet-50; their results are tested in
``tests/test_triton_backend.py``.  The ATen ops that read the finiteness flag see a zero
flag then, as after a finite gradient.  Stiefel steps are counted as steps known to be short
(the optimizer's bounds show every step below 3r, as with these gradients): a step that is
not adds one synchronisation (two ops) reading the retraction's flags.

    python bench/launches.py [--models resnet20 resnet110 resnet50] [--manifolds sphere ...]
        [--markdown FILE] [--execute]
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors: Triton's interpreter

import argparse  # noqa: E402
import copy  # noqa: E402
import sys  # noqa: E402
from collections import Counter  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from kernelgeo import constrain  # noqa: E402
from kernelgeo._compat import geoopt  # noqa: E402
from kernelgeo.models import get_model  # noqa: E402
from kernelgeo.optim import ConvergentRSGD  # noqa: E402
from kernelgeo.optim import triton_backend as tb  # noqa: E402

MODELS = {"resnet20": ("resnet20", 10), "resnet110": ("resnet110", 10),
          "resnet50": ("torchvision:resnet50", 1000)}
MANIFOLDS = ["sphere", "centered-sphere", "oblique", "po:sphere+oblique", "stiefel"]
OPTIMIZERS = ["SGD foreach", "geoopt RSGD", "torch", "native", "triton"]


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched inside it (by name in :attr:`ops`)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def _fill_grads(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        v = torch.randn(p.shape, generator=g) * 1e-2
        p.grad = torch.empty_like(p.detach()).copy_(v)  # the parameter's memory layout


def make_optimizer(kind: str, model):
    if kind == "SGD foreach":
        return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    if kind == "geoopt RSGD":
        return geoopt.optim.RiemannianSGD(model.parameters(), lr=1e-3, momentum=0.9)
    return ConvergentRSGD(model.parameters(), lr=1e-3, momentum=0.9, stabilize=None,
                          backend=kind)


def count_step(opt, model, execute: bool = False) -> tuple[int, int]:
    """(ATen ops, Triton launches) of the second step of ``opt`` (the first builds state)."""
    _fill_grads(model, 0)
    with tb.counting(execute=execute):
        opt.step()
    _fill_grads(model, 1)
    with OpCounter() as ops, tb.counting(execute=execute) as launches:
        opt.step()
    return ops.total, launches.launches


def measure(model_name: str, manifolds, optimizers=OPTIMIZERS, execute: bool = False) -> list:
    name, classes = MODELS[model_name]
    base = get_model(name, num_classes=classes, in_channels=3)
    rows = []
    for spec in manifolds:
        row = [model_name, spec]
        constrained = copy.deepcopy(base)
        constrain(constrained, spec, on_invalid="skip")  # once: Stiefel projections are slow
        for kind in optimizers:
            if kind == "triton" and not tb.available():
                row.append("n/a")
                continue
            model = copy.deepcopy(base if kind == "SGD foreach" else constrained)
            ops, launches = count_step(make_optimizer(kind, model), model, execute)
            row.append(f"{ops}" if kind != "triton" else f"{ops} + {launches}")
        rows.append(row)
    return rows


HEADER = ["params of", "manifold"] + [
    {"SGD foreach": "torch SGD foreach", "geoopt RSGD": "geoopt RSGD",
     "torch": "ours, torch ops", "native": "ours, native (CPU)",
     "triton": "ours, triton (ATen + Triton)"}[k] for k in OPTIMIZERS]


def table(rows, header=HEADER) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--manifolds", nargs="+", default=MANIFOLDS)
    ap.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    ap.add_argument("--execute", action="store_true",
                    help="run the Triton kernels (interpreter on CPU: slow for ResNet-50)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for mname in args.models:
        for r in measure(mname, args.manifolds, execute=args.execute):
            print(" | ".join(r), flush=True)
            rows.append(r)
    md = ("Operations in one optimizer step (momentum 0.9, steady state): ATen ops counted "
          "with a TorchDispatchMode (about one kernel launch each on a GPU; a foreach op "
          "counts once) and, for the Triton backend, Triton launches.\n\n" + table(rows) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(md)
    return rows


if __name__ == "__main__":
    main()
