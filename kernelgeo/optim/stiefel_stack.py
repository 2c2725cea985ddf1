r"""Stacked Stiefel update of the Triton backend: a bounded number of launches per step.

The Stiefel blocks (QR retraction) of the optimizer's kernels are grouped into a few
*classes*: blocks with the same number of columns :math:`p`, radius :math:`r`, dtype and
device, whose column length :math:`n` is within a factor :data:`WASTE` of the class's
largest, :math:`n_{\max}`.  A class is one stack ``(B, p, n_max)`` of the blocks in the row
layout :math:`X^\top` (``B`` Stiefel components: one per group of filters or slice), zero
in the columns :math:`n \le j < n_{\max}`.  The update of
:mod:`~kernelgeo.optim.batched` (``stiefel_prepare``/``stiefel_apply``) then runs once per
class on the stacks, with the elementwise parts and the copies in a fixed number of Triton
launches over all classes of a (device, dtype):

1. ``stiefel_gather`` (one launch): the points, gradients and momentum buffers of every block
   into the stacks ``X, G, B`` (one table row per item: addresses and row-layout strides);
2. per class: :math:`A = X^\top G` (row layout: ``bmm(X, G^T)``), :math:`u = G -
   \mathrm{sym}(A) X/r^2` (``add``, ``baddbmm_``, in place of ``G``);
3. ``stiefel_direction`` (one launch): momentum :math:`B \leftarrow u` (first step) or
   :math:`\mu B + (1-\tau)u`, the direction :math:`d` (:math:`u`, :math:`B`, or
   :math:`u + \mu B` for Nesterov) and per-tile partial sums of :math:`\|d\|^2`;
   ``stiefel_displace`` (one launch): :math:`\|d\|` of each block from its partial sums (a
   fixed order: deterministic), the step size :math:`g = \lambda/\max(1, \lambda\|d\|/c)` of
   :mod:`~kernelgeo.optim.step_rules` (the same formula and per-component cap :math:`c` as
   the sphere kernels and the torch path), and :math:`M = X - g\,d` (in ``G``);
4. per class, the Cholesky-QR retraction: :math:`MM^\top = LL^\top` (``bmm``,
   ``cholesky_ex``), :math:`Q = L^{-1}M` (``solve_triangular`` into ``X``; :math:`QQ^\top =
   I`, the new point is :math:`rQ`), and the transport by projection :math:`B \leftarrow B -
   \mathrm{sym}(Q B^\top)\,Q` (``bmm``, ``add``, ``baddbmm``);
5. ``stiefel_scatter`` (one launch): :math:`rQ` and :math:`B` back into the parameters and
   the per-parameter state tensors.

Zero padding of :math:`n` is exact: every product above contracts or maps along :math:`n`
linearly, so padded columns of :math:`X, G, B` give zero columns of :math:`A`'s summands,
:math:`u`, :math:`d`, :math:`M`, :math:`Q` and the transported :math:`B`, and add nothing to
the norms, to :math:`MM^\top` or to :math:`QB^\top`.  Cholesky-QR equals the sign-corrected
Householder ``qf`` (the Cholesky factor is the unique positive-diagonal R factor); it is
well conditioned because :math:`MM^\top = r^2 I + g^2 dd^\top \succeq r^2 I` for a tangent
:math:`d`.  As in the torch path, when the optimizer's bounds do not show every step to be
at most :math:`3r` long, one synchronisation per step reads the blocks' flags (step longer
than :math:`3r`, or a failed factorisation) and the classes concerned take Householder QR.

Why the launch count is honest: every ATen op here acts on a whole class stack (one batched
cuBLAS/cuSOLVER call, not a loop over tensors; note that torch itself chooses a loop over
the batch of ``solve_triangular`` when a batch has at most 8 matrices of size at least 64,
i.e. for classes of at most 8 components), and every Triton launch covers all blocks of a
(device, dtype) through the item/tile tables.  No ``torch._foreach_*`` op is used, and the
per-class views of the stacks are made once per plan, not per step.  A gradient whose
strides differ from its parameter's is copied first (one op per such gradient, as in the
sphere path; autograd produces gradients with the parameter's strides).

Memory: the three stacks (plus ``(B, p, p)`` scratch per class) hold the padded size of all
Stiefel kernels of a (device, dtype) each; padding adds at most a factor :data:`WASTE` per
block (ResNet-50 with per-filter Stiefel kernels: 33.7M stack entries for 23.5M kernel entries).

The momentum stays in the optimizer state as one tensor per block in the block's shape (the
stacks are scratch space refilled every step): ``state``/``state_dict()`` are the usual
per-parameter mapping, and a loaded state is used as it is.  Weight decay on Stiefel blocks
is the projection of :math:`\lambda_{wd}X`, which is zero (:math:`P_X(X) = 0`): omitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..manifolds.stiefel import _qf
from . import _item_flags
from . import batched as bt
from .step_rules import KERNEL_CAPPED, RuleConstants

__all__ = ["StiefelItem", "StiefelStack", "item", "build", "run", "WASTE", "TILE"]

#: largest ratio n_max / n of a block in a class (padding multiplies its flops by at most this)
WASTE = 4
#: most entries of a stack per program of the elementwise kernels (fewer, the next power of
#: two of the largest block, when every block of a (device, dtype) is smaller: slices)
TILE = 2048
#: partial sums read per iteration when a block's norm is assembled
PART_BLOCK = 256
DTYPES = (torch.float32, torch.float64)


@dataclass
class StiefelItem:
    """A Stiefel block (QR retraction) of a kernel: ``ncomp`` components ``(p, n)`` in the
    row layout, a view of the parameter with strides ``xs`` (component, row, column)."""

    param: torch.Tensor
    index: int
    layout: bt._Layout
    consts: RuleConstants
    ncomp: int
    p: int
    n: int
    xs: tuple
    block: int = 0
    bidx: tuple | None = None
    buf: torch.Tensor | None = None  # momentum in the block's shape
    bs: tuple = (0, 0, 0)  # row-layout strides of ``buf``
    fresh: bool = False
    group: dict | None = None

    def sub(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.bidx is None else t[self.bidx]


def _row_strides(lay, t: torch.Tensor) -> tuple | None:
    """Strides of the row layout ``(G, p, n)`` of ``t`` when it is a view, else None."""
    v = lay.view(t)
    if not bt._shares(v, t):
        return None
    return tuple(v.stride())


def item(group, i, p, lay, consts, b, bidx) -> StiefelItem | None:
    """The stacked-update item of a block, or None (left to the torch path): a Stiefel
    block with the QR retraction, float32/float64, whose row layout is a view."""
    if lay.kind != "stiefel" or p.dtype not in DTYPES:
        return None
    x = p.detach() if bidx is None else p.detach()[bidx]
    if x.numel() == 0:
        return None
    xs = _row_strides(lay, x)
    if xs is None:
        return None
    g, n, pp = lay.m._np(lay.shape)
    return StiefelItem(p, i, lay, consts, g, pp, n, xs, block=b, bidx=bidx, group=group)


def attach_momentum(it: StiefelItem, state, new_bufs: dict) -> None:
    """The state tensor (block shape) is the buffer; its row layout must be a view."""
    bt.attach_native_momentum(it, state, new_bufs)
    bs = _row_strides(it.layout, it.buf)
    if bs is None:  # a loaded buffer with odd strides: a contiguous copy, kept in the state
        it.buf = it.buf.contiguous()
        if not it.fresh:
            state[it.param]["momentum_blocks"][it.block] = it.buf
        bs = _row_strides(it.layout, it.buf)
    it.bs = bs


@dataclass
class _Class:
    p: int
    r: float
    nmax: int
    blocks: list  # (item index, component)
    off: int = 0  # first entry in the flat stacks
    b0: int = 0  # first global block
    views: dict = field(default_factory=dict)


@dataclass
class StiefelStack:
    """The classes of one (device, dtype), their flat stacks and tables."""

    device: torch.device
    dtype: torch.dtype
    items: list
    classes: list
    X: torch.Tensor  # point, then the retraction's Q
    G: torch.Tensor  # gradient, then u, then M = X - g d
    B: torch.Tensor  # momentum
    tiles: torch.Tensor
    blocks: torch.Tensor
    partial: torch.Tensor
    flags: torch.Tensor
    info: torch.Tensor
    ntiles: int
    block_item: list  # item index of each global block
    tile: int  # entries per program
    ftab_key: tuple | None = None
    ftab: torch.Tensor | None = None
    offsets: list = field(default_factory=list)  # byte offset of each item's block
    keep: tuple = ()


def _classes(items: list) -> list[_Class]:
    by_key: dict = {}
    for k, it in enumerate(items):
        by_key.setdefault((it.p, float(it.layout.r)), []).append(k)
    out = []
    for (p, r), ks in by_key.items():
        ks.sort(key=lambda k: -items[k].n)
        cur = None
        for k in ks:
            n = items[k].n
            if cur is None or n * WASTE < cur.nmax:
                cur = _Class(p, r, n, [])
                out.append(cur)
            cur.blocks.extend((k, c) for c in range(items[k].ncomp))
    return out


def build(items: list, device: torch.device) -> list[StiefelStack]:
    """Stacks (one per dtype) of a device's Stiefel items; views made once here."""
    out = []
    for dtype in DTYPES:
        its = [it for it in items if it.param.dtype == dtype]
        if not its:
            continue
        classes = _classes(its)
        tile = min(TILE, max(16, 1 << (max(c.p * c.nmax for c in classes) - 1).bit_length()))
        tiles, blocks, block_item = [], [], []
        off = 0
        for c in classes:
            c.off, c.b0 = off, len(blocks)
            size = c.p * c.nmax
            for k, comp in c.blocks:
                t0 = len(tiles)
                tiles.extend((len(blocks), e, min(tile, size - e)) for e in range(0, size, tile))
                blocks.append((k, comp, its[k].n, c.nmax, off, t0, len(tiles) - t0, 0))
                block_item.append(k)
                off += size
        kw = dict(dtype=dtype, device=device)
        flat = [torch.zeros(off, **kw) for _ in range(3)]
        nb = len(blocks)
        st = StiefelStack(
            device, dtype, its, classes, *flat,
            tiles=torch.tensor(tiles, dtype=torch.int64).reshape(-1, 3).to(device),
            blocks=torch.tensor(blocks, dtype=torch.int64).reshape(-1, 8).to(device),
            partial=torch.zeros(len(tiles), dtype=torch.float64, device=device),
            flags=torch.zeros(nb, dtype=torch.int32, device=device),
            info=torch.zeros(nb, dtype=torch.int32, device=device),
            ntiles=len(tiles), block_item=block_item, tile=tile)
        for c in classes:
            nb_c = len(c.blocks)
            shp = (nb_c, c.p, c.nmax)
            v = {k: getattr(st, k)[c.off:c.off + nb_c * c.p * c.nmax].view(shp)
                 for k in "XGB"}
            v["GT"], v["BT"] = v["G"].mT, v["B"].mT
            for k in ("A", "S", "L"):
                v[k] = torch.zeros(nb_c, c.p, c.p, **kw)
            v["AT"] = v["A"].mT
            v["info"] = st.info[c.b0:c.b0 + nb_c]
            c.views = v
        st.offsets = [it.sub(it.param.detach()).data_ptr() - it.param.data_ptr()
                      for it in its]
        out.append(st)
    return out


def _tables(opt, st: StiefelStack, keep: list):
    """Item table of this step (gradient addresses change) and the per-block float table
    (rebuilt only when ``lr`` or a first-step flag changes)."""
    ints, fkey = [], []
    for it, off in zip(st.items, st.offsets, strict=True):
        p, g = it.param, it.param.grad
        if g.is_sparse:
            raise RuntimeError("ConvergentRSGD does not support sparse gradients")
        xa = p.data_ptr() + off
        if g.stride() == p.stride() and g.dtype == p.dtype:
            ga, gs = g.data_ptr() + off, it.xs
        else:  # read with strides of its own: a copy in a layout whose row view exists
            gc = it.sub(g).to(p.dtype).contiguous()
            keep.append(gc)
            ga, gs = gc.data_ptr(), tuple(it.layout.view(gc).stride())
        hasb = it.buf is not None
        ba = it.buf.data_ptr() if hasb else xa
        ints.append([xa, ga, ba, *it.xs, *gs, *(it.bs if hasb else it.xs), int(hasb),
                     0, 0, 0])
        mult = opt._multiplier(p)
        grp = it.group
        lr = float(grp["lr"]) if mult is None else float(grp["lr"] * mult)
        fkey.append((lr, it.fresh, hasb))
    itab = torch.tensor(ints, dtype=torch.int64).to(st.device, non_blocking=True)
    key = tuple(fkey)
    if key != st.ftab_key:
        rows = []
        for k in st.block_item:
            it = st.items[k]
            lr, fresh, hasb = fkey[k]
            c, grp = it.consts, it.group
            flags = _item_flags.encode(fresh=fresh, capped=c.code == KERNEL_CAPPED,
                                       buffer=hasb, nesterov=bool(grp["nesterov"]) and hasb)
            rows.append([lr, c.kernel_cap, float(it.layout.r),
                         float(grp["momentum"]), float(grp["dampening"]), float(flags), 0, 0])
        st.ftab = torch.tensor(rows, dtype=torch.float64).to(st.device)
        st.ftab_key = key
    return itab


def run(opt, st: StiefelStack, launch, kernels) -> None:
    """One step of the stack's items (gradients already checked finite, and the step known
    not to overflow by the optimizer's bounds)."""
    keep: list = []
    itab = _tables(opt, st, keep)
    is64 = st.dtype == torch.float64
    grid = (st.ntiles,)
    launch(kernels["st_gather"], grid, st.tiles, itab, st.blocks, st.X, st.G, st.B,
           IS64=is64, TILE=st.tile)
    for c in st.classes:  # u = G - sym(X^T G) X / r^2 in the row layout, in G
        v = c.views
        torch.bmm(v["X"], v["GT"], out=v["A"])
        torch.add(v["A"], v["AT"], out=v["S"])
        v["G"].baddbmm_(v["S"], v["X"], alpha=-0.5 / (c.r * c.r))
    launch(kernels["st_direction"], grid, st.tiles, st.blocks, st.ftab, st.G, st.B,
           st.partial, TILE=st.tile)
    launch(kernels["st_displace"], grid, st.tiles, st.blocks, st.ftab, st.X, st.G, st.B,
           st.partial, st.flags, TILE=st.tile, PB=PART_BLOCK)
    for c in st.classes:  # Q = L^{-1} M, M M^T = L L^T: the unit-radius QR factor, in X
        v = c.views
        torch.bmm(v["G"], v["GT"], out=v["A"])
        torch.linalg.cholesky_ex(v["A"], out=(v["L"], v["info"]))
        torch.linalg.solve_triangular(v["L"], v["G"], upper=False, out=v["X"])
    lrmax = max(float(it.group["lr"]) for it in st.items)
    long_ = [c for c in st.classes if not lrmax * opt._dbound <= 3.0 * c.r]
    if long_:
        # steps not known to be short: one synchronisation reads every block's flags
        bad = torch.add(st.flags, st.info).cpu().tolist()
        for c in long_:
            if any(bad[c.b0:c.b0 + len(c.blocks)]):
                v = c.views
                v["X"].copy_(_qf(v["G"].mT).mT)
    if any(it.buf is not None for it in st.items):
        for c in st.classes:  # B <- B - sym(Q B^T) Q (Q at unit radius)
            v = c.views
            torch.bmm(v["X"], v["BT"], out=v["A"])
            torch.add(v["A"], v["AT"], out=v["S"])
            v["B"].baddbmm_(v["S"], v["X"], alpha=-0.5)
    launch(kernels["st_scatter"], grid, st.tiles, itab, st.blocks, st.ftab, st.X, st.B,
           IS64=is64, TILE=st.tile)
    st.keep = (itab, keep)  # alive until the kernels have read them
