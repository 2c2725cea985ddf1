"""Shared pytest fixtures: reproducible random generators and per-dtype tolerances.

Seeds are derived from the test's node id, so every test draws its own reproducible stream;
set ``KERNELGEO_TEST_SEED`` to an integer to shift all streams (a cheap way to rerun the
randomized suites on fresh data).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

# Triton decides when a kernel is decorated whether it runs in its interpreter; without a GPU
# every Triton kernel is tested there, so the switch is set before any test module imports one
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

#: metrics of a run's history that measure wall time (they differ between identical runs)
TIME_KEYS = ("epoch_time", "images_per_s")


def strip_times(history: list[dict]) -> list[dict]:
    """A run's per-epoch history without its timing fields (:data:`TIME_KEYS`): what an
    exactly resumed run must reproduce."""
    return [{k: v for k, v in row.items() if k not in TIME_KEYS} for row in history]


#: relative tolerance of a property check, per floating dtype (float64 tight, float32 loose)
TOL = {torch.float64: 1e-9, torch.float32: 2e-4}


def seed_for(nodeid: str) -> int:
    """Deterministic 31-bit seed of a test id, shifted by ``$KERNELGEO_TEST_SEED``."""
    return (zlib.crc32(nodeid.encode()) + int(os.environ.get("KERNELGEO_TEST_SEED", "0"))) % (
        2**31
    )


@pytest.fixture
def seed(request) -> int:
    """Per-test integer seed (see :func:`seed_for`)."""
    return seed_for(request.node.nodeid)


@pytest.fixture
def gen(seed) -> torch.Generator:
    """A CPU :class:`torch.Generator` seeded per test."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=[torch.float64, torch.float32], ids=["f64", "f32"])
def dtype(request) -> torch.dtype:
    """Both floating dtypes; pair with :data:`TOL` or the ``tol`` fixture."""
    return request.param


@pytest.fixture
def tol(dtype) -> float:
    """Relative tolerance for the ``dtype`` fixture."""
    return TOL[dtype]
