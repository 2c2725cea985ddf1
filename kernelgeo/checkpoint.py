"""Training checkpoints: atomic saves and safe loads.

A checkpoint is written to a temporary file in the target's directory, flushed to disk and
moved over the target with :func:`os.replace`, so a crash or a full disk never leaves a half
written checkpoint under the real name (the previous one survives).  Loading uses
``torch.load(..., weights_only=True)``, which unpickles only tensors and plain containers and
so cannot execute code from a foreign file; everything saved is therefore converted to plain
tensors, numbers, strings, lists and dicts first (:func:`to_plain`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "to_plain"]


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read (truncated, corrupt, or not a kernelgeo checkpoint)."""


def to_plain(obj: Any) -> Any:
    """Copy of ``obj`` that ``torch.load(weights_only=True)`` can read back.

    Tensor subclasses (e.g. :class:`geoopt.ManifoldParameter`, which carries its manifold
    object) become plain tensors, numpy arrays become tensors, tuples stay tuples.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().as_subclass(torch.Tensor)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        seq = [to_plain(v) for v in obj]
        return seq if isinstance(obj, list) else tuple(seq)
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.device)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a weights-only checkpoint")


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` to ``path`` atomically (temp file in the same directory + ``os.replace``).

    Parameters
    ----------
    state : dict
        Tensors, numbers, strings and containers of them (tensor subclasses are stored as
        plain tensors).
    path : path
        Target file; its directory is created if needed.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plain = to_plain(state)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(plain, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    # the rename itself is durable only once the directory entry is on disk
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    required: tuple[str, ...] = ()) -> dict:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Parameters
    ----------
    path : path
    map_location : str, torch.device or callable
        As for :func:`torch.load`.
    required : tuple of str
        Top-level keys that must be present.

    Returns
    -------
    dict

    Raises
    ------
    FileNotFoundError
        No such file.
    CheckpointError
        Truncated, corrupt, unsafe (needs arbitrary unpickling) or missing required keys; the
        message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for damaged zip/pickle data
        size = path.stat().st_size
        why = (str(err).splitlines() or [""])[0][:200]
        raise CheckpointError(
            f"cannot read checkpoint {path} ({size} bytes): it is truncated or corrupt, or not "
            f"a kernelgeo checkpoint ({type(err).__name__}: {why}). "
            "Delete it to start over, or restore it from a backup.") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: not a kernelgeo training "
                              "checkpoint")
    return state
