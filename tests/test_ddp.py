"""Two-process data-parallel training (gloo on CPU) through ``torchrun -m kernelgeo train``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo not available")
def test_two_rank_gloo_training_keeps_identical_kernels_on_manifold(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "kernelgeo", "train", "--dataset", "digits",
           "--geometry", "layer1.*=sphere,*=stiefel", "--epochs", "1", "--batch-size", "128",
           "--sync-check-every", "1", "--out", str(out), "--quiet"]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2
    # all-reduced max - min of every parameter entry after every step: bitwise identical
    assert s["ddp_max_param_divergence"] == 0.0
    assert s["max_constraint_error"] < 1e-5 and s["manifold_parameters"] > 0
    h = s["history"][0]
    assert h["step"] == 1437 // 128  # each step is one global batch split over the ranks
    # only rank 0 writes: a single line per epoch
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
