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
:mod:`kernelgeo.optim.scaling` for :math:`m_\ell`, :mod:`kernelgeo.optim.geometries` for the
update of each geometry (torch ops; pointers to the reference, C and Triton versions),
:mod:`kernelgeo.optim.batched` for the chunks of the batched path,
:mod:`kernelgeo.optim.native` for the fused CPU kernels and :mod:`kernelgeo.optim.momentum`
for the momentum state.  This module holds the orchestration: param groups, validation, the
overflow pre-pass, plan caching and the dispatch to the backends.
"""

from __future__ import annotations

import math
import warnings

import torch

from .._compat import RiemannianSGD
from ..manifolds import KernelProduct
from . import batched as bt
from . import geometries as geo
from . import momentum as mom
from . import native as _native
from .schedules import GuaranteeWarning, check_robbins_monro
from .step_rules import DEFAULT_MAX_STEP, RULES, check_rule_args

__all__ = ["ConvergentRSGD", "NonFiniteGradientError", "StepOverflowError"]

_BACKENDS = ("auto", "torch", "native", "triton")


class NonFiniteGradientError(FloatingPointError):
    """A gradient holds NaN or Inf; the message names the parameters."""


class StepOverflowError(FloatingPointError):
    """The new value of a parameter or of its momentum is not representable in its dtype
    (finite gradients and learning rate, but their product overflows); nothing was changed."""


def _check_hyper(where: str, h: dict) -> None:
    """Refuse hyper-parameters that would corrupt the weights (NaN, Inf, out of range)."""
    def num(key, lo, hi, lo_open=False, hi_open=False, hint=""):
        if key not in h:
            return
        v = h[key]
        try:
            f = float(v)
        except (TypeError, ValueError, RuntimeError):
            raise ValueError(f"{where}{key} must be a real number, got {v!r}") from None
        ok = math.isfinite(f) and (f > lo if lo_open else f >= lo) and \
            (f < hi if hi_open else f <= hi)
        if not ok:
            lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open else "]"
            raise ValueError(f"{where}{key}={v!r} is out of range: it must be finite and in "
                             f"{lo_b}{lo}, {hi}{hi_b}{hint}")
    num("lr", 0.0, math.inf, hi_open=True,
        hint=" (an LR scheduler or a loaded state_dict may have set it)")
    num("momentum", 0.0, 1.0, hi_open=True,
        hint=": the buffer sums past gradients with weights momentum**k")
    num("dampening", 0.0, 1.0)
    num("weight_decay", 0.0, math.inf, hi_open=True)
    if h.get("nesterov") and (float(h.get("momentum", 0)) <= 0 or
                               float(h.get("dampening", 0)) != 0):
        raise ValueError(f"{where}Nesterov momentum requires a momentum and zero dampening")
    if h.get("rho") is not None:
        num("rho", 0.0, math.inf, lo_open=True, hi_open=True)
    num("max_step", 0.0, 1.0, lo_open=True, hi_open=True)


def _describe(p) -> str:
    """Shape and geometry of a parameter, for messages."""
    m = getattr(p, "manifold", None)
    what = "Euclidean" if m is None else getattr(m, "name", None) or type(m).__name__
    if isinstance(m, KernelProduct):
        what = "product " + "+".join(getattr(b, "name", type(b).__name__)
                                     for b, _ in m.blocks(p.shape))
    return f"shape {tuple(p.shape)}, {p.dtype}, {what}"


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
        (default), and on a step whose new values overflow the parameters' dtype
        :class:`StepOverflowError`; or skip the whole step (counted in
        :attr:`skipped_steps`).  Weights and buffers are untouched either way.
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
        rounding (tested).  An alias of ``backend`` (``True``: ``"native"``, ``False``:
        ``"torch"``).
    backend : {"auto", "torch", "native", "triton"}
        Implementation of the batched step: ``"torch"`` (torch ops only), ``"native"`` (as
        ``native=True``), ``"triton"`` (:mod:`~kernelgeo.optim.triton_backend`: a few Triton
        launches per step for sphere, centred-sphere, oblique and Stiefel (QR retraction)
        kernels; other kernels keep the torch path; CUDA tensors, or CPU tensors under
        ``TRITON_INTERPRET=1``); ``"auto"`` (default): Triton for CUDA parameters when it can
        be imported, the fused CPU kernels on the CPU, torch ops otherwise.  With
        ``log_stats`` or ``batched=False`` the torch path is used.

    Notes
    -----
    State per parameter: ``momentum_buffer`` (Euclidean, as in ``torch.optim.SGD``) or
    ``momentum_blocks`` (kernels: one tensor per block of the kernel's manifold, in the
    block's own shape, tangent at the current point); groups count ``step``.  The fast path
    updates most buffers in place through views; for oblique columns it works on a copy in a
    structure-of-arrays layout and refreshes the state tensors after every step (see
    :mod:`~kernelgeo.optim.batched`): to change buffers, use :meth:`load_state_dict`, which
    refuses (naming the parameter, nothing loaded) a state whose momentum has another block
    structure or shape, or holds NaN/Inf, and projects loaded kernel momentum onto the
    tangent space at the current point.

    A step completes for every parameter or changes none.  Hyper-parameters must be finite
    (``lr >= 0``, ``0 <= momentum < 1``, ``0 <= dampening <= 1``, ``weight_decay >= 0``;
    ``lr`` is checked again at every step, as schedulers change it).  The fast path writes
    in place, so it runs only when nothing in it can overflow: a pre-pass (one read of
    every gradient, in C for the fused kernels) bounds the 2-norms of the gradients, and
    tracked upper bounds of the buffers' and parameters' norms (measured in float64 after
    :meth:`load_state_dict` or when exceeded) bound every squared or multiplied quantity
    (below about :math:`\sqrt{\text{float max}}/64`: 3e17 in float32).  Other steps (huge
    finite gradients or learning rates) take the reference path, which computes every new
    value in float64 into temporaries, with gradients and buffers divided by their largest
    entry and the retraction's argument by :math:`\max(1, \|g_k d_k\|/r)` (sphere and
    Stiefel retractions are invariant to positive scaling), so that the step keeps its
    direction and the rule's length; the values are written only when all are finite in
    the parameters' dtype.  Writing into the state tensors between steps bypasses the
    tracked bounds.  The Stiefel fast path reads the Cholesky factorisation's status and
    uses Householder QR (the same retraction) when it failed or when a step is longer than
    :math:`3r` (Cholesky-QR then loses orthogonality); this costs one synchronisation per
    Stiefel chunk.  Half precision (float16/bfloat16): torch has no half-precision
    Cholesky, QR or SVD on the CPU, so the retractions that factorise compute in float32
    and round the result to the parameter's dtype (the reference path works in float64).

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
                 step_rule: str = "gsgd", rho: float | None = None,
                 max_step: float = DEFAULT_MAX_STEP,
                 radius_scaling=None, stabilize: int | None = 100, nonfinite: str = "raise",
                 decay_manifold: bool = False, batched: bool = True, log_stats: bool = False,
                 guarantee: bool = False, chunk_numel: int = 1 << 18,
                 native: bool | None = None, backend: str = "auto"):
        _check_hyper("ConvergentRSGD: ", dict(lr=lr, momentum=momentum, dampening=dampening,
                                              weight_decay=weight_decay, nesterov=nesterov,
                                              rho=rho, max_step=max_step))
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
        if backend not in _BACKENDS:
            raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
        if native is not None:  # alias: must agree with an explicit backend
            alias = "native" if native else "torch"
            if backend not in ("auto", alias):
                raise ValueError(f"native={native!r} contradicts backend={backend!r}; pass "
                                 "only backend")
            backend = alias
        if backend == "native":
            native = True
        elif backend in ("torch", "triton"):
            native = False
        if backend == "triton":
            from . import triton_backend as _tb

            if not _tb.available():
                raise RuntimeError("backend='triton' is unavailable: "
                                   f"{_tb.unavailable_reason()}; use backend='auto'")
        self.backend = backend
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
        self._bound = None  # magnitude bounds of the fast path's pre-pass (None: measure)
        self._dbound = math.inf  # bound of every direction's norm in the last fast step
        # skip RiemannianSGD.__init__ (fixed defaults); OptimMixin -> Optimizer
        super(RiemannianSGD, self).__init__(params, defaults, stabilize=stabilize)

    # ----------------------------------------------------------------- bookkeeping
    #: configuration kept by pickling/deepcopy (``Optimizer.__getstate__`` keeps only
    #: defaults, state and groups); plans and caches are rebuilt on the next step
    _PICKLED = ("nonfinite", "batched", "log_stats", "guarantee", "chunk_numel",
                "radius_scaling", "skipped_steps", "native", "backend", "_schedule_ok",
                "_guarantee_checked", "_warned_foreign", "_stabilize")

    def __getstate__(self):
        st = super().__getstate__()
        st.update({k: self.__dict__[k] for k in self._PICKLED if k in self.__dict__})
        return st

    def __setstate__(self, state):
        super().__setstate__(state)
        self.last_stats = []
        self._plan = self._plan_sig = self._plan_native = self._native_cache = None
        self._bound = None
        self._dbound = math.inf

    def add_param_group(self, param_group: dict):
        rule = param_group.get("step_rule", self.defaults["step_rule"])
        if rule not in RULES:
            raise ValueError(f"unknown step_rule {rule!r}; use one of {RULES}")
        check_rule_args(param_group.get("rho"), param_group.get("max_step", DEFAULT_MAX_STEP))
        _check_hyper(f"param_groups[{len(self.param_groups)}]: ", param_group)
        super().add_param_group(param_group)
        self._plan = None
        self._bound = None
        self._guarantee_checked = False  # the new group is checked at the next step

    def load_state_dict(self, state_dict):
        """Load a state from :meth:`state_dict`; refuses (nothing loaded) a state whose
        hyper-parameters are out of range or whose momentum does not fit the parameters
        (another geometry, block structure or shape), naming the parameter.  Loaded kernel
        momentum is projected onto the tangent space at the current point."""
        self._check_loaded(state_dict)
        super().load_state_dict(state_dict)
        self._plan = None  # buffers are new tensors: rebuild the chunk storage
        self._bound = None
        with torch.no_grad():
            self._tangent_momentum()

    def _check_loaded(self, state_dict) -> None:
        groups = state_dict.get("param_groups", [])
        saved_state = state_dict.get("state", {})
        if len(groups) != len(self.param_groups):
            return  # torch's own check reports it
        for gi, (group, sg) in enumerate(zip(self.param_groups, groups, strict=True)):
            _check_hyper(f"loaded state_dict, param_groups[{gi}]: ", sg)
            if len(sg.get("params", ())) != len(group["params"]):
                return  # torch's own check reports it
            for i, (p, key) in enumerate(zip(group["params"], sg["params"], strict=True)):
                st = saved_state.get(key)
                if st:
                    self._check_loaded_param(group, i, p, st)

    def _check_loaded_param(self, group, i, p, st) -> None:
        kind, m = bt.classify(p)
        name = self._name(group, i)
        fix = ("; load the state of an optimizer over the same model and geometry, or drop "
               "this parameter's entry from state_dict['state'] to restart its momentum")

        def check(t, shape, what):
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"loaded optimizer state for {name}: {what} is "
                                 f"{type(t).__name__}, not a tensor{fix}")
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"loaded optimizer state for {name}: {what} has shape "
                                 f"{tuple(t.shape)}, expected {tuple(shape)}{fix}")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"loaded optimizer state for {name}: {what} holds NaN/Inf"
                                 f"{fix}")

        if kind == "kernel":
            if "momentum_buffer" in st:
                raise ValueError(f"loaded optimizer state for {name}: a Euclidean "
                                 f"'momentum_buffer' for a kernel on a manifold{fix}")
            bl = st.get("momentum_blocks")
            if bl is None:
                return
            blocks = m.blocks(p.shape) if isinstance(m, KernelProduct) else [(m, None)]
            if len(bl) != len(blocks):
                raise ValueError(f"loaded optimizer state for {name}: {len(bl)} momentum "
                                 f"block(s), the manifold has {len(blocks)}{fix}")
            for b, (_, bidx) in enumerate(blocks):
                shape = p.shape if bidx is None or len(blocks) == 1 else \
                    KernelProduct._sub(p.shape, bidx)
                if bl[b] is not None:
                    check(bl[b], shape, f"momentum block {b}")
        else:
            if "momentum_blocks" in st:
                raise ValueError(f"loaded optimizer state for {name}: kernel "
                                 f"'momentum_blocks' for a parameter without a kernel "
                                 f"manifold{fix}")
            if st.get("momentum_buffer") is not None:
                check(st["momentum_buffer"], p.shape, "momentum_buffer")

    def _tangent_momentum(self, rtol: float = 1e-4) -> None:
        """Project every kernel's momentum onto the tangent space at the current point (a
        buffer saved at another point, or for another geometry, is not tangent here).  A
        buffer whose normal part is below ``rtol`` of its norm (rounding: the state of this
        very point) is left as it is, so that a resumed run continues bit for bit."""
        for group in self.param_groups:
            for p in group["params"]:
                kind, m = bt.classify(p)
                bl = self.state[p].get("momentum_blocks") if p in self.state else None
                if kind != "kernel" or not bl:
                    continue
                blocks = m.blocks(p.shape) if isinstance(m, KernelProduct) else [(m, None)]
                for b, (bm, bidx) in enumerate(blocks):
                    if bl[b] is None:
                        continue
                    psub = p if bidx is None or len(blocks) == 1 else p[bidx]
                    t = bm.proju(psub.detach(), bl[b])
                    off = _norm64(t - bl[b])
                    if off > rtol * _norm64(bl[b]):
                        mom.set_kernel_block(self.state, p, b, t.contiguous())

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
        p = group["params"][i]
        if names:
            return f"{names[i]!r} ({_describe(p)})"
        gi = next((k for k, g in enumerate(self.param_groups) if g is group), "?")
        return f"param_groups[{gi}]['params'][{i}] ({_describe(p)}; pass " \
               "model.named_parameters() to the optimizer to see names here)"

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
        for gi, group in enumerate(self.param_groups):  # schedulers may have changed them
            _check_hyper(f"param_groups[{gi}]: ", {"lr": group["lr"]})
        with torch.no_grad():
            if self.radius_scaling is not None:
                self.radius_scaling.refresh()
            if self.batched and self._use_triton():
                from . import triton_backend as _tb

                done = _tb.step(self)
            elif self.batched:
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

    def _overflow(self, name: str, what: str, p) -> bool:
        g = p.grad
        gmax = float(g.abs().max()) if g is not None and g.numel() else 0.0
        msg = (f"the step of {name} is not representable in {p.dtype}: its new {what} "
               f"overflows (largest |gradient| {gmax:.3g}); no parameter was changed. Lower "
               "the learning rate, clip gradients (torch.nn.utils.clip_grad_norm_) or use "
               "a bounded step_rule")
        if self.nonfinite == "raise":
            raise StepOverflowError(msg)
        return False

    def _check_sparse(self) -> None:
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is not None and (p.grad.is_sparse or p.grad.layout != torch.strided):
                    raise RuntimeError(
                        f"ConvergentRSGD does not support sparse gradients: {self._name(group, i)}"
                        f" has a {p.grad.layout} gradient; make it dense (p.grad = "
                        "p.grad.to_dense()) or optimise this parameter with torch.optim."
                        "SparseAdam")

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
        r"""Per-parameter, per-block update with the manifolds' own primitives (the oracle),
        also the safe path of the batched step (see :meth:`_step_batched`).

        Every new value (parameters and buffers) is computed first into temporaries, in
        float64 and with gradients and buffers divided by their largest entry, so that no
        intermediate overflows: the retractions of spheres and Stiefel manifolds are
        invariant to positive scaling of their argument, which is divided by
        :math:`\max(1, \|g_k d_k\|/r)` before retracting.  The values are written only
        when all are finite in the parameters' dtype (else :class:`StepOverflowError` names
        the parameter, or the step is skipped with ``nonfinite='skip'``).
        """
        self._check_sparse()
        work = []
        bad = []
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                if not bool(torch.isfinite(p.grad).all()):
                    bad.append(self._name(group, i))
                work.append((group, i, p))
        if bad:
            return self._nonfinite(bad)
        stats = {} if self.log_stats else None
        commits: list[tuple] = []
        for group, i, p in work:
            kind, m = bt.classify(p)
            name = self._name(group, i)
            if kind == "euclid":
                self._ref_euclid(group, p, name, commits)
            elif kind == "foreign":
                self._foreign(group, p, m, name, commits)
            else:
                self._ref_kernel(group, p, m, stats, name, commits)
        for _, _, _, new, name, what, p in commits:
            if isinstance(new, torch.Tensor) and not bool(torch.isfinite(new).all()):
                return self._overflow(name, what, p)
        _apply_commits(commits)
        self._bound = None  # buffers changed outside the fast path's bookkeeping
        if stats is not None:
            self._publish_stats(stats)
        return True

    def _ref_euclid(self, group, p, name, commits):
        geo.euclidean.reference_euclid_step(self.state, group, p, name, commits)

    def _foreign(self, group, p, m, name, commits):
        """Other geoopt manifolds: plain Riemannian SGD (no step rule, no batching)."""
        if group["step_rule"] != "none" and not self._warned_foreign:
            warnings.warn(f"{type(m).__name__} is not a kernelgeo manifold: its parameters get "
                          "plain Riemannian SGD without the step rule", stacklevel=3)
            self._warned_foreign = True
        geo.generic.foreign_step(self.state, group, p, m, name, commits)

    def _ref_kernel(self, group, p, m, stats, name, commits):
        lr = float(group["lr"])
        mult = self._multiplier(p)
        if mult is not None:
            lr = lr * float(mult)
        geo.generic.reference_kernel_step(self.state, group, p, m, lr, stats, name, commits)

    # -------------------------------------------------------------- batched path
    def _signature(self):
        # the plan caches views of the parameters: a new storage (``p.data = ...``) rebuilds it
        return tuple(tuple((p.grad is not None, p.data_ptr()) for p in g["params"])
                     for g in self.param_groups)

    def _use_triton(self) -> bool:
        backend = getattr(self, "backend", "auto")
        if backend not in ("auto", "triton") or self.log_stats or _compiling():
            return False
        if backend == "triton":
            return True
        if not torch.cuda.is_available() or not any(
                p.is_cuda for g in self.param_groups for p in g["params"]):
            return False
        from . import triton_backend as _tb

        return _tb.available()

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
        """The fast path, after a pre-pass that makes it safe.

        The pre-pass reads every gradient once (a bound of its 2-norm, not finite if an
        entry is not; in C for the fused kernels' gradients) and bounds, from it and from
        tracked bounds of the momentum buffers and parameters, every quantity the update
        squares or multiplies (:meth:`_fast_is_safe`).  Steps within the bounds (every
        realistic one) cannot overflow and run batched, writing in place; the others take
        the reference path (:meth:`_step_reference`), which computes everything in
        temporaries before writing, so a step either completes for every parameter or
        changes none.
        """
        plans = self._get_plan()
        try:
            gnorm, keep = self._prepass(plans)
        except (RuntimeError, NotImplementedError, ValueError):
            self._check_sparse()  # the usual cause: name the parameter
            raise
        if not gnorm < math.inf:  # some gradient is not finite, or its sum of squares overflows
            bad = self._find_bad()
            if bad:
                return self._nonfinite(bad)
        if not self._fast_is_safe(plans, gnorm):
            del keep
            done = self._step_reference()
            if done:  # it wrote the state tensors (new buffers too): rebuild the chunks
                self._plan = None
                self._get_plan()
            return done
        prepared = [[self._prepare_chunk(group, ch) for ch in gp.chunks]
                    for group, gp in zip(self.param_groups, plans, strict=True)]
        native_stats = self._native_run(plans)
        del keep
        self.last_stats = []
        for group, gp, items in zip(self.param_groups, plans, prepared, strict=True):
            self._euclid_foreach(group, [group["params"][i] for i in gp.euclid])
            stats = list(native_stats.get(id(group), ())) if self.log_stats else None
            for item in items:
                self._apply_chunk(group, item, stats)
            for i in gp.foreign:
                self._step_foreign(group, i)
            if stats is not None:
                self._publish_stats({id(group): stats}, append=True)
        return True

    def _prepare_chunk(self, group, ch) -> tuple:
        """Gather one chunk of same-shape kernels and its gradients, and compute the
        directions the update needs: ``(chunk, x, g, c, inplace, hyper)`` for
        :meth:`_apply_chunk`."""
        x, g, inplace = bt.gather(ch, _grad)
        h = self._hyper(group, ch)
        h.short = float(group["lr"]) * self._dbound <= 3.0 * ch.layout.r
        g, c = geo.GEOMETRIES[ch.kind].prepare(ch, x, g, h)
        return ch, x, g, c, inplace, h

    def _apply_chunk(self, group, item, stats) -> None:
        """Step one chunk prepared by :meth:`_prepare_chunk` and write it back."""
        ch, x, g, c, inplace, h = item
        h.lr = self._chunk_lr(group, ch, c.dim() if ch.kind == "sphere" else 1)
        xn = geo.GEOMETRIES[ch.kind].apply(ch, x, g, c, h, stats)
        if not inplace:
            bt.scatter(ch, xn)
        if ch.fresh_members:
            bt.commit_fresh(ch, self.state, _nblocks)

    def _step_foreign(self, group, i) -> None:
        """geoopt's update of parameter ``i`` of ``group`` (a manifold that is not a
        kernelgeo kernel manifold), computed first and then written."""
        p = group["params"][i]
        commits: list = []
        self._foreign(group, p, p.manifold, self._name(group, i), commits)
        _apply_commits(commits)

    def _prepass(self, plans) -> tuple[float, list]:
        """An upper bound of the 2-norm of every gradient of the step (NaN or Inf if one is
        not finite), with one synchronisation; binds the fused kernels' gradient pointers
        (the returned list keeps alive the copies made for them)."""
        keep: list = []
        out = 0.0
        cache = getattr(self, "_prepass_cache", None)
        if cache is None or cache[0] is not plans:
            eu, other = [], []  # parameters whose gradients are read by C / by torch
            for group, gp in zip(self.param_groups, plans, strict=True):
                ps = group["params"]
                eu.extend(ps[i] for i in gp.euclid)
                seen = set()
                for ch in gp.chunks:
                    for mem in ch.members:
                        if id(mem.param) not in seen:
                            seen.add(id(mem.param))
                            other.append(mem.param)
                other.extend(ps[i] for i in gp.foreign)
            cache = self._prepass_cache = (plans, eu, other)
        _, eu, other = cache
        c_ok = self._use_native()
        torch_ts = [p.grad for p in other]
        c_ts = []
        for p in eu:
            g = p.grad
            (c_ts if c_ok and _native_checkable(g) else torch_ts).append(g)
        if any(g.layout != torch.strided for g in torch_ts):
            self._check_sparse()  # (the fused kernels' gradients: their strides raise below)
        for _group, dtype, mems, arr, _ in self._native_work(plans):
            keep.extend(self._native_bind(_group, dtype, mems, arr))
            # the largest entry bounds a component's norm up to sqrt(its numel)
            nmax = max(it.nblk * it.a * it.s for it in arr)
            out = _nanmax(out, math.sqrt(nmax) * _native.amax(arr, dtype))
        by_dtype: dict = {}
        for g in c_ts:
            by_dtype.setdefault(g.dtype, []).append(g)
        for gs in by_dtype.values():
            nmax = max(g.numel() for g in gs)
            out = _nanmax(out, math.sqrt(nmax) * _native.amax_tensors(gs))
        if torch_ts:
            out = _nanmax(out, _norm_bound(torch_ts))
        return out, keep

    def _measure_bounds(self) -> dict:
        """Largest 2-norm of any momentum buffer and of any parameter (one pass over them,
        in float64: no overflow); the fast path then tracks upper bounds of both."""
        beta, xe = 0.0, 0.0
        norms = []
        for group in self.param_groups:
            for p in group["params"]:
                norms.append(p.detach())
                if p not in self.state:
                    continue
                st = self.state[p]
                if st.get("momentum_buffer") is not None:
                    beta = max(beta, _norm64(st["momentum_buffer"]))
                for t in st.get("momentum_blocks") or ():
                    if t is not None:
                        beta = max(beta, _norm64(t))
        for t in norms:
            xe = max(xe, _norm64(t))
        return {"beta": beta, "x": xe}

    def _fast_is_safe(self, plans, gnorm: float) -> bool:
        r"""Whether no intermediate of the fast path can overflow this step (sufficient
        conditions from norm bounds); updates the tracked bounds when it returns True.

        :math:`\gamma` (from :meth:`_prepass`) bounds every component's gradient norm,
        :math:`\beta` every buffer's norm (the transport is a projection, which does not
        increase it), :math:`\xi` every parameter's norm; then
        :math:`\|G_k + w x_k\| \le \gamma + w\xi`,
        :math:`\|B'\| \le \mu\beta + \gamma + w\xi` and the direction :math:`d` and the
        displacement :math:`\lambda m d` are bounded.  These bounds are far above realistic
        values (float32: about 3e17 for what is squared).
        """
        if not gnorm < math.inf:
            return False
        if self._bound is None:
            self._bound = self._measure_bounds()
        cached = getattr(self, "_safe_consts", None)
        if cached is None or cached[0] is not plans:
            dts = {p.dtype for g in self.param_groups for p in g["params"]
                   if p.grad is not None and p.is_floating_point()}
            rmax = 1.0
            for gp in plans:
                for ch in gp.chunks:
                    rmax = max(rmax, float(ch.layout.r))
                for nm in gp.native:
                    rmax = max(rmax, float(nm.layout.r))
            fmax = min((torch.finfo(d).max for d in dts), default=math.inf)
            cached = self._safe_consts = (plans, fmax, rmax)
        _, fmax, rmax = cached
        if fmax == math.inf:
            return True
        sq = math.sqrt(fmax) / 64.0
        mult = 1.0 if self.radius_scaling is None else \
            float(getattr(self.radius_scaling, "clip", (1.0, 1e3))[1])
        lrm = max(float(g["lr"]) for g in self.param_groups) * mult
        mu = max(float(g["momentum"]) for g in self.param_groups)
        wd = max(float(g["weight_decay"]) for g in self.param_groups)
        nest = any(g["nesterov"] for g in self.param_groups)

        def within(bnd) -> bool:
            gam = gnorm + wd * bnd["x"]
            beta = mu * bnd["beta"] + gam if mu else 0.0
            d = (gam + mu * beta if nest else beta) if mu else gam
            ok = max(gam, beta, d, rmax + lrm * d) <= sq and bnd["x"] + lrm * d <= fmax / 4
            if ok:
                self._bound = {"beta": beta, "x": bnd["x"] + lrm * d}
                self._dbound = d * mult
            return ok

        if within(self._bound):
            return True
        self._bound = self._measure_bounds()  # the tracked bounds may be loose: measure
        return within(self._bound)

    def _native_work(self, plans) -> list:
        """Per group and dtype: the members and a ctypes item array, built once per plan
        (the fields that change between steps, gradient pointers and ``lr``, are refreshed
        by :meth:`_native_bind`)."""
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
                    it.rule, it.cap = c.code, c.kernel_cap  # the step_rules table's codes
                # like torch's own CPU kernels, use its threads for large steps (one part per
                # thread, at least NATIVE_GRAIN entries each; kernels are never split)
                numel = sum(nm.nblk * nm.a * nm.s for nm in mems)
                parts = _native.partition(arr, max(1, min(threads, numel // NATIVE_GRAIN)))
                work.append((group, dtype, mems, arr, parts))
        self._native_cache = (plans, work, threads)
        return work

    def _native_bind(self, group, dtype, mems, arr) -> list:
        """Refresh the fields of the item array that change between steps (gradient
        pointers, ``lr``, first step); returns the gradient copies made for it."""
        keep = []
        for it, nm in zip(arr, mems, strict=True):
            g, x = nm.sub(nm.param.grad), nm.sub(nm.param.detach())
            if g.stride() != x.stride() or g.dtype != dtype:
                g = torch.empty_like(x).copy_(g)
                keep.append(g)
            it.g = g.data_ptr()
            lr = group["lr"]
            mult = self._multiplier(nm.param)
            it.lr = float(lr) if mult is None else float(lr * mult)
            it.fresh = int(nm.fresh)
        return keep

    def _native_run(self, plans) -> dict:
        """Fused CPU step of the plans' native kernels (bound by :meth:`_prepass`, which
        checked their gradients).  Returns the per-group step statistics when
        ``log_stats``."""
        work = self._native_work(plans)
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
                    mom.set_kernel_block(self.state, nm.param, nm.block, nm.buf,
                                         _nblocks(nm.param))
                nm.fresh = False
        return out

    def _hyper(self, group, ch) -> geo.Hyper:
        wd = group["weight_decay"] if (ch.consts.flat or group["decay_manifold"]) else 0.0
        return geo.Hyper(lr=group["lr"], momentum=group["momentum"],
                        dampening=group["dampening"], nesterov=group["nesterov"], wd=wd)

    def _euclid_foreach(self, group, params):
        """``torch.optim.SGD``'s update of Euclidean parameters
        (:func:`~kernelgeo.optim.geometries.euclidean.euclid_foreach`; its fused CPU kernel
        unless the fused kernels are off or the step is being compiled)."""
        geo.euclidean.euclid_foreach(self.state, group, params,
                                     fused=self.native is not False and not _compiling())

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
                psub.copy_(geo.generic.reproject(bm, psub))
                if bl is not None and bl[b] is not None:
                    bl[b].copy_(bm.proju(psub, bl[b]))


def _grad(p):
    return p.grad


def _apply_commits(commits: list) -> None:
    """Write the reference path's new values: ``("copy", tensor, ...)`` into a tensor,
    ``("state", setter, ...)`` into the momentum state (:mod:`~kernelgeo.optim.momentum`);
    ``("check", ...)`` entries were only checked to be finite."""
    for op, target, _key, new, *_ in commits:
        if op == "copy":
            target.copy_(new)
        elif op == "state":
            target(new)


#: fewest entries per thread of the fused kernels (below, a thread costs more than it saves)
NATIVE_GRAIN = 1 << 20


def _compiling() -> bool:
    comp = getattr(torch, "compiler", None)
    return bool(comp is not None and hasattr(comp, "is_compiling") and comp.is_compiling())


def _native_checkable(g: torch.Tensor) -> bool:
    return g.layout == torch.strided and g.is_cpu and g.dtype in _native.DTYPES and \
        g.is_contiguous()


def _norm_bound(ts: list[torch.Tensor], small: int = 1 << 14) -> float:
    """An upper bound of the largest 2-norm of the tensors ``ts``, with one synchronisation:
    NaN or Inf if an entry is not finite, and Inf (a false alarm the caller resolves) if a
    sum of squares overflows.  One ``dot`` per tensor (``vector_norm`` is several times
    slower on the CPU); small tensors (BN parameters, biases) after one ``cat`` (the norm
    of the concatenation bounds each one's)."""
    ts = [t for t in ts if t.numel()]
    if not ts:
        return 0.0
    little = [t.reshape(-1) for t in ts if t.numel() <= small]
    sq = []
    for t in ts:
        if t.numel() > small:
            f = t.reshape(-1)
            sq.append(torch.dot(f, f) if f.dtype in (torch.float32, torch.float64)
                      else f.float().square().sum())
    if little:
        f = torch.cat([t.to(torch.promote_types(t.dtype, torch.float32)) for t in little]) \
            if len({t.dtype for t in little}) > 1 or little[0].dtype not in (
                torch.float32, torch.float64) else torch.cat(little)
        sq.append(torch.dot(f, f))
    dev = sq[0].device
    return math.sqrt(float(torch.stack([v.to(device=dev, dtype=torch.float64)
                                        for v in sq]).max()))


def _nanmax(a: float, b: float) -> float:
    """``max`` that propagates NaN (Python's ``max`` drops it depending on the order)."""
    return a if a != a else (b if b != b or b > a else a)


def _norm64(t: torch.Tensor) -> float:
    """2-norm in float64 (float32 entries beyond ~1e19 would overflow the sum of squares)."""
    if not t.numel():
        return 0.0
    if t.dtype != torch.float64:
        return float(torch.linalg.vector_norm(t.detach(), dtype=torch.float64))
    m = float(t.detach().abs().max())
    if not 0.0 < m < math.inf:
        return m
    return m * float(torch.linalg.vector_norm(t.detach() / m))
