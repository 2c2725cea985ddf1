"""Image classification data held in memory as uint8 tensors, and a tensor data loader.

Every data set is decoded once into an :class:`ImageData`: ``x_train`` uint8 ``(N, C, H, W)``,
``y_train`` int64 ``(N,)`` and likewise for the test split.  :class:`TensorLoader` shuffles with
a :class:`torch.Generator`, and runs augmentation (random crop with zero padding, horizontal
flip) and normalisation on whole batches on the training device, so there is no per-sample
Python work (no ``torch.utils.data.DataLoader``).

Data sets (:func:`available_datasets`):

=====================  =============================================================
``digits``             scikit-learn's UCI handwritten digits, 1,797 8x8 grey images,
                       shipped with scikit-learn (offline); fixed stratified 80/20 split
``cifar10-jpeg``       all of CIFAR-10 from the packed-JPEG file
                       ``cifar10_jpeg_q75.npz`` (lossy, quality 75; see :func:`load_packed_jpeg`)
``cifar10-tiny``       ``cifar10_tiny_1k200.npz``: 1,000 train / 200 test decoded images
``cifar10``            torchvision's CIFAR-10 from a data directory (``download=True`` to fetch)
``cifar100``           torchvision's CIFAR-100, likewise
``mnist``              MNIST idx files (torchvision layout ``MNIST/raw`` or flat)
``fashion-mnist``      Fashion-MNIST idx files: data directory, torchvision layout, or
                       Debian's ``dataset-fashion-mnist`` package (``dpkg -L``)
``folder:<path>``      an ``ImageFolder`` tree ``<path>/train/<class>/*`` and
                       ``<path>/test/<class>/*`` (or ``val``): decoded into memory up to
                       :data:`kernelgeo.folder.STREAM_THRESHOLD` image files, streamed
                       (:class:`~kernelgeo.folder.FolderData`) beyond
=====================  =============================================================

:func:`make_loader` returns the batch loader of either kind of data set: a
:class:`TensorLoader` for an :class:`ImageData`, a :class:`~kernelgeo.folder.FolderLoader`
(DataLoader worker processes, :mod:`torchvision.transforms.v2`) for a ``FolderData``.

Files are searched for in, in order: the explicit ``data_dir``, the environment variable
``KERNELGEO_DATA``, ``../shared/data`` relative to the working directory and relative to the
repository.  A missing data set raises :class:`DataNotFoundError`, which lists the places
searched and how to get the data.

Packed-JPEG format (``*.npz``, no pickled objects): ``train_bytes`` uint8 ``(total,)`` are the
JPEG files concatenated, ``train_offsets`` int64 ``(N + 1,)`` delimit image ``i`` as
``train_bytes[train_offsets[i]:train_offsets[i + 1]]``, ``train_labels`` int64 ``(N,)``; the same
three keys with prefix ``test_``.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import os
import shutil
import struct
import subprocess
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "ImageData", "DataNotFoundError", "TensorLoader", "available_datasets", "load_dataset",
    "search_dirs", "find_file", "load_packed_jpeg", "load_decoded_npz", "read_idx", "write_idx",
    "load_digits", "augment_batch", "draw_augmentation", "channel_stats",
    "check_dataset_name", "make_loader",
]

_REPO_ROOT = Path(__file__).resolve().parent.parent
#: torchvision 0.29 deprecates its image codecs in favour of torchcodec, warning on every call;
#: they still work and torchcodec is not a dependency, so that one message is silenced
_TV_IMAGE_DEPRECATION = r"The image decoding and encoding capabilities of TorchVision"


@contextlib.contextmanager
def _quiet_tv_image():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_TV_IMAGE_DEPRECATION,
                                category=DeprecationWarning)
        yield

_DATASETS = {
    "digits": "scikit-learn handwritten digits, 8x8 grey, 10 classes (offline)",
    "cifar10-jpeg": "CIFAR-10 (JPEG q75 copy) from cifar10_jpeg_q75.npz",
    "cifar10-tiny": "1,000/200-image CIFAR-10 (JPEG q75 copy) subset, cifar10_tiny_1k200.npz",
    "cifar10": "CIFAR-10 via torchvision (python pickle batches)",
    "cifar100": "CIFAR-100 via torchvision (python pickle batches)",
    "mnist": "MNIST idx files",
    "fashion-mnist": "Fashion-MNIST idx files",
    "folder:<path>": "ImageFolder tree <path>/{train,test}/<class>/<image>",
}

#: data sets whose images are not mirror-symmetric in meaning, so no horizontal flips
_NO_FLIP = {"digits", "mnist", "fashion-mnist"}


class DataNotFoundError(FileNotFoundError):
    """A data set's files were not found; the message lists where and how to get them."""


@dataclass
class ImageData:
    """A classification data set decoded into memory.

    Attributes
    ----------
    name : str
        Data set name as given to :func:`load_dataset`.
    x_train, x_test : torch.Tensor
        uint8 images, shape ``(N, C, H, W)``.
    y_train, y_test : torch.Tensor
        int64 labels in ``[0, num_classes)``, shape ``(N,)``.
    num_classes : int
    mean, std : tuple of float
        Per-channel mean and standard deviation of ``x_train / 255`` (used to normalise).
    flip : bool
        Whether horizontal flips are a label-preserving augmentation for these images.
    label : str
        Human-readable name for reports, e.g. ``"CIFAR-10 (JPEG q75 copy)"``.
    source : str
        Where the data were read from.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    flip: bool = True
    label: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise ValueError(f"x_{split} must be uint8 (N, C, H, W), got {x.dtype} "
                                 f"{tuple(x.shape)}")
            if y.shape != (x.shape[0],):
                raise ValueError(f"y_{split} has shape {tuple(y.shape)}, expected "
                                 f"({x.shape[0]},)")
        if not self.mean:
            self.mean, self.std = channel_stats(self.x_train)
        if not self.label:
            self.label = self.name

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.x_train.shape[2]), int(self.x_train.shape[3])

    @property
    def n_train(self) -> int:
        return int(self.y_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.y_test.shape[0])

    def subset(self, n_train: int | None = None, n_test: int | None = None,
               seed: int = 0) -> ImageData:
        """Stratified random subset (class proportions kept) of the train and/or test split.

        Parameters
        ----------
        n_train, n_test : int or None
            Number of images to keep (``None`` or ``>= N`` keeps the split whole).
        seed : int
            Seed of the selection, independent of the training seed.
        """
        out = {}
        for split, n in (("train", n_train), ("test", n_test)):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if n is not None and n < len(y):
                if n <= 0:
                    raise ValueError(f"subset size must be positive, got {n}")
                idx = _stratified_indices(y, n, seed)
                x, y = x[idx], y[idx]
            out[f"x_{split}"], out[f"y_{split}"] = x, y
        # keep the full training set's statistics so subsets normalise like the full data
        return replace(self, **out, mean=self.mean, std=self.std)

    def resized(self, size: int) -> ImageData:
        """The same images resized to ``size`` x ``size`` (uint8, statistics recomputed).

        The shorter side is resized to ``size`` with antialiased bilinear interpolation (area
        averaging when shrinking by an integer factor) and the image centre-cropped, as
        :class:`~kernelgeo.folder.FolderData` does for ImageFolder trees.

        Parameters
        ----------
        size : int
            Side length of the output images, ``>= 1``.
        """
        if int(size) < 1:
            raise ValueError(f"image_size must be a positive integer, got {size!r}")
        size = int(size)
        if self.image_size == (size, size):
            return self
        out = {f"x_{split}": _resize_uint8(getattr(self, f"x_{split}"), size)
               for split in ("train", "test")}
        h, w = self.image_size
        return replace(self, **out, mean=(), std=(),
                       label=f"{self.label}, resized {h}x{w} -> {size}x{size}")

    def describe(self) -> str:
        return (f"{self.label}: train {tuple(self.x_train.shape)}, test "
                f"{tuple(self.x_test.shape)}, {self.num_classes} classes")


def _resize_uint8(x: torch.Tensor, size: int, chunk: int = 4096) -> torch.Tensor:
    """Resize uint8 images ``(N, C, H, W)``: shorter side to ``size``, centre crop."""
    import torch.nn.functional as F

    h, w = int(x.shape[2]), int(x.shape[3])
    scale = size / min(h, w)
    th, tw = max(size, round(h * scale)), max(size, round(w * scale))
    top, left = (th - size) // 2, (tw - size) // 2
    out = torch.empty((x.shape[0], x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk].float()
        if h % th == 0 and w % tw == 0:
            yb = F.avg_pool2d(xb, (h // th, w // tw))
        else:
            yb = F.interpolate(xb, size=(th, tw), mode="bilinear", antialias=True,
                               align_corners=False)
        yb = yb[:, :, top:top + size, left:left + size]
        out[i:i + chunk] = yb.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _stratified_indices(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    labels = y.numpy()
    _, counts = np.unique(labels, return_counts=True)
    strat = labels if n >= len(counts) and counts.min() >= 2 else None
    keep, _ = train_test_split(idx, train_size=n, stratify=strat, random_state=seed)
    return torch.from_numpy(np.sort(keep))


def channel_stats(x: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of ``x / 255`` for uint8 ``x`` of shape ``(N, C, H, W)``."""
    c = x.shape[1]
    xs = x.transpose(0, 1).reshape(c, -1)
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    # chunked so that a 50k-image set does not need a float64 copy of itself
    for chunk in xs.split(1 << 22, dim=1):
        f = chunk.double() / 255.0
        s1 += f.sum(1)
        s2 += (f * f).sum(1)
    n = xs.shape[1]
    mean = s1 / n
    std = (s2 / n - mean**2).clamp_min(1e-12).sqrt()
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def available_datasets() -> dict[str, str]:
    """Names accepted by :func:`load_dataset` and a one-line description of each."""
    return dict(_DATASETS)


def check_dataset_name(name: str) -> str:
    """Return ``name`` normalised, or raise ``ValueError`` listing the valid names."""
    key = name.strip().lower()
    if key.startswith("folder:") and len(key) > len("folder:"):
        return name.strip()
    if key in ("fashion_mnist", "fashionmnist"):
        key = "fashion-mnist"
    if key not in _DATASETS or key == "folder:<path>":
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(_DATASETS)}")
    return key


# ------------------------------------------------------------------------------ search paths
def search_dirs(data_dir: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for data files, in order (duplicates removed).

    Parameters
    ----------
    data_dir : path or None
        Explicit directory; searched first.

    Returns
    -------
    list of Path
        ``data_dir``, ``$KERNELGEO_DATA``, ``./../shared/data`` and ``<repo>/../shared/data``.
    """
    cands: list[Path] = []
    if data_dir:
        cands.append(Path(data_dir).expanduser())
    env = os.environ.get("KERNELGEO_DATA")
    if env:
        cands.extend(Path(p).expanduser() for p in env.split(os.pathsep) if p)
    cands.append(Path.cwd() / ".." / "shared" / "data")
    cands.append(_REPO_ROOT / ".." / "shared" / "data")
    out, seen = [], set()
    for c in cands:
        key = os.path.normpath(os.path.abspath(c))
        if key not in seen:
            seen.add(key)
            out.append(Path(key))
    return out


def _not_found(what: str, names: list[str], dirs: list[Path], how: str) -> DataNotFoundError:
    where = "\n".join(f"  - {d}{'' if d.is_dir() else ' (does not exist)'}" for d in dirs)
    return DataNotFoundError(
        f"{what} not found: looked for {', '.join(names)} in\n{where}\n{how}"
    )


def find_file(filename: str, data_dir=None, *, subdirs: tuple[str, ...] = ("",)) -> Path | None:
    """First existing ``<dir>/<subdir>/<filename>`` over :func:`search_dirs`, or ``None``."""
    for d in search_dirs(data_dir):
        for sub in subdirs:
            p = d / sub / filename
            if p.is_file():
                return p
    return None


# ----------------------------------------------------------------------------- file formats
def load_packed_jpeg(path: str | os.PathLike, *, splits=("train", "test"),
                     num_threads: int | None = None) -> dict[str, torch.Tensor]:
    """Decode a packed-JPEG ``.npz`` (format in the module docstring) into uint8 tensors.

    Parameters
    ----------
    path : path
        The ``.npz`` file.
    splits : sequence of str
        Prefixes to decode.

    Returns
    -------
    dict
        ``x_<split>`` uint8 ``(N, 3, H, W)`` and ``y_<split>`` int64 ``(N,)`` per split.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    out = {}
    with np.load(path, allow_pickle=False) as z:
        for s in splits:
            missing = [k for k in (f"{s}_bytes", f"{s}_offsets", f"{s}_labels") if k not in z]
            if missing:
                raise ValueError(f"{path}: not a packed-JPEG file, missing keys {missing}")
            buf = torch.from_numpy(z[f"{s}_bytes"])
            off = z[f"{s}_offsets"].astype(np.int64)
            labels = torch.from_numpy(z[f"{s}_labels"].astype(np.int64))
            if len(off) != len(labels) + 1 or off[-1] != buf.numel():
                raise ValueError(f"{path}: {s}_offsets inconsistent with {s}_bytes/{s}_labels")
            datas = [buf[int(a):int(b)] for a, b in zip(off[:-1], off[1:])]
            # decode_jpeg on a list decodes in one call; chunks bound peak memory
            imgs = []
            with _quiet_tv_image():
                for i in range(0, len(datas), 4096):
                    imgs.extend(decode_jpeg(datas[i:i + 4096], mode=ImageReadMode.RGB))
            out[f"x_{s}"] = torch.stack(imgs).contiguous()
            out[f"y_{s}"] = labels
    return out


def load_decoded_npz(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read an ``.npz`` with ``x_train``/``x_test`` uint8 ``(N, H, W, C)`` HWC images and
    ``y_train``/``y_test`` labels; returns NCHW uint8 and int64 tensors."""
    out = {}
    with np.load(path, allow_pickle=False) as z:
        for s in ("train", "test"):
            x = z[f"x_{s}"]
            if x.ndim == 3:
                x = x[..., None]
            out[f"x_{s}"] = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2) \
                .contiguous()
            out[f"y_{s}"] = torch.from_numpy(z[f"y_{s}"].astype(np.int64))
    return out


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4",
               0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (MNIST format), gzip-compressed if the name ends in ``.gz``.

    Returns
    -------
    numpy.ndarray
        Array of the file's shape and dtype (e.g. uint8 ``(N, 28, 28)`` for images).
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}i", data[4:4 + 4 * ndim])
    dt = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(dims)) if dims else 1
    body = data[4 + 4 * ndim:]
    if len(body) != count * dt.itemsize:
        raise ValueError(f"{path}: idx header says {dims} x {dt.itemsize} bytes, file has "
                         f"{len(body)} bytes of data (truncated?)")
    return np.frombuffer(body, dtype=dt).reshape(dims).astype(dt.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an idx file, gzip-compressed if the name ends in ``.gz``."""
    a = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, a.ndim]) + struct.pack(f">{a.ndim}i", *a.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + a.tobytes())


# ---------------------------------------------------------------------------------- loaders
def load_digits(split_seed: int = 0, test_fraction: float = 0.2) -> ImageData:
    """scikit-learn's 8x8 digits as uint8 ``(N, 1, 8, 8)``; stratified split fixed by seed.

    The 17 grey levels 0..16 are scaled to 0..255.
    """
    from sklearn.datasets import load_digits as _ld
    from sklearn.model_selection import train_test_split

    d = _ld()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    y = d.target.astype(np.int64)
    itr, ite = train_test_split(np.arange(len(y)), test_size=test_fraction, stratify=y,
                                random_state=split_seed)
    t = torch.from_numpy
    return ImageData("digits", t(x[itr]), t(y[itr]), t(x[ite]), t(y[ite]), 10, flip=False,
                     label="UCI digits (scikit-learn, 8x8)", source="sklearn.datasets")


_IDX_NAMES = {
    "train_x": ("train-images-idx3-ubyte",), "train_y": ("train-labels-idx1-ubyte",),
    "test_x": ("t10k-images-idx3-ubyte",), "test_y": ("t10k-labels-idx1-ubyte",),
}
_TV_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10",
             "cifar100": "CIFAR100"}


def _debian_fashion_dirs() -> list[Path]:
    if not shutil.which("dpkg"):
        return []
    try:
        res = subprocess.run(["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True,
                             text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if res.returncode != 0:
        return []
    return sorted({Path(line).parent for line in res.stdout.splitlines()
                   if "idx" in line and line.endswith(".gz")})


def _idx_dirs(name: str, data_dir) -> list[Path]:
    subs = {"mnist": ("", "mnist", "MNIST/raw"),
            "fashion-mnist": ("", "fashion-mnist", "fashion_mnist", "FashionMNIST/raw")}[name]
    dirs = [d / s for d in search_dirs(data_dir) for s in subs]
    if name == "fashion-mnist":
        dirs.extend(_debian_fashion_dirs())
    return dirs


def _load_idx_dataset(name: str, data_dir, download: bool) -> ImageData:
    if download:
        root = _download_root(data_dir)
        _tv_download(name, root)
    dirs = _idx_dirs(name, data_dir)
    found = None
    for d in dirs:
        paths = {}
        for key, (stem,) in _IDX_NAMES.items():
            for cand in (d / (stem + ".gz"), d / stem):
                if cand.is_file():
                    paths[key] = cand
                    break
        if len(paths) == 4:
            found = paths
            break
    if found is None:
        how = ("Get it with `--download` (needs internet; saved under --data-dir or "
               "$KERNELGEO_DATA)")
        if name == "fashion-mnist":
            how += (", or offline on Debian/Ubuntu: `apt-get install dataset-fashion-mnist`")
        stems = [s + "[.gz]" for (s,) in _IDX_NAMES.values()]
        raise _not_found(f"{name} idx files", stems, dirs, how + ".")
    arr = {k: read_idx(p) for k, p in found.items()}
    t = torch.from_numpy
    return ImageData(
        name, t(arr["train_x"][:, None].copy()), t(arr["train_y"].astype(np.int64)),
        t(arr["test_x"][:, None].copy()), t(arr["test_y"].astype(np.int64)), 10, flip=False,
        label={"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}[name],
        source=str(found["train_x"].parent))


def _download_root(data_dir) -> Path:
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("KERNELGEO_DATA")
    if env:
        return Path(env.split(os.pathsep)[0]).expanduser()
    return Path.home() / ".cache" / "kernelgeo" / "data"


def _tv_download(name: str, root: Path) -> None:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TV_CLASS[name])
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(str(root), train=train, download=True)


def _load_tv_cifar(name: str, data_dir, download: bool) -> ImageData:
    import torchvision.datasets as tvd

    cls = getattr(tvd, _TV_CLASS[name])
    roots = [_download_root(data_dir)] if download else search_dirs(data_dir)
    if not download:
        # torchvision also checks a home cache that users commonly download into
        roots.append(Path.home() / ".cache" / "kernelgeo" / "data")
    for root in roots:
        try:
            tr = cls(str(root), train=True, download=download)
            te = cls(str(root), train=False, download=download)
        except RuntimeError:
            if download:
                raise
            continue
        t = torch.from_numpy
        return ImageData(
            name, t(tr.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(tr.targets, dtype=torch.int64),
            t(te.data).permute(0, 3, 1, 2).contiguous(),
            torch.tensor(te.targets, dtype=torch.int64), len(tr.classes),
            label={"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}[name], source=str(root))
    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    raise _not_found(name, [folder + "/"], roots,
                     "Get it with `--download` (needs internet; saved under --data-dir or "
                     "$KERNELGEO_DATA), or for CIFAR-10 use the offline `cifar10-jpeg` copy.")


def _load_shared_npz(name: str, data_dir) -> ImageData:
    fname = {"cifar10-jpeg": "cifar10_jpeg_q75.npz", "cifar10-tiny": "cifar10_tiny_1k200.npz"}[
        name]
    path = find_file(fname, data_dir)
    if path is None:
        raise _not_found(
            name, [fname], search_dirs(data_dir),
            "This file is not distributed with kernelgeo; put it in one of these directories "
            "(or pass --data-dir / set KERNELGEO_DATA), or use `--dataset cifar10 --download` "
            "for the original CIFAR-10.")
    arr = load_packed_jpeg(path) if name == "cifar10-jpeg" else load_decoded_npz(path)
    label = ("CIFAR-10 (JPEG q75 copy)" if name == "cifar10-jpeg"
             else "CIFAR-10 (JPEG q75 copy), 1k/200 subset")
    return ImageData(name, arr["x_train"], arr["y_train"], arr["x_test"], arr["y_test"], 10,
                     label=label, source=str(path))


def _load_folder(spec: str, image_size: int | None, stream: bool | None, split_seed: int):
    from .folder import STREAM_THRESHOLD, FolderData

    fd = FolderData(spec.split(":", 1)[1], image_size, name=spec, stats_seed=split_seed)
    if stream is None:
        stream = fd.n_train + fd.n_test > STREAM_THRESHOLD
    return fd if stream else fd.to_memory()


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, data_dir: str | None, download: bool, split_seed: int,
                 image_size: int | None, stream: bool | None):
    if name.lower().startswith("folder:"):
        return _load_folder(name, image_size, stream, split_seed)
    if name == "digits":
        d = load_digits(split_seed)
    elif name in ("cifar10-jpeg", "cifar10-tiny"):
        d = _load_shared_npz(name, data_dir)
    elif name in ("mnist", "fashion-mnist"):
        d = _load_idx_dataset(name, data_dir, download)
    elif name in ("cifar10", "cifar100"):
        d = _load_tv_cifar(name, data_dir, download)
    else:  # pragma: no cover - checked before
        raise ValueError(f"unknown dataset {name!r}")
    return d.resized(image_size) if image_size is not None else d


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *,
                 download: bool = False, split_seed: int = 0, train_subset: int | None = None,
                 test_subset: int | None = None, image_size: int | None = None,
                 stream: bool | None = None):
    """Load a data set by name (cached: a second call returns the same object).

    Parameters
    ----------
    name : str
        One of :func:`available_datasets` (``folder:<path>`` for an ImageFolder tree).
    data_dir : path, optional
        Directory searched first (see :func:`search_dirs`) and download target.
    download : bool
        Fetch torchvision data sets (cifar10, cifar100, mnist, fashion-mnist) if missing.
    split_seed : int
        Seed of the fixed train/test split (``digits``), of subset selection and of the
        sample of a streamed folder's training images that the statistics come from.
    train_subset, test_subset : int, optional
        Keep a stratified subset of this many images.
    image_size : int, optional
        Resize the shorter side to ``image_size`` (aspect ratio kept) and centre-crop to
        ``image_size`` x ``image_size`` (:meth:`ImageData.resized`); the statistics used to
        normalise are those of the resized training images.  Without it, in-memory data sets
        keep their size and all images of an ImageFolder tree must share one size.
    stream : bool, optional
        ImageFolder trees only: ``True`` streams from disk (:class:`FolderData`), ``False``
        decodes into memory, ``None`` streams trees of more than
        :data:`kernelgeo.folder.STREAM_THRESHOLD` image files.

    Returns
    -------
    ImageData or FolderData
        Pass it to :func:`make_loader` for batches.

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid names).
    DataNotFoundError
        Files missing (the message lists where they were looked for and how to get them).
    ImageDecodeError
        An ImageFolder image cannot be decoded (the message names the file); a streamed folder
        raises it when the batch holding the file is loaded.
    """
    key = check_dataset_name(name)
    if stream is not None and not key.lower().startswith("folder:"):
        raise ValueError(f"stream= applies to folder:<path> data sets only, not {key!r}")
    d = _load_cached(key, str(data_dir) if data_dir else None, bool(download), int(split_seed),
                     image_size, stream)
    if train_subset is not None or test_subset is not None:
        d = d.subset(train_subset, test_subset, seed=split_seed)
    return d


# ---------------------------------------------------------------------------- augmentation
def draw_augmentation(n: int, *, crop_padding: int = 0, flip: bool = False,
                      generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random parameters of :func:`augment_batch` for ``n`` images, drawn on the CPU.

    Returns
    -------
    dict
        ``offsets`` int64 ``(2, n)`` crop offsets in ``[0, 2 * crop_padding]`` (if cropping),
        ``flips`` bool ``(n,)`` (if flipping).
    """
    out = {}
    if crop_padding > 0:
        out["offsets"] = torch.randint(0, 2 * crop_padding + 1, (2, n), generator=generator)
    if flip:
        out["flips"] = torch.rand(n, generator=generator) < 0.5
    return out


def augment_batch(x: torch.Tensor, *, crop_padding: int = 0, flip: bool = False,
                  generator: torch.Generator | None = None,
                  params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip of a whole batch.

    The random numbers are drawn on the CPU from ``generator`` (a handful per image), so the
    result is reproducible and independent of the device ``x`` lives on.

    Parameters
    ----------
    x : torch.Tensor
        Images ``(N, C, H, W)`` of any dtype, on any device.
    crop_padding : int
        Pad by this many zeros on every side, then crop back to ``H x W`` at a random offset.
    flip : bool
        Mirror each image left-right with probability 1/2.
    generator : torch.Generator, optional
        CPU generator the random parameters are drawn from.
    params : dict, optional
        Parameters from :func:`draw_augmentation` (then ``generator`` is not used).

    Returns
    -------
    torch.Tensor
        Augmented batch, same shape, dtype and device as ``x``.
    """
    n, c, h, w = x.shape
    if params is None:
        params = draw_augmentation(n, crop_padding=crop_padding, flip=flip, generator=generator)
    if not params:
        return x
    p = crop_padding if "offsets" in params else 0
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = ar_h.expand(n, h)
    cols = ar_w.expand(n, w)
    if "flips" in params:
        # a mirrored image reads its columns backwards: fold the flip into the gather index
        cols = torch.where(params["flips"].to(x.device)[:, None], (w - 1) - ar_w, ar_w)
    if p:
        off = params["offsets"].to(x.device)
        rows = rows + off[0][:, None]
        cols = cols + off[1][:, None]
        x = torch.nn.functional.pad(x, (p, p, p, p))
    wp = w + 2 * p
    # one gather over flattened pixels: a contiguous result, no per-image Python work
    flat = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, -1).gather(2, flat).reshape(n, c, h, w)


class TensorLoader:
    """Batches of an in-memory uint8 image tensor, augmented and normalised on ``device``.

    Shuffling and augmentation draw from one CPU :class:`torch.Generator`, so a run is
    reproducible from the seed and resumable from :meth:`state_dict`.  For data-parallel
    training every rank builds the same global batch (same generator, same seed) and keeps its
    slice ``rank::world_size``-contiguous shard, so the union over ranks is exactly the
    single-process batch.

    Parameters
    ----------
    x : torch.Tensor
        uint8 images ``(N, C, H, W)`` (moved to ``device`` once).
    y : torch.Tensor
        int64 labels ``(N,)``.
    batch_size : int
        Global batch size (over all ranks).
    mean, std : sequence of float
        Per-channel normalisation of ``x / 255``.
    shuffle : bool
        Reshuffle every epoch (training) or keep the order (evaluation).
    drop_last : bool
        Drop the last incomplete batch.
    crop_padding : int
        Random-crop padding (0: no crop).
    flip : bool
        Random horizontal flips.
    seed : int
        Seed of the generator.
    device : torch.device or str
    rank, world_size : int
        This process's shard of each batch.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, mean, std,
                 shuffle: bool = False, drop_last: bool = False, crop_padding: int = 0,
                 flip: bool = False, seed: int = 0, device="cpu", rank: int = 0,
                 world_size: int = 1, dtype: torch.dtype = torch.float32):
        if batch_size < world_size:
            raise ValueError(f"batch size {batch_size} smaller than world size {world_size}")
        self.device = torch.device(device)
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last = shuffle, drop_last
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        self.rank, self.world_size = int(rank), int(world_size)
        self.dtype = dtype
        c = x.shape[1]
        self.mean = torch.tensor(mean, dtype=dtype, device=self.device).reshape(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=dtype, device=self.device).reshape(1, c, 1, 1)
        self.generator = torch.Generator().manual_seed(int(seed))

    def __len__(self) -> int:
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self.y)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])

    def _shard(self, idx: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return idx
        return idx.tensor_split(self.world_size)[self.rank]

    def normalize(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> float ``(B, C, H, W)``, ``(x/255 - mean) / std``."""
        return (xb.to(self.dtype) / 255.0 - self.mean) / self.std

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.y)
        if self.shuffle:
            order = torch.randperm(n, generator=self.generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.crop_padding or self.flip:
                # drawn for the whole global batch so that every rank consumes the same random
                # numbers and the shards together are exactly the single-process batch
                params = draw_augmentation(len(idx), crop_padding=self.crop_padding,
                                           flip=self.flip, generator=self.generator)
                sl = self._shard(torch.arange(len(idx)))
                params = {k: v[..., sl] for k, v in params.items()}
                idx = self._shard(idx)
                xb = augment_batch(self.x[idx], crop_padding=self.crop_padding, flip=self.flip,
                                   params=params)
            else:
                idx = self._shard(idx)
                xb = self.x[idx]
            yield self.normalize(xb), self.y[idx]


def make_loader(data, split: str, batch_size: int, *, shuffle: bool = False,
                drop_last: bool = False, crop_padding: int = 0, flip: bool = False,
                seed: int = 0, device="cpu", rank: int = 0, world_size: int = 1,
                dtype: torch.dtype = torch.float32, workers: int | None = None):
    """The batch loader of one split of a data set.

    Parameters
    ----------
    data : ImageData or FolderData
        In memory (gives a :class:`TensorLoader`, ``workers`` unused) or a streamed image
        folder (gives a :class:`~kernelgeo.folder.FolderLoader`).
    split : {"train", "test"}
    batch_size : int
        Global batch size (over all ranks).
    shuffle, drop_last, crop_padding, flip, seed, device, rank, world_size, dtype
        As for :class:`TensorLoader`.
    workers : int, optional
        DataLoader worker processes of a streamed folder (``None``: a default from the CPU
        count; ``0``: decode in this process).

    Returns
    -------
    TensorLoader or FolderLoader
        ``len()`` batches, ``num_samples``, ``state_dict()`` / ``load_state_dict()``,
        iteration over normalised ``(x, y)`` batches of this rank on ``device``, and
        ``normalize(uint8_batch)``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    kw = dict(shuffle=shuffle, drop_last=drop_last, crop_padding=crop_padding, flip=flip,
              seed=seed, device=device, rank=rank, world_size=world_size, dtype=dtype)
    if isinstance(data, ImageData):
        return TensorLoader(getattr(data, f"x_{split}"), getattr(data, f"y_{split}"), batch_size,
                            mean=data.mean, std=data.std, **kw)
    from .folder import FolderData, FolderLoader

    if isinstance(data, FolderData):
        return FolderLoader(data, split, batch_size, workers=workers, **kw)
    raise TypeError(f"make_loader needs an ImageData or FolderData, got {type(data).__name__}")


def __getattr__(name: str):
    # the folder module imports torchvision, which importing kernelgeo.data does not need
    if name in ("FolderData", "FolderLoader", "ImageDecodeError"):
        from . import folder

        return getattr(folder, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
