"""Image-folder data sets ``<root>/{train,test}/<class>/<image>``, in memory or streamed.

The tree is scanned with torchvision's :class:`~torchvision.datasets.ImageFolder` (the class list
is the training split's, so test labels agree with training labels even when a test class
directory is missing).  Files whose name does not end in one of torchvision's image extensions
(``.jpg .jpeg .png .ppm .bmp .pgm .tif .tiff .webp``), hidden files (``.DS_Store``, macOS
``._*`` resource forks) and hidden directories are skipped, with one warning that counts them.
Images are decoded with PIL and converted to RGB (grey images get three equal channels); a file
PIL cannot decode raises :class:`ImageDecodeError` naming the file.

Geometry. Every image goes through the same deterministic transform: resize the shorter side to
``min(H, W)`` of the target size (antialiased, aspect ratio kept), then centre-crop to
``(H, W)``.  The target is ``(image_size, image_size)`` when ``image_size`` is given; otherwise
the native size shared by the images of the statistics sample (different sizes there raise and
ask for ``image_size``; an image of another size outside the sample is brought to it by the same
resize and crop, zero-padded where it is smaller).

In memory or streamed. :func:`kernelgeo.data.load_dataset` decodes a tree of at most
:data:`STREAM_THRESHOLD` image files (train + test) into an :class:`~kernelgeo.data.ImageData`
(``stream=None``; ``stream=False`` forces it, ``stream=True`` streams any size); larger trees
become a :class:`FolderData` whose :class:`FolderLoader` decodes batches in
:class:`torch.utils.data.DataLoader` worker processes with :mod:`torchvision.transforms.v2`.
Both paths produce bitwise the same uint8 images for the test split.

Training augmentation of a streamed folder (``FolderData.train_crop``): ``"pad"`` (default,
the same recipe as the in-memory loader) applies the fixed transform, then a random crop after
``crop_padding`` zeros of padding and a random horizontal flip; ``"random-resized"`` applies
:class:`~torchvision.transforms.v2.RandomResizedCrop` (scale ``rrc_scale``) to the decoded
image, then the flip.  Normalisation ``(x / 255 - mean) / std`` runs on the training device,
with per-channel statistics of a seeded sample of :data:`STATS_SAMPLE` training images (all of
them when there are fewer) after the fixed transform.

Determinism and resumption. Epoch ``e`` visits the samples in a permutation seeded by
``(seed, e)``; sample ``i`` of epoch ``e`` is augmented with the global RNG seeded by
``(seed, e, i)`` inside :func:`torch.random.fork_rng`.  Batches therefore depend on the seed,
epoch, batch size and data only: not on the number of workers, nor on the world size (each
rank keeps the ``rank``-th of ``world_size`` contiguous slices of the global batch, so the
ranks' shards concatenate to the single-process batch).  :meth:`FolderLoader.state_dict`
records the epoch and the number of batches already yielded; after
:meth:`~FolderLoader.load_state_dict` the remaining batches are bitwise those the uninterrupted
run would have produced, at an epoch boundary or in the middle of an epoch.  Not covered: a
changed tree (refused through a fingerprint of the file list), a different batch size in the
middle of an epoch (refused), other PIL / torchvision versions (decoding and resampling may
differ), and the streamed and in-memory loaders of the same data, which draw their
augmentations from different random streams.
"""

from __future__ import annotations

import os
import warnings
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from .data import DataNotFoundError, ImageData, _stratified_indices, channel_stats

__all__ = ["FolderData", "FolderLoader", "ImageDecodeError", "SkippedFilesWarning", "decode_rgb",
           "STREAM_THRESHOLD", "STATS_SAMPLE"]

#: image files (train + test) up to which ``load_dataset`` decodes a folder into memory
STREAM_THRESHOLD = 20_000
#: training images whose pixels estimate the normalisation statistics of a streamed folder
STATS_SAMPLE = 1024
_MASK64 = (1 << 64) - 1


class SkippedFilesWarning(UserWarning):
    """Files of an image folder were skipped (not images, or hidden)."""


def _outside_stacklevel() -> int:
    """``stacklevel`` of the first caller outside this package, for warnings to point at."""
    import sys

    pkg = os.path.dirname(os.path.abspath(__file__))
    f, level = sys._getframe(1), 1
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(pkg + os.sep):
        f, level = f.f_back, level + 1
    return level


class ImageDecodeError(ValueError):
    """An image file could not be decoded; the message names the file."""


def decode_rgb(path: str | os.PathLike) -> torch.Tensor:
    """Decode an image file with PIL into a uint8 RGB tensor ``(3, H, W)``.

    Raises
    ------
    ImageDecodeError
        The file is not a decodable image (the message names it).
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")  # forces the full decode, so truncation is caught here
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(
            f"cannot decode image file {path}: {err}. Remove or replace this file (or move it "
            "out of the data tree)") from err
    return v2.functional.pil_to_tensor(rgb)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _mix(seed: int, epoch: int, idx) -> np.ndarray:
    """Well-spread 64-bit seeds for samples ``idx`` of epoch ``epoch`` under ``seed``."""
    s = _splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    s = _splitmix64(s ^ np.uint64(epoch & _MASK64))
    return _splitmix64(np.asarray(idx, dtype=np.uint64) ^ s)


def _is_hidden(path: str) -> bool:
    return os.path.basename(path).startswith(".")


class _FixedClassesImageFolder(ImageFolder):
    """ImageFolder with a given class list (the training split's), empty classes allowed."""

    def __init__(self, root, classes, is_valid_file):
        self._fixed_classes = list(classes)
        try:
            super().__init__(root, loader=decode_rgb, is_valid_file=is_valid_file,
                             allow_empty=True)
        except TypeError:  # torchvision < 0.18: no allow_empty
            super().__init__(root, loader=decode_rgb, is_valid_file=is_valid_file)

    def find_classes(self, directory):
        return list(self._fixed_classes), {c: i for i, c in enumerate(self._fixed_classes)}


def _class_dirs(d: Path) -> list[str]:
    return sorted(e.name for e in os.scandir(d) if e.is_dir() and not e.name.startswith("."))


class _DecodeFailure(str):
    """The message of an ImageDecodeError, handed from a worker as data: a worker that raised
    leaves its DataLoader slow to shut down (seconds of join timeouts)."""


def _collate(items):
    for item in items:
        if isinstance(item, _DecodeFailure):
            return item
    return torch.utils.data.default_collate(items)


class _Transformed(torch.utils.data.Dataset):
    """Samples ``(index, seed)`` of an ImageFolder, transformed under a per-sample seed."""

    def __init__(self, folder: ImageFolder, transform, random: bool, raise_errors=True):
        self.folder, self.transform, self.random = folder, transform, random
        self.raise_errors = raise_errors

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, item):
        i, seed = item
        path, label = self.folder.samples[i]
        try:
            img = self.folder.loader(path)
        except ImageDecodeError as err:
            if self.raise_errors:
                raise
            return _DecodeFailure(str(err))
        if not self.random:
            return self.transform(img), label
        # the global RNG is what transforms.v2 draws from; forking it keeps the caller's
        # stream untouched when there are no worker processes
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed also queues seeds for every
            # accelerator backend, recording a stack trace each time (a third of the cost)
            torch.default_generator.manual_seed(seed)
            img = self.transform(img)
        return img, label


class FolderData:
    """An ImageFolder tree ``<root>/train/<class>/*`` and ``<root>/test/<class>/*`` (or
    ``val``), scanned but not decoded; batches come from :class:`FolderLoader`.

    Parameters
    ----------
    root : path
        Root of the tree.
    image_size : int, optional
        Side of the square images produced (shorter side resized, centre crop); ``None`` keeps
        the native size, which the images of the statistics sample must share.
    flip : bool
        Whether horizontal flips preserve the labels (natural images: yes).
    train_crop : {"pad", "random-resized"}
        Random crop of training images (see the module docstring).
    rrc_scale : tuple of float
        Area fraction range of ``"random-resized"`` crops.
    stats_sample : int
        Number of training images the channel statistics are estimated from.
    stats_seed : int
        Seed of the statistics sample.
    name : str, optional
        Data set name (default ``"folder:<root>"``).

    Attributes
    ----------
    name, label, source : str
    num_classes, in_channels : int
    image_size : tuple of int
        ``(H, W)`` of every produced image.
    mean, std : tuple of float
        Per-channel statistics of ``x / 255`` (estimated on first access).
    n_train, n_test : int
    classes : list of str
    """

    def __init__(self, root, image_size: int | None = None, *, flip: bool = True,
                 train_crop: str = "pad", rrc_scale: tuple[float, float] = (0.08, 1.0),
                 stats_sample: int = STATS_SAMPLE, stats_seed: int = 0,
                 name: str | None = None):
        root = Path(root).expanduser()
        test_name = next((s for s in ("test", "val") if (root / s).is_dir()), None)
        if not (root / "train").is_dir() or test_name is None:
            raise DataNotFoundError(
                f"ImageFolder data set {root}: expected directories {root / 'train'} and "
                f"{root / 'test'} (or {root / 'val'}), each with one sub-directory per class")
        if train_crop not in ("pad", "random-resized"):
            raise ValueError(f"train_crop must be 'pad' or 'random-resized', got {train_crop!r}")
        if image_size is not None and int(image_size) < 1:
            raise ValueError(f"image_size must be a positive integer, got {image_size!r}")
        classes = _class_dirs(root / "train")
        if not classes:
            raise DataNotFoundError(f"{root / 'train'} has no class sub-directories")
        extra = sorted(set(_class_dirs(root / test_name)) - set(classes))
        if extra:
            raise ValueError(f"{root / test_name} has classes {extra} that {root / 'train'} "
                             "lacks; every test class needs training images")
        skipped: list[str] = []

        def valid(path: str) -> bool:
            ok = path.lower().endswith(IMG_EXTENSIONS) and not _is_hidden(path)
            if not ok:
                skipped.append(path)
            return ok

        self.folders = {split: _FixedClassesImageFolder(root / sub, classes, valid)
                        for split, sub in (("train", "train"), ("test", test_name))}
        for split, sub in (("train", "train"), ("test", test_name)):
            if not self.folders[split].samples:
                raise DataNotFoundError(f"no image files under {root / sub} (recognised: "
                                        f"{' '.join(IMG_EXTENSIONS)})")
        if skipped:
            warnings.warn(f"{root}: skipped {len(skipped)} non-image or hidden file(s), e.g. "
                          f"{os.path.relpath(skipped[0], root)}", SkippedFilesWarning,
                          stacklevel=_outside_stacklevel())
        self.root, self.classes = root, classes
        self.name = name or f"folder:{root}"
        self.label = f"ImageFolder {root.name}"
        self.source = str(root)
        self.num_classes = len(classes)
        self.in_channels = 3
        self.flip = bool(flip)
        self.train_crop, self.rrc_scale = train_crop, tuple(rrc_scale)
        self.skipped = len(skipped)
        self.extra = {"classes": classes}
        self._stats_seed, self._stats_sample = int(stats_seed), int(stats_sample)
        self._stats: tuple | None = None
        self._fingerprint: dict[str, int] = {}
        if image_size is not None:
            self.image_size = (int(image_size), int(image_size))
        else:
            self.image_size = self._native_size()

    # ------------------------------------------------------------------ read-only attributes
    @property
    def n_train(self) -> int:
        return len(self.folders["train"].samples)

    @property
    def n_test(self) -> int:
        return len(self.folders["test"].samples)

    @property
    def mean(self) -> tuple[float, ...]:
        return self._channel_stats()[0]

    @property
    def std(self) -> tuple[float, ...]:
        return self._channel_stats()[1]

    def describe(self) -> str:
        h, w = self.image_size
        return (f"{self.label}: train {self.n_train}, test {self.n_test} images streamed at "
                f"{h}x{w} from {self.root}, {self.num_classes} classes")

    def __repr__(self) -> str:
        return f"FolderData({self.describe()!r})"

    # ---------------------------------------------------------------------------- transforms
    def fixed_transform(self) -> v2.Compose:
        """Shorter side to ``min(image_size)``, centre crop to ``image_size`` (uint8 in/out)."""
        return v2.Compose([v2.Resize(min(self.image_size), antialias=True),
                           v2.CenterCrop(list(self.image_size))])

    def train_transform(self, crop_padding: int = 0, flip: bool = False) -> v2.Compose:
        """The random training transform (see the module docstring)."""
        if self.train_crop == "random-resized":
            steps = [v2.RandomResizedCrop(list(self.image_size), scale=self.rrc_scale,
                                          antialias=True)]
        else:
            steps = list(self.fixed_transform().transforms)
            if crop_padding:
                steps.append(v2.RandomCrop(list(self.image_size), padding=int(crop_padding),
                                           fill=0))
        if flip:
            steps.append(v2.RandomHorizontalFlip())
        return v2.Compose(steps)

    # ------------------------------------------------------------------------------- helpers
    def _stats_indices(self) -> list[int]:
        n = self.n_train
        if n <= self._stats_sample:
            return list(range(n))
        g = torch.Generator().manual_seed(self._stats_seed)
        return sorted(torch.randperm(n, generator=g)[:self._stats_sample].tolist())

    def _native_size(self) -> tuple[int, int]:
        from PIL import Image

        sizes: dict[tuple[int, int], str] = {}
        for i in self._stats_indices():
            path = self.folders["train"].samples[i][0]
            try:
                with Image.open(path) as im:  # reads the header only
                    w, h = im.size
            except (OSError, ValueError, SyntaxError) as err:
                raise ImageDecodeError(f"cannot decode image file {path}: {err}. Remove or "
                                       "replace this file") from err
            sizes.setdefault((h, w), path)
            if len(sizes) > 1:
                (s1, p1), (s2, p2) = sizes.items()
                raise ValueError(
                    f"{self.root}: images have different sizes ({s1[0]}x{s1[1]} {p1}, "
                    f"{s2[0]}x{s2[1]} {p2}); pass image_size (CLI --image-size) to resize "
                    "the shorter side and centre-crop to a square")
        return next(iter(sizes))

    def decode(self, split: str, indices=None, workers: int = 0) -> torch.Tensor:
        """uint8 ``(N, 3, H, W)`` of ``indices`` (default all) of ``split`` after the fixed
        transform, decoded on ``workers`` threads (``0``: up to 8)."""
        folder = self.folders[split]
        idx = range(len(folder.samples)) if indices is None else indices
        view = _Transformed(folder, self.fixed_transform(), False)
        n_threads = workers or min(8, os.cpu_count() or 1)
        if n_threads <= 1 or len(idx) < 64:
            imgs = [view[(i, 0)][0] for i in idx]
        else:
            # PIL and torch release the GIL while decoding and resizing
            with ThreadPoolExecutor(n_threads) as pool:
                imgs = [x for x, _ in pool.map(view.__getitem__, [(i, 0) for i in idx])]
        c, (h, w) = self.in_channels, self.image_size
        return torch.stack(imgs) if imgs else torch.empty(0, c, h, w, dtype=torch.uint8)

    def targets(self, split: str) -> torch.Tensor:
        return torch.tensor(self.folders[split].targets, dtype=torch.int64)

    def _channel_stats(self):
        if self._stats is None:
            self._stats = channel_stats(self.decode("train", self._stats_indices()))
        return self._stats

    def fingerprint(self, split: str) -> int:
        """CRC-32 of the split's file list (relative paths and labels)."""
        if split not in self._fingerprint:
            crc = 0
            for path, label in self.folders[split].samples:
                crc = zlib.crc32(f"{os.path.relpath(path, self.root)}\t{label}\n".encode(), crc)
            self._fingerprint[split] = crc
        return self._fingerprint[split]

    def to_memory(self) -> ImageData:
        """Decode both splits (fixed transform) into an :class:`~kernelgeo.data.ImageData`."""
        return ImageData(self.name, self.decode("train"), self.targets("train"),
                         self.decode("test"), self.targets("test"), self.num_classes,
                         flip=self.flip, label=self.label, source=self.source,
                         extra={"classes": self.classes})

    def subset(self, n_train: int | None = None, n_test: int | None = None,
               seed: int = 0) -> FolderData:
        """Stratified random subset of the file lists, as :meth:`ImageData.subset` (the
        normalisation statistics stay those of the full training split)."""
        import copy

        self._channel_stats()
        out = copy.copy(self)
        out.folders = dict(self.folders)
        out._fingerprint = {}
        for split, n in (("train", n_train), ("test", n_test)):
            folder = self.folders[split]
            if n is None or n >= len(folder.samples):
                continue
            if n <= 0:
                raise ValueError(f"subset size must be positive, got {n}")
            keep = _stratified_indices(self.targets(split), n, seed).tolist()
            f = copy.copy(folder)
            f.samples = [folder.samples[i] for i in keep]
            f.imgs = f.samples
            f.targets = [s[1] for s in f.samples]
            out.folders[split] = f
        return out


def _default_workers(world_size: int) -> int:
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return max(0, min(8, (os.cpu_count() or 1) // max(1, local) - 1))


class _PlanSampler(torch.utils.data.Sampler):
    """Batch sampler replaying the batch plan the loader sets before each epoch."""

    def __init__(self):
        self.plan: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.plan)

    def __len__(self) -> int:
        return len(self.plan)


class FolderLoader:
    """Batches of a :class:`FolderData` split, decoded by DataLoader workers, normalised on
    ``device``; same protocol as :class:`kernelgeo.data.TensorLoader`.

    Parameters are those of :func:`kernelgeo.data.make_loader`; ``workers`` is the number of
    DataLoader processes (``None``: up to 8, split over the ranks of this node; ``0``: decode in
    this process).  Determinism and resumption are described in the module docstring.
    """

    def __init__(self, data: FolderData, split: str, batch_size: int, *, shuffle: bool = False,
                 drop_last: bool = False, crop_padding: int = 0, flip: bool = False,
                 seed: int = 0, device="cpu", rank: int = 0, world_size: int = 1,
                 dtype: torch.dtype = torch.float32, workers: int | None = None):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if batch_size < world_size:
            raise ValueError(f"batch size {batch_size} smaller than world size {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside [0, world size {world_size})")
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
        self.data, self.split = data, split
        self.device = torch.device(device)
        self.batch_size = int(batch_size)
        self.shuffle, self.drop_last = bool(shuffle), bool(drop_last)
        self.crop_padding, self.flip = int(crop_padding), bool(flip)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.dtype = dtype
        self.workers = _default_workers(world_size) if workers is None else int(workers)
        self.augment = split == "train" and (
            bool(crop_padding) or bool(flip) or data.train_crop == "random-resized")
        transform = (data.train_transform(self.crop_padding, self.flip) if self.augment
                     else data.fixed_transform())
        self._view = _Transformed(data.folders[split], transform, self.augment,
                                  raise_errors=False)
        c = data.in_channels
        self.mean = torch.tensor(data.mean, dtype=dtype, device=self.device).reshape(1, c, 1, 1)
        self.std = torch.tensor(data.std, dtype=dtype, device=self.device).reshape(1, c, 1, 1)
        self._epoch, self._start = 0, 0
        self._current: tuple[int, int] | None = None
        self._sampler = _PlanSampler()
        self._dl = None

    def __len__(self) -> int:
        n = self.num_samples
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self._view)

    def state_dict(self) -> dict:
        """``epoch`` (index of the epoch to run or running) and ``batch`` (batches of it
        already yielded), with what identifies the stream."""
        epoch, batch = self._current if self._current is not None else (self._epoch,
                                                                          self._start)
        return {"kind": "folder", "seed": self.seed, "epoch": epoch, "batch": batch,
                "batch_size": self.batch_size, "num_samples": self.num_samples,
                "fingerprint": self.data.fingerprint(self.split)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict`: the next iteration yields the batches that followed.

        Raises
        ------
        ValueError
            The state is not a folder loader's, or was written for another file list, or
            stopped mid-epoch under another batch size.
        """
        if state.get("kind") != "folder":
            raise ValueError("not a FolderLoader state (keys: "
                             f"{sorted(state)}); was it written by the in-memory loader?")
        if (state["num_samples"], state["fingerprint"]) != (
                self.num_samples, self.data.fingerprint(self.split)):
            raise ValueError(
                f"loader state was written for another {self.split} file list "
                f"({state['num_samples']} files, fingerprint {state['fingerprint']:#010x}; now "
                f"{self.num_samples}, {self.data.fingerprint(self.split):#010x}) under "
                f"{self.data.root}; restore the data or start a new run")
        if state["batch"] and state["batch_size"] != self.batch_size:
            raise ValueError(f"loader state stopped after batch {state['batch']} of batch size "
                             f"{state['batch_size']}; cannot resume it with batch size "
                             f"{self.batch_size}")
        self.seed, self._epoch, self._start = (int(state["seed"]), int(state["epoch"]),
                                               int(state["batch"]))
        self._current = None

    def normalize(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> float ``(B, C, H, W)``, ``(x/255 - mean) / std``."""
        return (xb.to(self.dtype) / 255.0 - self.mean) / self.std

    def _plan(self, epoch: int, start: int) -> list[list[tuple[int, int]]]:
        n = self.num_samples
        if self.shuffle:
            # index n is no sample's, so the permutation's seed differs from every sample's
            g = torch.Generator().manual_seed(int(_mix(self.seed, epoch, [n])[0] >> np.uint64(1)))
            order = torch.randperm(n, generator=g)
        else:
            order = torch.arange(n)
        plan = []
        for b in range(start, len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.world_size > 1:
                idx = idx.tensor_split(self.world_size)[self.rank]
            idx = idx.tolist()
            seeds = _mix(self.seed, epoch, idx).tolist() if self.augment else [0] * len(idx)
            plan.append(list(zip(idx, seeds)))
        return plan

    def _dataloader(self):
        if self._dl is None:
            self._dl = torch.utils.data.DataLoader(
                self._view, batch_sampler=self._sampler, num_workers=self.workers,
                pin_memory=self.device.type == "cuda", persistent_workers=self.workers > 0,
                # its own generator: the DataLoader draws a base seed per iteration, which
                # would otherwise advance the caller's global RNG (samples are reseeded anyway)
                generator=torch.Generator().manual_seed(self.seed), collate_fn=_collate)
        return self._dl

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start = self._epoch, self._start
        # a new iteration is a new epoch, as for TensorLoader, unless a state asked to resume
        self._epoch, self._start = epoch + 1, 0
        plan = self._plan(epoch, start)
        self._sampler.plan = [p for p in plan if p]
        it = iter(self._dataloader()) if self._sampler.plan else iter(())
        c, (h, w) = self.data.in_channels, self.data.image_size
        self._current = (epoch, start)
        try:
            for k, p in enumerate(plan, start + 1):
                if p:
                    batch = next(it)
                    if isinstance(batch, _DecodeFailure):
                        raise ImageDecodeError(str(batch))
                    xb, yb = batch
                else:  # a last batch smaller than the world size leaves some ranks nothing
                    xb = torch.empty(0, c, h, w, dtype=torch.uint8)
                    yb = torch.empty(0, dtype=torch.int64)
                nb = self.device.type == "cuda"
                xb = self.normalize(xb.to(self.device, non_blocking=nb))
                yb = yb.to(self.device, non_blocking=nb)
                # after the last batch the stream continues with the next epoch
                self._current = (epoch, k) if k < len(self) else (epoch + 1, 0)
                yield xb, yb
        finally:
            self._current = None
