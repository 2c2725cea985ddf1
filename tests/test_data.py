"""Data sets, file formats, search paths and the tensor loader (kernelgeo.data)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kernelgeo import data as kd
from kernelgeo.data import (
    DataNotFoundError,
    TensorLoader,
    augment_batch,
    draw_augmentation,
    load_dataset,
    read_idx,
    write_idx,
)

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def _isolate(monkeypatch, tmp_path):
    """No data anywhere: no env var, cwd and repo root point into an empty tree."""
    monkeypatch.delenv("KERNELGEO_DATA", raising=False)
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    monkeypatch.setattr(kd, "_REPO_ROOT", tmp_path / "a" / "repo")
    # Debian's dataset-fashion-mnist may be installed system-wide
    monkeypatch.setattr(kd, "_debian_fashion_dirs", lambda: [])
    kd._load_cached.cache_clear()


def test_digits_shapes_and_fixed_stratified_split():
    d = load_dataset("digits")
    assert d.x_train.dtype == torch.uint8 and d.x_train.shape[1:] == (1, 8, 8)
    assert len(d.y_train) + len(d.y_test) == 1797
    assert int(d.x_train.max()) == 255 and int(d.x_train.min()) == 0
    # stratified: every class in both splits at (nearly) its overall rate
    tr = torch.bincount(d.y_train, minlength=10).double() / len(d.y_train)
    te = torch.bincount(d.y_test, minlength=10).double() / len(d.y_test)
    assert (tr - te).abs().max() < 0.01
    again = kd.load_digits(split_seed=0)
    assert torch.equal(again.y_test, d.y_test) and torch.equal(again.x_test, d.x_test)
    other = kd.load_digits(split_seed=1)
    assert not torch.equal(other.y_test, d.y_test)
    assert not d.flip


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError, match="valid: digits, cifar10-jpeg"):
        load_dataset("imagenet")


def test_idx_roundtrip_and_truncation(tmp_path):
    a = np.random.default_rng(0).integers(0, 256, (5, 4, 3), dtype=np.uint8)
    for name in ("x.idx", "x.idx.gz"):
        write_idx(tmp_path / name, a)
        np.testing.assert_array_equal(read_idx(tmp_path / name), a)
    raw = (tmp_path / "x.idx").read_bytes()
    (tmp_path / "t.idx").write_bytes(raw[:-7])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(tmp_path / "t.idx")
    (tmp_path / "bad.idx").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="magic"):
        read_idx(tmp_path / "bad.idx")


def test_fashion_mnist_from_generated_idx_files(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path)
    rng = np.random.default_rng(1)
    root = tmp_path / "fm" / "FashionMNIST" / "raw"  # torchvision's layout
    root.mkdir(parents=True)
    xs = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    ys = np.arange(20, dtype=np.uint8) % 10
    write_idx(root / "train-images-idx3-ubyte.gz", xs)
    write_idx(root / "train-labels-idx1-ubyte.gz", ys)
    write_idx(root / "t10k-images-idx3-ubyte.gz", xs[:10])
    write_idx(root / "t10k-labels-idx1-ubyte.gz", ys[:10])
    d = load_dataset("fashion-mnist", data_dir=tmp_path / "fm")
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_test.shape == (10, 1, 28, 28)
    assert torch.equal(d.x_train[:, 0], torch.from_numpy(xs))
    assert d.y_train.dtype == torch.int64 and d.y_train.tolist() == ys.tolist()
    assert d.label == "Fashion-MNIST"


def test_missing_data_says_where_and_how(tmp_path, monkeypatch):
    _isolate(monkeypatch, tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataNotFoundError) as ei:
        load_dataset("fashion-mnist", data_dir=empty)
    msg = str(ei.value)
    assert str(empty) in msg and "--download" in msg and "dataset-fashion-mnist" in msg
    with pytest.raises(DataNotFoundError) as ei:
        load_dataset("cifar10-jpeg", data_dir=empty)
    msg = str(ei.value)
    assert "cifar10_jpeg_q75.npz" in msg and str(empty) in msg and "KERNELGEO_DATA" in msg
    monkeypatch.setenv("KERNELGEO_DATA", str(tmp_path / "envdir"))
    with pytest.raises(DataNotFoundError, match="envdir"):
        load_dataset("cifar10-tiny")


def _packed(tmp_path, n_train=6, n_test=3):
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(0)
    out = {}
    imgs = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
        # smooth images survive JPEG well enough to compare
        x = torch.nn.functional.avg_pool2d(x.float(), 5, 1, 2).to(torch.uint8)
        files = [encode_jpeg(im, quality=95).numpy() for im in x]
        out[f"{split}_bytes"] = np.concatenate(files)
        out[f"{split}_offsets"] = np.cumsum([0] + [len(f) for f in files]).astype(np.int64)
        out[f"{split}_labels"] = np.arange(n, dtype=np.int64) % 10
        imgs[split] = x
    path = tmp_path / "cifar10_jpeg_q75.npz"
    np.savez(path, **out)
    return path, imgs, out


def test_packed_jpeg_loader(tmp_path, monkeypatch):
    path, imgs, raw = _packed(tmp_path)
    arr = kd.load_packed_jpeg(path)
    assert arr["x_train"].shape == (6, 3, 32, 32) and arr["x_train"].dtype == torch.uint8
    assert arr["y_test"].tolist() == [0, 1, 2]
    assert (arr["x_train"].float() - imgs["train"].float()).abs().mean() < 8
    # found through the search path by its documented name
    _isolate(monkeypatch, tmp_path)
    d = load_dataset("cifar10-jpeg", data_dir=tmp_path)
    assert d.label == "CIFAR-10 (JPEG q75 copy)" and d.x_test.shape == (3, 3, 32, 32)
    bad = dict(raw)
    bad["train_offsets"] = bad["train_offsets"][:-1]
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(ValueError, match="inconsistent"):
        kd.load_packed_jpeg(tmp_path / "bad.npz")


def test_image_folder(tmp_path):
    from torchvision.io import write_png

    for split in ("train", "val"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                write_png(torch.full((3, 6, 6), 40 * i, dtype=torch.uint8),
                          str(tmp_path / split / c / f"{i}.png"))
    d = load_dataset(f"folder:{tmp_path}")
    assert d.x_train.shape == (4, 3, 6, 6) and d.num_classes == 2
    assert d.y_train.tolist() == [0, 0, 1, 1] and d.extra["classes"] == ["cat", "dog"]
    d8 = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert d8.x_test.shape == (4, 3, 8, 8)


def test_tiny_cifar_real_file():
    try:
        d = load_dataset("cifar10-tiny")
    except DataNotFoundError as err:
        pytest.skip(f"cifar10_tiny_1k200.npz absent: {str(err).splitlines()[0]}")
    assert d.x_train.shape == (1000, 3, 32, 32) and d.x_test.shape == (200, 3, 32, 32)
    assert torch.bincount(d.y_train).tolist() == [100] * 10
    # the README's published channel means of the full set, within subset noise
    assert np.allclose(d.mean, (0.4914, 0.4822, 0.4465), atol=0.02)


def test_subset_is_stratified_and_keeps_stats():
    d = load_dataset("digits")
    s = load_dataset("digits", train_subset=200, test_subset=50)
    assert len(s.y_train) == 200 and len(s.y_test) == 50
    assert torch.bincount(s.y_train, minlength=10).min() >= 18
    assert s.mean == d.mean


def test_augment_matches_reference(gen):
    x = torch.randint(0, 256, (12, 3, 10, 10), dtype=torch.uint8, generator=gen)
    p = draw_augmentation(12, crop_padding=2, flip=True, generator=gen)
    out = augment_batch(x, crop_padding=2, flip=True, params=p)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(12):
        r, c = p["offsets"][:, i].tolist()
        ref = xp[i, :, r:r + 10, c:c + 10]
        if p["flips"][i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    assert torch.equal(augment_batch(x, flip=True, params={"flips": torch.ones(12, dtype=bool)}),
                       x.flip(-1))
    assert p["flips"].any() and not p["flips"].all()


def _loader(d, **kw):
    base = dict(mean=d.mean, std=d.std, shuffle=True, drop_last=True, crop_padding=1,
                flip=True, seed=3)
    base.update(kw)
    return TensorLoader(d.x_train, d.y_train, 64, **base)


def test_loader_shards_union_is_single_process_batch():
    d = load_dataset("digits")
    full = list(_loader(d))
    shards = [list(_loader(d, rank=r, world_size=3)) for r in range(3)]
    assert len(full) == len(d.y_train) // 64
    for b, (xb, yb) in enumerate(full):
        assert xb.dtype == torch.float32 and xb.shape == (64, 1, 8, 8)
        xs = torch.cat([s[b][0] for s in shards])
        ys = torch.cat([s[b][1] for s in shards])
        assert torch.equal(xs, xb) and torch.equal(ys, yb)


def test_loader_state_resumes_order_and_augmentation():
    d = load_dataset("digits")
    a = _loader(d)
    list(a)
    st = a.state_dict()
    nxt = [y for _, y in a]
    b = _loader(d, seed=99)
    b.load_state_dict(st)
    assert all(torch.equal(u, v) for u, v in zip(nxt, [y for _, y in b]))
    # normalised data are centred
    xs = torch.cat([x for x, _ in TensorLoader(d.x_train, d.y_train, 500, mean=d.mean,
                                               std=d.std)])
    assert abs(float(xs.mean())) < 1e-4 and abs(float(xs.std()) - 1) < 1e-3


def test_image_size_resizes_in_memory_data_sets():
    """``image_size`` applies to every data set (it was once ignored outside ImageFolder trees)."""
    from kernelgeo.data import ImageData

    d = load_dataset("digits")
    d4 = load_dataset("digits", image_size=4)
    assert d4.image_size == (4, 4) and d4.n_train == d.n_train and d4.x_train.dtype == torch.uint8
    # an integer factor is plain 2x2 area averaging, rounded half to even
    x = d.x_train[:7].double()
    ref = (x[:, :, 0::2, 0::2] + x[:, :, 1::2, 0::2] + x[:, :, 0::2, 1::2]
           + x[:, :, 1::2, 1::2]) / 4
    assert torch.equal(d4.x_train[:7], ref.round().to(torch.uint8))
    assert d4.mean != d.mean  # statistics of the resized images
    # non-integer factor and a non-square image: shorter side resized, centre-cropped
    rect = ImageData("r", torch.randint(0, 256, (3, 1, 8, 12), dtype=torch.uint8),
                     torch.zeros(3, dtype=torch.long),
                     torch.randint(0, 256, (2, 1, 8, 12), dtype=torch.uint8),
                     torch.zeros(2, dtype=torch.long), 1)
    r5 = rect.resized(5)
    assert r5.image_size == (5, 5) and r5.n_test == 2
    assert rect.resized(8).image_size == (8, 8)
    with pytest.raises(ValueError, match="positive"):
        rect.resized(0)
    assert load_dataset("digits", image_size=8) is not d  # cached per size
    assert load_dataset("digits", image_size=8).image_size == (8, 8)
