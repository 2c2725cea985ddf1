"""Image-folder data sets: scanning, decoding, streaming loader (kernelgeo.folder, make_loader)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from kernelgeo import data as kd
from kernelgeo.data import TensorLoader, load_dataset, make_loader
from kernelgeo.folder import FolderData, FolderLoader, ImageDecodeError

pytestmark = pytest.mark.filterwarnings(
    "ignore:The image decoding and encoding capabilities of TorchVision:DeprecationWarning")


def _tree(root, n_train=5, n_test=3, classes=("cat", "dog", "emu"), seed=0, sizes=None):
    """Random images of odd sizes, RGB and grey, PNG and JPEG, plus macOS junk files."""
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                h, w = sizes or (int(rng.integers(9, 31)), int(rng.integers(9, 31)))
                grey = i % 2 == 1
                arr = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
                Image.fromarray(arr, "L" if grey else "RGB").save(
                    d / f"{i}.{'jpg' if i % 3 == 0 else 'png'}")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "train" / "dog" / "._0.jpg").write_bytes(b"\x00\x05\x16\x07")  # AppleDouble
    (root / "test" / "emu" / "notes.txt").write_text("not an image")
    return root


def _folder(tmp_path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return FolderData(_tree(tmp_path / "tree"), **kw)


def _batches(loader, n=None):
    out = []
    for i, b in enumerate(loader):
        if n is not None and i == n:
            break
        out.append(b)
    return out


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v)
                                    for (x, y), (u, v) in zip(a, b))


def test_scan_skips_junk_with_one_note_and_shapes(tmp_path):
    _tree(tmp_path / "t")
    with pytest.warns(UserWarning, match=r"skipped 3 non-image or hidden file") as rec:
        fd = load_dataset(f"folder:{tmp_path / 't'}", image_size=12, stream=True)
    assert len([w for w in rec if "skipped" in str(w.message)]) == 1
    assert isinstance(fd, FolderData) and fd.skipped == 3
    assert (fd.n_train, fd.n_test, fd.num_classes, fd.in_channels) == (15, 9, 3, 3)
    assert fd.image_size == (12, 12) and fd.classes == ["cat", "dog", "emu"]
    assert fd.flip and fd.label.startswith("ImageFolder") and "streamed at 12x12" in fd.describe()
    ld = make_loader(fd, "train", 4, shuffle=True, drop_last=True, crop_padding=2, flip=True,
                     workers=0)
    bs = _batches(ld)
    assert len(ld) == len(bs) == 3 and ld.num_samples == 15
    for x, y in bs:
        assert x.dtype == torch.float32 and x.shape == (4, 3, 12, 12)
        assert y.dtype == torch.int64 and set(y.tolist()) <= {0, 1, 2}
    te = make_loader(fd, "test", 4, workers=0)
    assert [len(y) for _, y in te] == [4, 4, 1]
    assert torch.cat([y for _, y in te]).tolist() == [0] * 3 + [1] * 3 + [2] * 3


def test_streamed_equals_in_memory_and_statistics(tmp_path):
    fd = _folder(tmp_path, image_size=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mem = load_dataset(f"folder:{fd.root}", image_size=10)  # 24 files: in memory
    assert isinstance(mem, kd.ImageData) and mem.n_train == 15 and mem.n_test == 9
    # the same pixels whichever way: decode + resize + crop are shared
    assert torch.equal(fd.decode("train"), mem.x_train)
    for split in ("train", "test"):
        a = _batches(make_loader(fd, split, 7, workers=0))
        b = _batches(make_loader(mem, split, 7))
        assert _same(a, b)
    # statistics: all 15 training images are the sample, so they are exact; oracle in numpy
    x = mem.x_train.numpy().astype(np.float64) / 255.0
    np.testing.assert_allclose(fd.mean, x.mean(axis=(0, 2, 3)), rtol=1e-12)
    np.testing.assert_allclose(fd.std, x.std(axis=(0, 2, 3)), rtol=1e-9)
    xs = torch.cat([xb for xb, _ in make_loader(fd, "train", 15, workers=0)]).double()
    assert xs.mean((0, 2, 3)).abs().max() < 1e-5
    assert (xs.std((0, 2, 3), correction=0) - 1).abs().max() < 1e-5
    # grey images are replicated into three equal channels
    grey = fd.decode("train", [1])[0]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])


def test_statistics_sample_is_seeded(tmp_path):
    fd = _folder(tmp_path, image_size=8, stats_sample=6, stats_seed=3)
    idx = fd._stats_indices()
    assert len(idx) == 6 and idx == sorted(idx)
    ref = kd.channel_stats(fd.decode("train", idx))
    assert fd.mean == ref[0] and fd.std == ref[1]
    with pytest.warns(UserWarning, match="skipped"):
        again = FolderData(fd.root, 8, stats_sample=6, stats_seed=3)
    with pytest.warns(UserWarning, match="skipped"):
        other = FolderData(fd.root, 8, stats_sample=6, stats_seed=4)
    assert again.mean == fd.mean and other._stats_indices() != idx


def test_resize_keeps_aspect_ratio(tmp_path):
    # 20 x 40 (H x W): red | green | blue columns 0-7 | 8-31 | 32-39.  Keeping the aspect
    # ratio (shorter side 20 -> 10, width 40 -> 20, centre crop of 10 = source columns 10-29,
    # antialiasing support 2 pixels) sees green only; stretching to 10 x 10 would keep red and
    # blue at the borders.
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :8, 0] = 255
    arr[:, 8:32, 1] = 255
    arr[:, 32:, 2] = 255
    for split in ("train", "test"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.fromarray(arr).save(tmp_path / split / "a" / "x.png")
    for stream in (False, True):
        d = load_dataset(f"folder:{tmp_path}", image_size=10, stream=stream)
        img = d.x_test[0] if not stream else d.decode("test")[0]
        assert img.shape == (3, 10, 10)
        assert int(img[1].min()) == 255 and int(img[0].max()) == 0 and int(img[2].max()) == 0
    kd._load_cached.cache_clear()
    from torchvision.transforms.v2.functional import resize

    stretched = resize(torch.from_numpy(arr).permute(2, 0, 1), [10, 10], antialias=True)
    assert int(stretched[0, :, 0].min()) > 200  # the oracle above can tell the two apart


def test_native_size_kept_and_mixed_sizes_refused(tmp_path):
    _tree(tmp_path / "same", sizes=(9, 13))
    with pytest.warns(UserWarning, match="skipped"):
        fd = FolderData(tmp_path / "same")
    assert fd.image_size == (9, 13)
    assert next(iter(make_loader(fd, "test", 2, workers=0)))[0].shape == (2, 3, 9, 13)
    _tree(tmp_path / "mixed")
    with pytest.warns(UserWarning, match="skipped"), \
            pytest.raises(ValueError, match=r"different sizes .* pass image_size"):
        FolderData(tmp_path / "mixed")


def test_determinism_independent_of_workers_and_seeded(tmp_path):
    fd = _folder(tmp_path, image_size=8)
    kw = dict(shuffle=True, drop_last=True, crop_padding=2, flip=True)
    a = _batches(make_loader(fd, "train", 4, seed=5, workers=0, **kw))
    b = _batches(make_loader(fd, "train", 4, seed=5, workers=2, **kw))
    c = _batches(make_loader(fd, "train", 4, seed=6, workers=0, **kw))
    assert _same(a, b) and not _same(a, c)
    # persistent workers across epochs, one of them abandoned after a batch
    seqs = []
    for w in (0, 2):
        ld = make_loader(fd, "train", 4, seed=5, workers=w, **kw)
        seqs.append([_batches(ld, 1), _batches(ld), _batches(ld)])
    assert all(_same(u, v) for u, v in zip(*seqs))
    # the caller's global RNG stream is untouched by the per-sample seeding
    torch.manual_seed(0)
    r0 = torch.rand(3)
    torch.manual_seed(0)
    _batches(make_loader(fd, "train", 4, seed=5, workers=0, **kw))
    assert torch.equal(torch.rand(3), r0)
    # two epochs differ in order and augmentation
    ld = make_loader(fd, "train", 15, seed=5, workers=0, **kw)
    (x1, y1), = _batches(ld)
    (x2, y2), = _batches(ld)
    assert not torch.equal(y1, y2) or not torch.equal(x1, x2)


def test_random_resized_crop(tmp_path):
    fd = _folder(tmp_path, image_size=8, train_crop="random-resized", rrc_scale=(0.3, 1.0))
    a = _batches(make_loader(fd, "train", 5, shuffle=True, flip=True, seed=1, workers=0))
    b = _batches(make_loader(fd, "train", 5, shuffle=True, flip=True, seed=1, workers=0))
    assert _same(a, b) and a[0][0].shape == (5, 3, 8, 8)
    fixed = _batches(make_loader(fd, "train", 5, workers=0))
    assert not torch.equal(torch.cat([x for x, _ in fixed]), torch.cat([x for x, _ in a]))
    with pytest.raises(ValueError, match="train_crop"):
        FolderData(fd.root, 8, train_crop="zoom")


def test_resume_mid_epoch_and_at_epoch_boundary(tmp_path):
    fd = _folder(tmp_path, image_size=8)
    kw = dict(shuffle=True, drop_last=True, crop_padding=1, flip=True, seed=2, workers=0)
    ref = make_loader(fd, "train", 4, **kw)
    _e0, e1, e2 = _batches(ref), _batches(ref), _batches(ref)
    # epoch boundary
    a = make_loader(fd, "train", 4, **kw)
    _batches(a)
    st = a.state_dict()
    assert (st["epoch"], st["batch"]) == (1, 0)
    b = make_loader(fd, "train", 4, **{**kw, "seed": 99})
    b.load_state_dict(st)
    assert _same(_batches(b), e1) and _same(_batches(b), e2)
    # mid-epoch: state taken while iterating, after 2 of 3 batches
    a = make_loader(fd, "train", 4, **kw)
    _batches(a)
    it = iter(a)
    next(it), next(it)
    st = a.state_dict()
    assert (st["epoch"], st["batch"]) == (1, 2)
    torch.save(st, tmp_path / "st.pt")  # plain values: checkpoints load it with weights_only
    st = torch.load(tmp_path / "st.pt", weights_only=True)
    b = make_loader(fd, "train", 4, **kw)
    b.load_state_dict(st)
    assert _same(_batches(b), e1[2:]) and _same(_batches(b), e2)
    # state after the last batch of an epoch points at the next epoch (epoch 1 was left
    # after 2 batches, so this iteration is epoch 2)
    it = iter(a)
    next(it)
    assert a.state_dict()["batch"] == 1
    for _ in it:
        pass
    assert (a.state_dict()["epoch"], a.state_dict()["batch"]) == (3, 0)
    # an abandoned iteration does not resume: the next one is a new epoch, as in TensorLoader
    c = make_loader(fd, "train", 4, **kw)
    _batches(c, 1)
    assert _same(_batches(c), e1)


def test_resume_refuses_other_data_or_batch_size(tmp_path):
    fd = _folder(tmp_path, image_size=8)
    a = make_loader(fd, "train", 4, shuffle=True, workers=0)
    it = iter(a)
    next(it)
    st = a.state_dict()
    with pytest.raises(ValueError, match="batch size 4"):
        make_loader(fd, "train", 5, workers=0).load_state_dict(st)
    with pytest.raises(ValueError, match="another train file list"):
        make_loader(fd.subset(n_train=12), "train", 4, workers=0).load_state_dict(st)
    mem = kd.ImageData("m", fd.decode("train"), fd.targets("train"), fd.decode("test"),
                       fd.targets("test"), 3)
    with pytest.raises(ValueError, match="not a FolderLoader state"):
        a.load_state_dict(make_loader(mem, "train", 4).state_dict())


def test_shards_concatenate_to_single_process_batch(tmp_path):
    fd = _folder(tmp_path, image_size=8)
    kw = dict(shuffle=True, crop_padding=1, flip=True, seed=4, workers=0)
    full = _batches(make_loader(fd, "train", 7, **kw))
    shards = [_batches(make_loader(fd, "train", 7, rank=r, world_size=3, **kw))
              for r in range(3)]
    assert len(full) == 3 and all(len(s) == 3 for s in shards)
    for b, (xb, yb) in enumerate(full):
        assert torch.equal(torch.cat([s[b][0] for s in shards]), xb)
        assert torch.equal(torch.cat([s[b][1] for s in shards]), yb)
    # the last global batch has one image: two ranks get empty batches, not an error
    assert [len(s[2][1]) for s in shards] == [1, 0, 0]
    assert shards[1][2][0].shape == (0, 3, 8, 8)
    with pytest.raises(ValueError, match="rank 3"):
        make_loader(fd, "train", 7, rank=3, world_size=3)


def test_corrupt_image_is_named(tmp_path):
    root = _tree(tmp_path / "t")
    bad = root / "train" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG body")
    trunc = root / "test" / "cat" / "truncated.jpg"
    buf = (root / "test" / "cat" / "0.jpg").read_bytes()
    trunc.write_bytes(buf[:len(buf) // 2])
    with pytest.warns(UserWarning, match="skipped"):
        fd = FolderData(root, 8, stats_sample=1)  # the sample does not reach broken.jpg
    with pytest.raises(ImageDecodeError, match=r"broken\.jpg"):
        _batches(make_loader(fd, "train", 4, workers=0))
    with pytest.raises(ImageDecodeError, match=r"truncated\.jpg"):
        _batches(make_loader(fd, "test", 4, workers=2))  # re-raised from a worker process
    with pytest.warns(UserWarning, match="skipped"), \
            pytest.raises(ImageDecodeError, match=r"broken\.jpg"):
        load_dataset(f"folder:{root}", image_size=8, stream=False)
    kd._load_cached.cache_clear()


def test_layout_errors(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(kd.DataNotFoundError, match="expected directories"):
        FolderData(tmp_path)
    (tmp_path / "test" / "b").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"classes \['b'\]"):
        FolderData(tmp_path)
    (tmp_path / "train" / "b").mkdir()
    with pytest.raises(kd.DataNotFoundError, match="no image files under"):
        FolderData(tmp_path)
    with pytest.raises(ValueError, match="folder:<path> data sets only"):
        load_dataset("digits", stream=True)


def test_subset_is_stratified_and_keeps_statistics(tmp_path):
    fd = _folder(tmp_path, image_size=8)
    s = fd.subset(n_train=9, n_test=3, seed=1)
    assert (s.n_train, s.n_test) == (9, 3) and (fd.n_train, fd.n_test) == (15, 9)
    assert torch.bincount(s.targets("train")).tolist() == [3, 3, 3]
    assert s.mean == fd.mean
    assert s.fingerprint("train") != fd.fingerprint("train")


def test_make_loader_on_image_data_is_tensor_loader():
    d = load_dataset("digits")
    kw = dict(shuffle=True, drop_last=True, crop_padding=1, flip=True, seed=3)
    a = make_loader(d, "train", 64, **kw)
    b = TensorLoader(d.x_train, d.y_train, 64, mean=d.mean, std=d.std, **kw)
    assert isinstance(a, TensorLoader) and _same(_batches(a), _batches(b))
    t = make_loader(d, "test", 100)
    assert t.num_samples == d.n_test and _same(
        _batches(t), _batches(TensorLoader(d.x_test, d.y_test, 100, mean=d.mean, std=d.std)))
    with pytest.raises(ValueError, match="split"):
        make_loader(d, "val", 10)
    with pytest.raises(TypeError, match="ImageData or FolderData"):
        make_loader(object(), "train", 10)
    assert isinstance(make_loader, object) and FolderLoader.__name__ == "FolderLoader"
