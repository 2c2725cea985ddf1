"""The training loop behind ``kernelgeo train``: :func:`train`.

A run is: validate the configuration (:mod:`.config`), build data loaders (:mod:`.loaders`),
model, geometry, optimizer and schedule (:mod:`.optimizers`), check the output directory and
any checkpoint to resume (:mod:`.rundir`) -- all before a file is written -- then train epoch
by epoch, writing a checkpoint and the metrics after each epoch, and finally ``summary.json``.

Resuming (``resume=True``) restores model, optimizer, scheduler, loss scaler, the data
generator and the global RNG states from ``checkpoint.pt`` and rewrites the metrics files from
the history stored in it, so an interrupted run (even one killed with ``SIGKILL``) continued
with ``--resume`` produces the same metrics and weights as an uninterrupted one (bit for bit
on a CPU with the same thread count).  Every setting that changes the result must be the same
(:func:`~kernelgeo.training.config.resume_differences` lists those that differ).

Extending a finished run (``resume=True`` with a larger ``epochs``) is allowed for the
``constant``, ``robbins-monro`` and ``plateau`` schedules, whose learning rate at a step does
not depend on the length of the run: the extended run is then identical to one started with
the larger ``epochs`` (a ``plateau`` run that reached its final plateau trains no further).
``cosine`` and ``step`` schedules are functions of the total number of steps, so changing
``epochs`` would change the learning rate of steps already taken: that is refused (start a
new run with the larger ``--epochs`` instead).
"""

from __future__ import annotations

import math
import os
import shlex
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import constrain, constraint_error
from .. import distributed as kdist
from .._compat import ManifoldParameter
from ..checkpoint import load_checkpoint, save_checkpoint
from ..data import check_dataset_name, load_dataset
from ..manifolds import GeometryError, GeometrySpec, parse_geometry
from ..models import check_model_name, get_model
from . import rundir
from .config import ConfigError, TrainConfig, config_dict, resume_differences, validate
from .environment import (
    machine_info,
    pick_device,
    rng_state,
    seed_all,
    set_rng_state,
    set_threads,
)
from .loaders import build_loaders, default_model
from .optimizers import LENGTH_DEPENDENT_SCHEDULES, build_optimizer, build_scheduler
from .path import PathMeter
from .plateau import PlateauLR

__all__ = ["train", "evaluate", "CKPT_FORMAT"]

#: ``format`` entry of training checkpoints
CKPT_FORMAT = "kernelgeo-train-2"
_AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: initial loss scale of ``amp="fp16"`` (torch's default; halved on every overflow)
FP16_INIT_SCALE = 2.0**16


@dataclass
class _Run:
    """What one run is made of (built by :func:`_build`, then trained)."""

    cfg: TrainConfig
    ctx: kdist.DistContext
    device: torch.device
    data: Any
    model_name: str
    model: nn.Module
    report: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    train_loader: Any
    test_loader: Any
    out: Path | None
    cfg_dict: dict
    log: Any
    path: PathMeter | None = None
    action: str | None = None  # what to do with ``out`` (see rundir.check_out)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return _AMP_DTYPES[self.cfg.amp]


def train(cfg: TrainConfig, data=None) -> dict[str, Any]:
    """Train one model as configured by ``cfg``; returns the summary dict.

    Parameters
    ----------
    cfg : TrainConfig
    data : ImageData or FolderData, optional
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
        Bad names, values, rules or option combinations; an output directory that holds
        another run; a checkpoint written with different settings.  Nothing is written.
    kernelgeo.data.DataNotFoundError
        Missing data.
    kernelgeo.checkpoint.CheckpointError
        Unreadable or corrupt checkpoint on ``resume`` (nothing is written).
    kernelgeo.checkpoint.StorageError
        A file could not be written (full disk, permissions); the last good checkpoint is kept.
    FloatingPointError
        The training loss became NaN/Inf (the checkpoint of the last good epoch is kept).
    """
    validate(cfg)
    try:
        cfg.dataset = check_dataset_name(cfg.dataset)
        if cfg.model is not None:
            cfg.model = check_model_name(cfg.model)
        cfg.geometry = parse_geometry(cfg.geometry)
    except (GeometryError, ValueError) as err:
        raise ConfigError(str(err)) from None
    device_type = "cuda" if (cfg.device.startswith("cuda") or (
        cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    ctx = kdist.init_distributed(device_type)
    threads = torch.get_num_threads()
    try:
        run = _build(cfg, data, ctx)
        state = _check_out_and_resume(run)
        return _train(run, state)
    finally:
        torch.set_num_threads(threads)
        kdist.cleanup()


def _log_fn(cfg: TrainConfig, ctx: kdist.DistContext):
    if ctx.is_main and not cfg.quiet:
        return lambda *a: print(*a, flush=True)
    return lambda *a: None


def _build(cfg: TrainConfig, data, ctx: kdist.DistContext) -> _Run:
    device = pick_device(cfg.device, ctx.local_rank)
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir, download=cfg.download,
                            split_seed=cfg.split_seed, train_subset=cfg.train_subset,
                            test_subset=cfg.test_subset, image_size=cfg.image_size)
    set_threads(cfg.threads, device, data.image_size, ctx.world_size)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    model_name = cfg.model or default_model(data)
    seed_all(cfg.seed)
    model = get_model(model_name, data.num_classes, data.in_channels)
    spec: GeometrySpec = cfg.geometry
    try:
        report = constrain(model, spec.constrain_spec(), on_invalid="skip",
                           include_linear=cfg.include_linear)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    model.to(device)
    train_loader, test_loader = build_loaders(cfg, data, device, ctx.rank, ctx.world_size)
    steps_per_epoch = len(train_loader)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg, steps_per_epoch * cfg.epochs, steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE,
                                  enabled=cfg.amp == "fp16")
    cd = config_dict(cfg)
    cd["model"] = model_name
    return _Run(cfg, ctx, device, data, model_name, model, report, optimizer, scheduler, scaler,
                train_loader, test_loader, Path(cfg.out) if cfg.out else None, cd,
                _log_fn(cfg, ctx), PathMeter(model) if cfg.track_path else None)


def _check_out_and_resume(run: _Run) -> dict | None:
    """Check the output directory and load the checkpoint to resume, changing nothing;
    returns the checkpoint's state (or ``None``)."""
    cfg, out = run.cfg, run.out
    if out is None:
        if cfg.resume:
            raise ConfigError("--resume needs --out (the directory of the run to continue)")
        return None
    run.action = action = rundir.check_out(out, resume=cfg.resume, force=cfg.force)
    if action != "resume":
        if cfg.resume:
            run.log(f"--resume: no checkpoint in {out}; starting from scratch")
        return None
    path = out / rundir.CKPT_NAME
    state = load_checkpoint(path, map_location=run.device,
                            required=("format", "config", "model", "optimizer", "epoch",
                                      "history"))
    if state["format"] != CKPT_FORMAT:
        raise ConfigError(f"--resume: {path} has format {state['format']!r}, this version "
                          f"writes {CKPT_FORMAT!r}; it cannot be continued exactly")
    diff = resume_differences(state["config"], run.cfg_dict)
    if diff:
        raise ConfigError(f"--resume: {path} was written by a run with other settings ("
                          + "; ".join(diff) + "); give the same options, or use another --out")
    old_epochs, done = int(state["config"]["epochs"]), int(state["epoch"])
    if cfg.epochs < done:
        raise ConfigError(f"--resume: {path} has {done} epochs done, more than --epochs "
                          f"{cfg.epochs}")
    if cfg.epochs != old_epochs and cfg.schedule in LENGTH_DEPENDENT_SCHEDULES:
        raise ConfigError(
            f"--resume with --epochs {cfg.epochs} (the run was planned for {old_epochs}): the "
            f"{cfg.schedule} schedule depends on the number of epochs, so changing it would "
            "change the learning rate of the steps already taken. Start a new run with "
            f"--epochs {cfg.epochs}, or use --schedule constant or robbins-monro for runs "
            "that are to be extended")
    return state


def _restore(run: _Run, state: dict) -> tuple[int, int, list[dict]]:
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.train_loader.load_state_dict(state["loader"])
    set_rng_state(state["rng"], run.device)
    if run.path is not None:
        run.path.load_state_dict(state.get("path"))
    return int(state["epoch"]), int(state["step"]), list(state["history"])


def _prepare_files(run: _Run, history: list[dict]) -> None:
    ctx, out = run.ctx, run.out
    if out is None:
        return
    # every rank has checked the directory before rank 0 moves or creates it
    kdist.barrier(ctx)
    if ctx.is_main:
        moved = rundir.prepare_out(out, run.action)
        if moved is not None:
            run.log(f"moved the previous contents of {out} to {moved} (--force)")
        rundir.write_json(out / "config.json", run.cfg_dict)
        rundir.write_text(out / "geometry.md", run.report.to_markdown() + "\n")
        rundir.write_metrics(out, history)
    kdist.barrier(ctx)


def _checkpoint(run: _Run, epoch: int, step: int, history: list[dict]) -> None:
    save_checkpoint({
        "format": CKPT_FORMAT, "config": run.cfg_dict, "epoch": epoch, "step": step,
        "history": history, "model": run.model.state_dict(),
        "optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(), "loader": run.train_loader.state_dict(),
        "rng": rng_state(run.device),
        "path": run.path.state_dict() if run.path is not None else None,
    }, run.out / rundir.CKPT_NAME)


@torch.no_grad()
def evaluate(model: nn.Module, loader, ctx: kdist.DistContext,
             amp_dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Mean cross-entropy and error rate of ``model`` over ``loader`` (summed over ranks)."""
    was = model.training
    model.eval()
    acc = None
    for xb, yb in loader:
        if acc is None:
            acc = torch.zeros(3, dtype=torch.float64, device=yb.device)
        with torch.autocast(yb.device.type, dtype=amp_dtype or torch.bfloat16,
                            enabled=amp_dtype is not None):
            logits = model(xb)
        acc[0] += F.cross_entropy(logits.float(), yb, reduction="sum").double()
        acc[1] += (logits.argmax(1) != yb).sum()
        acc[2] += len(yb)
    if acc is None:
        acc = torch.zeros(3, dtype=torch.float64)
    kdist.all_reduce_sum(acc, ctx)
    model.train(was)
    n = max(float(acc[2]), 1.0)
    return float(acc[0]) / n, float(acc[1]) / n


class _Progress:
    """Per-batch progress: a line every ``print_freq`` batches (also when piped), else a
    progress bar on a terminal."""

    def __init__(self, run: _Run, epoch: int, steps: int):
        cfg = run.cfg
        self.run, self.epoch, self.steps = run, epoch, steps
        self.t0 = time.perf_counter()
        self.every = cfg.print_freq if (run.ctx.is_main and not cfg.quiet) else None
        self.bar = None
        if (self.every is None and cfg.progress and not cfg.quiet and run.ctx.is_main
                and sys.stderr.isatty()):
            from tqdm import tqdm

            self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                            dynamic_ncols=True)

    def update(self, batch: int, acc: torch.Tensor) -> None:
        if self.every is None and self.bar is None:
            return
        el = max(time.perf_counter() - self.t0, 1e-9)
        ips = float(acc[2]) * self.run.ctx.world_size / el
        loss = float(acc[0] / acc[2])
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.3f}", img_s=f"{ips:.0f}")
        elif batch % self.every == 0 or batch == self.steps:
            self.run.log(f"epoch {self.epoch + 1}/{self.run.cfg.epochs} batch "
                         f"{batch}/{self.steps}  train loss {loss:.4f}  {ips:.0f} img/s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _train_epoch(run: _Run, model_t: nn.Module, epoch: int, step: int,
                 divergence: float) -> tuple[int, torch.Tensor, int, float]:
    """One pass over the training loader; returns (step, [loss sum, errors, n], skipped
    fp16 steps, DDP divergence)."""
    cfg, ctx, opt, scaler = run.cfg, run.ctx, run.optimizer, run.scaler
    model_t.train()
    acc = torch.zeros(3, dtype=torch.float64, device=run.device)
    skipped = 0
    progress = _Progress(run, epoch, len(run.train_loader))
    for batch, (xb, yb) in enumerate(run.train_loader, 1):
        with torch.autocast(run.device.type, dtype=run.amp_dtype or torch.bfloat16,
                            enabled=run.amp_dtype is not None):
            logits = model_t(xb)
            loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if scaler.is_enabled():
            # the Riemannian step (tangent projection, step rule, retraction) must see the
            # true gradient; GradScaler.step then skips the step if it holds inf/NaN
            scaler.unscale_(opt)
            scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if scaler.is_enabled() and scaler.get_scale() < scale:
            skipped += 1
            with warnings.catch_warnings():
                # a skipped step is no optimizer.step(): torch would warn that the scheduler
                # steps first; the schedule follows the iteration count on purpose
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler")
                run.scheduler.step()
        else:
            run.scheduler.step()
        if run.path is not None:
            run.path.update()
        step += 1
        with torch.no_grad():
            acc[0] += loss.detach().double() * len(yb)
            acc[1] += (logits.argmax(1) != yb).sum()
            acc[2] += len(yb)
        if ctx.enabled and cfg.sync_check_every and step % cfg.sync_check_every == 0:
            divergence = max(divergence, kdist.param_divergence(model_t, ctx))
        if ctx.enabled and cfg.broadcast_every and step % cfg.broadcast_every == 0:
            kdist.broadcast_parameters(model_t, ctx)
        progress.update(batch, acc)
        if cfg.max_steps and step >= cfg.max_steps:
            break
    progress.close()
    return step, acc, skipped, divergence


def _epoch_row(run: _Run, model_t: nn.Module, epoch: int, step: int, acc: torch.Tensor,
               skipped: int, t0: float) -> dict[str, Any]:
    """The metrics of a finished epoch (test evaluation included); refuses a diverged run."""
    train_time = time.perf_counter() - t0
    kdist.all_reduce_sum(acc, run.ctx)
    test_loss, test_err = evaluate(model_t, run.test_loader, run.ctx, run.amp_dtype)
    row = {
        "epoch": epoch + 1, "step": step, "lr": run.optimizer.param_groups[0]["lr"],
        "train_loss": float(acc[0] / acc[2]), "train_error": float(acc[1] / acc[2]),
        "test_loss": test_loss, "test_error": test_err,
        "constraint_error": float(constraint_error(run.model)),
        "epoch_time": time.perf_counter() - t0,
        "images_per_s": float(acc[2]) / max(train_time, 1e-9),
        "amp_skipped_steps": skipped,
        "path_length": run.path.total_length() if run.path is not None else None,
    }
    if not math.isfinite(row["train_loss"]):
        raise FloatingPointError(
            f"training diverged at epoch {epoch + 1} (train loss {row['train_loss']}); lower "
            "--lr" + (f"; the last checkpoint in {run.out} is kept"
                      if run.out is not None and run.cfg.checkpoint else ""))
    return row


def _train(run: _Run, state: dict | None) -> dict:
    cfg, ctx, device, model = run.cfg, run.ctx, run.device, run.model
    start_epoch, step, history = _restore(run, state) if state else (0, 0, [])
    if state:
        run.log(f"resumed from {run.out / rundir.CKPT_NAME} at epoch {start_epoch}")
    if ctx.enabled:
        # conv weights with a size-1 dim (1-channel stems) get gradients whose strides differ
        # from DDP's bucket views only in that dim: harmless, but warned about every step
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        model_t = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        model_t = model
    _prepare_files(run, history)
    n_params = sum(p.numel() for p in model.parameters())
    n_manifold = sum(p.numel() for p in model.parameters() if isinstance(p, ManifoldParameter))
    run.log(f"{run.data.describe()}; model {run.model_name} ({n_params} parameters, "
            f"{n_manifold} on manifolds); geometry {cfg.geometry}; device {device}"
            + (f"; amp {cfg.amp}" if cfg.amp != "none" else "")
            + (f"; {ctx.world_size} ranks ({ctx.backend})" if ctx.enabled else ""))

    divergence, stopped_early = 0.0, False
    plateau = run.scheduler if isinstance(run.scheduler, PlateauLR) else None
    t_run = time.perf_counter()
    # a resumed run that already reached its final plateau trains no further
    first = cfg.epochs if plateau is not None and plateau.converged else start_epoch
    for epoch in range(first, cfg.epochs):
        t0 = time.perf_counter()
        step, acc, skipped, divergence = _train_epoch(run, model_t, epoch, step, divergence)
        row = _epoch_row(run, model_t, epoch, step, acc, skipped, t0)
        history.append(row)
        run.log(f"epoch {epoch + 1}/{cfg.epochs}  train loss {row['train_loss']:.4f} err "
                f"{row['train_error']:.4f}  test loss {row['test_loss']:.4f} err "
                f"{row['test_error']:.4f}  "
                f"constraint {row['constraint_error']:.2e}  {row['epoch_time']:.2f}s "
                f"({row['images_per_s']:.0f} img/s)"
                + (f"  {skipped} fp16 steps skipped (inf/NaN)" if skipped else ""))
        # decided before the checkpoint, so that a resumed run continues at the same rate
        done = plateau is not None and plateau.epoch_end(row["train_loss"])
        if plateau is not None and plateau.decay_epochs[-1:] == [epoch + 1]:
            run.log(f"training loss plateaued at epoch {epoch + 1}: learning rate now "
                    f"{run.optimizer.param_groups[0]['lr']:.3g}")
        if ctx.is_main and run.out is not None:
            if cfg.checkpoint:
                _checkpoint(run, epoch + 1, step, history)
            rundir.write_metrics(run.out, history)
        if done:
            run.log(f"training loss plateaued at the final learning rate at epoch {epoch + 1}"
                    f" (change < {plateau.tol:g} over {plateau.window} epochs): done")
            break
        if cfg.max_steps and step >= cfg.max_steps:
            stopped_early = epoch + 1 < cfg.epochs or step < len(run.train_loader) * cfg.epochs
            break
        if cfg.stop_after and epoch + 1 - start_epoch >= cfg.stop_after and epoch + 1 < cfg.epochs:
            stopped_early = True
            run.log(f"stopping after {cfg.stop_after} epoch(s) as asked; continue with --resume")
            break

    if ctx.enabled:
        divergence = max(divergence, kdist.param_divergence(model_t, ctx))
    summary = _summary(run, history, n_params, n_manifold, divergence,
                       time.perf_counter() - t_run, stopped_early)
    if ctx.is_main and run.out is not None:
        rundir.write_json(run.out / "summary.json", summary)
    return summary


def _summary(run: _Run, history, n_params, n_manifold, divergence, run_time,
             stopped_early) -> dict[str, Any]:
    cfg = run.cfg
    errs = [h["test_error"] for h in history]
    best = int(np.argmin(errs)) if errs else -1
    times = [h["epoch_time"] for h in history]
    return {
        "dataset": cfg.dataset, "dataset_label": run.data.label, "model": run.model_name,
        "geometry": str(cfg.geometry), "optimizer": cfg.optimizer, "step_rule": cfg.step_rule,
        "schedule": cfg.schedule, "seed": cfg.seed, "amp": cfg.amp,
        "epochs_done": len(history), "epochs": cfg.epochs, "completed": not stopped_early,
        "train_images": int(run.train_loader.num_samples),
        "test_images": int(run.test_loader.num_samples),
        "final_test_error": errs[-1] if errs else None,
        "best_test_error": errs[best] if errs else None,
        "best_epoch": best + 1 if errs else None,
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "time_per_epoch": float(np.mean(times)) if times else None,
        "run_time": run_time,
        "max_constraint_error": max((h["constraint_error"] for h in history), default=0.0),
        "final_constraint_error": history[-1]["constraint_error"] if history else 0.0,
        "amp_skipped_steps": sum(h.get("amp_skipped_steps", 0) for h in history),
        "path_length": run.path.total_length() if run.path is not None else None,
        "plateau": (run.scheduler.describe() if isinstance(run.scheduler, PlateauLR)
                    else None),
        "path_length_per_layer": run.path.layer_lengths() if run.path is not None else None,
        "path_length_note": ("not measured (track_path=False)" if run.path is None
                              else run.path.unavailable or ""),
        "parameters": n_params, "manifold_parameters": n_manifold,
        "layers": [vars(e).copy() for e in run.report.entries],
        "world_size": run.ctx.world_size, "ddp_max_param_divergence": divergence,
        "command": cfg.command or shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "torch": torch.__version__, "machine": machine_info(run.device),
        "device": str(run.device), "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "config": run.cfg_dict,
        "history": history,
    }
