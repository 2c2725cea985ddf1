"""Training loop behind ``kernelgeo train``: data, model, geometry, optimizer, schedule, metrics,
checkpoints and exact resume.

:func:`train` takes a :class:`TrainConfig` and returns the run's summary (a dict, also written
to ``<out>/summary.json``).  Output directory layout::

    <out>/config.json       the configuration
    <out>/geometry.md       which layer lives on which manifold (ConstrainReport)
    <out>/metrics.jsonl     one JSON object per epoch
    <out>/metrics.csv       the same as a table
    <out>/checkpoint.pt     latest state (atomic; see kernelgeo.checkpoint)
    <out>/summary.json      final/best test error, time per epoch, constraint error, machine

Resuming (``resume=True``) restores model, optimizer, scheduler, the data generator and the
global RNG states from ``checkpoint.pt``, written at the end of every epoch, and rewrites the
metrics files from the history stored in it, so an interrupted run continued with ``--resume``
produces the same metrics as an uninterrupted one (bit for bit on a CPU with the same thread
count).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import platform
import random
import shlex
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import distributed as kdist
from ._compat import ManifoldParameter
from .checkpoint import load_checkpoint, save_checkpoint
from .data import ImageData, TensorLoader, check_dataset_name, load_dataset
from .models import check_model_name, get_model

__all__ = ["TrainConfig", "train", "parse_geometry", "check_geometry", "build_optimizer",
           "build_scheduler", "OPTIMIZERS", "SCHEDULES", "STEP_RULES", "machine_info",
           "geometry_slug", "constraint_error", "ConfigError"]

OPTIMIZERS = ("rsgd", "geoopt", "sgd")
SCHEDULES = ("cosine", "step", "robbins-monro", "constant")
STEP_RULES = ("gsgd", "bounded", "none")
METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "train_error", "test_loss", "test_error",
                 "constraint_error", "epoch_time", "images_per_s")
CKPT_NAME = "checkpoint.pt"
#: config fields that must agree between a checkpoint and the run resuming it
_RESUME_KEYS = ("dataset", "model", "geometry", "optimizer", "step_rule", "schedule", "epochs",
                "batch_size", "lr", "momentum", "weight_decay", "seed", "train_subset")


class ConfigError(ValueError):
    """Invalid configuration (bad names, bad rules, incompatible options)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (the CLI flags of ``kernelgeo train``).

    ``geometry`` is a manifold name (``"sphere"``, ``"po:sphere+stiefel"``...) or per-layer
    rules ``"layer1.*=sphere,layer3.*=stiefel,*=euclidean"`` (module-name globs, first match
    wins).  ``model=None`` picks ``resnet-digits`` for 8x8 images and ``resnet20`` otherwise.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    split_seed: int = 0
    image_size: int | None = None
    model: str | None = None
    geometry: str = "euclidean"
    optimizer: str = "rsgd"
    step_rule: str = "gsgd"
    schedule: str = "cosine"
    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    manifold_weight_decay: float = 0.0
    rm_t0: float | None = None
    rm_power: float = 0.75
    augment: str = "auto"
    crop_padding: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool = False
    deterministic: bool = False
    threads: int | None = None
    out: str | None = None
    resume: bool = False
    checkpoint: bool = True
    stop_after: int | None = None
    max_steps: int | None = None
    sync_check_every: int = 100
    broadcast_every: int = 0
    quiet: bool = False
    progress: bool = True
    command: str | None = None
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------- geometry
def parse_geometry(spec: str) -> str | dict[str, str]:
    """Parse a geometry spec: a single name, or rules ``glob=name,glob=name,...``.

    Parameters
    ----------
    spec : str
        ``"sphere"``, ``"po:sphere+stiefel"`` or ``"layer1.*=sphere,*=euclidean"``.

    Returns
    -------
    str or dict
        The name, or an insertion-ordered ``{glob: name}`` mapping for
        :func:`kernelgeo.constrain`.

    Raises
    ------
    ConfigError
        Malformed rules or unknown manifold names (listing the valid names).
    """
    from .manifolds import get_manifold

    s = spec.strip()
    if not s:
        raise ConfigError("empty geometry spec")
    if "=" not in s:
        if "," in s:
            raise ConfigError(f"bad geometry {spec!r}: several entries need the form "
                              "'glob=name', e.g. 'layer1.*=sphere,*=euclidean'")
        _check_manifold_name(s, get_manifold)
        return s
    rules: dict[str, str] = {}
    for i, part in enumerate(s.split(",")):
        part = part.strip()
        if part.count("=") != 1:
            raise ConfigError(f"bad geometry rule #{i + 1} {part!r} in {spec!r}: expected "
                              "'<module-name glob>=<geometry>', e.g. 'layer1.*=sphere'")
        glob, name = (x.strip() for x in part.split("="))
        if not glob or not name:
            raise ConfigError(f"bad geometry rule #{i + 1} {part!r} in {spec!r}: empty "
                              f"{'glob' if not glob else 'geometry'}")
        if glob in rules:
            raise ConfigError(f"geometry rule glob {glob!r} given twice in {spec!r}")
        _check_manifold_name(name, get_manifold)
        rules[glob] = name
    return rules


def _check_manifold_name(name: str, get_manifold) -> None:
    try:
        get_manifold(name)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"bad geometry {name!r}: {err}") from None


def check_geometry(spec: str) -> str:
    """Validate a geometry spec string (see :func:`parse_geometry`); returns it unchanged."""
    parse_geometry(spec)
    return spec


def geometry_slug(spec: str) -> str:
    """File-system friendly name of a geometry spec, e.g. ``po-sphere+stiefel``."""
    out = "".join(c if (c.isalnum() or c in "+-_.") else "-" for c in spec.strip())
    return out.strip("-") or "geometry"


def constraint_error(model: nn.Module) -> float:
    """Largest distance of a manifold parameter of ``model`` from its manifold."""
    try:
        from . import constraint_error as _ce
    except ImportError:  # pragma: no cover - only while kernelgeo.constrain is missing
        _ce = None
    if _ce is not None:
        return float(_ce(model))
    err = 0.0
    with torch.no_grad():
        for p in model.parameters():
            if isinstance(p, ManifoldParameter):
                err = max(err, float((p - p.manifold.projx(p)).abs().max()))
    return err


# ------------------------------------------------------------------------ optimizer/schedule
def _param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    man, euc = [], []
    for p in model.parameters():
        if p.requires_grad:
            (man if isinstance(p, ManifoldParameter) else euc).append(p)
    groups = []
    if man:
        # weight decay on a sphere/Stiefel kernel only pulls it off the manifold (the tangent
        # projection removes most of it), so it defaults to 0 there
        groups.append({"params": man, "weight_decay": cfg.manifold_weight_decay})
    if euc:
        groups.append({"params": euc, "weight_decay": cfg.weight_decay})
    return groups


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.optimizer`` over ``model``'s parameters.

    ``rsgd`` is :class:`kernelgeo.optim.ConvergentRSGD` (with ``cfg.step_rule``), ``geoopt``
    is :class:`geoopt.optim.RiemannianSGD`, ``sgd`` is :class:`torch.optim.SGD` (only for
    models without manifold parameters).  Manifold kernels and Euclidean parameters are two
    parameter groups with their own weight decay.
    """
    groups = _param_groups(model, cfg)
    kw = dict(lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "sgd":
        if any(isinstance(p, ManifoldParameter) for p in model.parameters()):
            raise ConfigError("--optimizer sgd cannot keep kernels on their manifolds; use "
                              "rsgd or geoopt with a non-euclidean geometry")
        return torch.optim.SGD(groups, **kw)
    if cfg.optimizer == "rsgd":
        try:
            from .optim import ConvergentRSGD
        except ImportError:
            warnings.warn("kernelgeo.optim.ConvergentRSGD is not available; falling back to "
                          "geoopt.optim.RiemannianSGD", RuntimeWarning, stacklevel=2)
        else:
            return ConvergentRSGD(groups, step_rule=cfg.step_rule, **kw)
    if cfg.optimizer in ("rsgd", "geoopt"):
        from ._compat import RiemannianSGD

        return RiemannianSGD(groups, **kw)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")


class _Schedule:
    """Picklable learning-rate factor of step ``t`` (so LambdaLR can save/restore it)."""

    def __init__(self, kind: str, total: int, t0: float, power: float):
        self.kind, self.total, self.t0, self.power = kind, max(1, total), t0, power

    def __call__(self, t: int) -> float:
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, self.total) / self.total))
        if self.kind == "step":
            return 0.1 ** (int(t >= 0.5 * self.total) + int(t >= 0.75 * self.total))
        if self.kind == "robbins-monro":
            return (1.0 + t / self.t0) ** (-self.power)
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int,
                    steps_per_epoch: int):
    """Per-step learning-rate scheduler for ``cfg.schedule``.

    ``cosine``: :math:`\\eta_t = \\eta_0 (1 + \\cos(\\pi t / T)) / 2`; ``step``: x0.1 at 50% and
    75% of training; ``robbins-monro``: :math:`\\eta_t = \\eta_0 (1 + t/t_0)^{-p}` with
    :math:`1/2 < p \\le 1` (:math:`\\sum\\eta_t=\\infty`, :math:`\\sum\\eta_t^2<\\infty`, the step
    sizes of the convergence theorem; ``t0`` defaults to one epoch); ``constant``.
    """
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"unknown schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}")
    t0 = float(cfg.rm_t0 or steps_per_epoch)
    if cfg.schedule == "robbins-monro":
        if not 0.5 < cfg.rm_power <= 1.0:
            raise ConfigError(f"--rm-power must be in (0.5, 1] for Robbins-Monro step sizes, "
                              f"got {cfg.rm_power}")
        try:
            from .optim import RobbinsMonroLR
        except ImportError:
            pass
        else:
            return RobbinsMonroLR(optimizer, t0=t0, power=cfg.rm_power)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, _Schedule(cfg.schedule, total_steps, t0, cfg.rm_power))


# ------------------------------------------------------------------------------------ helpers
def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Platform, CPU, thread count, accelerator and library versions, for reports."""
    from . import __version__

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "kernelgeo": __version__,
        "hostname": platform.node(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _pick_device(name: str, ctx_local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda requested but CUDA is not available")
        return torch.device("cuda", ctx_local_rank) if name == "cuda" else torch.device(name)
    if name != "cpu":
        raise ConfigError(f"unknown device {name!r}; valid: auto, cpu, cuda, cuda:N")
    return torch.device("cpu")


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _rng_state(device: torch.device) -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": list(np.random.get_state())}
    if device.type == "cuda":
        st["cuda"] = torch.cuda.get_rng_state(device)
    return st


def _set_rng_state(st: dict, device: torch.device) -> None:
    torch.set_rng_state(st["torch"])
    py = st["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = st["numpy"]
    np.random.set_state((npst[0], np.asarray(npst[1], dtype=np.uint32), *npst[2:]))
    if device.type == "cuda" and "cuda" in st:
        torch.cuda.set_rng_state(st["cuda"], device)


def _augment_policy(cfg: TrainConfig, data: ImageData) -> tuple[int, bool]:
    a = cfg.augment.lower()
    valid = ("auto", "none", "crop", "flip", "crop+flip")
    if a not in valid:
        raise ConfigError(f"unknown augmentation {cfg.augment!r}; valid: {', '.join(valid)}")
    h = data.image_size[0]
    # standard CIFAR recipe pads 4 on 32x32; keep the same fraction for smaller images
    pad = cfg.crop_padding if cfg.crop_padding is not None else max(1, h // 8)
    if a == "auto":
        # 8x8 digits are too small to crop without losing strokes; no flips for characters
        crop = h >= 16
        return (pad if crop else 0), (data.flip and crop)
    return (pad if "crop" in a else 0), ("flip" in a)


def _default_model(data: ImageData) -> str:
    return "resnet-digits" if max(data.image_size) <= 16 else "resnet20"


def _write_metrics(out: Path, history: list[dict]) -> None:
    with open(out / "metrics.jsonl", "w") as f:
        for row in history:
            f.write(json.dumps(row) + "\n")
    with open(out / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(history)


def _append_metrics(out: Path, row: dict, first: bool) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    with open(out / "metrics.csv", "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
        if first:
            w.writeheader()
        w.writerow(row)


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


@torch.no_grad()
def evaluate(model: nn.Module, loader: TensorLoader, ctx: kdist.DistContext,
             amp_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Mean cross-entropy and error rate of ``model`` over ``loader`` (summed over ranks)."""
    was = model.training
    model.eval()
    acc = torch.zeros(3, dtype=torch.float64, device=loader.device)
    for xb, yb in loader:
        with torch.autocast(loader.device.type, dtype=amp_dtype or torch.bfloat16,
                            enabled=amp_dtype is not None):
            logits = model(xb)
        acc[0] += F.cross_entropy(logits.float(), yb, reduction="sum").double()
        acc[1] += (logits.argmax(1) != yb).sum()
        acc[2] += len(yb)
    kdist.all_reduce_sum(acc, ctx)
    model.train(was)
    n = max(float(acc[2]), 1.0)
    return float(acc[0]) / n, float(acc[1]) / n


def _check_resume(state: dict, cfg: TrainConfig, path: Path) -> None:
    old = state.get("config", {})
    diff = [f"{k}: checkpoint {old.get(k)!r} vs now {getattr(cfg, k)!r}"
            for k in _RESUME_KEYS if k in old and old.get(k) != getattr(cfg, k)]
    if diff:
        raise ConfigError(f"--resume: {path} was written by a different run configuration ("
                          + "; ".join(diff) + "); use another --out directory or the same "
                          "options")


# --------------------------------------------------------------------------------------- main
def train(cfg: TrainConfig, data: ImageData | None = None) -> dict[str, Any]:
    """Train one model as configured by ``cfg``; returns the summary dict.

    Parameters
    ----------
    cfg : TrainConfig
    data : ImageData, optional
        Pre-loaded data (otherwise loaded from ``cfg.dataset``); lets :mod:`kernelgeo.compare`
        decode a data set once for many runs.

    Returns
    -------
    dict
        Summary: ``final_test_error``, ``best_test_error``, ``best_epoch``,
        ``time_per_epoch``, ``max_constraint_error``, ``history`` (per-epoch metrics), ...

    Raises
    ------
    ConfigError
        Bad names, rules or option combinations.
    kernelgeo.data.DataNotFoundError
        Missing data.
    kernelgeo.checkpoint.CheckpointError
        Unreadable checkpoint on ``resume``.
    """
    try:
        cfg.dataset = check_dataset_name(cfg.dataset)
        if cfg.model is not None:
            cfg.model = check_model_name(cfg.model)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    spec = parse_geometry(cfg.geometry)
    for name, valid in (("optimizer", OPTIMIZERS), ("step_rule", STEP_RULES),
                        ("schedule", SCHEDULES)):
        if getattr(cfg, name) not in valid:
            raise ConfigError(f"unknown {name.replace('_', '-')} {getattr(cfg, name)!r}; "
                              f"valid: {', '.join(valid)}")
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.lr <= 0:
        raise ConfigError("epochs and batch size must be >= 1 and lr > 0")

    device_type = "cuda" if (cfg.device.startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    ctx = kdist.init_distributed(device_type)
    threads = torch.get_num_threads()
    try:
        return _train(cfg, spec, data, ctx)
    finally:
        torch.set_num_threads(threads)
        kdist.cleanup()


def _train(cfg: TrainConfig, spec, data: ImageData | None, ctx: kdist.DistContext) -> dict:
    device = _pick_device(cfg.device, ctx.local_rank)
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                            split_seed=cfg.split_seed, train_subset=cfg.train_subset,
                            test_subset=cfg.test_subset, image_size=cfg.image_size)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif device.type == "cpu" and (max(data.image_size) <= 16 or ctx.enabled):
        # the convolutions of 8x8 images are too small to split over threads: intra-op
        # threading costs more than it saves (measured 13 ms/step on 1 thread vs 70+ ms on 2),
        # and several ranks on one CPU would oversubscribe its cores
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", ctx.world_size))
        torch.set_num_threads(1 if max(data.image_size) <= 16
                              else max(1, (os.cpu_count() or 1) // local_world))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    log = (lambda *a: print(*a, flush=True)) if (ctx.is_main and not cfg.quiet) else (
        lambda *a: None)

    model_name = cfg.model or _default_model(data)
    _seed_all(cfg.seed)
    model = get_model(model_name, data.num_classes, data.in_channels)
    from . import constrain

    try:
        report = constrain(model, spec, on_invalid="skip")
    except ValueError as err:
        raise ConfigError(str(err)) from None
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    n_manifold = sum(p.numel() for p in model.parameters() if isinstance(p, ManifoldParameter))

    crop, flip = _augment_policy(cfg, data)
    train_loader = TensorLoader(data.x_train, data.y_train, cfg.batch_size, mean=data.mean,
                                std=data.std, shuffle=True, drop_last=True, crop_padding=crop,
                                flip=flip, seed=cfg.seed, device=device, rank=ctx.rank,
                                world_size=ctx.world_size)
    if len(train_loader) == 0:
        raise ConfigError(f"batch size {cfg.batch_size} exceeds the {train_loader.num_samples} "
                          "training images")
    test_loader = TensorLoader(data.x_test, data.y_test, max(cfg.batch_size, 500),
                               mean=data.mean, std=data.std, device=device, rank=ctx.rank,
                               world_size=ctx.world_size)
    steps_per_epoch = len(train_loader)
    total_steps = steps_per_epoch * cfg.epochs
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, total_steps, steps_per_epoch)

    out = Path(cfg.out) if cfg.out else None
    cfg_dict = dataclasses.asdict(cfg)
    cfg_dict["model"] = cfg.model
    start_epoch, step, history = 0, 0, []
    ckpt_path = out / CKPT_NAME if out else None
    if cfg.resume:
        if ckpt_path is None:
            raise ConfigError("--resume needs --out (the directory of the run to continue)")
        if ckpt_path.is_file():
            state = load_checkpoint(ckpt_path, map_location=device,
                                    required=("model", "optimizer", "epoch", "history"))
            _check_resume(state, cfg, ckpt_path)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            train_loader.load_state_dict(state["loader"])
            _set_rng_state(state["rng"], device)
            start_epoch, step, history = state["epoch"], state["step"], list(state["history"])
            log(f"resumed from {ckpt_path} at epoch {start_epoch}")
        else:
            log(f"--resume: no checkpoint at {ckpt_path}; starting from scratch")

    if ctx.enabled:
        # conv weights with a size-1 dim (1-channel stems) get gradients whose strides differ
        # from DDP's bucket views only in that dim: harmless, but warned about every step
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        model_t = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model_t = model
    amp_dtype = torch.bfloat16 if cfg.amp else None

    if ctx.is_main and out is not None:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", {**cfg_dict, "model": model_name})
        (out / "geometry.md").write_text(report.to_markdown() + "\n")
        _write_metrics(out, history)
    log(f"{data.describe()}; model {model_name} ({n_params} parameters, {n_manifold} on "
        f"manifolds); geometry {cfg.geometry}; device {device}"
        + (f"; {ctx.world_size} ranks ({ctx.backend})" if ctx.enabled else ""))

    show_bar = cfg.progress and not cfg.quiet and ctx.is_main and sys.stderr.isatty()
    divergence = 0.0
    t_run = time.perf_counter()
    stopped_early = False
    epoch = start_epoch
    for epoch in range(start_epoch, cfg.epochs):
        model_t.train()
        t0 = time.perf_counter()
        acc = torch.zeros(3, dtype=torch.float64, device=device)
        bar = None
        if show_bar:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       leave=False, dynamic_ncols=True)
        for xb, yb in train_loader:
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16,
                                enabled=amp_dtype is not None):
                logits = model_t(xb)
                loss = F.cross_entropy(logits.float(), yb)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            with torch.no_grad():
                acc[0] += loss.detach().double() * len(yb)
                acc[1] += (logits.argmax(1) != yb).sum()
                acc[2] += len(yb)
            if ctx.enabled and cfg.sync_check_every and step % cfg.sync_check_every == 0:
                divergence = max(divergence, kdist.param_divergence(model_t, ctx))
            if ctx.enabled and cfg.broadcast_every and step % cfg.broadcast_every == 0:
                kdist.broadcast_parameters(model_t, ctx)
            if bar is not None:
                el = time.perf_counter() - t0
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}",
                                img_s=f"{float(acc[2]) * ctx.world_size / max(el, 1e-9):.0f}")
            if cfg.max_steps and step >= cfg.max_steps:
                break
        if bar is not None:
            bar.close()
        train_time = time.perf_counter() - t0
        kdist.all_reduce_sum(acc, ctx)
        test_loss, test_err = evaluate(model_t, test_loader, ctx, amp_dtype)
        epoch_time = time.perf_counter() - t0
        row = {
            "epoch": epoch + 1, "step": step, "lr": optimizer.param_groups[0]["lr"],
            "train_loss": float(acc[0] / acc[2]), "train_error": float(acc[1] / acc[2]),
            "test_loss": test_loss, "test_error": test_err,
            "constraint_error": constraint_error(model),
            "epoch_time": epoch_time, "images_per_s": float(acc[2]) / max(train_time, 1e-9),
        }
        if not math.isfinite(row["train_loss"]):
            raise FloatingPointError(f"training diverged at epoch {epoch + 1} (loss "
                                     f"{row['train_loss']}); lower --lr")
        history.append(row)
        log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} err "
            f"{row['train_error']:.4f}  test loss {test_loss:.4f} err {test_err:.4f}  "
            f"constraint {row['constraint_error']:.2e}  {epoch_time:.2f}s "
            f"({row['images_per_s']:.0f} img/s)")
        if ctx.is_main and out is not None:
            _append_metrics(out, row, first=not (out / "metrics.csv").stat().st_size)
            if cfg.checkpoint:
                save_checkpoint({
                    "format": "kernelgeo-train-1", "config": cfg_dict, "epoch": epoch + 1,
                    "step": step, "history": history, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "loader": train_loader.state_dict(), "rng": _rng_state(device),
                }, ckpt_path)
        if cfg.max_steps and step >= cfg.max_steps:
            stopped_early = True
            break
        if cfg.stop_after and epoch + 1 - start_epoch >= cfg.stop_after and epoch + 1 < cfg.epochs:
            stopped_early = True
            log(f"stopping after {cfg.stop_after} epoch(s) as asked; continue with --resume")
            break

    if ctx.enabled:
        divergence = max(divergence, kdist.param_divergence(model_t, ctx))
    summary = _summary(cfg, model_name, data, history, report, n_params, n_manifold, device,
                       ctx, divergence, time.perf_counter() - t_run, stopped_early)
    if ctx.is_main and out is not None:
        _write_json(out / "summary.json", summary)
    return summary


def _summary(cfg, model_name, data, history, report, n_params, n_manifold, device, ctx,
             divergence, run_time, stopped_early) -> dict[str, Any]:
    errs = [h["test_error"] for h in history]
    best = int(np.argmin(errs)) if errs else -1
    times = [h["epoch_time"] for h in history]
    return {
        "dataset": cfg.dataset, "dataset_label": data.label, "model": model_name,
        "geometry": cfg.geometry, "optimizer": cfg.optimizer, "step_rule": cfg.step_rule,
        "schedule": cfg.schedule, "seed": cfg.seed,
        "epochs_done": len(history), "epochs": cfg.epochs, "completed": not stopped_early,
        "train_images": int(len(data.y_train)), "test_images": int(len(data.y_test)),
        "final_test_error": errs[-1] if errs else None,
        "best_test_error": errs[best] if errs else None,
        "best_epoch": best + 1 if errs else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "time_per_epoch": float(np.mean(times)) if times else None,
        "run_time": run_time,
        "max_constraint_error": max((h["constraint_error"] for h in history), default=0.0),
        "final_constraint_error": history[-1]["constraint_error"] if history else 0.0,
        "parameters": n_params, "manifold_parameters": n_manifold,
        "layers": [dataclasses.asdict(e) for e in report.entries],
        "world_size": ctx.world_size, "ddp_max_param_divergence": divergence,
        "command": cfg.command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__, "machine": machine_info(device), "device": str(device),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "config": dataclasses.asdict(cfg),
        "history": history,
    }

