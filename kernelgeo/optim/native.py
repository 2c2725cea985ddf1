r"""Fused CPU kernels for sphere-like kernel manifolds (optional, compiled on first use).

The torch path of :mod:`kernelgeo.optim.batched` needs about nine elementwise passes over a
sphere or oblique kernel plus Python and dispatch work per chunk (and transposing copies for
oblique columns); ``torch.optim.SGD`` needs three.  ``native_kernels.c`` (shipped with the
package) does the whole step of ``kernelgeo.optim.batched.sphere_apply`` (Riemannian
gradient, momentum, step rule, retraction, transport) for all such kernels of a step in a
single call, in the kernels' own memory layout (no gathering, no copies): three passes over
each row or column while it is in the CPU caches; the 3-entry columns of 3x3 oblique kernels
vectorised across columns.  Sums that overflow (entries near the largest float) are redone
in double with rescaling before anything is written.  ``kernelgeo/optim/native_kernels.c``
documents the kernels; :class:`~kernelgeo.optim.ConvergentRSGD` (``native=``) decides which
parameters use them.

It is compiled with the system C compiler (``$CC``, else ``cc``) the first time it is needed,
for this CPU (``-march=native``), and cached under ``$KERNELGEO_CACHE_DIR`` (default
``$XDG_CACHE_HOME/kernelgeo`` or ``~/.cache/kernelgeo``; a per-user temporary directory if
that cannot be written) with a name that hashes the source, the flags, the compiler and the
CPU, written atomically.  Without a compiler, or with
``KERNELGEO_NATIVE=0``, :func:`available` is False and the optimizer uses the torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = ["DTYPES", "available", "unavailable_reason", "load", "Item", "check", "check_tensors",
           "amax", "amax_tensors",
           "sphere_step", "sphere_step_parallel", "partition", "library_path"]

_SRC = Path(__file__).with_name("native_kernels.c")
_FLAGS = ["-O3", "-std=c11", "-fPIC", "-shared", "-fopenmp-simd", "-fno-math-errno",
          "-fno-trapping-math"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_error: str | None = None


class Item(ctypes.Structure):
    """Mirror of ``kg_item`` in ``native_kernels.c`` (one kernel of a step)."""

    _fields_ = [
        ("x", ctypes.c_void_p), ("g", ctypes.c_void_p), ("b", ctypes.c_void_p),
        ("rn_out", ctypes.c_void_p), ("step_out", ctypes.c_void_p),
        ("nblk", ctypes.c_int64), ("a", ctypes.c_int64), ("s", ctypes.c_int64),
        ("center", ctypes.c_int32), ("fresh", ctypes.c_int32),
        ("lr", ctypes.c_double), ("r", ctypes.c_double), ("cap", ctypes.c_double),
        ("rule", ctypes.c_int32), ("pad", ctypes.c_int32),
    ]


def _cache_dir() -> Path:
    d = os.environ.get("KERNELGEO_CACHE_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kernelgeo"


def _cpu_id() -> str:
    # -march=native code must not run on another CPU sharing this cache (a shared home)
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        keys = ("model name", "flags", "Features", "CPU part")
        return "|".join(sorted({ln.strip() for ln in info.splitlines()
                                if ln.split(":")[0].strip() in keys}))
    except OSError:
        return platform.processor() or platform.machine()


def _compiler() -> str | None:
    cc = os.environ.get("CC", "cc")
    return shutil.which(cc) or (shutil.which("gcc") if cc == "cc" else None)


def library_path(cc: str, flags: list[str], directory: Path | None = None) -> Path:
    """Where the library built by ``cc`` with ``flags`` is cached (in ``directory``, default
    the cache directory): the name hashes source, flags, compiler, its version and the CPU."""
    try:
        ver = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        ver = ""
    h = hashlib.sha256()
    for part in (_SRC.read_bytes(), " ".join(flags).encode(), cc.encode(), ver.encode(),
                 _cpu_id().encode(), platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return (directory or _cache_dir()) / f"native-{h.hexdigest()[:20]}.so"


def _build(cc: str, flags: list[str], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    # the build takes seconds (up to ~20 with -O3 on a slow machine): say why the first step
    # pauses, and that it does not happen again
    print(f"kernelgeo: compiling the fused CPU optimizer kernels with {cc}, once (cached as "
          f"{out})...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        subprocess.run([cc, *flags, str(_SRC), "-o", tmp, "-lm"], check=True,
                       capture_output=True, text=True, timeout=120)
        os.replace(tmp, out)  # atomic: a concurrent build or reader never sees half a file
        print(f"kernelgeo: compiled in {time.perf_counter() - t0:.1f} s", file=sys.stderr,
              flush=True)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _bind(lib: ctypes.CDLL) -> None:
    P = ctypes.POINTER(Item)
    for suf in ("f32", "f64"):
        f = getattr(lib, f"kg_check_{suf}")
        f.argtypes, f.restype = [P, ctypes.c_int64], ctypes.c_int64
        f = getattr(lib, f"kg_check_arrays_{suf}")
        f.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                      ctypes.c_int64]
        f.restype = ctypes.c_int64
        f = getattr(lib, f"kg_amax_{suf}")
        f.argtypes, f.restype = [P, ctypes.c_int64], ctypes.c_double
        f = getattr(lib, f"kg_amax_arrays_{suf}")
        f.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_int64),
                      ctypes.c_int64]
        f.restype = ctypes.c_double
        f = getattr(lib, f"kg_sphere_step_{suf}")
        f.argtypes = [P, ctypes.c_int64, ctypes.c_double, ctypes.c_double, ctypes.c_int32]
        f.restype = ctypes.c_int64


def load() -> ctypes.CDLL | None:
    """The compiled library (building it once if needed), or None if it cannot be had."""
    global _lib, _tried, _error
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        _tried = True
        if os.environ.get("KERNELGEO_NATIVE", "1").strip().lower() in ("0", "false", "no",
                                                                       "off"):
            _error = "disabled by KERNELGEO_NATIVE"
            return None
        cc = _compiler()
        if cc is None:
            _error = "no C compiler (set $CC)"
            return None
        errors = []
        # -march=native where the compiler knows it; portable code otherwise
        # a per-user temporary directory when the cache directory cannot be written
        tmp_dir = Path(tempfile.gettempdir()) / f"kernelgeo-{getattr(os, 'getuid', lambda: 0)()}"
        for flags in (_FLAGS + ["-march=native"], _FLAGS):
            path = library_path(cc, flags)
            try:
                if not path.exists():
                    try:
                        _build(cc, flags, path)
                    except OSError:  # cannot write there (not a compile error)
                        path = library_path(cc, flags, tmp_dir)
                        if not path.exists():
                            _build(cc, flags, path)
                lib = ctypes.CDLL(str(path))
                _bind(lib)
            except (OSError, subprocess.SubprocessError, AttributeError) as e:
                stderr = getattr(e, "stderr", "") or ""
                errors.append(f"{' '.join(flags)}: {e} {stderr[-500:]}")
                continue
            _lib = lib
            return lib
        _error = "; ".join(errors)
        # a compiler that cannot build the file is unexpected (no compiler is not): say so
        warnings.warn(f"kernelgeo: the fused CPU kernels did not build, the optimizer uses "
                      f"torch ops (slower on the CPU): {_error[:1000]}", RuntimeWarning,
                      stacklevel=3)
        return None


def available() -> bool:
    """Whether the fused CPU kernels can be used (compiles them on the first call)."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None if it is True or was not asked yet)."""
    return _error


_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
#: the dtypes the kernels are compiled for
DTYPES = tuple(_SUFFIX)


def _fn(name: str, dtype: torch.dtype):
    lib = load()
    if lib is None:
        raise RuntimeError(f"the fused CPU kernels are unavailable: {_error}")
    return getattr(lib, f"{name}_{_SUFFIX[dtype]}")


def check(items, dtype: torch.dtype) -> int:
    """Index of the first item (a ctypes ``Item`` array) whose gradient has a NaN/Inf, or -1."""
    return int(_fn("kg_check", dtype)(items, len(items)))


def check_tensors(tensors: list[torch.Tensor]) -> int:
    """Index of the first tensor (dense, CPU, one float dtype) with a NaN/Inf entry, or -1."""
    n = len(tensors)
    ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_int64 * n)(*[t.numel() for t in tensors])
    return int(_fn("kg_check_arrays", tensors[0].dtype)(ptrs, sizes, n))


def amax(items, dtype: torch.dtype) -> float:
    """Largest ``|entry|`` of the gradients of a ctypes ``Item`` array (NaN if one is NaN/Inf)."""
    return float(_fn("kg_amax", dtype)(items, len(items)))


def amax_tensors(tensors: list[torch.Tensor]) -> float:
    """Largest ``|entry|`` of dense CPU tensors of one float dtype (NaN if one is NaN/Inf)."""
    n = len(tensors)
    ptrs = (ctypes.c_void_p * n)(*[t.data_ptr() for t in tensors])
    sizes = (ctypes.c_int64 * n)(*[t.numel() for t in tensors])
    return float(_fn("kg_amax_arrays", tensors[0].dtype)(ptrs, sizes, n))


def partition(items, parts: int) -> list:
    """Split a ctypes ``Item`` array into at most ``parts`` consecutive sub-arrays of about
    equal work (entries), sharing its memory (later changes to ``items`` are seen)."""
    n = len(items)
    sizes = [it.nblk * it.a * it.s for it in items]
    total, out, start, acc = sum(sizes), [], 0, 0
    for i, sz in enumerate(sizes):
        acc += sz
        if acc * parts >= total * (len(out) + 1) or i == n - 1:
            k = i + 1 - start
            out.append((Item * k).from_buffer(items, start * ctypes.sizeof(Item)))
            start = i + 1
    return out


_pool = None
_pool_key = None


def _executor(workers: int):
    # a process forked after the pool was made has no pool threads: make a new one there
    global _pool, _pool_key
    key = (os.getpid(), workers)
    if _pool_key != key:
        from concurrent.futures import ThreadPoolExecutor

        if _pool is not None and _pool_key[0] == key[0]:  # other size, same process
            _pool.shutdown(wait=False)
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kernelgeo-native")
        _pool_key = key
    return _pool


def sphere_step_parallel(parts: list, dtype: torch.dtype, momentum: float, dampening: float,
                         nesterov: bool) -> None:
    """:func:`sphere_step` on the sub-arrays of :func:`partition`, one per thread (the
    ctypes call releases the GIL); the calling thread takes the first part."""
    if len(parts) == 1:
        sphere_step(parts[0], dtype, momentum, dampening, nesterov)
        return
    pool = _executor(len(parts) - 1)
    futs = [pool.submit(sphere_step, part, dtype, momentum, dampening, nesterov)
            for part in parts[1:]]
    sphere_step(parts[0], dtype, momentum, dampening, nesterov)
    for f in futs:
        f.result()


def sphere_step(items, dtype: torch.dtype, momentum: float, dampening: float,
                nesterov: bool) -> None:
    """One fused step of every item of the ctypes ``Item`` array ``items`` (see
    ``native_kernels.c`` for the maths)."""
    done = _fn("kg_sphere_step", dtype)(
        items, len(items), float(momentum), float(dampening), int(bool(nesterov)))
    if done != len(items):
        raise RuntimeError("native sphere step refused its input (column longer than 64); "
                           "pass native=False to the optimizer")
