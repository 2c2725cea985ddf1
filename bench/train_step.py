"""Time one training step (forward, backward, optimizer step) and its peak memory.

Compares plain ``torch.optim.SGD(foreach=True)`` on the unconstrained network with
ConvergentRSGD (default backend: Triton kernels on CUDA where they apply) and geoopt's
RiemannianSGD on the constrained network, in the same run, with the same batch.  Peak memory
(CUDA only) is the largest allocation of a timed step above what the model, its gradients and
the optimizer state held before it.

    python bench/train_step.py [--model resnet20] [--batch 128] [--image 32]
        [--amp none|bf16] [--channels-last] [--manifolds sphere oblique stiefel]
        [--device cpu] [--markdown FILE]

ResNet-50 as on ImageNet: ``--model resnet50 --batch 64 --image 224 --amp bf16
--channels-last --device cuda``.
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


def _step_fn(model, opt, x, y, amp):
    lossf = torch.nn.CrossEntropyLoss()
    dev = x.device.type

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=amp == "bf16"):
            out = model(x)
        lossf(out.float(), y).backward()
        opt.step()

    return step


def _peak(step, device) -> float:
    """Peak bytes allocated by one step above the memory held before it (CUDA), else NaN."""
    if not device.startswith("cuda"):
        return float("nan")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return float(torch.cuda.max_memory_allocated() - before)


def _prep(model, device, channels_last):
    model = model.to(device)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def measure(model_name, manifolds, device, batch, repeat, number, *, image=32, amp="none",
            channels_last=False):
    sync = torch.cuda.synchronize if device.startswith("cuda") else None
    g = torch.Generator().manual_seed(0)
    classes = 1000 if model_name == "resnet50" else 10
    x = torch.randn(batch, 3, image, image, generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(classes, (batch,), generator=g).to(device)
    base = build_model(model_name)
    m0 = _prep(copy.deepcopy(base), device, channels_last)
    sgd = torch.optim.SGD(m0.parameters(), lr=1e-3, momentum=0.9, foreach=True)
    step_sgd = _step_fn(m0, sgd, x, y, amp)
    t_sgd = timeit(step_sgd, repeat=repeat, number=number, sync=sync)
    mem_sgd = _peak(step_sgd, device)
    del m0, sgd, step_sgd
    rows = []
    for spec in manifolds:
        mo = _prep(constrain_model(copy.deepcopy(base), spec), device, channels_last)
        ours = ConvergentRSGD(mo.parameters(), lr=1e-3, momentum=0.9, stabilize=None)
        step_ours = _step_fn(mo, ours, x, y, amp)
        t_ours = timeit(step_ours, repeat=repeat, number=number, sync=sync)
        mem_ours = _peak(step_ours, device)
        del mo, ours, step_ours
        mg = _prep(constrain_model(copy.deepcopy(base), spec), device, channels_last)
        ref = geoopt.optim.RiemannianSGD(mg.parameters(), lr=1e-3, momentum=0.9)
        t_geo = timeit(_step_fn(mg, ref, x, y, amp), repeat=repeat, number=number, sync=sync)
        del mg, ref
        mib = (lambda b: "n/a" if b != b else f"{b / 2**20:.0f}")  # noqa: E731
        rows.append([model_name, batch, f"{image}px", amp,
                     "channels_last" if channels_last else "contiguous", spec,
                     f"{t_sgd * 1e3:.1f}", f"{t_ours * 1e3:.1f}", f"{t_geo * 1e3:.1f}",
                     f"{t_ours / t_sgd:.2f}x", f"{t_geo / t_sgd:.2f}x", mib(mem_sgd),
                     mib(mem_ours)])
        print(" | ".join(map(str, rows[-1])), flush=True)
    return rows


HEADER = ["model", "batch", "image", "amp", "memory format", "manifold", "plain SGD step (ms)",
          "ConvergentRSGD step (ms)", "geoopt RSGD step (ms)", "ours / SGD", "geoopt / SGD",
          "SGD step peak (MiB)", "ConvergentRSGD step peak (MiB)"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--manifolds", nargs="+", default=["sphere", "oblique", "stiefel"])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image", type=int, default=32, help="image side in pixels")
    ap.add_argument("--amp", default="none", choices=["none", "bf16"],
                    help="bf16 autocast of the forward pass")
    ap.add_argument("--channels-last", action="store_true",
                    help="model and batch in channels_last memory format")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--number", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--markdown", default=None, help="append the table to this file")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = measure(a.model, a.manifolds, a.device, a.batch, a.repeat, a.number, image=a.image,
                   amp=a.amp, channels_last=a.channels_last)
    publish(rows, HEADER, heading=f"Training step ({a.device})", script="train_step.py",
            argv=argv or sys.argv[1:], markdown=a.markdown)
    return rows


if __name__ == "__main__":
    main()
