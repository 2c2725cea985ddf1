"""Triton kernels of :mod:`kernelgeo.optim.triton_backend` (imported only when Triton is)."""

import triton
import triton.language as tl

from . import _item_flags


@triton.jit
def _pointers(ib, IS64: tl.constexpr):
    # an item's first three entries: addresses of point, gradient and momentum buffer
    if IS64:
        pt = tl.pointer_type(tl.float64)
    else:
        pt = tl.pointer_type(tl.float32)
    return tl.load(ib).to(pt), tl.load(ib + 1).to(pt), tl.load(ib + 2).to(pt)


@triton.jit
def _header(tiles, itab, ftab, t, IS64: tl.constexpr):
    it = tl.load(tiles + 3 * t)
    c0 = tl.load(tiles + 3 * t + 1)
    nc = tl.load(tiles + 3 * t + 2)
    ib = itab + 8 * it
    fb = ftab + 8 * it
    xp, gp, bp = _pointers(ib, IS64)
    a = tl.load(ib + 3)
    s = tl.load(ib + 4)
    flags = tl.load(ib + 5)
    lr = tl.load(fb)
    r = tl.load(fb + 1)
    cap = tl.load(fb + 2)
    mu = tl.load(fb + 3)
    damp = tl.load(fb + 4)
    return xp, gp, bp, c0, nc, a, s, flags, lr, r, cap, mu, damp

@triton.jit
def _step_size(rn, lr, cap, rule):
    # kernelgeo.optim.step_rules.step_sizes: g = lr / max(1, lr R / cap) (rule 1)
    return tl.where(rule, lr / tl.maximum(rn * (lr / cap), 1.0), lr)

_CENTER = tl.constexpr(_item_flags.CENTER)
_FRESH = tl.constexpr(_item_flags.FRESH)
_CAPPED = tl.constexpr(_item_flags.CAPPED)
_BUFFER = tl.constexpr(_item_flags.BUFFER)
_NESTEROV = tl.constexpr(_item_flags.NESTEROV)


@triton.jit
def _flags(flags):
    # an item's flags word (kernelgeo.optim._item_flags): centre, fresh buffer, capped rule,
    # has a buffer, Nesterov
    return ((flags & _CENTER) != 0, (flags & _FRESH) != 0, (flags & _CAPPED) != 0,
            (flags & _BUFFER) != 0, (flags & _NESTEROV) != 0)

@triton.jit
def sphere_short(tiles, itab, ftab, tile0, BC: tl.constexpr, BA: tl.constexpr,
                 IS64: tl.constexpr):
    t = tile0 + tl.program_id(0)
    xp, gp, bp, c0, nc, a, s, flags, lr, r, cap, mu, damp = _header(tiles, itab, ftab,
                                                                     t, IS64)
    center, fresh, rule, hasb, nest = _flags(flags)
    ci = c0 + tl.arange(0, BC).to(tl.int64)
    cm = tl.arange(0, BC) < nc
    k = tl.arange(0, BA).to(tl.int64)
    km = k < a
    blk = ci // s
    off = (blk * a * s + (ci - blk * s))[:, None] + k[None, :] * s
    m = cm[:, None] & km[None, :]
    # double precision in registers: sums of squares of float32 data cannot overflow
    x = tl.load(xp + off, mask=m, other=0.0).to(tl.float64)
    g = tl.load(gp + off, mask=m, other=0.0).to(tl.float64)
    gm = tl.sum(g, 1) / a.to(g.dtype)  # a >= 1
    g = tl.where(m, g - tl.where(center, gm, 0.0)[:, None], 0.0)
    r2 = r * r
    u = g - (tl.sum(x * g, 1) / r2)[:, None] * x
    mb = m & hasb
    b = tl.load(bp + off, mask=mb, other=0.0).to(tl.float64)
    bn = tl.where(fresh, u, mu * b + (1.0 - damp) * u)
    d = tl.where(hasb, tl.where(nest, u + mu * bn, bn), u)
    rn = tl.sqrt(tl.sum(d * d, 1))
    stp = _step_size(rn, lr, cap, rule)
    y = x - stp[:, None] * d
    # padding rows (beyond nc) have y = 0: keep their (unstored) values finite
    c = r / tl.sqrt(tl.where(cm, tl.sum(y * y, 1), 1.0))
    xn = c[:, None] * y
    tl.store(xp + off, xn.to(xp.dtype.element_ty), mask=m)
    bt_ = bn - (tl.sum(xn * bn, 1) / r2)[:, None] * xn
    tl.store(bp + off, bt_.to(bp.dtype.element_ty), mask=mb)

@triton.jit
def sphere_long(tiles, itab, ftab, tile0, BA: tl.constexpr, IS64: tl.constexpr):
    t = tile0 + tl.program_id(0)
    xp, gp, bp, c0, nc, a, s, flags, lr, r, cap, mu, damp = _header(tiles, itab, ftab,
                                                                     t, IS64)
    center, fresh, rule, hasb, nest = _flags(flags)
    blk = c0 // s
    base = blk * a * s + (c0 - blk * s)
    k0 = tl.arange(0, BA).to(tl.int64)
    r2 = r * r
    zero = tl.zeros([BA], dtype=tl.float64)  # double sums (see sphere_short)
    # pass 1: <x, G>, sum x, sum G (centring)
    axg = zero
    ax = zero
    ag = zero
    for st in range(0, a, BA):
        k = st + k0
        km = k < a
        x = tl.load(xp + base + k * s, mask=km, other=0.0).to(tl.float64)
        g = tl.load(gp + base + k * s, mask=km, other=0.0).to(tl.float64)
        axg += x * g
        ax += x
        ag += g
    mg = tl.where(center, tl.sum(ag, 0) / a.to(lr.dtype), 0.0)
    cu = (tl.sum(axg, 0) - mg * tl.sum(ax, 0)) / r2
    # pass 2: momentum written (the gradients were checked), |d|^2, <d, B>, <x, B>
    add = zero
    adb = zero
    axb = zero
    for st in range(0, a, BA):
        k = st + k0
        km = k < a
        x = tl.load(xp + base + k * s, mask=km, other=0.0).to(tl.float64)
        g = tl.load(gp + base + k * s, mask=km, other=0.0).to(tl.float64)
        u = tl.where(km, g - mg - cu * x, 0.0)
        mb = km & hasb
        b = tl.load(bp + base + k * s, mask=mb, other=0.0).to(tl.float64)
        bn = tl.where(fresh, u, mu * b + (1.0 - damp) * u)
        tl.store(bp + base + k * s, bn.to(bp.dtype.element_ty), mask=mb)
        d = tl.where(hasb, tl.where(nest, u + mu * bn, bn), u)
        add += d * d
        adb += d * bn
        axb += x * bn
    rn = tl.sqrt(tl.sum(add, 0))
    stp = _step_size(rn, lr, cap, rule)
    # pass 3: |y|^2, y = x - g d
    ayy = zero
    for st in range(0, a, BA):
        k = st + k0
        km = k < a
        x = tl.load(xp + base + k * s, mask=km, other=0.0).to(tl.float64)
        g = tl.load(gp + base + k * s, mask=km, other=0.0).to(tl.float64)
        u = tl.where(km, g - mg - cu * x, 0.0)
        bn = tl.load(bp + base + k * s, mask=km & hasb, other=0.0).to(tl.float64)
        d = tl.where(hasb, tl.where(nest, u + mu * bn, bn), u)
        y = x - stp * d
        ayy += y * y
    c = r / tl.sqrt(tl.sum(ayy, 0))
    # <x', B> = c (<x, B> - g <d, B>): B' = B - <x', B>/r^2 x'
    cb = c * (tl.sum(axb, 0) - stp * tl.sum(adb, 0)) / r2
    # pass 4: x' and the transported momentum
    for st in range(0, a, BA):
        k = st + k0
        km = k < a
        x = tl.load(xp + base + k * s, mask=km, other=0.0).to(tl.float64)
        g = tl.load(gp + base + k * s, mask=km, other=0.0).to(tl.float64)
        u = tl.where(km, g - mg - cu * x, 0.0)
        mb = km & hasb
        bn = tl.load(bp + base + k * s, mask=mb, other=0.0).to(tl.float64)
        d = tl.where(hasb, tl.where(nest, u + mu * bn, bn), u)
        xn = c * (x - stp * d)
        tl.store(xp + base + k * s, xn.to(xp.dtype.element_ty), mask=km)
        tl.store(bp + base + k * s, (bn - cb * xn).to(bp.dtype.element_ty), mask=mb)

@triton.jit
def check_finite(chunks, ttab, out, out0, big, IS64: tl.constexpr, BLOCK: tl.constexpr,
                 NB: tl.constexpr):
    # out[out0 + pid] = largest |entry| of this program's range, +inf for a NaN (Inf stays)
    pid = tl.program_id(0)
    ti = tl.load(chunks + 2 * pid)
    start = tl.load(chunks + 2 * pid + 1)
    if IS64:
        pt = tl.pointer_type(tl.float64)
    else:
        pt = tl.pointer_type(tl.float32)
    p = tl.load(ttab + 2 * ti).to(pt)
    n = tl.load(ttab + 2 * ti + 1)
    off0 = tl.arange(0, BLOCK).to(tl.int64)
    m = tl.zeros([BLOCK], dtype=tl.float64)
    for i in range(NB):
        off = start + i * BLOCK + off0
        v = tl.load(p + off, mask=off < n, other=0.0).to(tl.float64)
        m = tl.maximum(m, tl.where(v == v, tl.abs(v), big))
    tl.store(out + out0 + pid, tl.max(m, 0))


# ------------------------------------------------------------------ stacked Stiefel blocks
# (kernelgeo.optim.stiefel_stack).  One program per tile of TILE consecutive entries of one
# stacked block (its row layout X^T, (p, nmax), zero-padded from n to nmax columns).
# tiles: (gb, first entry in the block, entries); blocks: (item, component, n, nmax,
# offset in the stacks, first tile, tiles); itab: per item the addresses and row-layout
# strides (component, row, column) of the point, gradient and momentum buffer; ftab: per
# block lr, cap, r, momentum, dampening and a flags word (rule, fresh, buffer, Nesterov).
@triton.jit
def _stiefel_tile(tiles, blocks, t, TILE: tl.constexpr):
    gb = tl.load(tiles + 3 * t)
    e0 = tl.load(tiles + 3 * t + 1)
    cnt = tl.load(tiles + 3 * t + 2)
    bb = blocks + 8 * gb
    item = tl.load(bb)
    comp = tl.load(bb + 1)
    n = tl.load(bb + 2)
    nmax = tl.load(bb + 3)
    soff = tl.load(bb + 4)
    t0 = tl.load(bb + 5)
    nt = tl.load(bb + 6)
    ar = tl.arange(0, TILE)
    e = e0 + ar.to(tl.int64)
    m = ar < cnt
    i = e // nmax
    j = e - i * nmax
    return gb, item, comp, n, soff, t0, nt, e, m, i, j


@triton.jit
def _stiefel_item(itab, item, IS64: tl.constexpr):
    ib = itab + 16 * item
    xp, gp, bp = _pointers(ib, IS64)
    return xp, gp, bp, ib


@triton.jit
def _stiefel_hyper(ftab, gb):
    fb = ftab + 8 * gb
    center, fresh, rule, hasb, nest = _flags(tl.load(fb + 5).to(tl.int32))
    return (tl.load(fb), tl.load(fb + 1), tl.load(fb + 2), tl.load(fb + 3), tl.load(fb + 4),
            rule, fresh, hasb, nest)


@triton.jit
def stiefel_gather(tiles, itab, blocks, X, G, B, IS64: tl.constexpr, TILE: tl.constexpr):
    # stacks <- point, gradient, buffer (row layout); the padding columns j >= n get zeros
    gb, item, comp, n, soff, t0, nt, e, m, i, j = _stiefel_tile(tiles, blocks,
                                                                tl.program_id(0), TILE)
    xp, gp, bp, ib = _stiefel_item(itab, item, IS64)
    hasb = tl.load(ib + 12) != 0
    v = m & (j < n)
    xo = comp * tl.load(ib + 3) + i * tl.load(ib + 4) + j * tl.load(ib + 5)
    go = comp * tl.load(ib + 6) + i * tl.load(ib + 7) + j * tl.load(ib + 8)
    bo = comp * tl.load(ib + 9) + i * tl.load(ib + 10) + j * tl.load(ib + 11)
    tl.store(X + soff + e, tl.load(xp + xo, mask=v, other=0.0), mask=m)
    tl.store(G + soff + e, tl.load(gp + go, mask=v, other=0.0), mask=m)
    tl.store(B + soff + e, tl.load(bp + bo, mask=v & hasb, other=0.0), mask=m)


@triton.jit
def stiefel_direction(tiles, blocks, ftab, U, B, partial, TILE: tl.constexpr):
    # B <- u (fresh) or mu B + (1 - dampening) u; partial[t] = this tile's sum of d^2
    t = tl.program_id(0)
    gb, item, comp, n, soff, t0, nt, e, m, i, j = _stiefel_tile(tiles, blocks, t, TILE)
    lr, cap, r, mu, damp, rule, fresh, hasb, nest = _stiefel_hyper(ftab, gb)
    u = tl.load(U + soff + e, mask=m, other=0.0).to(tl.float64)
    mb = m & hasb
    b = tl.load(B + soff + e, mask=mb, other=0.0).to(tl.float64)
    bn = tl.where(fresh, u, mu * b + (1.0 - damp) * u)
    tl.store(B + soff + e, bn.to(B.dtype.element_ty), mask=mb)
    d = tl.where(hasb, tl.where(nest, u + mu * bn, bn), u)
    tl.store(partial + t, tl.sum(d * d, 0))


@triton.jit
def stiefel_displace(tiles, blocks, ftab, X, U, B, partial, flags, TILE: tl.constexpr,
                     PB: tl.constexpr):
    # U <- M = X - g d, g the step rule's size from |d| (the block's partial sums); flags[gb]
    # = the step is longer than 3r (the Cholesky-QR retraction then needs checking)
    t = tl.program_id(0)
    gb, item, comp, n, soff, t0, nt, e, m, i, j = _stiefel_tile(tiles, blocks, t, TILE)
    lr, cap, r, mu, damp, rule, fresh, hasb, nest = _stiefel_hyper(ftab, gb)
    acc = tl.zeros([PB], dtype=tl.float64)
    for s in range(0, nt, PB):
        k = s + tl.arange(0, PB)
        acc += tl.load(partial + t0 + k, mask=k < nt, other=0.0)
    rn = tl.sqrt(tl.sum(acc, 0))
    stp = _step_size(rn, lr, cap, rule)
    x = tl.load(X + soff + e, mask=m, other=0.0).to(tl.float64)
    u = tl.load(U + soff + e, mask=m, other=0.0).to(tl.float64)
    bn = tl.load(B + soff + e, mask=m & hasb, other=0.0).to(tl.float64)
    d = tl.where(hasb, tl.where(nest, u + mu * bn, bn), u)
    tl.store(U + soff + e, (x - stp * d).to(U.dtype.element_ty), mask=m)
    tl.store(flags + gb, (stp * rn > 3.0 * r).to(tl.int32), mask=t == t0)


@triton.jit
def stiefel_scatter(tiles, itab, blocks, ftab, Q, B, IS64: tl.constexpr,
                    TILE: tl.constexpr):
    # point <- r Q (Q: the unit-radius retraction), buffer <- B; padding columns not written
    gb, item, comp, n, soff, t0, nt, e, m, i, j = _stiefel_tile(tiles, blocks,
                                                                tl.program_id(0), TILE)
    xp, gp, bp, ib = _stiefel_item(itab, item, IS64)
    hasb = tl.load(ib + 12) != 0
    r = tl.load(ftab + 8 * gb + 2)
    v = m & (j < n)
    xo = comp * tl.load(ib + 3) + i * tl.load(ib + 4) + j * tl.load(ib + 5)
    bo = comp * tl.load(ib + 9) + i * tl.load(ib + 10) + j * tl.load(ib + 11)
    q = tl.load(Q + soff + e, mask=v, other=0.0).to(tl.float64)
    tl.store(xp + xo, (r * q).to(xp.dtype.element_ty), mask=v)
    tl.store(bp + bo, tl.load(B + soff + e, mask=v & hasb, other=0.0), mask=v & hasb)
