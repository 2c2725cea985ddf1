"""Devices, threads, seeds and random-number-generator states of a run; machine description."""

from __future__ import annotations

import os
import platform
import random
from typing import Any

import numpy as np
import torch

from .config import ConfigError

__all__ = ["machine_info", "pick_device", "seed_all", "rng_state", "set_rng_state",
           "set_threads"]


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Platform, CPU, thread count, accelerator and library versions, for reports."""
    from .. import __version__

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernelgeo": __version__,
        "hostname": platform.node(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` -> a device (``cuda`` is this rank's GPU)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but CUDA is not available")
        try:
            return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)
        except RuntimeError:
            raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N") from None
    if name != "cpu":
        raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device("cpu")


def set_threads(threads: int | None, device: torch.device, image_size, world_size: int) -> None:
    """Intra-op CPU threads: ``threads`` if given, else 1 for tiny images, else the cores
    shared between the ranks of this machine."""
    if threads:
        torch.set_num_threads(threads)
    elif device.type == "cpu" and (max(image_size) <= 16 or world_size > 1):
        # the convolutions of 8x8 images are too small to split over threads: intra-op
        # threading costs more than it saves (measured 13 ms/step on 1 thread vs 70+ ms on 2),
        # and several ranks on one CPU would oversubscribe its cores
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        torch.set_num_threads(1 if max(image_size) <= 16
                              else max(1, (os.cpu_count() or 1) // local_world))


def seed_all(seed: int) -> None:
    """Seed Python's, numpy's (modulo 2**32) and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """The global generators' states (checkpointed for an exact resume)."""
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": list(np.random.get_state())}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def set_rng_state(st: dict, device: torch.device) -> None:
    """Restore :func:`rng_state` (after a round trip through a weights-only checkpoint)."""
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = st["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)
