"""Optimizer and learning-rate schedule of a run.

To add an optimizer: write a function ``(groups, cfg) -> torch.optim.Optimizer`` below, add
it to :data:`_FACTORIES` and its name to :data:`kernelgeo.training.config.OPTIMIZERS` (the
command line's ``--optimizer`` choices come from there).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim import lr_scheduler as lrs

from .._compat import ManifoldParameter, RiemannianSGD
from ..optim import ConvergentRSGD, RiemannianAdam, RobbinsMonroLR
from .config import OPTIMIZERS, SCHEDULES, ConfigError, TrainConfig
from .plateau import PlateauLR

__all__ = ["param_groups", "build_optimizer", "build_scheduler", "LENGTH_DEPENDENT_SCHEDULES"]

#: schedules whose learning rate at a step depends on the total number of steps
LENGTH_DEPENDENT_SCHEDULES = ("cosine", "step")


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """Two parameter groups of ``(name, parameter)`` pairs (so optimizer errors name layers):
    manifold kernels with ``cfg.manifold_weight_decay``, the rest with ``cfg.weight_decay``."""
    man, euc = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (man if isinstance(p, ManifoldParameter) else euc).append((name, p))
    groups = []
    if man:
        # weight decay on a sphere/Stiefel kernel only pulls it off the manifold (the tangent
        # projection removes most of it), so it defaults to 0 there
        groups.append({"params": man, "weight_decay": cfg.manifold_weight_decay})
    if euc:
        groups.append({"params": euc, "weight_decay": cfg.weight_decay})
    return groups


def _sgd(groups, cfg):
    if groups and any(isinstance(p, ManifoldParameter) for g in groups for _, p in g["params"]):
        raise ConfigError("--optimizer sgd cannot keep kernels on their manifolds; use "
                          "rsgd or geoopt with a non-euclidean geometry")
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _rsgd(groups, cfg):
    # step_rule None: the optimizer's own default
    rule = {} if cfg.step_rule is None else {"step_rule": cfg.step_rule}
    return ConvergentRSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                          **rule)


def _geoopt(groups, cfg):
    return RiemannianSGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)


def _adam(groups, cfg):
    # betas are Adam's defaults; --momentum and --nesterov are SGD settings and unused here
    return RiemannianAdam(groups, lr=cfg.lr)


_FACTORIES = {"rsgd": _rsgd, "adam": _adam, "geoopt": _geoopt, "sgd": _sgd}


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``model``'s parameters.

    ``rsgd`` is :class:`kernelgeo.optim.ConvergentRSGD` (with ``cfg.step_rule``), ``geoopt``
    is :class:`geoopt.optim.RiemannianSGD`, ``adam`` is :class:`kernelgeo.optim.RiemannianAdam`
    (default betas; ``cfg.momentum`` unused), ``sgd`` is :class:`torch.optim.SGD` (only for
    models without manifold parameters).  Manifold kernels and Euclidean parameters are two
    parameter groups (:func:`param_groups`) with their own weight decay; parameters are
    passed with their names.
    """
    if cfg.optimizer not in _FACTORIES:
        raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
    return _FACTORIES[cfg.optimizer](param_groups(model, cfg), cfg)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
                    steps_per_epoch: int) -> lrs.LRScheduler:
    r"""Per-step learning-rate scheduler for ``cfg.schedule`` (torch's and kernelgeo's).

    ``cosine``: :class:`~torch.optim.lr_scheduler.CosineAnnealingLR` over ``total_steps``,
    :math:`\eta_t = \eta_0 (1 + \cos(\pi t / T)) / 2`; ``step``:
    :class:`~torch.optim.lr_scheduler.MultiStepLR`, x0.1 at 50% and 75% of training;
    ``robbins-monro``: :class:`kernelgeo.optim.RobbinsMonroLR`,
    :math:`\eta_t = \eta_0 (1 + t/t_0)^{-p}` with :math:`1/2 < p \le 1`
    (:math:`\sum\eta_t=\infty`, :math:`\sum\eta_t^2<\infty`, the step sizes of the
    convergence theorem; ``t0`` defaults to one epoch); ``constant``:
    :class:`~torch.optim.lr_scheduler.ConstantLR` with factor 1; ``plateau``:
    :class:`kernelgeo.training.plateau.PlateauLR` (rate x0.1 at each plateau of the training
    loss, ``cfg.plateau_*``; the training loop reports every epoch's loss to it and stops at
    the final plateau).  ``cosine`` and ``step`` depend on ``total_steps``
    (:data:`LENGTH_DEPENDENT_SCHEDULES`).
    """
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
    total = max(1, int(total_steps))
    if cfg.schedule == "cosine":
        return lrs.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0)
    if cfg.schedule == "step":
        return lrs.MultiStepLR(optimizer, milestones=[math.ceil(0.5 * total),
                                                      math.ceil(0.75 * total)], gamma=0.1)
    if cfg.schedule == "robbins-monro":
        return RobbinsMonroLR(optimizer, t0=float(cfg.rm_t0 or steps_per_epoch),
                              power=cfg.rm_power)
    if cfg.schedule == "plateau":
        return PlateauLR(optimizer, tol=cfg.plateau_tol, window=cfg.plateau_window,
                         decays=cfg.plateau_decays)
    return lrs.ConstantLR(optimizer, factor=1.0, total_iters=0)
