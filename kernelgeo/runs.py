r"""Load a finished ``kernelgeo train`` run for analysis: :func:`load_run`.

A run directory (see :mod:`kernelgeo.training.rundir`) holds ``config.json``,
``metrics.jsonl``, ``checkpoint.pt`` and ``summary.json``.  :func:`load_run` rebuilds the
model exactly as the training loop built it -- same architecture, same geometry applied by
:func:`kernelgeo.constrain` from the stored configuration, so every kernel is a
``ManifoldParameter`` on the manifold it was trained on -- and loads the weights from the
checksummed checkpoint (:func:`kernelgeo.checkpoint.load_checkpoint` refuses a file whose
contents changed).  The data are loaded with the run's own settings
(:func:`kernelgeo.data.load_dataset`, loaders from :func:`kernelgeo.data.make_loader` through
:func:`kernelgeo.training.loaders.build_loaders`), so batches are normalised as in training.

Initial weights.  Training seeds the global generators with the configuration's ``seed``
immediately before building and constraining the model, so the initialization is re-created
deterministically from the configuration.  ``kernelgeo train`` does not store its epoch-0
weights, so the re-created initialization cannot be compared with a stored one and
:attr:`Run.init_note` says so; a checkpoint that does hold them (entry :data:`INIT_KEY`) is
compared with the re-created ones and its stored weights are used.  With
``with_init=False`` :attr:`Run.init_state` is ``None`` and distances from the initialization
are unavailable, with the reason in :attr:`Run.init_note`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["RunError", "Run", "load_run", "INIT_KEY"]


class RunError(ValueError):
    """A directory is not a loadable ``kernelgeo train`` run (missing, foreign or
    inconsistent files); the message names the directory and what is wrong."""


@dataclass
class Run:
    """A trained run, ready for analysis (returned by :func:`load_run`).

    Attributes
    ----------
    path : Path
        The run directory.
    config : TrainConfig
        The configuration the run was trained with (geometry parsed).
    config_dict : dict
        The same as stored (JSON values).
    model : nn.Module
        On the CPU, in ``eval`` mode, with the checkpoint's weights; constrained kernels are
        ``ManifoldParameter`` s on their training manifolds.
    data : ImageData or FolderData
        The run's data set (same split, subsets and image size).
    train_loader, test_loader
        Loaders as in training (training: shuffled with the run's seed, augmented as in
        training, full batches); batches are normalised float tensors.
    history : list of dict
        Per-epoch metrics (``metrics.jsonl``; the checkpoint's copy if that file is absent).
    summary : dict
        ``summary.json`` (empty if the run did not finish).
    epoch, step : int
        Epochs and optimizer steps done at the checkpoint.
    optimizer_state : dict
        The optimizer's ``state_dict`` from the checkpoint (see :meth:`optimizer`).
    init_state : dict or None
        Re-created initial weights (state dict), or ``None`` when unavailable.
    init_note : str
        How ``init_state`` was obtained, or why it is unavailable.
    path_lengths : dict or None
        Path length travelled by each weight (parameters with ``ndim >= 2``, by name) up to
        the checkpoint (:mod:`kernelgeo.training.path`), or ``None`` when unavailable.
    path_note : str
        Why ``path_lengths`` is unavailable (empty when it is available).
    """

    path: Path
    config: Any
    config_dict: dict
    model: nn.Module
    data: Any
    train_loader: Any
    test_loader: Any
    history: list = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    epoch: int = 0
    step: int = 0
    optimizer_state: dict = field(default_factory=dict)
    init_state: dict | None = None
    init_note: str = ""
    path_lengths: dict | None = None
    path_note: str = ""

    @property
    def name(self) -> str:
        """Directory name of the run."""
        return self.path.name

    @property
    def geometry(self) -> str:
        return str(self.config.geometry)

    def optimizer(self) -> torch.optim.Optimizer:
        """The run's optimizer over :attr:`model`, with the checkpoint's state (momentum
        buffers, step counts) loaded."""
        from .training import build_optimizer

        opt = build_optimizer(self.model, self.config)
        opt.load_state_dict(self.optimizer_state)
        return opt

    def train_batch(self, n: int | None = None, *, augment: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` training images (normalised as in training) and their labels.

        Unshuffled and, unless ``augment``, not augmented, so the batch is the same on every
        call; ``n`` defaults to the run's batch size.
        """
        return self._first_batch("train", n, augment)

    def test_batch(self, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` test images (normalised) and their labels."""
        return self._first_batch("test", n, False)

    def _first_batch(self, split: str, n: int | None, augment: bool):
        from .data import make_loader
        from .training.loaders import augment_policy

        total = self.train_loader.num_samples if split == "train" \
            else self.test_loader.num_samples
        n = min(int(n or self.config.batch_size), int(total))
        crop, flip = augment_policy(self.config, self.data) if augment else (0, False)
        loader = make_loader(self.data, split, n, crop_padding=crop, flip=flip,
                             seed=self.config.seed, workers=0)
        return next(iter(loader))


#: optional checkpoint entry holding the epoch-0 state dict (compared with the re-created one)
INIT_KEY = "init_model"
_REQUIRED = ("format", "config", "model", "optimizer", "epoch", "step", "history")


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunError(f"{path}: cannot read the run's {what} ({err})") from None


def _config_from_dict(d: dict, path: Path):
    from .training import TrainConfig
    from .training.config import ConfigError, validate

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise RunError(f"{path}: configuration has fields this version does not know "
                       f"({', '.join(unknown)}); it was written by another kernelgeo version")
    kw = {k: v for k, v in d.items() if k in names}
    kw.update(resume=False, force=False, device="cpu", quiet=True, out=None)
    cfg = TrainConfig(**kw)
    try:
        validate(cfg)
        from .manifolds import parse_geometry

        cfg.geometry = parse_geometry(cfg.geometry)
    except (ConfigError, ValueError) as err:
        raise RunError(f"{path}: invalid configuration: {err}") from None
    return cfg


def _build_model(cfg, data):
    """Model and geometry exactly as :func:`kernelgeo.training.loop._build` makes them
    (seeding first, so the weights are the run's initialization)."""
    from . import constrain
    from .models import get_model
    from .training.environment import seed_all

    seed_all(cfg.seed)
    model = get_model(cfg.model, data.num_classes, data.in_channels)
    constrain(model, cfg.geometry.constrain_spec(), on_invalid="skip",
              include_linear=cfg.include_linear)
    return model


def load_run(path: str | Path, *, data=None, with_init: bool = True) -> Run:
    """Load a ``kernelgeo train`` run directory for analysis.

    Parameters
    ----------
    path : str or Path
        A directory written by ``kernelgeo train`` (or :func:`kernelgeo.training.train`) with a
        checkpoint (runs trained with ``--no-checkpoint`` cannot be analysed).
    data : ImageData or FolderData, optional
        The run's data set, already loaded (otherwise loaded from the configuration).
    with_init : bool
        Re-create the initial weights (:attr:`Run.init_state`).

    Returns
    -------
    Run

    Raises
    ------
    RunError
        ``path`` is missing, not a directory, not a training run (no ``config.json`` or
        ``checkpoint.pt``), a checkpoint of another format, a configuration this version
        cannot rebuild, or weights that do not fit the rebuilt model.
    kernelgeo.checkpoint.CheckpointError
        The checkpoint is truncated, corrupt or altered (checksums do not match).
    kernelgeo.data.DataNotFoundError
        The run's data set is not available here.

    Examples
    --------
    >>> run = load_run("runs/train/sphere")                      # doctest: +SKIP
    >>> x, y = run.train_batch(64)                               # doctest: +SKIP
    >>> run.model(x).argmax(1)                                   # doctest: +SKIP
    """
    from .checkpoint import load_checkpoint
    from .data import load_dataset
    from .training.loaders import build_loaders
    from .training.loop import CKPT_FORMAT
    from .training.rundir import CKPT_NAME

    p = Path(path)
    if not p.exists():
        raise RunError(f"run directory {p} does not exist")
    if not p.is_dir():
        raise RunError(f"{p} is a file, not a run directory")
    ckpt_path = p / CKPT_NAME
    if not (p / "config.json").is_file() or not ckpt_path.is_file():
        have = sorted(q.name for q in p.iterdir())[:8]
        raise RunError(
            f"{p} is not a kernelgeo training run: it needs config.json and {CKPT_NAME} "
            f"(it holds {', '.join(have) if have else 'nothing'}); give the --out directory "
            "of a `kernelgeo train` run that wrote checkpoints")
    _read_json(p / "config.json", "configuration (config.json)")
    state = load_checkpoint(ckpt_path, map_location="cpu", required=_REQUIRED)
    if state["format"] != CKPT_FORMAT:
        raise RunError(f"{ckpt_path} has format {state['format']!r}; this version reads "
                       f"{CKPT_FORMAT!r}")
    # the checkpoint's copy is checksummed; config.json is for people
    cfg = _config_from_dict(dict(state["config"]), ckpt_path)
    if data is None:
        data = load_dataset(cfg.dataset, cfg.data_dir, split_seed=cfg.split_seed,
                            train_subset=cfg.train_subset, test_subset=cfg.test_subset,
                            image_size=cfg.image_size)
    from .training.environment import rng_state, set_rng_state

    # building seeds the global generators as training did; leave the caller's untouched
    saved = rng_state(torch.device("cpu"))
    try:
        model = _build_model(cfg, data)
        init_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        set_rng_state(saved, torch.device("cpu"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise RunError(f"{ckpt_path}: the weights do not fit the model {cfg.model!r} rebuilt "
                       f"from the configuration: {err}") from None
    model.eval()
    train_loader, test_loader = build_loaders(cfg, data, torch.device("cpu"), 0, 1)

    history = list(state["history"])
    if (p / "metrics.jsonl").is_file():
        lines = (p / "metrics.jsonl").read_text().splitlines()
        try:
            history = [json.loads(s) for s in lines if s.strip()]
        except ValueError as err:
            raise RunError(f"{p / 'metrics.jsonl'}: unreadable metrics ({err})") from None
    summary = _read_json(p / "summary.json", "summary") if (p / "summary.json").is_file() \
        else {}
    stored = state.get(INIT_KEY)
    if not with_init:
        init_state, note = None, "not requested"
    elif stored is None:
        note = (f"re-created from the configuration's seed {cfg.seed} (the run stores no "
                "epoch-0 weights to compare with)")
    else:
        same = stored.keys() == init_state.keys() and all(
            torch.equal(stored[k], init_state[k]) for k in stored)
        init_state = {k: v.clone() for k, v in stored.items()}
        note = ("stored in the checkpoint; re-created from the seed: "
                + ("identical" if same else "different (the stored weights are used)"))
    path_lengths, path_note = _path_lengths(state)
    return Run(p, cfg, dict(state["config"]), model, data, train_loader, test_loader,
               history, summary, int(state["epoch"]), int(state["step"]),
               state["optimizer"], init_state, note, path_lengths, path_note)


def _path_lengths(state: dict) -> tuple[dict | None, str]:
    """The checkpoint's path lengths (they belong to its weights, as the summary's need not)."""
    if "path" not in state:
        return None, "the checkpoint was written by a version that did not measure it"
    ps = state["path"]
    if ps is None:
        return None, "not measured (the run was trained with track_path=False)"
    if ps.get("unavailable"):
        return None, ps["unavailable"]
    return dict(zip(ps["names"], ps["per_layer"], strict=True)), ""
