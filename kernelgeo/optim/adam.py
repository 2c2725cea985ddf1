r"""Riemannian Adam for kernel manifolds, batched over kernels of the same geometry and shape.

The update of Bécigneul & Ganea (2019, "Riemannian Adaptive Optimization Methods", ICLR) on a
product of manifolds :math:`\mathcal M = \mathcal M_1\times\cdots\times\mathcal M_K`: every
*component* :math:`k` (a sphere row, an oblique column, a Stiefel block; one entry of a
Euclidean tensor) gets its own adaptive scale, computed from the squared Riemannian norm of
its gradient.  At step :math:`t` with learning rate :math:`\alpha` and Euclidean gradient
:math:`G`:

.. math::

    u_k &= P_{x_k}(G_k + \lambda x_k) \qquad\text{(Riemannian gradient)}\\
    m_k &\leftarrow \beta_1 m_k + (1-\beta_1)\,u_k,\qquad
    v_k \leftarrow \beta_2 v_k + (1-\beta_2)\,\|u_k\|_{x_k}^2\\
    \hat v_k &= \max(\hat v_k, v_k)\ \text{(AMSGrad)},\quad \hat v_k = v_k\ \text{(Adam)}\\
    d_k &= \frac{m_k/(1-\beta_1^t)}{\sqrt{\hat v_k/(1-\beta_2^t)} + \epsilon},\qquad
    x_k' = R_{x_k}(-\alpha\, d_k),\qquad m_k \leftarrow \mathcal T_{x_k\to x_k'}(m_k)

with :math:`R` the manifold's retraction and :math:`\mathcal T` its vector transport
(projection onto :math:`T_{x'_k}`).  Because :math:`v_k` is one scalar per component, the
direction :math:`d_k` is a positive multiple of the tangent vector :math:`m_k`: it stays in
:math:`T_{x_k}\mathcal M_k`.  An elementwise second moment (torch's Adam applied to the
embedding coordinates) rescales the coordinates of :math:`m_k` unequally and leaves the
tangent space; the retraction then silently removes part of the step.

Batching: kernels (and blocks of product kernels) whose manifolds have the same
:meth:`~kernelgeo.manifolds.KernelManifold.batch_key` (geometry, component shape, radius,
retraction), dtype and device form one *class*; a step concatenates the canonical layouts
(``to_batch``) of the class's points, gradients and first moments and runs the batched
primitives (:meth:`~kernelgeo.manifolds.KernelManifold.batched_proju`, ``batched_inner``,
``batched_retr``, ``batched_transp``) once per class (classes whose manifold declares a
sphere layout, :attr:`~kernelgeo.manifolds.KernelManifold.batched_layout` ``"rows"`` or
``"columns"``, retract by one normalisation, :math:`r(x+d)/\|x+d\|`).  Plain
parameters (and kernelgeo/geoopt Euclidean manifold parameters) follow
:class:`torch.optim.Adam` (L2 weight decay, ``foreach`` ops), with its state layout.

A step is computed into new tensors first and written only when every new weight and moment
is finite: a step changes all parameters or none.
"""

from __future__ import annotations

import math

import torch

from ..manifolds import Euclidean, KernelManifold, KernelProduct
from . import batched as _bt
from .rsgd import NonFiniteGradientError

__all__ = ["RiemannianAdam"]


class _Entries(KernelManifold):
    """Euclidean blocks of product kernels: every entry is one component (plain Adam)."""

    name = "entries"
    min_rank = 1

    def to_batch(self, x):
        return x.reshape(-1, 1)

    def from_batch(self, b, shape):
        return b.reshape(shape)

    def _bproju(self, x, u, r):
        return u

    def _bretr(self, x, u, r):
        return x + u

    def _btransp(self, x, y, v, r):
        return v


_ENTRIES = _Entries()


def _blocks(p):
    """``[(manifold, index or None, block shape, components)]`` of a kernel parameter."""
    m = p.manifold
    if isinstance(m, KernelProduct):
        out = []
        for bm, idx in m.blocks(p.shape):
            shape = KernelProduct._sub(p.shape, idx)
            out.append((bm, idx, shape))
    else:
        out = [(m, None, tuple(p.shape))]
    res = []
    for bm, idx, shape in out:
        if isinstance(bm, Euclidean):
            bm = _ENTRIES
        res.append((bm, idx, shape, bm.num_components(shape)))
    return res


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate canonical layouts along the batch dim, keeping the memory order of the
    views: Stiefel frames ``(G, n, p)`` are transposed views of row-major ``(G, p, n)``
    kernels, and batched matrix products run 2x faster on them in that order (measured)."""
    if len(ts) == 1:
        return ts[0]
    t0 = ts[0]
    if t0.dim() >= 3 and not t0.is_contiguous() and t0.mT.is_contiguous():
        return torch.cat([t.mT for t in ts]).mT
    return torch.cat(ts)


class _Member:
    __slots__ = ("param", "index", "idx", "shape", "m", "off", "n")

    def __init__(self, param, index, idx, shape, m, off, n):
        self.param, self.index, self.idx, self.shape = param, index, idx, shape
        self.m, self.off, self.n = m, off, n  # component range [off, off + n) of exp_avg_sq

    def sub(self, t):
        return t if self.idx is None else t[self.idx]


class RiemannianAdam(torch.optim.Optimizer):
    r"""Adam / AMSGrad on products of kernel manifolds, one adaptive scale per component.

    Parameters
    ----------
    params : iterable
        Parameters, ``(name, parameter)`` pairs (``model.named_parameters()``: names appear
        in errors) or param-group dicts.  Kernels are :class:`geoopt.ManifoldParameter` on a
        :class:`~kernelgeo.manifolds.KernelManifold` (products included); plain tensors and
        Euclidean manifold parameters are updated as by :class:`torch.optim.Adam`; other
        geoopt manifolds get geoopt's per-parameter Riemannian Adam update (not batched).
    lr : float
        Learning rate :math:`\alpha` (default ``1e-3``); LR schedulers act on it as usual.
    betas : (float, float)
        :math:`(\beta_1, \beta_2)`, default ``(0.9, 0.999)``.
    eps : float
        :math:`\epsilon` added to :math:`\sqrt{\hat v}` (default ``1e-8``).
    weight_decay : float
        L2 penalty :math:`\lambda` added to the Euclidean gradient (as torch's and geoopt's
        Adam).  On spheres, oblique and Stiefel manifolds its tangent projection is zero
        (these manifolds are centred at the origin), so it acts on flat parameters only.
    amsgrad : bool
        Use :math:`\hat v_k = \max_{s\le t} v_k(s)` (AMSGrad, Reddi et al. 2018).
    nonfinite : {"raise", "skip"}
        On a NaN/Inf gradient (or a step whose new weights or moments would not be finite):
        raise :class:`~kernelgeo.optim.NonFiniteGradientError` naming the parameters
        (default), or skip the whole step (counted in :attr:`skipped_steps`).  Weights and
        state are untouched either way.

    Notes
    -----
    State of a kernel parameter: ``step`` (int), ``exp_avg`` (the parameter's shape, tangent
    at the current point: :math:`m`), ``exp_avg_sq`` (1-D, one entry per component, blocks of
    products in the order of :meth:`~kernelgeo.manifolds.KernelProduct.blocks`; a Euclidean
    block contributes one entry per element) and with ``amsgrad`` ``max_exp_avg_sq`` (same
    shape).  Plain parameters keep :class:`torch.optim.Adam`'s state (``exp_avg_sq`` in the
    parameter's shape).  Components are those of
    :meth:`~kernelgeo.manifolds.KernelManifold.to_batch`: rows for spheres, columns or rows
    for oblique kernels, ``(n, p)`` frames for Stiefel kernels.

    The only difference to geoopt's :class:`geoopt.optim.RiemannianAdam` on manifolds whose
    ``component_inner`` returns one value per component (geoopt's ``Sphere`` on a
    ``(rows, n)`` tensor, ``Stiefel`` on ``(G, n, p)``) is the batching: the iterates agree
    (tested).  kernelgeo's manifolds answer ``component_inner`` per component too, so geoopt's
    optimizer on kernelgeo parameters runs the same algorithm, one kernel at a time.

    Examples
    --------
    >>> import torch, kernelgeo
    >>> from kernelgeo.optim import RiemannianAdam
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),
    ...                           torch.nn.LazyLinear(2))
    >>> _ = net(torch.zeros(1, 3, 8, 8)); _ = kernelgeo.constrain(net, "sphere")
    >>> opt = RiemannianAdam(net.named_parameters(), lr=1e-2)
    >>> net(torch.randn(4, 3, 8, 8)).square().mean().backward(); opt.step()
    >>> opt.state[net[0].weight]["exp_avg_sq"].shape  # one entry per filter (sphere row)
    torch.Size([8])
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 amsgrad=False, *, nonfinite: str = "raise"):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr!r}")
        if not eps >= 0.0:
            raise ValueError(f"Invalid epsilon value: {eps!r}")
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"Invalid betas {betas!r}: both must lie in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad)
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._plan = None
        self._plan_sig = None
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- bookkeeping
    def __getstate__(self):
        st = super().__getstate__()
        st.update(nonfinite=self.nonfinite, skipped_steps=self.skipped_steps)
        return st

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plan = self._plan_sig = None

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._plan = None

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._plan = None

    def _name(self, group, i) -> str:
        names = group.get("param_names")
        if names:
            return str(names[i])
        return f"param_groups[{self.param_groups.index(group)}]['params'][{i}] " \
               f"(shape {tuple(group['params'][i].shape)})"

    def _refuse(self, bad: list[str], what: str) -> bool:
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"{what} in " + ", ".join(bad) + "; the step was not taken and no weight or "
                "state was changed. Lower the learning rate, clip gradients, or pass "
                "nonfinite='skip'")
        self.skipped_steps += 1
        return False

    # ------------------------------------------------------------------------ plan
    def _signature(self):
        return tuple(tuple(p.grad is not None for p in g["params"]) for g in self.param_groups)

    def _get_plan(self):
        """Per group: Euclidean indices, classes of kernel blocks, foreign indices."""
        sig = self._signature()
        if self._plan is not None and sig == self._plan_sig:
            return self._plan
        plans = []
        for group, has in zip(self.param_groups, sig, strict=True):
            euclid, foreign, classes = [], [], {}
            for i, p in enumerate(group["params"]):
                if not has[i]:
                    continue
                kind, m = _bt.classify(p)
                if kind == "euclid":
                    euclid.append(i)
                elif kind == "foreign":
                    foreign.append(i)
                else:
                    off = 0
                    for bm, idx, shape, n in _blocks(p):
                        key = (type(bm), bm.batch_key(shape), p.dtype, p.device)
                        classes.setdefault(key, []).append(
                            _Member(p, i, idx, shape, bm, off, n))
                        off += n
            plans.append((euclid, list(classes.values()), foreign))
        self._plan, self._plan_sig = plans, sig
        return plans

    def _init_state(self, group, p):
        st = self.state[p]
        if st:
            return st
        kind, _ = _bt.classify(p)
        st["step"] = 0
        st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if kind == "kernel":
            n = sum(b[3] for b in _blocks(p))
            sq = torch.zeros(n, dtype=p.dtype, device=p.device)
        else:
            sq = torch.zeros_like(p, memory_format=torch.preserve_format)
        st["exp_avg_sq"] = sq
        if group["amsgrad"]:
            st["max_exp_avg_sq"] = torch.zeros_like(sq)
        return st

    # ------------------------------------------------------------------------ step
    def step(self, closure=None):
        """One optimisation step; ``closure`` re-evaluates the loss (called with grad on)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            self._step()
        return loss

    def _step(self) -> bool:
        plans = self._get_plan()
        grads = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"RiemannianAdam does not support sparse gradients "
                                       f"({self._name(group, i)})")
                grads.append(p.grad)
        if not grads:
            return True
        if not _all_finite(grads):
            bad = [self._name(g, i) for g in self.param_groups
                   for i, p in enumerate(g["params"])
                   if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
            if bad:
                return self._refuse(bad, "non-finite gradient (NaN or Inf)")
        # compute every new value first; write only when all are finite
        writes: list[tuple[torch.Tensor, torch.Tensor]] = []
        owners: list[tuple] = []  # (group, index) of each write, named only on failure
        for group, (euclid, classes, foreign) in zip(self.param_groups, plans, strict=True):
            for i in euclid + [m.index for c in classes for m in c] + foreign:
                self._init_state(group, group["params"][i])
            self._euclid(group, euclid, writes, owners)
            for members in classes:
                self._class(group, members, writes, owners)
            for i in foreign:
                self._foreign(group, i, writes, owners)
        news = [new for _, new in writes]
        if not _all_finite(news):
            bad = sorted({self._name(*o) for o, (_, n) in zip(owners, writes, strict=True)
                          if not bool(torch.isfinite(n).all())})
            if bad:
                return self._refuse(bad, "a step that would write non-finite values "
                                         "(overflow of the moments)")
        torch._foreach_copy_([dst for dst, _ in writes], news)
        for group, (euclid, classes, foreign) in zip(self.param_groups, plans, strict=True):
            ps = group["params"]
            for i in set(euclid + [m.index for c in classes for m in c] + foreign):
                self.state[ps[i]]["step"] += 1
        return True

    @staticmethod
    def _corrections(group, steps):
        b1, b2 = group["betas"]
        return [1 - b1 ** (s + 1) for s in steps], [1 - b2 ** (s + 1) for s in steps]

    def _euclid(self, group, idx, writes, owners):
        """torch.optim.Adam's update (its formula and order of operations), out of place."""
        if not idx:
            return
        ps = [group["params"][i] for i in idx]
        sts = [self.state[p] for p in ps]
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        xs = [p.detach() for p in ps]
        gs = [p.grad for p in ps]
        if wd:
            gs = torch._foreach_add(gs, xs, alpha=wd)
        ms = [st["exp_avg"] for st in sts]
        vs = [st["exp_avg_sq"] for st in sts]
        m_new = torch._foreach_lerp(ms, gs, 1 - b1)
        v_new = torch._foreach_mul(vs, b2)
        torch._foreach_addcmul_(v_new, gs, gs, 1 - b2)
        bc1, bc2 = self._corrections(group, [st["step"] for st in sts])
        if group["amsgrad"]:
            vmax = torch._foreach_maximum([st["max_exp_avg_sq"] for st in sts], v_new)
            base = vmax
            writes.extend(zip([st["max_exp_avg_sq"] for st in sts], vmax, strict=True))
            owners.extend((group, i) for i in idx)
        else:
            base = v_new
        denom = torch._foreach_sqrt(base)
        if len(set(bc1)) == 1:  # the usual case: one scalar, no per-tensor scalar list
            torch._foreach_div_(denom, math.sqrt(bc2[0]))
            torch._foreach_add_(denom, eps)
            x_new = torch._foreach_addcdiv(xs, m_new, denom, -lr / bc1[0])
        else:
            torch._foreach_div_(denom, [math.sqrt(c) for c in bc2])
            torch._foreach_add_(denom, eps)
            x_new = torch._foreach_addcdiv(xs, m_new, denom, [-lr / c for c in bc1])
        for group_list in (zip(xs, x_new, strict=True), zip(ms, m_new, strict=True),
                           zip(vs, v_new, strict=True)):
            writes.extend(group_list)
            owners.extend((group, i) for i in idx)

    def _class(self, group, members, writes, owners):
        """One batched update of kernel blocks that share a batch key."""
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        m0 = members[0].m
        r = m0.radius_of(members[0].shape)
        sts = [self.state[mem.param] for mem in members]
        tb = [mem.m.to_batch for mem in members]
        x = _cat([f(mem.sub(mem.param.detach())) for f, mem in zip(tb, members, strict=True)])
        g = _cat([f(mem.sub(mem.param.grad)) for f, mem in zip(tb, members, strict=True)])
        m = _cat([f(mem.sub(st["exp_avg"])) for f, mem, st in zip(tb, members, sts,
                                                                   strict=True)])
        v = _cat([st["exp_avg_sq"][mem.off:mem.off + mem.n]
                  for mem, st in zip(members, sts, strict=True)])
        if wd:
            g = g.add(x, alpha=wd)
        u = m0.batched_proju(x, g, r)
        m = torch.lerp(m, u, 1 - b1)
        v = v.mul(b2).add_(m0.batched_inner(x, u, u), alpha=1 - b2)
        steps = [st["step"] for st in sts]
        bc1, bc2 = self._corrections(group, steps)
        if group["amsgrad"]:
            vmax = torch.maximum(_cat([st["max_exp_avg_sq"][mem.off:mem.off + mem.n]
                                       for mem, st in zip(members, sts, strict=True)]), v)
            base = vmax
        else:
            base = v
        if len(set(steps)) == 1:
            denom = base.div(bc2[0]).sqrt_().add_(eps)
            scale = (-lr / bc1[0]) / denom
        else:  # members that joined later have their own bias corrections
            c1 = torch.cat([torch.full((mem.n,), c, dtype=v.dtype, device=v.device)
                            for mem, c in zip(members, bc1, strict=True)])
            c2 = torch.cat([torch.full((mem.n,), c, dtype=v.dtype, device=v.device)
                            for mem, c in zip(members, bc2, strict=True)])
            denom = base.div(c2).sqrt_().add_(eps)
            scale = (-lr / c1) / denom
        d = m * scale.view((-1,) + (1,) * (m.dim() - 1))
        if m0.effective_batched_layout() in ("rows", "columns"):
            # the sphere's retraction r (x + d)/|x + d| without projx's guards against zero
            # and overflowing rows: |x + d|^2 = r^2 + |d|^2 for a tangent d
            y = x + d
            if m0.batched_centered:
                y = y - y.mean(-1, keepdim=True)
            xn = y.mul_(r / torch.linalg.vector_norm(y, dim=-1, keepdim=True))
        else:
            xn = m0.batched_retr(x, d, r)
        mn = m0.batched_transp(x, xn, m, r)
        xs, ms = xn.split([mem.n for mem in members]), mn.split([mem.n for mem in members])
        vs = v.split([mem.n for mem in members])
        vms = vmax.split([mem.n for mem in members]) if group["amsgrad"] else None
        for k, (mem, st) in enumerate(zip(members, sts, strict=True)):
            writes.append((mem.sub(mem.param.detach()), mem.m.from_batch(xs[k], mem.shape)))
            writes.append((mem.sub(st["exp_avg"]), mem.m.from_batch(ms[k], mem.shape)))
            writes.append((st["exp_avg_sq"][mem.off:mem.off + mem.n], vs[k]))
            nw = 3
            if vms is not None:
                writes.append((st["max_exp_avg_sq"][mem.off:mem.off + mem.n], vms[k]))
                nw = 4
            owners.extend([(group, mem.index)] * nw)

    def _foreign(self, group, i, writes, owners):
        """geoopt's Riemannian Adam for a manifold that is not a kernelgeo one."""
        p = group["params"][i]
        st = self.state[p]
        man = p.manifold
        b1, b2 = group["betas"]
        g = p.grad.add(p.detach(), alpha=group["weight_decay"])
        u = man.egrad2rgrad(p.detach(), g)
        m = st["exp_avg"].mul(b1).add_(u, alpha=1 - b1)
        v = st["exp_avg_sq"].mul(b2).add_(man.component_inner(p.detach(), u), alpha=1 - b2)
        (bc1,), (bc2,) = self._corrections(group, [st["step"]])
        base = v
        if group["amsgrad"]:
            base = torch.maximum(st["max_exp_avg_sq"], v)
            writes.append((st["max_exp_avg_sq"], base))
            owners.append((group, i))
        d = m.div(bc1) / base.div(bc2).sqrt_().add_(group["eps"])
        xn, mn = man.retr_transp(p.detach(), -group["lr"] * d, m)
        writes.extend([(p.detach(), xn), (st["exp_avg"], mn), (st["exp_avg_sq"], v)])
        owners.extend([(group, i)] * 3)


def _all_finite(ts: list[torch.Tensor], small: int = 1 << 14) -> bool:
    """Whether every entry of ``ts`` is finite, with one synchronisation.

    A sum is finite iff all its terms are, or it overflowed: a false alarm, after which the
    caller checks the tensors one by one.  Small tensors (BN parameters, biases) are summed
    after one ``cat`` instead of one kernel call each.
    """
    little = [t.reshape(-1) for t in ts if t.numel() <= small]
    sums = [t.sum() for t in ts if t.numel() > small]
    if little:
        sums.append(torch.cat(little).sum())
    return bool(torch.isfinite(torch.stack(sums)).all())
