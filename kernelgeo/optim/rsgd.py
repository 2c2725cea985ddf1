r"""Convergent Riemannian SGD on products of kernel manifolds and Euclidean parameters.

One optimizer for a whole network: constrained kernels (:class:`geoopt.ManifoldParameter` on a
:class:`~kernelgeo.manifolds.KernelManifold`, products included) and plain parameters (BN,
biases, FC) with the API of :class:`torch.optim.SGD`.

The update of one component :math:`k` (row of a sphere, Stiefel block, ...) of a kernel at step
:math:`t` with learning rate :math:`\lambda(t)` (the group's ``lr``, set by any LR scheduler):

.. math::

    u_k &= P_{x_k}(G_k) \qquad\text{(Riemannian gradient; } G \text{ = Euclidean gradient)}\\
    B_k &\leftarrow u_k \ \text{(first step)},\quad
        B_k \leftarrow \mu B_k + (1-\tau) u_k \ \text{(later)}\\
    d_k &= u_k + \mu B_k\ \text{(Nesterov)},\quad d_k = B_k\ \text{(momentum)},\quad
        d_k = u_k\ (\mu = 0)\\
    g_k &= \lambda(t)\,m_\ell / \max(1, \Gamma_k(\|d_k\|))
        \qquad\text{(step rule, } m_\ell \text{ optional layer scaling)}\\
    x_k &\leftarrow R_{x_k}(-g_k d_k), \qquad B_k \leftarrow P_{x_k^{\text{new}}}(B_k)
        \ \text{(transport by projection)}

with :math:`\mu` = ``momentum``, :math:`\tau` = ``dampening`` (the same recursion as
``torch.optim.SGD``, whose first step stores the gradient undamped).  The buffer is tangent from
the very first step (geoopt stores the raw Euclidean gradient there) and is always stored
transported, i.e. tangent at the current point.  Euclidean parameters follow
``torch.optim.SGD`` exactly (weight decay included, no step rule: flat factors need none).
See :mod:`kernelgeo.optim.step_rules` for :math:`\Gamma_k` and the assumptions of the
convergence guarantee, :mod:`kernelgeo.optim.schedules` for :math:`\lambda(t)`,
:mod:`kernelgeo.optim.scaling` for :math:`m_\ell`, :mod:`kernelgeo.optim.batched` for the
batched torch path and :mod:`kernelgeo.optim.native` for the fused CPU kernels.
"""

from __future__ import annotations

import math
import warnings

import torch

from .._compat import RiemannianSGD
from ..manifolds import KernelProduct, Stiefel
from ..manifolds.stiefel import _qf
from . import batched as bt
from . import native as _native
from .schedules import GuaranteeWarning, check_robbins_monro
from .step_rules import RULES, check_rule_args, rule_constants, step_sizes

__all__ = ["ConvergentRSGD", "NonFiniteGradientError"]


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf; the message names the parameters."""


def _nblocks(p) -> int:
    m = getattr(p, "manifold", None)
    return len(m.blocks(p.shape)) if isinstance(m, KernelProduct) else 1


class ConvergentRSGD(RiemannianSGD):
    r"""Riemannian SGD with a convergent step-size rule, batched over kernel manifolds.

    Parameters
    ----------
    params : iterable
        Parameters, ``(name, parameter)`` pairs (``model.named_parameters()``: names appear in
        errors) or param-group dicts.  Kernels are :class:`geoopt.ManifoldParameter` on a
        :class:`~kernelgeo.manifolds.KernelManifold`; every other tensor is Euclidean.
    lr : float
        :math:`\lambda` (use an LR scheduler, e.g. :class:`~kernelgeo.optim.RobbinsMonroLR`, for
        :math:`\lambda(t)`).
    momentum, dampening, weight_decay, nesterov
        As in :class:`torch.optim.SGD`.  Weight decay acts on Euclidean parameters (and
        Euclidean blocks of products); on curved kernels only with ``decay_manifold=True``,
        where it is a no-op for spheres, oblique and Stiefel manifolds: the tangent projection
        of :math:`\lambda_{wd}x` is zero, since these manifolds are (products of) spheres and
        orthonormal frames centred at the origin.
    step_rule : {"gsgd", "bounded", "none"}
        Rule of :mod:`~kernelgeo.optim.step_rules` (per group).  ``"gsgd"`` (default):
        plain Riemannian SGD whose step length is clipped at ``max_step`` times the
        convexity-radius bound :math:`\tfrac12\min(\mathrm{inj}, \pi/\sqrt{K_{\max}})` of
        each component; ``"bounded"``: clipped at ``max_step`` times the injectivity
        radius; ``"none"``: no clipping.
    rho : None
        No longer used (the former distance bound of ``"gsgd"``); anything but ``None``
        raises ``ValueError``.
    max_step : float
        :math:`\theta\in(0,1)`, the cap as a fraction of the rule's reference radius (0.5).
    radius_scaling : kernelgeo.optim.scaling.StepScaling, optional
        Layer-wise multipliers :math:`m_\ell` of the step of each kernel.
    stabilize : int or None
        Re-project every kernel (and its buffer) onto its manifold every ``stabilize`` steps
        of the group (default 100; ``None`` never).  The retractions used are themselves
        self-normalising, so this only removes slow float drift.
    nonfinite : {"raise", "skip"}
        On a NaN/Inf gradient raise :class:`NonFiniteGradientError` naming the parameters
        (default), or skip the whole step (counted in :attr:`skipped_steps`).  Weights and
        buffers are untouched either way.
    decay_manifold : bool
        Apply weight decay to curved kernels too (see above).
    batched : bool
        Fast path (default) or the per-parameter reference implementation.
    log_stats : bool
        Record :attr:`last_stats` (per group: ``lr``, max/mean :math:`R`, max :math:`\Gamma`,
        min/mean :math:`g`, max step length and its ratio to the injectivity radius) as
        tensors, without synchronising.
    guarantee : bool
        The user wants the convergence guarantee (``docs/optimization.rst``): at the first
        step, warn with a :class:`~kernelgeo.optim.ScheduleWarning` unless a
        Robbins–Monro schedule was registered with :meth:`set_schedule` (a
        :class:`RobbinsMonroLR` registers itself; register a ``LambdaLR`` yourself), and with
        a :class:`~kernelgeo.optim.GuaranteeWarning` listing, per param group,
        what else is outside the theorem (:meth:`guarantee_problems`: momentum, layer
        multipliers from data statistics, parameters on non-kernelgeo manifolds).  All three
        step rules are covered by the theorem.
    chunk_numel : int
        Size of the batched chunks of the fast path (see :mod:`~kernelgeo.optim.batched`).
    native : bool or None
        Fused CPU kernels (:mod:`~kernelgeo.optim.native`) for sphere, centred-sphere and
        oblique kernels (and such blocks of products that split output channels) on the
        CPU in float32/float64, and torch's fused SGD kernel for Euclidean CPU parameters
        (three passes per row or column from cache, no copies): ``None`` (default) uses
        them when they can be compiled, ``True`` requires them (``RuntimeError``
        otherwise), ``False`` never uses them.  Same iterates as the torch path up to
        rounding (tested).

    Notes
    -----
    State per parameter: ``momentum_buffer`` (Euclidean, as in ``torch.optim.SGD``) or
    ``momentum_blocks`` (kernels: one tensor per block of the kernel's manifold, in the
    block's own shape, tangent at the current point); groups count ``step``.  The fast path
    updates most buffers in place through views; for oblique columns it works on a copy in a
    structure-of-arrays layout and refreshes the state tensors after every step (see
    :mod:`~kernelgeo.optim.batched`): to change buffers, use :meth:`load_state_dict`.

    Examples
    --------
    >>> import torch, kernelgeo
    >>> from kernelgeo.optim import ConvergentRSGD, RobbinsMonroLR
    >>> net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),
    ...                           torch.nn.LazyLinear(2))
    >>> _ = net(torch.zeros(1, 3, 8, 8)); _ = kernelgeo.constrain(net, "sphere")
    >>> opt = ConvergentRSGD(net.named_parameters(), lr=0.1, momentum=0.9)
    >>> sched = RobbinsMonroLR(opt, t0=100, power=0.75)
    >>> net(torch.randn(4, 3, 8, 8)).square().mean().backward(); opt.step(); sched.step()
    """

    def __init__(self, params, lr, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 step_rule: str = "gsgd", rho: float | None = None, max_step: float = 0.5,
                 radius_scaling=None, stabilize: int | None = 100, nonfinite: str = "raise",
                 decay_manifold: bool = False, batched: bool = True, log_stats: bool = False,
                 guarantee: bool = False, chunk_numel: int = 1 << 18,
                 native: bool | None = None):
        if not lr >= 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if step_rule not in RULES:
            raise ValueError(f"unknown step_rule {step_rule!r}; use one of {RULES}")
        check_rule_args(rho, max_step)
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if stabilize is not None and (int(stabilize) != stabilize or stabilize < 1):
            raise ValueError(f"stabilize must be a positive int or None, got {stabilize!r}")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening,
                        weight_decay=weight_decay, nesterov=nesterov, step_rule=step_rule,
                        rho=rho, max_step=max_step, decay_manifold=decay_manifold)
        self.nonfinite = nonfinite
        self.batched = batched
        self.log_stats = log_stats
        self.guarantee = guarantee
        self.chunk_numel = int(chunk_numel)
        if native not in (None, True, False):
            raise ValueError(f"native must be None, True or False, got {native!r}")
        if native and not _native.available():
            raise RuntimeError("native=True but the fused CPU kernels are unavailable: "
                               f"{_native.unavailable_reason()}; pass native=None or False")
        self.native = native
        self.radius_scaling = radius_scaling
        self.skipped_steps = 0
        self.last_stats: list[dict] = []
        self._plan = None
        self._plan_sig = None
        self._plan_native = None
        self._schedule_ok = None
        self._guarantee_checked = False
        self._warned_foreign = False
        # skip RiemannianSGD.__init__ (fixed defaults); OptimMixin -> Optimizer
        super(RiemannianSGD, self).__init__(params, defaults, stabilize=stabilize)

    # ----------------------------------------------------------------- bookkeeping
    #: configuration kept by pickling/deepcopy (``Optimizer.__getstate__`` keeps only
    #: defaults, state and groups); plans and caches are rebuilt on the next step
    _PICKLED = ("nonfinite", "batched", "log_stats", "guarantee", "chunk_numel",
                "radius_scaling", "skipped_steps", "native", "_schedule_ok",
                "_guarantee_checked", "_warned_foreign", "_stabilize")

    def __getstate__(self):
        st = super().__getstate__()
        st.update({k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__})
        return st

    def __setstate__(self, state):
        super().__setstate__(state)
        self.last_stats = []
        self._plan = self._plan_sig = self._plan_native = self._native_cache = None

    def add_param_group(self, param_group: dict):
        rule = param_group.get("step_rule", self.defaults["step_rule"])
        if rule not in RULES:
            raise ValueError(f"unknown step_rule {rule!r}; use one of {RULES}")
        check_rule_args(param_group.get("rho"), param_group.get("max_step", 0.5))
        super().add_param_group(param_group)
        self._plan = None
        self._guarantee_checked = False  # the new group is checked at the next step

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        self._plan = None  # buffers are new tensors: rebuild the chunk storage

    def set_schedule(self, scheduler) -> bool:
        """Register the LR scheduler used; checks the Robbins–Monro conditions (warns)."""
        self._schedule_ok = check_robbins_monro(scheduler, warn=self.guarantee)
        return self._schedule_ok

    def guarantee_problems(self) -> list[str]:
        """What in this configuration is outside the convergence theorem of
        ``docs/optimization.rst`` (besides the schedule, see :meth:`set_schedule`), one
        string per problem and param group; empty when nothing is."""
        out = []
        for i, group in enumerate(self.param_groups):
            if group["momentum"]:
                kind = "Nesterov momentum" if group["nesterov"] else "momentum"
                out.append(f"param group {i}: {kind} {group['momentum']} (the theorem covers "
                           "momentum=0: the step direction must be the stochastic gradient)")
            if group["step_rule"] not in RULES:  # pragma: no cover - rejected when added
                out.append(f"param group {i}: step rule {group['step_rule']!r}")
            foreign = [self._name(group, j) for j, p in enumerate(group["params"])
                       if bt.classify(p)[0] == "foreign"]
            if foreign:
                out.append(f"param group {i}: {', '.join(foreign)} on a manifold that is not "
                           "a kernelgeo kernel manifold (no step rule, compactness unknown)")
        if self.radius_scaling is not None and getattr(self.radius_scaling, "data", False):
            out.append("radius_scaling uses data statistics: the layer multipliers change "
                       "with every batch (use StepScaling(data=False) for constant ones)")
        return out

    def _check_guarantee(self) -> None:
        if self._schedule_ok is None:
            self._schedule_ok = check_robbins_monro(None)  # no scheduler registered
        if not self._guarantee_checked:
            self._guarantee_checked = True
            problems = self.guarantee_problems()
            if problems:
                warnings.warn("the configuration is outside the convergence theorem: "
                              + "; ".join(problems), GuaranteeWarning, stacklevel=3)

    def _name(self, group, i) -> str:
        names = group.get("param_names")
        if names:
            return str(names[i])
        return f"param_groups[{self.param_groups.index(group)}]['params'][{i}] " \
               f"(shape {tuple(group['params'][i].shape)})"

    def _multiplier(self, p):
        if self.radius_scaling is None:
            return None
        return self.radius_scaling.multiplier(p)

    # ------------------------------------------------------------------------ step
    def step(self, closure=None):
        """One optimisation step; ``closure`` re-evaluates the loss (called with grad on)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.guarantee:
            self._check_guarantee()
        with torch.no_grad():
            if self.radius_scaling is not None:
                self.radius_scaling.refresh()
            if self.batched:
                done = self._step_batched()
            else:
                done = self._step_reference()
            if not done:
                self.skipped_steps += 1
                return loss
            for group in self.param_groups:
                group["step"] = group.get("step", 0) + 1
                if group["stabilize"] is not None and group["step"] % group["stabilize"] == 0:
                    self.stabilize_group(group)
                    self._plan = None
        return loss

    def _nonfinite(self, bad: list[str]) -> bool:
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                "non-finite gradient (NaN or Inf) in " + ", ".join(bad) + "; the step was not "
                "taken. Lower the learning rate, clip gradients, or pass nonfinite='skip'")
        return False

    def _find_bad(self) -> list[str]:
        bad = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    bad.append(self._name(group, i))
        return bad

    # ----------------------------------------------------------- reference path
    def _step_reference(self) -> bool:
        """Per-parameter, per-block update with the manifolds' own primitives (the oracle)."""
        work = []
        bad = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("ConvergentRSGD does not support sparse gradients")
                if not bool(torch.isfinite(p.grad).all()):
                    bad.append(self._name(group, i))
                work.append((group, i, p))
        if bad:
            return self._nonfinite(bad)
        stats = {} if self.log_stats else None
        for group, _i, p in work:
            kind, m = bt.classify(p)
            if kind == "euclid":
                self._ref_euclid(group, p)
            elif kind == "foreign":
                self._foreign(group, p, m)
            else:
                self._ref_kernel(group, p, m, stats)
        if stats is not None:
            self._publish_stats(stats)
        return True

    def _ref_euclid(self, group, p):
        g = p.grad
        wd, mu, damp = group["weight_decay"], group["momentum"], group["dampening"]
        if wd:
            g = g.add(p, alpha=wd)
        if mu:
            st = self.state[p]
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = torch.clone(g).detach()
            else:
                buf.mul_(mu).add_(g, alpha=1 - damp)
            g = g.add(buf, alpha=mu) if group["nesterov"] else buf
        p.add_(g, alpha=-group["lr"])

    def _foreign(self, group, p, m):
        """Other geoopt manifolds: plain Riemannian SGD (no step rule, no batching)."""
        if group["step_rule"] != "none" and not self._warned_foreign:
            warnings.warn(f"{type(m).__name__} is not a kernelgeo manifold: its parameters get "
                          "plain Riemannian SGD without the step rule", stacklevel=3)
            self._warned_foreign = True
        mu, damp = group["momentum"], group["dampening"]
        u = m.egrad2rgrad(p, p.grad.clone())
        if mu:
            st = self.state[p]
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = u.clone()
            else:
                buf.mul_(mu).add_(u, alpha=1 - damp)
            d = u.add(buf, alpha=mu) if group["nesterov"] else buf
            new, nbuf = m.retr_transp(p, -group["lr"] * d, buf)
            buf.copy_(nbuf)
        else:
            new = m.retr(p, -group["lr"] * u)
        p.copy_(new)

    def _ref_kernel(self, group, p, m, stats):
        mu, damp = group["momentum"], group["dampening"]
        lr = group["lr"]
        mult = self._multiplier(p)
        if mult is not None:
            lr = lr * mult
        blocks = m.blocks(p.shape) if isinstance(m, KernelProduct) else [(m, None)]
        st = self.state[p]
        for b, (bm, bidx) in enumerate(blocks):
            bidx = None if bidx is None or len(blocks) == 1 else bidx
            shape = tuple(p.shape) if bidx is None else KernelProduct._sub(p.shape, bidx)
            psub = p if bidx is None else p[bidx]
            r = bm.radius_of(shape)
            x = bm.to_batch(psub)
            gr = bm.to_batch(p.grad if bidx is None else p.grad[bidx])
            consts = rule_constants(group["step_rule"], bm, shape, rho=group["rho"],
                                    max_step=group["max_step"])
            if group["weight_decay"] and (consts.flat or group["decay_manifold"]):
                gr = gr + group["weight_decay"] * x
            u = bm._bproju(x, gr, r)
            if mu:
                bl = st.setdefault("momentum_blocks", [None] * len(blocks))
                if bl[b] is None:
                    buf = u.clone()
                else:
                    buf = bm.to_batch(bl[b]).clone()
                    buf.mul_(mu).add_(u, alpha=1 - damp)
                d = u.add(buf, alpha=mu) if group["nesterov"] else buf
            else:
                d = u
            rn = bm._binner(x, d, d).clamp_min(0).sqrt()
            g = step_sizes(lr, rn, consts)
            xn = bm._bretr(x, -g.view((-1,) + (1,) * (d.dim() - 1)) * d, r)
            if mu:
                nb = bm.from_batch(bm._btransp(x, xn, buf, r), shape).contiguous()
                if bl[b] is None:
                    bl[b] = nb
                else:
                    bl[b].copy_(nb)
            psub.copy_(bm.from_batch(xn, shape))
            if stats is not None:
                stats.setdefault(id(group), []).append((rn, g, consts))

    # -------------------------------------------------------------- batched path
    def _signature(self):
        # the plan caches views of the parameters: a new storage (``p.data = ...``) rebuilds it
        return tuple(tuple((p.grad is not None, p.data_ptr()) for p in g["params"])
                     for g in self.param_groups)

    def _use_native(self) -> bool:
        # ctypes calls and torch's fused SGD cannot be traced: torch.compile gets torch ops
        return self.native is not False and not _compiling() and _native.available()

    def _get_plan(self):
        sig = self._signature()
        native = self._use_native()
        if self._plan is None or sig != self._plan_sig or native != self._plan_native:
            self._plan_native = native
            plans = []
            new_bufs: dict = {}
            for group, has in zip(self.param_groups, sig, strict=True):
                gp = bt.build_group_plan(group, self.state, chunk_numel=self.chunk_numel,
                                         max_step=group["max_step"],
                                         has_grad=[h for h, _ in has], native=native)
                for ch in gp.chunks:
                    if ch.layout.soa:
                        bt.attach_soa(ch)
                if group["momentum"]:
                    for ch in gp.chunks:
                        bt.attach_momentum(ch, self.state, new_bufs)
                    for nm in gp.native:
                        bt.attach_native_momentum(nm, self.state, new_bufs)
                plans.append(gp)
            bt.attach_scratch([ch for gp in plans for ch in gp.chunks])
            self._plan, self._plan_sig = plans, sig
        return self._plan

    def _chunk_lr(self, group, ch: bt.Chunk, ndim: int):
        """``lr`` times the layer multipliers, per row of the chunk (``ndim``-D, row-major)."""
        lr = group["lr"]
        if self.radius_scaling is None:
            return lr
        ms = [self._multiplier(m.param) for m in ch.members]
        if len(ms) == 1:
            return lr * ms[0]
        rows = torch.cat([mm.reshape(1).expand(m.nrows) for mm, m in zip(ms, ch.members,
                                                                           strict=True)])
        if ch.layout.soa:  # column j*N + i of the (a, b*N) view belongs to slice i
            return lr * rows.repeat(ch.layout.soa_shape[1]).view(1, -1)
        return lr * rows.view((-1,) + (1,) * (ndim - 1))

    def _step_batched(self) -> bool:
        plans = self._get_plan()
        grads_of = _grad
        prepared, checks, c_checks = [], [], []
        native = any(gp.native for gp in plans)
        for group, gp in zip(self.param_groups, plans, strict=True):
            ps = group["params"]
            eg = [ps[i].grad for i in gp.euclid]
            if any(g.is_sparse for g in eg):
                raise RuntimeError("ConvergentRSGD does not support sparse gradients")
            if native:  # dense CPU float gradients are checked by the C kernel
                for g in eg:
                    (c_checks if _native_checkable(g) else checks).append(g)
            else:
                checks.extend(eg)
            items = []
            for ch in gp.chunks:
                x, g, inplace = bt.gather(ch, grads_of)
                h = self._hyper(group, ch)
                if ch.kind == "sphere":
                    g, c = bt.sphere_prepare(ch, x, g)
                elif ch.kind == "stiefel":
                    g, c = bt.stiefel_prepare(ch, x, g)
                else:
                    g, c = bt.generic_prepare(ch, x, g, h)
                checks.append(c)
                items.append((ch, x, g, c, inplace, h))
            for i in gp.foreign:
                checks.append(ps[i].grad)
            prepared.append(items)
        if checks and not _all_finite(checks):
            bad = self._find_bad()
            if bad:
                return self._nonfinite(bad)
        native_stats = self._native_step(plans, c_checks)
        if native_stats is None:
            return self._nonfinite(self._find_bad())
        self.last_stats = []
        for group, gp, items in zip(self.param_groups, plans, prepared, strict=True):
            self._euclid_foreach(group, [group["params"][i] for i in gp.euclid])
            stats = list(native_stats.get(id(group), ())) if self.log_stats else None
            for ch, x, g, c, inplace, h in items:
                h.lr = self._chunk_lr(group, ch, c.dim() if ch.kind == "sphere" else 1)
                if ch.kind == "sphere":
                    xn = bt.sphere_apply(ch, x, g, c, h, stats)
                elif ch.kind == "stiefel":
                    xn = bt.stiefel_apply(ch, x, g, c, h, stats)
                else:
                    xn = bt.generic_apply(ch, x, c, h, stats)
                if not inplace:
                    bt.scatter(ch, xn)
                if ch.fresh_members:
                    bt.commit_fresh(ch, self.state, _nblocks)
            for i in gp.foreign:
                self._foreign(group, group["params"][i], group["params"][i].manifold)
            if stats is not None:
                self._publish_stats({id(group): stats}, append=True)
        return True

    def _native_work(self, plans) -> list:
        """Per group and dtype: the members and a ctypes item array, built once per plan
        (the fields that change between steps, gradient pointers and ``lr``, are refreshed
        by :meth:`_native_step`)."""
        work = getattr(self, "_native_cache", None)
        threads = torch.get_num_threads()
        if work is not None and work[0] is plans and work[2] == threads:
            return work[1]
        work = []
        for group, gp in zip(self.param_groups, plans, strict=True):
            by_dtype: dict = {}
            for nm in gp.native:
                by_dtype.setdefault(nm.param.dtype, []).append(nm)
            for dtype, mems in by_dtype.items():
                arr = (_native.Item * len(mems))()
                for it, nm in zip(arr, mems, strict=True):
                    c = nm.consts
                    it.x = nm.sub(nm.param.detach()).data_ptr()
                    it.b = None if nm.buf is None else nm.buf.data_ptr()
                    it.nblk, it.a, it.s = nm.nblk, nm.a, nm.s
                    it.center, it.r = int(nm.layout.center), float(nm.layout.r)
                    it.rule = int(math.isfinite(c.cap))  # 0: g = lr, 1: capped at c.cap
                    it.cap = c.cap if it.rule else 1.0
                # like torch's own CPU kernels, use its threads for large steps (one part per
                # thread, at least NATIVE_GRAIN entries each; kernels are never split)
                numel = sum(nm.nblk * nm.a * nm.s for nm in mems)
                parts = _native.partition(arr, max(1, min(threads, numel // NATIVE_GRAIN)))
                work.append((group, dtype, mems, arr, parts))
        self._native_cache = (plans, work, threads)
        return work

    def _native_step(self, plans, euclid_grads: list) -> dict | None:
        """Fused CPU step of the plans' native kernels.  Every gradient (theirs and
        ``euclid_grads``, dense CPU float tensors, whose check is cheaper in C than in torch)
        is checked first: if one is not finite nothing is written and None is returned.
        Returns the per-group step statistics when ``log_stats``."""
        work = self._native_work(plans)
        if not work and not euclid_grads:
            return {}
        keep = []
        for group, dtype, mems, arr, _ in work:
            for it, nm in zip(arr, mems, strict=True):
                g = nm.param.grad
                if g.is_sparse:
                    raise RuntimeError("ConvergentRSGD does not support sparse gradients")
                g, x = nm.sub(g), nm.sub(nm.param.detach())
                if g.stride() != x.stride() or g.dtype != dtype:
                    g = torch.empty_like(x).copy_(g)
                    keep.append(g)
                it.g = g.data_ptr()
                lr = group["lr"]
                mult = self._multiplier(nm.param)
                it.lr = float(lr) if mult is None else float(lr * mult)
                it.fresh = int(nm.fresh)
            if _native.check(arr, dtype) >= 0:
                return None
        by_dtype: dict = {}
        for g in euclid_grads:
            by_dtype.setdefault(g.dtype, []).append(g)
        for gs in by_dtype.values():
            if _native.check_tensors(gs) >= 0:
                return None
        out: dict = {}
        for group, dtype, mems, arr, parts in work:
            outs = []
            if self.log_stats:
                for nm, it in zip(mems, arr, strict=True):
                    rn = torch.empty(nm.ncomp, dtype=torch.float64)
                    st = torch.empty(nm.ncomp, dtype=torch.float64)
                    it.rn_out, it.step_out = rn.data_ptr(), st.data_ptr()
                    outs.append((rn, st, nm.consts))
            _native.sphere_step_parallel(parts, dtype, group["momentum"], group["dampening"],
                                         group["nesterov"])
            out.setdefault(id(group), []).extend(
                (rn.to(dtype), st.to(dtype), c) for rn, st, c in outs)
            for it in arr:
                it.rn_out = it.step_out = None
            # raw writes bypass autograd's version counters: bump them like an in-place op
            touched = list({id(nm.param): nm.param for nm in mems}.values())
            touched += [nm.buf for nm in mems if nm.buf is not None]
            torch.autograd.graph.increment_version(touched)
            for nm in mems:
                if nm.fresh and nm.buf is not None:
                    st_ = self.state[nm.param]
                    blocks = st_.setdefault("momentum_blocks", [None] * _nblocks(nm.param))
                    blocks[nm.block] = nm.buf
                nm.fresh = False
        return out

    def _hyper(self, group, ch) -> bt.Hyper:
        wd = group["weight_decay"] if (ch.consts.flat or group["decay_manifold"]) else 0.0
        return bt.Hyper(lr=group["lr"], momentum=group["momentum"],
                        dampening=group["dampening"], nesterov=group["nesterov"], wd=wd)

    def _euclid_fused(self, group, params) -> bool:
        """``torch.optim.SGD(fused=True)``'s kernel on CPU float parameters (one call instead
        of three multi-tensor passes; the same recursion).  False: not applicable here."""
        if self.native is False or _compiling() or not _fused_sgd_ok() or \
                not all(p.is_cpu and p.dtype in _native.DTYPES for p in params):
            return False
        wd, mu, damp = group["weight_decay"], group["momentum"], group["dampening"]
        kw = dict(weight_decay=wd, momentum=mu, lr=group["lr"], dampening=damp,
                  nesterov=group["nesterov"], maximize=False, grad_scale=None, found_inf=None)
        if not mu:
            torch._fused_sgd_(params, [p.grad for p in params], [], is_first_step=False, **kw)
            return True
        old, fresh = [], []
        for p in params:
            (fresh if self.state[p].get("momentum_buffer") is None else old).append(p)
        if old:
            torch._fused_sgd_(old, [p.grad for p in old],
                              [self.state[p]["momentum_buffer"] for p in old],
                              is_first_step=False, **kw)
        if fresh:  # the kernel stores B = G (after weight decay) into these
            bufs = [torch.empty_like(p.grad) for p in fresh]
            torch._fused_sgd_(fresh, [p.grad for p in fresh], bufs, is_first_step=True, **kw)
            for p, b in zip(fresh, bufs, strict=True):
                self.state[p]["momentum_buffer"] = b
        return True

    def _euclid_foreach(self, group, params):
        """``torch.optim.SGD``'s multi-tensor update (same operations, same order), or its
        fused CPU kernel (see :meth:`_euclid_fused`)."""
        if not params or self._euclid_fused(group, params):
            return
        grads = [p.grad for p in params]
        wd, mu, damp = group["weight_decay"], group["momentum"], group["dampening"]
        if wd:
            grads = torch._foreach_add(grads, params, alpha=wd)
        if mu:
            bufs, fresh_p, fresh_g, old_b, old_g = [], [], [], [], []
            for p, g in zip(params, grads, strict=True):
                b = self.state[p].get("momentum_buffer")
                if b is None:
                    fresh_p.append(p)
                    fresh_g.append(g)
                else:
                    old_b.append(b)
                    old_g.append(g)
            if old_b:
                torch._foreach_mul_(old_b, mu)
                torch._foreach_add_(old_b, old_g, alpha=1 - damp)
            for p, g in zip(fresh_p, fresh_g, strict=True):
                self.state[p]["momentum_buffer"] = torch.clone(g).detach()
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            if group["nesterov"]:
                grads = torch._foreach_add(grads, bufs, alpha=mu)
            else:
                grads = bufs
        torch._foreach_add_(params, grads, alpha=-group["lr"])

    # ------------------------------------------------------------------ logging
    def _publish_stats(self, stats: dict, append: bool = False):
        out = [] if not append else self.last_stats
        for group in self.param_groups:
            if id(group) not in stats:
                continue
            rows = stats[id(group)]
            if not rows:
                out.append({"lr": group["lr"]})
                continue
            rn = torch.cat([r.flatten() for r, _, _ in rows])
            g = torch.cat([(s * torch.ones_like(r)).flatten() for r, s, _ in rows])
            inj = torch.cat([torch.full_like(r.flatten(), c.inj) for r, _, c in rows])
            lr = group["lr"]
            step_len = g * rn
            out.append({
                "lr": lr, "R_max": rn.max(), "R_mean": rn.mean(),
                "Gamma_max": (lr / g.clamp_min(torch.finfo(g.dtype).tiny)).max()
                if isinstance(lr, float) else None,
                "g_min": g.min(), "g_mean": g.mean(), "step_max": step_len.max(),
                "step_over_inj_max": (step_len / inj).max(),
            })
        self.last_stats = out

    # ------------------------------------------------------------- stabilisation
    @torch.no_grad()
    def stabilize_group(self, group):
        """Project every kernel of ``group`` back onto its manifold and its momentum onto the
        tangent space (removes float drift; a point at distance ``e`` moves by ``O(e)``)."""
        for p in group["params"]:
            kind, m = bt.classify(p)
            if kind == "euclid":
                continue
            if kind == "foreign":
                p.copy_(m.projx(p))
                buf = self.state[p].get("momentum_buffer")
                if buf is not None:
                    buf.copy_(m.proju(p, buf))
                continue
            blocks = m.blocks(p.shape) if isinstance(m, KernelProduct) else [(m, None)]
            bl = self.state[p].get("momentum_blocks")
            for b, (bm, bidx) in enumerate(blocks):
                bidx = None if bidx is None or len(blocks) == 1 else bidx
                psub = p if bidx is None else p[bidx]
                psub.copy_(_reproject(bm, psub))
                if bl is not None and bl[b] is not None:
                    bl[b].copy_(bm.proju(psub, bl[b]))


def _grad(p):
    return p.grad


#: fewest entries per thread of the fused kernels (below, a thread costs more than it saves)
NATIVE_GRAIN = 1 << 20
_FUSED_SGD: bool | None = None


def _fused_sgd_ok() -> bool:
    """Whether this torch has a CPU ``_fused_sgd_`` (probed once on a scratch tensor)."""
    global _FUSED_SGD
    if _FUSED_SGD is None:
        try:
            t, g = torch.zeros(2), torch.ones(2)
            torch._fused_sgd_([t], [g], [], weight_decay=0.0, momentum=0.0, lr=0.5,
                              dampening=0.0, nesterov=False, maximize=False,
                              is_first_step=False, grad_scale=None, found_inf=None)
            _FUSED_SGD = bool(torch.allclose(t, torch.full((2,), -0.5)))
        except (AttributeError, RuntimeError, NotImplementedError, TypeError):
            _FUSED_SGD = False
    return _FUSED_SGD


def _compiling() -> bool:
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling())


def _native_checkable(g: torch.Tensor) -> bool:
    return g.is_cpu and g.dtype in _native.DTYPES and g.is_contiguous()


def _all_finite(ts: list[torch.Tensor], small: int = 1 << 14) -> bool:
    """Whether every entry of ``ts`` is finite, with one synchronisation.

    A sum is finite iff all its terms are (or it overflowed: a false alarm, which only makes
    the caller look closer).  Small tensors (BN parameters, biases) are summed after one
    ``cat`` instead of one kernel call each.
    """
    little = [t.reshape(-1) for t in ts if t.numel() <= small]
    sums = [t.sum() for t in ts if t.numel() > small]
    if little:
        sums.append(torch.cat(little).sum())
    return bool(torch.isfinite(torch.stack(sums)).all())


def _reproject(m, x):
    """Metric projection, except for Stiefel: the QR factor (as close, up to O(error), and
    without the float64 SVD that the exact polar projection of a large kernel would cost)."""
    if isinstance(m, Stiefel):
        r = m.radius_of(x.shape)
        return m.from_batch(r * _qf(m.to_batch(x) / r), x.shape)
    return m.projx(x)


