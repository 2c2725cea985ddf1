"""Shared helpers of the benchmarks: models, parameter sets, timing, machine description."""

from __future__ import annotations

import datetime
import statistics
import time

import torch
from torch import nn

from kernelgeo import constrain
from kernelgeo._compat import geoopt
from kernelgeo.models import get_model
from kernelgeo.training import machine_info

#: benchmark model name -> (kernelgeo.models name, classes): ResNet-20 with 1x1 projection
#: shortcuts (option B) on CIFAR-10 and torchvision's ResNet-50 on ImageNet, as in RESULTS.md
MODELS = {"resnet20": ("resnet20-b", 10), "resnet50": ("torchvision:resnet50", 1000)}


def build_model(name: str) -> nn.Module:
    """A benchmark model by name (see :data:`MODELS`)."""
    if name not in MODELS:
        raise ValueError(f"unknown benchmark model {name!r}; valid: {', '.join(MODELS)}")
    model_name, classes = MODELS[name]
    return get_model(model_name, num_classes=classes, in_channels=3)


def constrain_model(model: nn.Module, spec: str) -> nn.Module:
    """Put every conv kernel that can hold ``spec`` on it (others stay Euclidean); returns
    ``model`` (:func:`kernelgeo.constrain` with ``on_invalid="skip"``)."""
    constrain(model, spec, on_invalid="skip")
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
    info = machine_info()
    dev = ""
    if torch.cuda.is_available():
        dev = f", GPU {torch.cuda.get_device_name()}"
    return (f"{info['platform']}, {info.get('cpu', 'unknown CPU')} ({info['cpu_count']} logical "
            f"CPUs, {info['torch_threads']} torch threads){dev}, Python {info['python']}, "
            f"torch {info['torch']}, geoopt {geoopt.__version__}")


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
