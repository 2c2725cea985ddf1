"""The training and test loaders of a run, built only through ``kernelgeo.data.make_loader``
(in-memory :class:`~kernelgeo.data.ImageData` or streaming folders alike)."""

from __future__ import annotations

import torch

from ..data import make_loader
from .config import AUGMENTATIONS, ConfigError, TrainConfig

__all__ = ["augment_policy", "build_loaders", "default_model"]




def augment_policy(cfg: TrainConfig, data) -> tuple[int, bool]:
    """``(crop padding, flip)`` of ``cfg.augment`` for ``data``'s images."""
    a = cfg.augment.lower()
    if a not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {cfg.augment!r}; valid: "
                          f"{', '.join(AUGMENTATIONS)}")
    h = data.image_size[0]
    # standard CIFAR recipe pads 4 on 32x32; keep the same fraction for smaller images
    pad = cfg.crop_padding if cfg.crop_padding is not None else max(1, h // 8)
    if a == "auto":
        # 8x8 digits are too small to crop without losing strokes; no flips for characters
        crop = h >= 16
        return (pad if crop else 0), (data.flip and crop)
    return (pad if "crop" in a else 0), ("flip" in a)


def default_model(data) -> str:
    """``resnet-digits`` for images up to 16 pixels, else ``resnet20``."""
    return "resnet-digits" if max(data.image_size) <= 16 else "resnet20"


def build_loaders(cfg: TrainConfig, data, device: torch.device, rank: int, world_size: int):
    """``(train_loader, test_loader)``: shuffled, augmented, full batches of
    ``cfg.batch_size`` for training; batches of ``max(batch_size, 500)`` for testing."""
    crop, flip = augment_policy(cfg, data)
    common = dict(device=device, rank=rank, world_size=world_size, workers=cfg.workers)
    try:
        train = make_loader(data, "train", cfg.batch_size, shuffle=True, drop_last=True,
                            crop_padding=crop, flip=flip, seed=cfg.seed, **common)
        test = make_loader(data, "test", max(cfg.batch_size, 500), **common)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if len(train) == 0:
        raise ConfigError(f"--batch-size {cfg.batch_size} exceeds the {train.num_samples} "
                          "training images")
    return train, test
