"""Shared helpers of the benchmarks: models, parameter sets, timing, machine description."""

from __future__ import annotations

import datetime
import platform
import statistics
import time

import torch
from torch import nn

from kernelgeo._compat import geoopt
from kernelgeo.manifolds import get_manifold


class _Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = self.b2(self.c2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


def resnet20(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016, 3 stages x 3 blocks, 16/32/64 channels; 1x1
    projection shortcuts)."""
    layers = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(3):
            layers.append(_Block(cin, cout, stride if i == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def build_model(name: str) -> nn.Module:
    if name == "resnet20":
        return resnet20()
    if name == "resnet50":
        import torchvision

        return torchvision.models.resnet50()
    raise ValueError(name)


def constrain_model(model: nn.Module, spec: str) -> nn.Module:
    """Put every conv kernel that accepts ``spec`` on it (others stay Euclidean)."""
    if spec == "euclidean":
        return model
    m = get_manifold(spec)
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            try:
                m.check_kernel_shape(tuple(mod.weight.shape))
            except ValueError:
                continue
            with torch.no_grad():
                # contiguous, as kernelgeo.constrain stores kernels (projx may return a
                # transposed layout, e.g. for oblique and Stiefel kernels)
                w = m.projx(mod.weight.detach()).contiguous()
            mod.weight = geoopt.ManifoldParameter(w, manifold=m)
    return model


def fill_grads(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator(device="cpu").manual_seed(seed)
    for p in model.parameters():
        v = (torch.randn(p.shape, generator=g) * 1e-2).to(p.device, p.dtype)
        # in the parameter's memory layout, as autograd's AccumulateGrad makes it (oblique
        # kernels, for instance, are stored with their last two dimensions swapped)
        p.grad = torch.empty_like(p.detach()).copy_(v)


def timeit(fn, *, repeat: int = 7, number: int = 5, sync=None) -> float:
    """Median over ``repeat`` runs of the mean time of ``number`` calls, in seconds."""
    fn()
    if sync:
        sync()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        if sync:
            sync()
        runs.append((time.perf_counter() - t) / number)
    return statistics.median(runs)


def timeit_interleaved(fns: dict, *, repeat: int = 7, number: int = 5, sync=None) -> dict:
    """Like :func:`timeit` for several functions, measured in alternating rounds so that they
    all see the same machine load (this 2-core machine is shared); medians, in seconds."""
    runs: dict = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    if sync:
        sync()
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            for _ in range(number):
                fn()
            if sync:
                sync()
            runs[k].append((time.perf_counter() - t) / number)
    return {k: statistics.median(v) for k, v in runs.items()}


def machine() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import os

    dev = ""
    if torch.cuda.is_available():
        dev = f", GPU {torch.cuda.get_device_name()}"
    return (f"{platform.platform()}, {cpu} ({os.cpu_count()} logical CPUs, "
            f"{torch.get_num_threads()} torch threads){dev}, Python {platform.python_version()}, "
            f"torch {torch.__version__}, geoopt {geoopt.__version__}")


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def table(rows: list[list], header: list[str]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def publish(rows: list[list], header: list[str], *, heading: str, script: str,
            argv: list[str], markdown: str | None) -> None:
    """Print the table; with ``markdown``, append it under ``heading`` with date, machine and
    the command that produced it (the format of ``bench/RESULTS.md``)."""
    md = table(rows, header)
    argv = list(argv)
    if "--markdown" in argv:  # where the table was written is not part of the command
        i = argv.index("--markdown")
        del argv[i:i + 2]
    print()
    print(md)
    if markdown:
        with open(markdown, "a") as f:
            f.write(f"\n### {heading}\n\n{now()}; {machine()}\n\n"
                    f"`python bench/{script} {' '.join(argv)}`\n\n{md}\n")
