"""Every GPU measurement of the optimizer in one call (< 5 minutes on an H100/H200).

    python bench/gpu_all.py [--out DIR]

Runs, on ``cuda``: one optimizer step on ResNet-50's and ResNet-20's parameters (sphere,
oblique, Stiefel; ConvergentRSGD with its default backend, the Triton kernels where they
apply, and with torch ops only; torch SGD foreach/fused and geoopt RiemannianSGD as anchors),
training steps of ResNet-20 (batch 128, 32 px) and of ResNet-50 (batch 64, 224 px, bf16
autocast, channels_last) with their peak memory against plain SGD.  Writes
``gpu_results.md`` into ``--out`` (default ``$OUT`` or ``bench/``).  Launch counts need no
GPU: ``bench/launches.py``.
Exits with status 0 and a message when no CUDA device is present.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT", str(Path(__file__).parent)))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_all: no CUDA device; nothing measured")
        return 0
    from bench import optimizer_step, train_step
    from bench.common import machine, now

    torch.backends.cudnn.benchmark = True
    out = Path(a.out) / "gpu_results.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        f.write(f"# GPU results\n\n{now()}; {machine()}\n\n`python bench/gpu_all.py`\n")
    t = time.time()
    optimizer_step.main(["--models", "resnet50", "--device", "cuda", "--repeat", "7",
                         "--number", "20", "--threads", "0", "--markdown", str(out)])
    optimizer_step.main(["--models", "resnet20", "--device", "cuda", "--repeat", "7",
                         "--number", "20", "--threads", "0", "--markdown", str(out)])
    train_step.main(["--device", "cuda", "--repeat", "7", "--number", "10",
                     "--markdown", str(out)])
    train_step.main(["--device", "cuda", "--model", "resnet50", "--batch", "64", "--image",
                     "224", "--amp", "bf16", "--channels-last", "--repeat", "5", "--number",
                     "5", "--markdown", str(out)])
    print(f"gpu_all: done in {time.time() - t:.0f} s; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
