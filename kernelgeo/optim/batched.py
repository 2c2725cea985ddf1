r"""Batched parameter updates of :class:`~kernelgeo.optim.ConvergentRSGD` (the fast path).

The optimizer's parameters are split once (and again only when the set of parameters with a
gradient changes) into *chunks*:

* **Euclidean** parameters of a group: one list, updated with ``torch._foreach_*`` ops exactly
  like ``torch.optim.SGD(foreach=True)``;
* **kernel** parameters: every block of every kernel (one block for a plain manifold, several for
  a product) is viewed in a *chunk layout* in which each component is one row (spheres,
  oblique) or one matrix (Stiefel).  Blocks with the same layout key are concatenated into one
  chunk (``torch.cat`` of the gradients, one batched update, one ``torch._foreach_copy_`` back)
  as long as the chunk stays below ``chunk_numel`` elements; a large block is its own chunk
  (no copy: the update works in place on a view of the parameter) and a very large one is
  split into row ranges so that the tensors of one chunk stay in the CPU caches while the
  ~8 elementwise passes of the update run over it.

Momentum buffers are kept in the optimizer state **in the parameter's own shape**, one per
block (``state["momentum_blocks"]``); for multi-block chunks they are views into one flat
storage of the chunk, so the batched update needs no copy and ``state_dict()`` stays the usual
per-parameter mapping.  After ``load_state_dict`` the plan is rebuilt and the loaded buffers are
copied into fresh chunk storage.

Layouts of the specialised updates (their maths, and where the same update is implemented in
C and Triton: :mod:`kernelgeo.optim.geometries`; the kind of a kernel comes from its
manifold's declared :attr:`~kernelgeo.manifolds.KernelManifold.batched_layout`):

sphere rows (:class:`~kernelgeo.manifolds.Sphere`, centred sphere, oblique)
    :math:`u = G - \frac{\langle x,G\rangle}{r^2}x` (gradients centred first on the centred
    sphere), exact retraction :math:`x' = r\,y/\|y\|` with :math:`y = x - g\,d`, transport by
    projection in closed form, :math:`B' = B + \frac{c\,g\,\langle d, B\rangle}{r^2}\,x'`
    with :math:`c = r/\|y\|` (uses :math:`\langle x, B\rangle = 0`).
oblique columns (structure of arrays)
    A column has only :math:`a = k_h` entries (``(a, b) = _slice_matrix(shape)``), and eager
    CPU ops that reduce over, or broadcast along, such a short inner dimension run 10-30x
    slower than plain elementwise ops.  These chunks therefore copy the kernels (transposing)
    into a workspace ``(a*b, N)`` (``N = out*in`` summed over the chunk's kernels) whose view
    ``(a, b*N)`` has entry :math:`k` of every column in row :math:`k`: a column reduction is
    the sum of :math:`a` contiguous rows, and a per-column scalar ``(1, b*N)`` broadcasts over
    the outer dimension.  Column :math:`(o, i, j)` of a kernel sits at position
    :math:`j N + \mathrm{off} + o\cdot\mathrm{in} + i`.  The momentum lives in the same
    layout in the chunk (the buffer the update works on); the per-parameter state tensors
    (block shape) are refreshed from it after every step, so ``state``/``state_dict()`` are
    exact, and the plan (rebuilt by ``load_state_dict`` and re-projection) copies them back
    in.  Writing into ``state[p]["momentum_blocks"]`` in place between steps is therefore not
    seen by these chunks; replace the state with ``load_state_dict``.
Stiefel, QR retraction
    in the row layout :math:`X^\top` (``(G, p, n)``, a view of the kernel):
    :math:`u = G - X\,\mathrm{sym}(X^\top G)/r^2` by one ``baddbmm``, and the QR retraction
    computed as Cholesky-QR: :math:`M = X - g\,d`, :math:`M^\top M = r^2 LL^\top`,
    :math:`\mathrm{qf}(M) = M L^{-\top}/r`, which equals the sign-corrected Householder ``qf``
    of :mod:`kernelgeo.manifolds.stiefel` (the Cholesky factor is the unique positive-diagonal
    R factor) and is well conditioned because :math:`M^\top M \succeq r^2 I` for a tangent step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..manifolds import Euclidean, KernelManifold, KernelProduct
from ..manifolds.oblique import _slice_matrix
from . import momentum as mom
from . import native as _native

# the updates of a chunk live with their geometry (kernelgeo.optim.geometries); their names
# stay importable from here
from .geometries._common import Hyper  # noqa: F401
from .geometries.generic import generic_apply, generic_prepare  # noqa: F401
from .geometries.sphere import sphere_apply, sphere_prepare  # noqa: F401
from .geometries.stiefel import stiefel_apply, stiefel_prepare  # noqa: F401
from .step_rules import RuleConstants, rule_constants

__all__ = ["Member", "Chunk", "NativeMember", "GroupPlan", "build_group_plan", "classify"]


# ----------------------------------------------------------------------------- classification
def _geoopt_euclidean(m) -> bool:
    from .._compat import geoopt

    return isinstance(m, (geoopt.Euclidean, Euclidean))


def classify(p: torch.Tensor):
    """``("euclid", None)``, ``("kernel", manifold)`` or ``("foreign", manifold)`` for ``p``.

    Decided from the tensor object at plan-building time (outside any compiled region), so a
    compiled step never has to ask ``isinstance(p, ManifoldParameter)``.
    """
    m = getattr(p, "manifold", None)
    if m is None or _geoopt_euclidean(m):
        return "euclid", None
    if isinstance(m, KernelManifold):
        return "kernel", m
    return "foreign", m


def _kind(m: KernelManifold) -> str:
    """The update a (non-product) kernel manifold gets, from its declared batched layout
    (:meth:`~kernelgeo.manifolds.KernelManifold.effective_batched_layout`): ``"sphere"``
    (rows, or uncentred columns), ``"stiefel"`` (frames with the QR retraction) or
    ``"generic"`` (the manifold's own batched primitives)."""
    layout = m.effective_batched_layout()
    if layout == "rows" or (layout == "columns" and not m.batched_centered):
        return "sphere"
    if layout == "matrices" and getattr(m, "retraction", None) == "qr":
        return "stiefel"
    return "generic"


class _Layout:
    """How a (sub-)kernel of a given shape is viewed in a chunk, and back.

    ``view(t)`` maps a tensor of the kernel's shape to the chunk layout (a view when ``t`` is
    contiguous); ``flat_view(flat)`` does the same for a 1-D storage holding several
    concatenated kernels; ``key`` says which kernels can share a chunk.
    """

    def __init__(self, kind: str, m: KernelManifold, shape: tuple[int, ...]):
        self.kind, self.m, self.shape = kind, m, shape
        self.r = m.radius_of(shape)
        self.transpose = False
        self.center = False
        self.soa = False
        if kind == "sphere":
            self.center = bool(m.batched_centered)
            if m.batched_layout == "columns":
                a, b = _slice_matrix(shape)
                # gathered/scattered by transposing copies into the SoA workspace (a, b*N)
                self.tail, self.dim, self.soa = (a * b,), 0, True
                self.soa_shape = (a, b)
            else:
                self.tail, self.dim = tuple(m.point_shape(shape)), -1
        elif kind == "stiefel":
            n, p = m.point_shape(shape)
            if m.per == "filter":
                self.tail = (p, n)  # kernel.reshape(G, p, n) is X^T: the row layout
            else:
                a, b = _slice_matrix(shape)
                self.tail = (a, b)
                self.transpose = a >= b  # canonical is (a, b) = (n, p): transpose to rows
            self.dim = None
        else:
            self.tail, self.dim = None, None
        self.key = (kind, type(m).__name__, self.tail, self.dim, self.center, self.r,
                    getattr(m, "retraction", None), self.soa)

    def view(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "generic":
            return self.m.to_batch(t)
        v = t.reshape((-1,) + self.tail)
        return v.transpose(-1, -2) if self.transpose else v

    def to_shape(self, b: torch.Tensor, shape) -> torch.Tensor:
        if self.kind == "generic":
            return self.m.from_batch(b, shape)
        return (b.transpose(-1, -2) if self.transpose else b).reshape(shape)


def _shares(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


# ------------------------------------------------------------------------------ plan objects
@dataclass
class Member:
    """One block of one kernel parameter inside a chunk."""

    param: torch.Tensor
    index: int  # position in the group's params
    block: int
    bidx: tuple | None  # slices of the block in the parameter (None: whole tensor)
    shape: tuple[int, ...]
    rows: tuple[int, int] | None = None  # row range of a split block (chunk layout)
    nrows: int = 0

    def sub(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.bidx is None else t[self.bidx]


@dataclass
class Chunk:
    """Kernel blocks with one layout, updated by one batched call."""

    kind: str
    layout: _Layout
    consts: RuleConstants
    members: list[Member]
    inplace: bool  # single member whose chunk view is a view of the parameter
    storage: torch.Tensor | None = None  # flat momentum storage of a multi-member chunk
    buf: torch.Tensor | None = None  # momentum buffer in chunk layout (view)
    fresh: torch.Tensor | bool | None = None  # rows whose momentum starts now
    fresh_members: list = field(default_factory=list)
    buf_param: torch.Tensor | None = None  # set when ``buf`` is a copy of the state tensor
    # structure-of-arrays chunks (oblique columns): workspaces (a*b, N) and copy lists
    ws_x: torch.Tensor | None = None
    ws_g: torch.Tensor | None = None
    soa_cols: list = field(default_factory=list)  # (member, first column, columns)
    soa_state: tuple = field(default_factory=lambda: ([], []))  # (state views, storage views)
    soa_x: tuple = field(default_factory=lambda: ([], []))  # (parameter views, ws views)
    scratch: torch.Tensor | None = None  # flat, shared by all chunks: products for dots
    x_views: list | None = None  # chunk-layout views of the members' parameters
    scatter_to: list | None = None  # parameter views that scatter copies into (None: reshape)


@dataclass
class NativeMember:
    """A kernel, or a dense block of a product kernel (a range of output channels), updated in
    place by the fused CPU kernel (:mod:`~kernelgeo.optim.native`): ``nblk`` blocks of ``a*s``
    entries, component ``(blk, j)`` = entries ``k*s + j``."""

    param: torch.Tensor
    index: int
    layout: _Layout
    consts: RuleConstants
    nblk: int
    a: int
    s: int
    block: int = 0  # index of the block in the parameter's manifold
    bidx: tuple | None = None  # slices of the block (None: the whole parameter)
    buf: torch.Tensor | None = None  # momentum, the block's shape and strides
    fresh: bool = False  # ``buf`` is new: published in the state after the first step

    def sub(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.bidx is None else t[self.bidx]

    @property
    def ncomp(self) -> int:
        return self.nblk * self.s


@dataclass
class GroupPlan:
    euclid: list[int]  # indices of Euclidean params in the group
    chunks: list[Chunk]
    foreign: list[int]
    native: list[NativeMember] = field(default_factory=list)


def _dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the entries fill ``numel`` consecutive memory slots."""
    expect = 1
    for st, sz in sorted((st, sz) for st, sz in zip(t.stride(), t.shape, strict=True)
                         if sz != 1):
        if st != expect:
            return False
        expect *= sz
    return True


def row_blocks(lay: _Layout, p: torch.Tensor) -> tuple[int, int, int] | None:
    """``(nblk, a, s)`` of a sphere-like kernel (or dense product block) in memory, or None.

    Memory layouts accepted (the gradient and buffer are given the parameter's strides):
    rows (spheres, oblique slices): every row is one contiguous segment, in any inner order
    (row sums do not depend on it: contiguous and channels-last kernels qualify); oblique
    columns: contiguous kernels (column = stride ``s`` in each ``a*s`` block) or kernels whose
    last two dimensions are swapped in memory (columns contiguous: rows of length ``a``).
    The layouts of the fused CPU kernels and of the Triton kernels, on any device.
    """
    if lay.kind != "sphere" or p.numel() == 0 or not _dense(p):
        return None
    if lay.soa:
        a, s = lay.soa_shape
        if p.is_contiguous():
            pass
        elif p.dim() == 4 and p.transpose(2, 3).is_contiguous():
            a, s = a, 1  # columns are contiguous: the rows kernel, nblk = out*in*k_w
        else:
            return None
    elif lay.dim == -1:
        a, s = math.prod(lay.tail), 1
        whole_rows = a == math.prod(p.shape[1:]) and (p.shape[0] == 1 or p.stride(0) == a)
        if not (p.is_contiguous() or whole_rows):
            return None
    else:
        return None
    if p.numel() % (a * s):
        return None
    return p.numel() // (a * s), a, s


def _native_shape(lay: _Layout, p: torch.Tensor) -> tuple[int, int, int] | None:
    """``(nblk, a, s)`` of a kernel for the fused CPU kernel (:func:`row_blocks` on a CPU
    tensor of a supported dtype, columns of stride at most 64), or None."""
    if p.device.type != "cpu" or p.dtype not in _native.DTYPES:
        return None
    shape = row_blocks(lay, p)
    return None if shape is None or shape[2] > 64 else shape


def build_group_plan(group: dict, state, *, chunk_numel: int, max_step: float,
                     has_grad: list[bool], native: bool = False) -> GroupPlan:
    """Split a param group's parameters with a gradient into Euclidean and chunked kernels
    (and dense sphere-like kernels or product blocks for the fused CPU kernel when ``native``)."""
    euclid, foreign, nat = [], [], []
    by_key: dict[tuple, list[tuple[_Layout, Member]]] = {}
    for i, p in enumerate(group["params"]):
        if not has_grad[i]:
            continue
        kind, m = classify(p)
        if kind == "euclid":
            euclid.append(i)
            continue
        if kind == "foreign":
            foreign.append(i)
            continue
        blocks = m.blocks(p.shape) if isinstance(m, KernelProduct) else [(m, None)]
        for b, (bm, bidx) in enumerate(blocks):
            bidx = None if bidx is None or len(blocks) == 1 else bidx
            shape = tuple(p.shape) if bidx is None else KernelProduct._sub(p.shape, bidx)
            lay = _Layout(_kind(bm), bm, shape)
            # blocks too, when dense (PO blocks: ranges of output channels of a dense kernel)
            ns = _native_shape(lay, p.detach() if bidx is None else p.detach()[bidx]) \
                if native else None
            if ns is not None:
                consts = rule_constants(group["step_rule"], lay.m, lay.shape,
                                        rho=group["rho"], max_step=max_step)
                nat.append(NativeMember(p, i, lay, consts, *ns, block=b, bidx=bidx))
                continue
            key = (lay.key, p.dtype, p.device)
            by_key.setdefault(key, []).append((lay, Member(p, i, b, bidx, shape)))
    chunks = []
    for (_, _, _), items in by_key.items():
        small: list[tuple[_Layout, Member]] = []
        for lay, mem in items:
            psub = mem.sub(mem.param.detach())
            v = lay.view(psub)
            mem.nrows = v.shape[0]
            is_view = _shares(v, psub) and lay.kind != "generic" or (
                lay.kind == "generic" and _shares(v, psub))
            numel = psub.numel()
            # SoA chunks copy in and out anyway: a kernel need not be viewable to join one
            if lay.kind == "generic" or (not is_view and not lay.soa) or \
                    numel * 2 >= chunk_numel:
                consts = rule_constants(group["step_rule"], lay.m, lay.shape,
                                        rho=group["rho"], max_step=max_step)
                per_row = max(1, numel // max(1, mem.nrows))
                step = max(1, chunk_numel // per_row)
                if lay.kind != "generic" and is_view and mem.nrows > step:
                    for s in range(0, mem.nrows, step):
                        sm = Member(mem.param, mem.index, mem.block, mem.bidx, mem.shape,
                                    rows=(s, min(mem.nrows, s + step)))
                        sm.nrows = sm.rows[1] - sm.rows[0]
                        chunks.append(Chunk(lay.kind, lay, consts, [sm], True))
                else:
                    chunks.append(Chunk(lay.kind, lay, consts, [mem], is_view))
            else:
                small.append((lay, mem))
        cur, size = [], 0
        for lay, mem in small + [(None, None)]:
            numel = 0 if mem is None else math.prod(mem.shape)
            if cur and (mem is None or size + numel > chunk_numel):
                lay0 = cur[0][0]
                consts = rule_constants(group["step_rule"], lay0.m, lay0.shape,
                                        rho=group["rho"], max_step=max_step)
                chunks.append(Chunk(lay0.kind, lay0, consts, [mm for _, mm in cur],
                                    len(cur) == 1))
                cur, size = [], 0
            if mem is not None:
                cur.append((lay, mem))
                size += numel
    return GroupPlan(euclid, chunks, foreign, nat)


def _rows(mem: Member, lay: _Layout, t: torch.Tensor, block: bool = False) -> torch.Tensor:
    """Chunk-layout rows of ``mem`` in ``t`` (a parameter, or a tensor in the block's shape)."""
    v = lay.view(t if block else mem.sub(t))
    return v if mem.rows is None else v[mem.rows[0]:mem.rows[1]]


def attach_soa(chunk: Chunk) -> None:
    """Allocate the SoA workspaces of an oblique-column chunk (see :func:`gather`)."""
    lay = chunk.layout
    p0 = chunk.members[0].param
    n, cols = 0, []
    for mem in chunk.members:
        cols.append((mem, n, mem.nrows))
        n += mem.nrows
    chunk.soa_cols = cols
    chunk.inplace = False
    kw = dict(dtype=p0.dtype, device=p0.device)
    chunk.ws_x = torch.empty(lay.tail[0], n, **kw)
    chunk.ws_g = torch.empty(lay.tail[0], n, **kw)
    # parameter-side views (any strides) paired with workspace views of the same shape
    chunk.soa_x = ([_soa_view(mem, lay, mem.param.detach()) for mem, _, _ in cols],
                   [_ws_view(mem, chunk.ws_x, off, nr) for mem, off, nr in cols])


def _soa_view(mem: Member, lay: _Layout, t: torch.Tensor, block: bool = False) -> torch.Tensor:
    """``t``'s (sub-)kernel of ``mem`` as ``(out, in, *k)`` (whole) or ``(a*b, rows)`` (split);
    a view of ``t`` whatever its strides, to pair with :func:`_ws_view`.  ``block``: ``t`` is
    already in the block's shape (momentum buffers)."""
    if mem.rows is None:
        return t if block else mem.sub(t)
    return _rows(mem, lay, t, block).t()


def _ws_view(mem: Member, ws: torch.Tensor, off: int, nr: int) -> torch.Tensor:
    """Columns ``off:off+nr`` of a ``(a*b, N)`` workspace in the shape of :func:`_soa_view`:
    entry ``(o, i, *k)`` of a kernel sits at row ``flat(k)``, column ``off + o*in + i``."""
    w = ws[:, off:off + nr]
    if mem.rows is not None:
        return w
    lead, k = mem.shape[:2], mem.shape[2:]
    nk = len(k)
    w = w.reshape(*(k or (1,)), *lead)
    if not k:
        return w[0]
    return w.permute(nk, nk + 1, *range(nk))


def attach_scratch(chunks: list[Chunk]) -> None:
    """One flat scratch tensor per dtype/device, as large as the largest row-sphere chunk,
    shared by those chunks (used and released within one call of :func:`_dot`)."""
    need: dict = {}
    for ch in chunks:
        if ch.kind == "sphere" and ch.layout.dim == -1:
            p = ch.members[0].param
            n = sum(m.nrows for m in ch.members) * math.prod(ch.layout.tail)
            key = (p.dtype, p.device)
            need[key] = max(need.get(key, 0), n)
    bufs = {k: torch.empty(n, dtype=k[0], device=k[1]) for k, n in need.items()}
    for ch in chunks:
        if ch.kind == "sphere" and ch.layout.dim == -1:
            p = ch.members[0].param
            ch.scratch = bufs[(p.dtype, p.device)]


def _attach_soa_momentum(chunk: Chunk, state, new_bufs: dict) -> None:
    """SoA momentum: the chunk's ``(a*b, N)`` storage is the buffer the update works on; the
    per-parameter state tensors (parameter shape) are refreshed from it after every step."""
    lay = chunk.layout
    a, b = lay.soa_shape
    storage = torch.zeros_like(chunk.ws_x)
    fresh_rows, fresh_members, pairs = [], [], ([], [])
    for mem, off, nr in chunk.soa_cols:
        buf = mom.kernel_block(state, mem.param, mem.block)
        if buf is None:
            key = (id(mem.param), mem.block)
            if key not in new_bufs:
                new_bufs[key] = torch.zeros(mem.shape, dtype=storage.dtype,
                                            device=storage.device)
            buf = new_bufs[key]
            fresh_members.append((mem, buf))
            fresh_rows.append(torch.ones(nr, dtype=torch.bool))
        else:
            if not buf.is_contiguous():  # row ranges of a split block need rows
                buf = buf.contiguous()
                mom.set_kernel_block(state, mem.param, mem.block, buf)
            _ws_view(mem, storage, off, nr).copy_(_soa_view(mem, lay, buf, True))
            fresh_rows.append(torch.zeros(nr, dtype=torch.bool))
        pairs[0].append(_soa_view(mem, lay, buf, True))
        pairs[1].append(_ws_view(mem, storage, off, nr))
    chunk.storage = storage
    chunk.buf = storage.view(a, -1)
    chunk.soa_state = pairs
    chunk.fresh_members = fresh_members
    if not fresh_members:
        chunk.fresh = None
    elif len(fresh_members) == len(chunk.members):
        chunk.fresh = True
    else:  # per column of the (a, b*N) view: column j*N + i belongs to slice i
        chunk.fresh = torch.cat(fresh_rows).repeat(b).view(1, -1).to(storage.device)


def attach_momentum(chunk: Chunk, state, new_bufs: dict) -> None:
    """Bind the chunk's momentum buffer to the per-parameter state (creating zeros if new).

    ``new_bufs`` maps ``(id(param), block)`` to buffers created during this plan build, so
    that the row ranges of a split block share one buffer.
    """
    mems = chunk.members
    lay = chunk.layout
    if lay.soa:
        _attach_soa_momentum(chunk, state, new_bufs)
        return
    if len(mems) == 1:
        mem = mems[0]
        buf = mom.kernel_block(state, mem.param, mem.block)
        key = (id(mem.param), mem.block)
        if buf is None:
            if key not in new_bufs:
                new_bufs[key] = torch.zeros(mem.shape, dtype=mem.param.dtype,
                                            device=mem.param.device)
            buf = new_bufs[key]
            chunk.fresh = True
            chunk.fresh_members = [(mem, buf)]
        else:
            if not buf.is_contiguous():
                buf = buf.contiguous()
                mom.set_kernel_block(state, mem.param, mem.block, buf)
            chunk.fresh = None
        v = lay.view(buf)
        chunk.buf_param = buf if not _shares(v, buf) else None
        chunk.buf = v if mem.rows is None else v[mem.rows[0]:mem.rows[1]]
        return
    total = sum(math.prod(m.shape) for m in mems)
    p0 = mems[0].param
    flat = torch.zeros(total, dtype=p0.dtype, device=p0.device)
    fresh_rows, fresh_members, off = [], [], 0
    for mem in mems:
        n = math.prod(mem.shape)
        dst = flat[off:off + n].view(mem.shape)
        off += n
        old = mom.kernel_block(state, mem.param, mem.block)
        if old is None:
            fresh_members.append((mem, dst))
            fresh_rows.append(torch.ones(mem.nrows, dtype=torch.bool))
        else:
            dst.copy_(old)
            mom.set_kernel_block(state, mem.param, mem.block, dst)
            fresh_rows.append(torch.zeros(mem.nrows, dtype=torch.bool))
    chunk.storage = flat
    chunk.buf = lay.view(flat)
    chunk.fresh_members = fresh_members
    if not fresh_members:
        chunk.fresh = None
    elif len(fresh_members) == len(mems):
        chunk.fresh = True
    else:
        chunk.fresh = torch.cat(fresh_rows).to(p0.device)


def attach_native_momentum(nm: NativeMember, state, new_bufs: dict) -> None:
    """The state tensor itself is the buffer the fused kernel updates (with the strides of the
    parameter's block, so that entries correspond one to one)."""
    x = nm.sub(nm.param.detach())
    buf = mom.kernel_block(state, nm.param, nm.block)
    if buf is None:
        key = (id(nm.param), nm.block)
        if key not in new_bufs:
            new_bufs[key] = torch.zeros_like(x)  # preserves the block's strides
        nm.buf, nm.fresh = new_bufs[key], True
    else:
        if buf.stride() != x.stride() or buf.dtype != x.dtype:
            buf = torch.empty_like(x).copy_(buf)
            mom.set_kernel_block(state, nm.param, nm.block, buf)
        nm.buf, nm.fresh = buf, False


def commit_fresh(chunk: Chunk, state, nblocks) -> None:
    """After the first successful step of new buffers, publish them in the state."""
    for mem, buf in chunk.fresh_members:
        mom.set_kernel_block(state, mem.param, mem.block, buf, nblocks(mem.param))
    chunk.fresh_members = []
    chunk.fresh = None


# --------------------------------------------------------------------------------- gathering
def gather(chunk: Chunk, grads_of) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Chunk-layout point ``X`` and gradient ``G``; whether ``X`` is the parameter itself."""
    lay = chunk.layout
    if lay.soa:  # structure of arrays: entry k of every column in row k (see module doc)
        gs = [_soa_view(mem, lay, grads_of(mem.param)) for mem, _, _ in chunk.soa_cols]
        gw = [_ws_view(mem, chunk.ws_g, off, nr) for mem, off, nr in chunk.soa_cols]
        torch._foreach_copy_(chunk.soa_x[1] + gw, chunk.soa_x[0] + gs)
        a = lay.soa_shape[0]
        return chunk.ws_x.view(a, -1), chunk.ws_g.view(a, -1), False
    if len(chunk.members) == 1:
        mem = chunk.members[0]
        x = lay.view(mem.sub(mem.param.detach()))
        g = lay.view(mem.sub(grads_of(mem.param)))
        if mem.rows is not None:
            x, g = x[mem.rows[0]:mem.rows[1]], g[mem.rows[0]:mem.rows[1]]
        return x, g, chunk.inplace and lay.kind != "generic"
    if chunk.x_views is None:  # valid while the plan is: it is rebuilt if a storage changes
        chunk.x_views = [lay.view(m.sub(m.param.detach())) for m in chunk.members]
    xs = chunk.x_views
    gs = [lay.view(m.sub(grads_of(m.param))) for m in chunk.members]
    if chunk.ws_x is None:  # reused every step: no allocation (nor page faults) per step
        chunk.ws_x, chunk.ws_g = torch.cat(xs), torch.cat(gs)
        return chunk.ws_x, chunk.ws_g, False
    return torch.cat(xs, out=chunk.ws_x), torch.cat(gs, out=chunk.ws_g), False


def scatter(chunk: Chunk, x: torch.Tensor) -> None:
    """Write the chunk's new points back into the parameters (unless updated in place)."""
    lay = chunk.layout
    if lay.soa:  # parameters, then the momentum in the parameters' shape
        torch._foreach_copy_(chunk.soa_x[0] + chunk.soa_state[0],
                             chunk.soa_x[1] + chunk.soa_state[1])
        return
    if chunk.scatter_to is None:  # (member index, parameter view or None), cached per plan
        chunk.scatter_to = []
        for mem in chunk.members:
            psub = mem.sub(mem.param.detach())
            v = lay.view(psub)
            chunk.scatter_to.append(v if _shares(v, psub) and mem.rows is None else None)
    parts = x.split([mem.nrows for mem in chunk.members])
    dst, src = [], []
    for mem, v, xs in zip(chunk.members, chunk.scatter_to, parts, strict=True):
        if v is not None:
            dst.append(v)
            src.append(xs)
        else:
            mem.sub(mem.param.detach()).copy_(lay.to_shape(xs, mem.shape))
    if dst:
        torch._foreach_copy_(dst, src)
