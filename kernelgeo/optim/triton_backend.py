r"""Triton backend of :class:`~kernelgeo.optim.ConvergentRSGD`: a few kernel launches per step.

On a GPU an optimizer step costs about one kernel launch per tensor operation, and the torch
path of :mod:`~kernelgeo.optim.batched` issues some ten operations per chunk (thousands per
step on ResNet-50).  This backend updates every sphere, centred-sphere and oblique kernel
(and every such dense block of a product kernel) of the optimizer in the style of torch's
multi-tensor apply:

* an **item table** (one row per kernel or product block: addresses of the point, gradient and
  momentum buffer, the component layout ``(a, s)``, flags, ``lr``, radius, step-rule cap,
  momentum, dampening), refreshed once per step (gradient addresses and ``lr`` change);
* a **tile table** (item, first component, number of components), built once per plan: a
  program of a launch updates one tile;
* one launch per (device, dtype, tile class): components of at most 1024 entries are updated
  from registers, many per program (``BC x BA`` tiles, ``BA`` the next power of two of the
  component length); longer ones one per program, in four passes over blocks of 512;
* before anything is written, one reduction launch per (device, dtype) over every gradient of
  the step (kernels, Euclidean parameters, kernels left to the torch path) writes the largest
  absolute entry of each range (``inf`` for a NaN); the step reads their maximum (one
  synchronisation): a non-finite gradient raises (or skips) with nothing written, and the
  bound :math:`\sqrt{n}\max|G|` of the gradients' norms goes to the optimizer's overflow
  test (the one of the torch fast path): a step that could overflow somewhere takes the
  reference path, which writes nothing unless every new value is finite.

Component ``(blk, j)`` of an item is the vector of its ``a`` entries ``blk*a*s + k*s + j``
(``k < a``): rows of spheres (``s = 1``), columns of the oblique slices (``a = k_h``,
``s = k_w``), or contiguous columns for kernels stored with the last two dimensions swapped.
The update of one component is that of ``kernelgeo.optim.batched.sphere_apply``, with the
step rule :math:`g = \lambda/\max(1, \lambda\|d\|/c)` of
:mod:`~kernelgeo.optim.step_rules` (the cap :math:`c` comes from
:func:`~kernelgeo.optim.step_rules.rule_constants`), the exact retraction
:math:`x' = r\,y/\|y\|`, :math:`y = x - g\,d`, and the momentum transported by projection
:math:`B' = B - \langle x', B\rangle x'/r^2`.  Weight decay on these manifolds is the
projection of :math:`\lambda_{wd}x`, which is zero: like the fused CPU kernels the backend
omits it.

Stiefel blocks with the QR retraction (per filter or per slice, in products too) are
updated on zero-padded stacks of a few classes (same :math:`p` and radius, :math:`n` within a
factor 4): four Triton launches per (device, dtype) for the copies, momentum, step rule and
:math:`M = X - g\,d`, and nine batched ATen ops per class for the products and the
Cholesky-QR retraction (see :mod:`~kernelgeo.optim.stiefel_stack`), whatever the number of
layers.

Left to the torch path (:mod:`~kernelgeo.optim.batched`, in the same step, after the check):
other kernels (Stiefel with the polar retraction, custom manifolds), sphere-like kernels that
are not dense, Stiefel blocks whose row layout is not a view of the parameter, dtypes other
than float32/float64, parameters on foreign manifolds; Euclidean parameters use the
optimizer's ``torch._foreach_*`` update.
Values are computed in double precision in registers (float32 data is loaded, converted and
stored back rounded): sums of squares of float32 gradients cannot overflow.  float64 entries
beyond ~1e154 are not rescaled.

On CPU tensors the kernels run only under Triton's interpreter (``TRITON_INTERPRET=1`` set
before :mod:`triton` is imported), which is how they are tested.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch

from ..manifolds import KernelProduct
from . import _item_flags, momentum
from . import batched as bt
from . import stiefel_stack as ss
from .rsgd import _nblocks
from .step_rules import KERNEL_CAPPED, rule_constants

__all__ = ["available", "unavailable_reason", "interpreting", "check_device", "step",
           "LaunchCounter", "counting"]

#: components at most this long are updated from registers (several per program)
SHORT_MAX = 1024
#: entries per program of the short kernel (BC x BA), and per block of the long kernel:
#: with 8 and 4 warps, 128 and 80 registers per thread and no spills for sm_90 (cuobjdump)
SHORT_TILE, LONG_BLOCK = 2048, 512
#: entries checked per program of the validation kernel (BLOCK x NB)
CHECK_BLOCK, CHECK_NB = 1024, 16
DTYPES = (torch.float32, torch.float64)

_TRITON = None
_REASON = None


def _import():
    global _TRITON, _REASON
    if _TRITON is None and _REASON is None:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as e:  # ImportError, or a broken install
            _REASON = f"triton cannot be imported ({type(e).__name__}: {e})"
        else:
            from . import _triton_kernels as k

            _TRITON = {"short": k.sphere_short, "long": k.sphere_long, "check": k.check_finite,
                       "st_gather": k.stiefel_gather, "st_direction": k.stiefel_direction,
                       "st_displace": k.stiefel_displace, "st_scatter": k.stiefel_scatter}
    return _TRITON


def available() -> bool:
    """Whether :mod:`triton` can be imported (it is bundled with CUDA builds of torch)."""
    return _import() is not None


def unavailable_reason() -> str | None:
    _import()
    return _REASON


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_device(device: torch.device) -> None:
    """Raise ``RuntimeError`` unless Triton can run kernels on tensors of ``device``."""
    if device.type == "cuda":
        return
    if device.type == "cpu" and interpreting():
        return
    raise RuntimeError(
        f"backend='triton' needs CUDA tensors (got tensors on {device}); on the CPU Triton "
        "runs only in its interpreter (set TRITON_INTERPRET=1 before triton is imported), "
        "which is slow: use backend='native' or 'auto' there")


# --------------------------------------------------------------------------- launch counting
class LaunchCounter:
    """Counts the kernel launches of this backend; with ``execute=False`` the kernels are
    counted but not run (for counting launches of large models under the interpreter)."""

    def __init__(self, execute: bool = True):
        self.launches = 0
        self.execute = execute


_COUNTERS: list[LaunchCounter] = []


class counting:
    """Context manager yielding a :class:`LaunchCounter` of the launches made inside it."""

    def __init__(self, execute: bool = True):
        self.counter = LaunchCounter(execute)

    def __enter__(self) -> LaunchCounter:
        _COUNTERS.append(self.counter)
        return self.counter

    def __exit__(self, *exc):
        _COUNTERS.remove(self.counter)


def _launch(kernel, grid, *args, **kw) -> None:
    run = True
    for c in _COUNTERS:
        c.launches += 1
        run = run and c.execute
    if run:
        kernel[grid](*args, **kw)


# -------------------------------------------------------------------------------- the plan
def _tile_shape(lay, p: torch.Tensor) -> tuple[int, int, int] | None:
    """``(nblk, a, s)`` of a sphere-like kernel or dense product block (see the module doc),
    or None: left to the torch path.  The layouts of the fused CPU kernels, on any device."""
    return bt.row_blocks(lay, p) if p.dtype in DTYPES else None


@dataclass
class _Launch:
    kind: str  # "short" or "long"
    dtype: torch.dtype
    tile0: int
    ntiles: int
    ba: int
    bc: int = 1


@dataclass
class _DevicePlan:
    device: torch.device
    items: list = field(default_factory=list)  # (group, NativeMember)
    tiles: torch.Tensor | None = None  # (T, 3) int64 on the device
    launches: list = field(default_factory=list)
    offsets: list = field(default_factory=list)  # byte offset of each item in its parameter
    chunks: dict = field(default_factory=dict)  # check work lists by gradient sizes
    stiefel_items: list = field(default_factory=list)  # stiefel_stack.StiefelItem
    stiefel: list = field(default_factory=list)  # stiefel_stack.StiefelStack per dtype


@dataclass
class TritonPlan:
    """Per device: items, tiles and launches; per group: Euclidean parameters and the torch
    fallback plan (``batched.GroupPlan``) of the kernels the backend does not handle."""

    devices: dict
    euclid: list  # per group: list of params
    fallback: list  # per group: GroupPlan
    safety: list  # per group: GroupPlan of chunks and items, for the overflow test


def _build_plan(opt, sig) -> TritonPlan:
    devices: dict = {}
    euclid, fallback = [], []
    new_bufs: dict = {}
    for group, has in zip(opt.param_groups, sig, strict=True):
        eu, rest = [], [False] * len(group["params"])
        for i, p in enumerate(group["params"]):
            if not has[i][0]:
                continue
            kind, m = bt.classify(p)
            if kind == "euclid":
                eu.append(p)
                continue
            mems = _kernel_items(group, i, p, m) if kind == "kernel" else None
            if mems is None:
                rest[i] = True
                continue
            dp = devices.setdefault(p.device, _DevicePlan(p.device))
            for nm in mems:
                stf = isinstance(nm, ss.StiefelItem)
                if group["momentum"]:
                    (ss.attach_momentum if stf else bt.attach_native_momentum)(
                        nm, opt.state, new_bufs)
                (dp.stiefel_items if stf else dp.items).append((group, nm))
        gp = bt.build_group_plan(group, opt.state, chunk_numel=opt.chunk_numel,
                                 max_step=group["max_step"], has_grad=rest, native=False)
        for ch in gp.chunks:
            if ch.layout.soa:
                bt.attach_soa(ch)
            if group["momentum"]:
                bt.attach_momentum(ch, opt.state, new_bufs)
        euclid.append(eu)
        fallback.append(gp)
    bt.attach_scratch([ch for gp in fallback for ch in gp.chunks])
    for dp in devices.values():
        _tile(dp)
        dp.stiefel = ss.build([it for _, it in dp.stiefel_items], dp.device)
    safety = []
    for group, gp in zip(opt.param_groups, fallback, strict=True):
        mine = [nm for dp in devices.values() for g, nm in dp.items + dp.stiefel_items
                if g is group]
        safety.append(bt.GroupPlan([], gp.chunks, [], mine))
    return TritonPlan(devices, euclid, fallback, safety)


def _kernel_items(group, i, p, m) -> list | None:
    """The items of a kernel (one per block: sphere-like ``NativeMember`` or
    ``StiefelItem``), or None when one block is not handled."""
    blocks = m.blocks(p.shape) if isinstance(m, KernelProduct) else [(m, None)]
    out = []
    for b, (bm, bidx) in enumerate(blocks):
        bidx = None if bidx is None or len(blocks) == 1 else bidx
        shape = tuple(p.shape) if bidx is None else KernelProduct._sub(p.shape, bidx)
        lay = bt._Layout(bt._kind(bm), bm, shape)
        consts = rule_constants(group["step_rule"], lay.m, lay.shape, rho=group["rho"],
                                max_step=group["max_step"])
        if lay.kind == "stiefel":
            it = ss.item(group, i, p, lay, consts, b, bidx)
            if it is None:
                return None
            out.append(it)
            continue
        ts = _tile_shape(lay, p.detach() if bidx is None else p.detach()[bidx])
        if ts is None:
            return None
        out.append(bt.NativeMember(p, i, lay, consts, *ts, block=b, bidx=bidx))
    return out


def _tile(dp: _DevicePlan) -> None:
    """Tile table and launches of a device: one launch per (dtype, tile class)."""
    by_key: dict = {}
    for idx, (_, nm) in enumerate(dp.items):
        ncomp = nm.nblk * nm.s
        if nm.a <= SHORT_MAX:
            ba = max(2, 1 << (nm.a - 1).bit_length())
            key = (nm.param.dtype, "short", ba)
            bc = max(1, min(256, SHORT_TILE // ba))
        else:
            key, bc = (nm.param.dtype, "long", LONG_BLOCK), 1
        rows = by_key.setdefault(key, [])
        rows.extend((idx, c, min(bc, ncomp - c)) for c in range(0, ncomp, bc))
    tiles = []
    for (dtype, kind, ba), rows in by_key.items():
        bc = max(1, min(256, SHORT_TILE // ba)) if kind == "short" else 1
        dp.launches.append(_Launch(kind, dtype, len(tiles), len(rows), ba, bc))
        tiles.extend(rows)
    dp.tiles = torch.tensor(tiles, dtype=torch.int64).reshape(-1, 3).to(dp.device)
    dp.offsets = [nm.sub(nm.param.detach()).data_ptr() - nm.param.data_ptr()
                  for _, nm in dp.items]


def _get_plan(opt) -> TritonPlan:
    sig = opt._signature()
    if not isinstance(opt._plan, TritonPlan) or sig != opt._plan_sig:
        opt._plan = _build_plan(opt, sig)
        opt._plan_sig = sig
        opt._plan_native = "triton"  # the torch path rebuilds its own plan
    return opt._plan


# ------------------------------------------------------------------------------------- step
def _item_tables(opt, dp: _DevicePlan, keep: list):
    """Item tables of this step (gradient addresses, lr and first-step flags change).  No
    ATen op per item: addresses are the parameters' and gradients' plus the blocks' byte
    offsets, computed with the plan."""
    ints, floats = [], []
    for (group, nm), off in zip(dp.items, dp.offsets, strict=True):
        p = nm.param
        g = p.grad
        if g.is_sparse:
            raise RuntimeError("ConvergentRSGD does not support sparse gradients")
        if g.stride() == p.stride() and g.dtype == p.dtype:
            ga = g.data_ptr() + off
        else:  # the kernel reads the gradient with the parameter's strides
            gc = torch.empty_like(nm.sub(p.detach())).copy_(nm.sub(g))
            keep.append(gc)
            ga = gc.data_ptr()
        mult = opt._multiplier(p)
        lr = float(group["lr"]) if mult is None else float(group["lr"] * mult)
        c = nm.consts
        hasb = nm.buf is not None
        flags = _item_flags.encode(center=bool(nm.layout.center), fresh=nm.fresh,
                                   capped=c.code == KERNEL_CAPPED, buffer=hasb,
                                   nesterov=bool(group["nesterov"]))
        xa = p.data_ptr() + off
        ints.append([xa, ga, nm.buf.data_ptr() if hasb else xa, nm.a, nm.s, flags, 0, 0])
        floats.append([lr, float(nm.layout.r), c.kernel_cap,
                       float(group["momentum"]), float(group["dampening"]), 0.0, 0.0, 0.0])
    itab = torch.tensor(ints, dtype=torch.int64).to(dp.device, non_blocking=True)
    ftab = torch.tensor(floats, dtype=torch.float64).to(dp.device, non_blocking=True)
    return itab, ftab


def _dense_flat(t: torch.Tensor) -> bool:
    return bt._dense(t) and t.dtype in DTYPES


def _check(opt, plan: TritonPlan, grads_by_dev: dict) -> float:
    """An upper bound of the 2-norm of every gradient (NaN or Inf when an entry is not
    finite): one reduction launch per (device, dtype) and one synchronisation per device;
    gradients the kernel cannot read (non-dense, other dtypes) by torch ops."""
    from .rsgd import _nanmax, _norm_bound

    others = []
    bound = 0.0
    for dev, grads in grads_by_dev.items():
        dp = plan.devices.get(dev)
        if dp is None and (dev.type == "cuda" or (dev.type == "cpu" and interpreting())):
            dp = plan.devices[dev] = _DevicePlan(dev)  # no items: the check only
        tri = [g for g in grads if g.numel() and _dense_flat(g)] if dp is not None else []
        ids = {id(t) for t in tri}
        others.extend(g for g in grads if id(g) not in ids)
        if not tri:
            continue
        by_dtype: dict = {}
        for g in tri:
            by_dtype.setdefault(g.dtype, []).append(g)
        key = tuple((dt, tuple(g.numel() for g in gs)) for dt, gs in by_dtype.items())
        work = dp.chunks.get(key)
        if work is None:  # static while the plan is: built once
            step_ = CHECK_BLOCK * CHECK_NB
            lists, total = [], 0
            for _, gs in by_dtype.items():
                rows = [[i, s] for i, g in enumerate(gs) for s in range(0, g.numel(), step_)]
                lists.append((torch.tensor(rows, dtype=torch.int64).to(dev), total))
                total += len(rows)
            # zeros: a counting-only run (LaunchCounter(execute=False)) reads a finite bound
            out = torch.zeros(total, dtype=torch.float64, device=dev)
            work = dp.chunks[key] = (lists, out)
        lists, out = work
        for (dtype, gs), (chunks, out0) in zip(by_dtype.items(), lists, strict=True):
            # dense: the entries are the numel memory slots from the lowest-strided one
            ttab = torch.tensor([[g.data_ptr(), g.numel()] for g in gs],
                                dtype=torch.int64).to(dev, non_blocking=True)
            _launch(_TRITON["check"], (chunks.shape[0],), chunks, ttab, out, out0,
                    math.inf, IS64=dtype == torch.float64, BLOCK=CHECK_BLOCK, NB=CHECK_NB)
        gmax = float(out.max())
        bound = _nanmax(bound, gmax * math.sqrt(max(g.numel() for g in tri)))
    if others:
        bound = _nanmax(bound, _norm_bound(others))
    return bound


def step(opt) -> bool:
    """One step of ``opt`` (a :class:`~kernelgeo.optim.ConvergentRSGD`) with this backend:
    True when taken, False when skipped (``nonfinite="skip"``) after a non-finite gradient."""
    if _import() is None:
        raise RuntimeError(f"backend='triton' is unavailable: {_REASON}")
    plan = _get_plan(opt)
    grads_by_dev: dict = {}
    for group, eu, gp in zip(opt.param_groups, plan.euclid, plan.fallback, strict=True):
        ps = group["params"]
        for p in eu:
            if p.grad.is_sparse:
                raise RuntimeError("ConvergentRSGD does not support sparse gradients")
            grads_by_dev.setdefault(p.device, []).append(p.grad)
        for ch in gp.chunks:
            for mem in ch.members:
                grads_by_dev.setdefault(mem.param.device, []).append(mem.param.grad)
        for i in gp.foreign:
            grads_by_dev.setdefault(ps[i].device, []).append(ps[i].grad)
    for dp in plan.devices.values():
        seen = set()
        for _, nm in dp.items + dp.stiefel_items:
            if id(nm.param) not in seen:  # the blocks of a product: their whole gradient
                seen.add(id(nm.param))
                grads_by_dev.setdefault(dp.device, []).append(nm.param.grad)
    if any(g.layout != torch.strided for gs in grads_by_dev.values() for g in gs):
        opt._check_sparse()
    for dev in grads_by_dev:
        check_device(dev)
    gnorm = _check(opt, plan, grads_by_dev)
    if not gnorm < math.inf:
        bad = opt._find_bad()
        if bad:
            return opt._nonfinite(bad)
    if not opt._fast_is_safe(plan.safety, gnorm):
        # some new value could overflow: the reference path computes every new value in
        # temporaries and writes only if all are finite
        done = opt._step_reference()
        opt._plan = None  # it wrote the state tensors (new buffers too): rebuild
        return done
    keep: list = []
    for dp in plan.devices.values():
        for st in dp.stiefel:
            ss.run(opt, st, _launch, _TRITON)
        if dp.stiefel_items:
            _publish(opt, dp.stiefel_items)
        if not dp.items:
            continue
        itab, ftab = _item_tables(opt, dp, keep)
        for ln in dp.launches:
            is64 = ln.dtype == torch.float64
            if ln.kind == "short":
                _launch(_TRITON["short"], (ln.ntiles,), dp.tiles, itab, ftab, ln.tile0,
                        BC=ln.bc, BA=ln.ba, IS64=is64,
                        num_warps=8 if ln.bc * ln.ba >= SHORT_TILE else 4)
            else:
                _launch(_TRITON["long"], (ln.ntiles,), dp.tiles, itab, ftab, ln.tile0,
                        BA=ln.ba, IS64=is64, num_warps=4)
        _publish(opt, dp.items)
        dp.keep = (itab, ftab, keep)  # alive until the kernels have read them
    for group, eu, gp in zip(opt.param_groups, plan.euclid, plan.fallback, strict=True):
        opt._euclid_foreach(group, eu)
        _fallback_step(opt, group, gp)
    return True


def _publish(opt, items) -> None:
    """After the launches that wrote ``items``: version counters, and new buffers into the
    state."""
    # raw writes bypass autograd's version counters: bump them like an in-place op
    touched = list({id(nm.param): nm.param for _, nm in items}.values())
    touched += [nm.buf for _, nm in items if nm.buf is not None]
    torch.autograd.graph.increment_version(touched)
    for _, nm in items:
        if nm.fresh and nm.buf is not None:
            momentum.set_kernel_block(opt.state, nm.param, nm.block, nm.buf,
                                      _nblocks(nm.param))
        nm.fresh = False


def _fallback_step(opt, group, gp) -> None:
    """The torch path for the kernels this backend does not handle (gradients checked)."""
    for ch in gp.chunks:
        opt._apply_chunk(group, opt._prepare_chunk(group, ch), None)
    for i in gp.foreign:
        opt._step_foreign(group, i)

