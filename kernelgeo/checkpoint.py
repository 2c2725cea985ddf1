"""Training checkpoints and run files: atomic, verified writes and checked loads.

Writing (:func:`save_checkpoint`, :func:`atomic_write`): the bytes go to a temporary file in
the target's directory, are flushed to disk (``fsync``), read back and compared with what was
meant to be written, and only then moved over the target with :func:`os.replace`; so a crash,
a full disk or a bad write never leaves a half-written or corrupt file under the real name, and
the previous file survives.  A failed write raises :class:`StorageError` (an :class:`OSError`
keeping ``errno``) saying what happened in words, e.g. ``no space left on device writing
runs/x/checkpoint.pt``.

Every checkpoint carries SHA-256 digests of each tensor's bytes (with its dtype and shape)
and of all other entries; :func:`load_checkpoint` recomputes them and refuses a file whose
contents changed (:class:`CheckpointError` naming the damaged entries).  Loading uses
``torch.load(..., weights_only=True)``, which unpickles only tensors and plain containers and
so cannot execute code from a foreign file; everything saved is therefore converted to plain
tensors, numbers, strings, lists and dicts first (:func:`to_plain`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["CheckpointError", "StorageError", "save_checkpoint", "load_checkpoint", "to_plain",
           "atomic_write", "checksums", "CHECKSUM_KEY"]

#: top-level key holding the digests (``{"algorithm", "tensors", "other"}``)
CHECKSUM_KEY = "checksums"


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be used (truncated, corrupt, altered, or not a kernelgeo
    checkpoint); the message names the file."""


_REASONS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.EROFS: "read-only file system", errno.EISDIR: "is a directory",
            errno.ENOTDIR: "a parent is not a directory", errno.ENOENT: "no such directory",
            errno.EIO: "input/output error"}


class StorageError(OSError):
    """Writing a file failed (full disk, no permission...); ``errno`` is kept and the message
    says what in words and which file, e.g. ``no space left on device writing <path>``."""

    def __str__(self) -> str:
        return str(self.strerror)


def _storage_error(err: OSError, path: Path, note: str = "") -> StorageError:
    reason = _REASONS.get(err.errno) or (err.strerror or str(err)).lower()
    return StorageError(err.errno, f"{reason} writing {path}{note}")


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file + ``fsync`` + read-back check +
    :func:`os.replace` (+ ``fsync`` of the directory).

    Raises
    ------
    StorageError
        The write failed (``path`` is left as it was, no temp file remains).
    """
    path = Path(path)
    keep = " (the previous file is kept)" if path.exists() else ""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        with open(tmp, "rb") as f:
            back = f.read()
        if hashlib.sha256(back).digest() != hashlib.sha256(data).digest():
            raise OSError(errno.EIO, "the file read back differs from what was written")
        os.replace(tmp, path)
        tmp = None
    except OSError as err:
        raise _storage_error(err, path, keep) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    # the rename itself is durable only once the directory entry is on disk
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


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


def _tensor_digest(t: torch.Tensor) -> str:
    t = t.detach().as_subclass(torch.Tensor).cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _walk(obj: Any, path: str, tensors: dict[str, str], other) -> None:
    if isinstance(obj, torch.Tensor):
        tensors[path] = _tensor_digest(obj)
    elif isinstance(obj, dict):
        other.update(f"{path}:dict{len(obj)};".encode())
        for k in sorted(obj, key=repr):
            _walk(obj[k], f"{path}/{k}", tensors, other)
    elif isinstance(obj, (list, tuple)):
        other.update(f"{path}:{type(obj).__name__}{len(obj)};".encode())
        for i, v in enumerate(obj):
            _walk(v, f"{path}/{i}", tensors, other)
    else:
        other.update(f"{path}={type(obj).__name__}:{obj!r};".encode())


def checksums(state: dict) -> dict[str, Any]:
    """SHA-256 digests of ``state`` (without its :data:`CHECKSUM_KEY` entry): one per tensor
    (over dtype, shape and bytes), keyed by its path such as ``"model/conv1.weight"``, and
    one over every other entry (paths, types and values)."""
    tensors: dict[str, str] = {}
    other = hashlib.sha256()
    _walk({k: v for k, v in state.items() if k != CHECKSUM_KEY}, "", tensors, other)
    return {"algorithm": "sha256", "tensors": tensors, "other": other.hexdigest()}


def save_checkpoint(state: dict, path: str | os.PathLike) -> Path:
    """Write ``state`` with its checksums to ``path`` atomically (see :func:`atomic_write`).

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

    Raises
    ------
    StorageError
        Full disk, no permission, ...: the previous checkpoint at ``path`` is kept.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _storage_error(err, path) from None
    plain = to_plain({k: v for k, v in state.items() if k != CHECKSUM_KEY})
    plain[CHECKSUM_KEY] = checksums(plain)
    buf = io.BytesIO()
    torch.save(plain, buf)
    return atomic_write(path, buf.getvalue())


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    required: tuple[str, ...] = ()) -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint` (``weights_only``).

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
        The state, without its checksums.

    Raises
    ------
    FileNotFoundError
        No such file.
    CheckpointError
        Truncated, corrupt, altered (checksum mismatch, naming the entries), without
        checksums, unsafe (needs arbitrary unpickling) or missing required keys; the message
        names the file.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a directory, not a file; remove or rename "
                              "it")
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
    stored = state.pop(CHECKSUM_KEY, None)
    if not isinstance(stored, dict) or "tensors" not in stored:
        raise CheckpointError(f"checkpoint {path} has no checksums: it was not written by "
                              "kernelgeo.checkpoint.save_checkpoint (or by an older version)")
    now = checksums(state)
    bad = [k for k in sorted(set(stored["tensors"]) | set(now["tensors"]))
           if stored["tensors"].get(k) != now["tensors"].get(k)]
    if bad or stored.get("other") != now["other"]:
        what = (f"tensor(s) {', '.join(b.lstrip('/') for b in bad[:5])}"
                + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else "") if bad
                else "non-tensor entries")
        raise CheckpointError(
            f"checkpoint {path} is corrupt: the SHA-256 checksum of {what} does not match "
            "the one stored when it was written (the file changed on disk). Restore it from a "
            "backup or delete it to start over.")
    missing = [k for k in required if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {missing}: not a kernelgeo training "
                              "checkpoint")
    return state
