"""The configuration of a training run: :class:`TrainConfig`, its valid values and checks.

Every value is checked by :func:`validate` (the command line uses the same per-field checks
through :func:`check_field`), so a run never starts with a setting it cannot honour.
:data:`NOT_RESULT_FIELDS` lists the fields that do not change what a run computes; every
other field must agree between a checkpoint and the run resuming it
(:func:`resume_differences`), so a field added later is checked on resume by default.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..manifolds import GeometrySpec
from ..optim import ConvergentRSGD
from ..optim.step_rules import RULES

__all__ = ["ConfigError", "TrainConfig", "OPTIMIZERS", "SCHEDULES", "STEP_RULES",
           "DEFAULT_STEP_RULE", "AUGMENTATIONS", "AMP_MODES", "SEED_MAX", "SPLIT_SEED_MAX",
           "NOT_RESULT_FIELDS", "check_field", "validate", "config_dict",
           "resume_differences"]

#: optimizers of ``--optimizer`` (see :func:`kernelgeo.training.build_optimizer`)
OPTIMIZERS = ("rsgd", "adam", "geoopt", "sgd")
#: learning-rate schedules of ``--schedule`` (see :func:`kernelgeo.training.build_scheduler`)
SCHEDULES = ("cosine", "step", "robbins-monro", "constant", "plateau")
#: step-size rules of :class:`kernelgeo.optim.ConvergentRSGD`
STEP_RULES = tuple(RULES)
#: the step rule :class:`kernelgeo.optim.ConvergentRSGD` uses when none is given
DEFAULT_STEP_RULE: str = inspect.signature(ConvergentRSGD).parameters["step_rule"].default
#: values of ``--augment``
AUGMENTATIONS = ("auto", "none", "crop", "flip", "crop+flip")
#: values of ``--amp``: no autocast, bfloat16 autocast, float16 autocast with loss scaling
AMP_MODES = ("none", "bf16", "fp16")
#: seeds are stored in 64-bit generators: ``0 <= seed <= SEED_MAX``
SEED_MAX = 2**63 - 1
#: the split seed also seeds scikit-learn/numpy (32-bit): ``0 <= split_seed <= SPLIT_SEED_MAX``
SPLIT_SEED_MAX = 2**32 - 1

#: fields that do not change the numbers a run produces (all others are checked on resume)
NOT_RESULT_FIELDS = frozenset({
    "epochs", "data_dir", "download", "device", "deterministic", "threads", "out", "resume",
    "force", "checkpoint", "stop_after", "max_steps", "sync_check_every", "broadcast_every",
    "quiet", "progress", "print_freq", "command", "extra", "track_path",
})


#: fields added after checkpoints were first written, with the value that reproduces what
#: those versions did (a checkpoint without the field resumes when the value is that one)
_LATER_FIELDS = {"plateau_tol": 0.02, "plateau_window": 3, "plateau_decays": 2}


class ConfigError(ValueError):
    """Invalid configuration (bad names, bad values, incompatible options or run directories)."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (the options of ``kernelgeo train``).

    ``geometry`` is a manifold name (``"sphere"``, ``"po:sphere+stiefel"``...), per-layer
    rules ``"layer1.*=sphere,layer3.*=stiefel,*=euclidean"`` (module-name globs, first match
    wins), or a :class:`~kernelgeo.manifolds.GeometrySpec` already parsed by
    :func:`~kernelgeo.manifolds.parse_geometry`.  ``model=None`` picks ``resnet-digits`` for
    8x8 images and ``resnet20`` otherwise.  ``amp`` is ``"none"``, ``"bf16"`` or ``"fp16"``
    (``True`` means ``"bf16"``).  ``step_rule=None`` uses :data:`DEFAULT_STEP_RULE`.
    """

    dataset: str = "digits"
    data_dir: str | None = None
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    split_seed: int = 0
    image_size: int | None = None
    workers: int | None = None
    model: str | None = None
    geometry: str | GeometrySpec = "euclidean"
    include_linear: bool = False
    optimizer: str = "rsgd"
    step_rule: str | None = None
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
    plateau_tol: float = 0.02
    plateau_window: int = 3
    plateau_decays: int = 2
    augment: str = "auto"
    crop_padding: int | None = None
    seed: int = 0
    device: str = "auto"
    amp: str | bool = "none"
    deterministic: bool = False
    threads: int | None = None
    out: str | None = None
    resume: bool = False
    force: bool = False
    checkpoint: bool = True
    stop_after: int | None = None
    max_steps: int | None = None
    sync_check_every: int = 100
    broadcast_every: int = 0
    quiet: bool = False
    progress: bool = True
    print_freq: int | None = None
    track_path: bool = True
    command: str | None = None
    extra: dict = field(default_factory=dict)


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[Any], bool]:
    def ok(v):
        return (isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo)
                and (hi is None or v <= hi))
    return ok


def _real(ok: Callable[[float], bool]) -> Callable[[Any], bool]:
    def check(v):
        return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                and ok(float(v)))
    return check


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _bool(v) -> bool:
    return isinstance(v, bool)


def _one_of(choices) -> Callable[[Any], bool]:
    return lambda v: v in choices


#: field -> (check, what a valid value is)
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "train_subset": (_optional(_int(1)), "a positive integer"),
    "test_subset": (_optional(_int(1)), "a positive integer"),
    "split_seed": (_int(0, SPLIT_SEED_MAX), f"an integer in [0, {SPLIT_SEED_MAX}] (2**32 - 1)"),
    "image_size": (_optional(_int(1)), "a positive integer"),
    "workers": (_optional(_int(0)), "an integer >= 0"),
    "include_linear": (_bool, "True or False"),
    "optimizer": (_one_of(OPTIMIZERS), f"one of {', '.join(OPTIMIZERS)}"),
    "step_rule": (_optional(_one_of(STEP_RULES)), f"one of {', '.join(STEP_RULES)}"),
    "schedule": (_one_of(SCHEDULES), f"one of {', '.join(SCHEDULES)}"),
    "epochs": (_int(1), "a positive integer"),
    "batch_size": (_int(1), "a positive integer"),
    "lr": (_real(lambda v: v > 0), "a finite number > 0"),
    "momentum": (_real(lambda v: 0 <= v < 1), "a number in [0, 1)"),
    "nesterov": (_bool, "True or False"),
    "weight_decay": (_real(lambda v: v >= 0), "a finite number >= 0"),
    "manifold_weight_decay": (_real(lambda v: v >= 0), "a finite number >= 0"),
    "rm_t0": (_optional(_real(lambda v: v > 0)), "a finite number > 0 (steps)"),
    "rm_power": (_real(lambda v: 0.5 < v <= 1), "a number in (0.5, 1] (Robbins-Monro)"),
    "plateau_tol": (_real(lambda v: 0 < v < 1), "a number in (0, 1) (relative loss change)"),
    "plateau_window": (_int(1), "a positive integer (epochs)"),
    "plateau_decays": (_int(0), "an integer >= 0"),
    "augment": (_one_of(AUGMENTATIONS), f"one of {', '.join(AUGMENTATIONS)}"),
    "crop_padding": (_optional(_int(0)), "an integer >= 0 (pixels)"),
    "seed": (_int(0, SEED_MAX), f"an integer in [0, {SEED_MAX}] (2**63 - 1)"),
    "amp": (_one_of(AMP_MODES), f"one of {', '.join(AMP_MODES)}"),
    "deterministic": (_bool, "True or False"),
    "threads": (_optional(_int(1)), "a positive integer"),
    "resume": (_bool, "True or False"),
    "force": (_bool, "True or False"),
    "checkpoint": (_bool, "True or False"),
    "stop_after": (_optional(_int(1)), "a positive integer (epochs)"),
    "max_steps": (_optional(_int(1)), "a positive integer (steps)"),
    "sync_check_every": (_int(0), "an integer >= 0 (steps; 0: never)"),
    "broadcast_every": (_int(0), "an integer >= 0 (steps; 0: never)"),
    "print_freq": (_optional(_int(1)), "a positive integer (batches)"),
    "track_path": (_bool, "True or False"),
}


def check_field(name: str, value: Any) -> Any:
    """Check one :class:`TrainConfig` value; returns it.

    Raises
    ------
    ConfigError
        Naming the option (``--lr``...), the value and what is valid.
    """
    check, what = _CHECKS[name]
    if not check(value):
        raise ConfigError(f"--{name.replace('_', '-')} must be {what}, got {value!r}")
    return value


def validate(cfg: TrainConfig) -> TrainConfig:
    """Check every field of ``cfg`` and the combinations; normalise ``amp`` and ``step_rule``.

    Returns
    -------
    TrainConfig
        ``cfg`` itself (``amp=True/False`` become ``"bf16"``/``"none"``, ``step_rule=None``
        becomes :data:`DEFAULT_STEP_RULE`).

    Raises
    ------
    ConfigError
    """
    if isinstance(cfg.amp, bool):
        cfg.amp = "bf16" if cfg.amp else "none"
    if cfg.step_rule is None:
        cfg.step_rule = DEFAULT_STEP_RULE
    for name in _CHECKS:
        check_field(name, getattr(cfg, name))
    if cfg.nesterov and cfg.momentum <= 0:
        raise ConfigError("--nesterov needs --momentum > 0")
    if cfg.resume and cfg.force:
        raise ConfigError("--resume continues the run in --out and --force moves it aside: "
                          "give one of them")
    if not isinstance(cfg.geometry, (str, GeometrySpec)):
        raise ConfigError(f"geometry must be a str or GeometrySpec, got "
                          f"{type(cfg.geometry).__name__}")
    return cfg


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as plain JSON-able values (the geometry as its text)."""
    d = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    d["geometry"] = str(cfg.geometry).strip()
    d["extra"] = dict(cfg.extra)
    return d


def resume_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The result-changing settings that differ between a checkpoint's configuration ``old``
    and the resuming run's ``new`` (both :func:`config_dict` outputs), as
    ``"name: checkpoint X vs now Y"``; a setting missing from ``old`` counts as different, except
    a field added later (``_LATER_FIELDS``) at the value that reproduces the older versions."""
    diff = []
    for key in new:
        if key in NOT_RESULT_FIELDS:
            continue
        if key not in old and key in _LATER_FIELDS and new[key] == _LATER_FIELDS[key]:
            continue
        if key not in old:
            diff.append(f"{key}: not in checkpoint vs now {new[key]!r}")
        elif old[key] != new[key]:
            diff.append(f"{key}: checkpoint {old[key]!r} vs now {new[key]!r}")
    return diff
