"""Data-parallel training with :class:`torch.nn.parallel.DistributedDataParallel`.

Launch ``kernelgeo train`` under ``torchrun``; every process trains one replica on its shard
of each batch (the global ``--batch-size`` is split over the ranks), gradients are averaged by
DDP, and since every rank then takes the same deterministic optimizer step the manifold
parameters stay identical on all ranks.  This is checked every ``--sync-check-every`` steps
(max. absolute difference of all parameters over ranks, reported in ``summary.json``);
``--broadcast-every K`` additionally copies rank 0's parameters to all ranks every K steps
(a guard against non-deterministic kernels, e.g. cuDNN autotuning).  Only rank 0 writes
files.  The backend is NCCL on CUDA devices and gloo on CPUs.

One machine, 4 processes (CPU or 4 GPUs)::

    torchrun --nproc_per_node 4 -m kernelgeo train --dataset cifar10-jpeg --model resnet20 \\
        --geometry sphere --out runs/r20-sphere

Several machines (run on every node, with its own ``--node_rank``; ``MASTER`` is the
address of node 0, reachable from all nodes; every node must see the data at the same path)::

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 \\
        --rdzv_backend c10d --rdzv_endpoint MASTER:29500 --rdzv_id myjob \\
        -m kernelgeo train --dataset cifar10-jpeg --model resnet20 --out runs/r20

With gloo, set ``GLOO_SOCKET_IFNAME`` (and ``NCCL_SOCKET_IFNAME`` for NCCL) to the network
interface the nodes share if the default one is wrong.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistContext", "init_distributed", "cleanup", "barrier", "all_reduce_sum",
           "param_divergence",
           "broadcast_parameters", "unwrap", "EPILOG"]

EPILOG = """distributed training:
  torchrun --nproc_per_node N -m kernelgeo train ...     (one machine, N processes/GPUs)
  torchrun --nnodes M --node_rank R --nproc_per_node N \\
      --rdzv_backend c10d --rdzv_endpoint HOST0:29500 --rdzv_id JOB -m kernelgeo train ...
  (run on every node with its own R; HOST0 = address of node 0; same data path on all nodes.)
  --batch-size is the global batch, split over the ranks; gloo on CPU, NCCL on CUDA; only
  rank 0 writes files; parameters are checked identical across ranks (--sync-check-every)."""


@dataclass
class DistContext:
    """Where this process sits in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistContext:
    """Join the process group described by torchrun's environment variables, if any.

    Parameters
    ----------
    device_type : {"cpu", "cuda"}
        Selects the backend (gloo or NCCL).

    Returns
    -------
    DistContext
        Single-process context when ``WORLD_SIZE`` is unset or 1.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if device_type == "cuda":
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(rank, world, local, backend)


def cleanup() -> None:
    """Leave the process group (no-op when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if ctx.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``t`` over ranks in place (no-op for a single process); returns ``t``."""
    if ctx.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _flat_params(model: nn.Module) -> torch.Tensor:
    ps = [p.detach().reshape(-1).as_subclass(torch.Tensor) for p in unwrap(model).parameters()]
    return torch.cat(ps).float() if ps else torch.zeros(0)


def param_divergence(model: nn.Module, ctx: DistContext) -> float:
    """Largest absolute difference of any parameter entry between ranks (0 if identical).

    Computed with an all-reduce of the max and of the min of every entry, so it is exact
    and collective: every rank must call it.
    """
    if not ctx.enabled:
        return 0.0
    flat = _flat_params(model)
    hi, lo = flat.clone(), flat.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    return float((hi - lo).max()) if flat.numel() else 0.0


def broadcast_parameters(model: nn.Module, ctx: DistContext, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank, in place (collective)."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        for t in list(unwrap(model).parameters()) + list(unwrap(model).buffers()):
            dist.broadcast(t.data, src=src)
