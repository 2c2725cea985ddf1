"""Run directories: where every command writes, and the rules that keep runs apart.

Convention: each command writes to ``--out``, by default ``runs/<command>/<name>`` where
``<name>`` is ``--name`` or the start time (``20261129-204500``, made unique with ``-2``,
``-3``...).  A training run directory holds::

    config.json       the configuration
    geometry.md       which layer lives on which manifold (ConstrainReport)
    metrics.jsonl     one JSON object per epoch
    metrics.csv       the same as a table
    checkpoint.pt     latest state (atomic, checksummed; see kernelgeo.checkpoint)
    summary.json      final/best test error, time per epoch, constraint error, machine

Rules (:func:`check_out`, applied before anything is written, so a refused command leaves the
directory as it was):

* an existing non-empty ``--out`` is never written into by a new run: ``--resume`` continues
  it, ``--force`` first renames it to a unique sibling ``<out>.old-<time>`` (kept, never
  deleted), anything else is refused;
* ``--out`` must be a directory (or not exist yet) that can be written; ``checkpoint.pt`` must
  be a file.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from ..checkpoint import StorageError, atomic_write
from .config import ConfigError

__all__ = ["RUNS_ROOT", "CKPT_NAME", "METRIC_FIELDS", "default_out", "check_out", "prepare_out",
           "move_aside", "write_json", "write_text", "write_metrics"]

#: root of the default output directories
RUNS_ROOT = "runs"
CKPT_NAME = "checkpoint.pt"
#: columns of ``metrics.csv``
METRIC_FIELDS = ("epoch", "step", "lr", "train_loss", "train_error", "test_loss", "test_error",
                 "constraint_error", "epoch_time", "images_per_s", "amp_skipped_steps",
                 "path_length")


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    k = 2
    while path.with_name(f"{path.name}-{k}").exists():
        k += 1
    return path.with_name(f"{path.name}-{k}")


def default_out(command: str, name: str | None = None, root: str | os.PathLike = RUNS_ROOT
                ) -> Path:
    """``<root>/<command>/<name>``; without ``name`` the current time, made unique."""
    if name is not None:
        if not name or name in (".", "..") or "/" in name or os.sep in name:
            raise ConfigError(f"--name must be a plain directory name, got {name!r}")
        return Path(root) / command / name
    return _unique(Path(root) / command / time.strftime("%Y%m%d-%H%M%S"))


def _nearest_existing(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_out(out: str | os.PathLike, *, resume: bool = False, force: bool = False,
              what: str = "run", container: bool = False, resumable: bool = True) -> str:
    """Decide what a command may do with its output directory, without changing anything.

    Parameters
    ----------
    out : path
    resume : bool
        The command continues the run in ``out``.
    force : bool
        An existing run in ``out`` may be moved aside.
    what : str
        Word for the contents in messages (``"run"``, ``"comparison"``, ...).
    container : bool
        ``out`` holds other runs in subdirectories (a comparison), which are checked one by
        one: existing contents are then kept unless ``force`` moves them aside.
    resumable : bool
        Whether the command has ``--resume`` (only then is it suggested).

    Returns
    -------
    str
        ``"new"`` (write into a new or empty directory), ``"resume"`` (``out`` holds a
        checkpoint to continue) or ``"move"`` (rename the existing ``out`` first).

    Raises
    ------
    ConfigError
        ``out`` is a file, not writable, holds a run and neither ``resume`` nor ``force`` was
        given, its ``checkpoint.pt`` is not a file, or ``resume`` was asked for a directory
        without checkpoint but with other files.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a directory; choose a directory")
    anc = _nearest_existing(out)
    if not anc.is_dir():
        raise ConfigError(f"cannot create --out {out}: {anc} is a file, not a directory")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to --out {out}: permission denied on {anc}")
    if not out.exists():
        return "new"
    if container:
        return "move" if force and any(out.iterdir()) else "new"
    ckpt = out / CKPT_NAME
    if ckpt.exists() and not ckpt.is_file():
        raise ConfigError(f"{ckpt} is a directory, not a checkpoint file; remove or rename it")
    entries = sorted(p.name for p in out.iterdir())
    if resume:
        if ckpt.is_file():
            return "resume"
        if entries:
            raise ConfigError(
                f"--resume: {out} holds no {CKPT_NAME} to continue from (it contains "
                f"{', '.join(entries[:6])}{' ...' if len(entries) > 6 else ''}); choose the "
                "directory of the run to continue, or drop --resume and use another --out")
        return "new"
    if not entries:
        return "new"
    if force:
        return "move"
    raise ConfigError(
        f"--out {out} already holds a {what} ({', '.join(entries[:6])}"
        f"{' ...' if len(entries) > 6 else ''}); "
        + ("continue it with --resume, " if resumable else "")
        + "move it aside with --force, or choose another --out")


def move_aside(out: str | os.PathLike) -> Path:
    """Rename ``out`` to a unique sibling ``<out>.old-<time>``; returns the new path."""
    out = Path(out)
    dest = _unique(out.with_name(f"{out.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"))
    try:
        os.rename(out, dest)
    except OSError as err:
        raise StorageError(err.errno, f"cannot move {out} aside to {dest}: "
                           f"{(err.strerror or str(err)).lower()}") from None
    return dest


def prepare_out(out: str | os.PathLike, action: str) -> Path | None:
    """Carry out :func:`check_out`'s decision: move an old run aside (returns where it went)
    and create ``out``."""
    out = Path(out)
    moved = move_aside(out) if action == "move" else None
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError(err.errno, f"cannot create {out}: "
                           f"{(err.strerror or str(err)).lower()}") from None
    return moved


def write_text(path: Path, text: str) -> None:
    """Atomic text write (see :func:`kernelgeo.checkpoint.atomic_write`)."""
    atomic_write(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (indented; unknown types as ``str``)."""
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_metrics(out: Path, history: list[dict]) -> None:
    """(Re)write ``metrics.jsonl`` and ``metrics.csv`` from the whole history, atomically."""
    write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    w.writerows(history)
    write_text(out / "metrics.csv", buf.getvalue())
