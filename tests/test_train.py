"""Training loop (kernelgeo.train), checkpoints (kernelgeo.checkpoint) and compare."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import strip_times

from kernelgeo.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from kernelgeo.data import DataNotFoundError, load_dataset
from kernelgeo.train import (
    ConfigError,
    TrainConfig,
    parse_geometry,
    train,
)

GEOMETRIES = ["euclidean", "sphere", "centered-sphere", "oblique", "oblique-slice", "stiefel",
              "stiefel-slice", "po:sphere+stiefel", "layer1.*=sphere,layer2.*=stiefel"]



def _cfg(**kw):
    base = dict(dataset="digits", epochs=2, batch_size=64, lr=0.1, quiet=True, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_training_lowers_loss_and_keeps_kernels_on_manifold(geometry):
    s = train(_cfg(geometry=geometry))
    h = s["history"]
    assert h[1]["train_loss"] < h[0]["train_loss"]
    assert h[1]["test_loss"] < math.log(10)  # below chance (uniform prediction)
    assert s["max_constraint_error"] < 1e-5
    if geometry != "euclidean":
        assert s["manifold_parameters"] > 0
        assert any(e["status"] == "manifold" for e in s["layers"])
    else:
        assert s["manifold_parameters"] == 0


def _tiny():
    try:
        return load_dataset("cifar10-tiny")
    except DataNotFoundError as err:
        pytest.skip(f"cifar10_tiny_1k200.npz absent: {str(err).splitlines()[0]}")


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_tiny_cifar_steps_lower_loss(geometry):
    import kernelgeo
    from kernelgeo.data import TensorLoader
    from kernelgeo.models import get_model
    from kernelgeo.train import build_optimizer

    d = _tiny()
    torch.manual_seed(0)
    # the small digits ResNet runs on 32x32 too (global pooling) and keeps this test fast
    model = get_model("resnet-digits", 10, 3)
    kernelgeo.constrain(model, parse_geometry(geometry).constrain_spec(), on_invalid="skip")
    opt = build_optimizer(model, _cfg(lr=0.1, geometry=geometry))
    x, y = next(iter(TensorLoader(d.x_train, d.y_train, 64, mean=d.mean, std=d.std)))
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threading only adds overhead
    try:
        for _ in range(10):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert losses[-1] < losses[0] - 0.2, losses
    assert kernelgeo.constraint_error(model) < 1e-5


def test_tiny_cifar_training_run():
    _tiny()
    s = train(_cfg(dataset="cifar10-tiny", model="resnet-digits", geometry="sphere",
                   epochs=2, batch_size=50, lr=0.05, train_subset=300, test_subset=100))
    h = s["history"]
    assert h[-1]["train_loss"] < h[0]["train_loss"] < 2.6
    assert s["max_constraint_error"] < 1e-5 and s["train_images"] == 300
    assert s["dataset_label"].startswith("CIFAR-10 (JPEG q75 copy)")


def test_resume_is_exact(tmp_path):
    kw = dict(geometry="po:sphere+stiefel", epochs=3, augment="crop", deterministic=True)
    full = train(_cfg(out=str(tmp_path / "full"), **kw))
    part = train(_cfg(out=str(tmp_path / "part"), stop_after=1, **kw))
    assert len(part["history"]) == 1 and not part["completed"]
    rest = train(_cfg(out=str(tmp_path / "part"), resume=True, **kw))
    assert rest["completed"] and len(rest["history"]) == 3
    assert strip_times(rest["history"]) == strip_times(full["history"])
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert strip_times([json.loads(x) for x in lines]) == strip_times(full["history"])
    csv_rows = (tmp_path / "part" / "metrics.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("epoch,step,lr")
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "part" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_of_finished_run_and_mismatch(tmp_path):
    out = str(tmp_path / "r")
    s = train(_cfg(out=out, epochs=1))
    again = train(_cfg(out=out, epochs=1, resume=True))
    assert strip_times(again["history"]) == strip_times(s["history"])
    with pytest.raises(ConfigError, match="lr: checkpoint 0.1 vs now 0.2"):
        train(_cfg(out=out, epochs=1, lr=0.2, resume=True))


def test_truncated_checkpoint_names_the_file(tmp_path):
    out = tmp_path / "t"
    train(_cfg(out=str(out), epochs=1))
    ck = out / "checkpoint.pt"
    raw = ck.read_bytes()
    ck.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match=str(ck)):
        train(_cfg(out=str(out), epochs=1, resume=True))
    ck.write_bytes(b"")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_checkpoint(ck)


def test_atomic_save_keeps_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    save_checkpoint({"a": torch.ones(3)}, p)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"a": torch.zeros(3)}, p)
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(p)["a"], torch.ones(3))
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


class Evil:
    """Not a tensor or plain container: weights-only loading must refuse it."""


def test_checkpoint_refuses_arbitrary_objects(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"x": Evil()}, p)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(p)


def test_parse_geometry():
    from kernelgeo.manifolds import GeometryError

    assert parse_geometry("sphere").names() == "sphere"
    rules = parse_geometry(" layer1.*=sphere , layer3.*=stiefel,*=euclidean").names()
    assert list(rules.items()) == [("layer1.*", "sphere"), ("layer3.*", "stiefel"),
                                   ("*", "euclidean")]
    for bad, match in [("spheer", "valid names"), ("a=sphere,b", "rule #2"),
                       ("=sphere", "empty glob"), ("a=", "empty geometry"),
                       ("a=x", "valid names"), ("a=sphere,a=stiefel", "twice"),
                       ("sphere,stiefel", "glob=name"), ("", "empty")]:
        with pytest.raises(GeometryError, match=match):
            parse_geometry(bad)
    assert issubclass(GeometryError, ValueError)


def test_config_errors():
    with pytest.raises(ConfigError, match="match no convolution layer"):
        train(_cfg(geometry="layr1.*=sphere", epochs=1))
    with pytest.raises(ConfigError, match="cannot keep kernels"):
        train(_cfg(geometry="sphere", optimizer="sgd", epochs=1))
    with pytest.raises(ConfigError, match="valid: digits"):
        train(_cfg(dataset="imagenet"))


def test_sgd_on_euclidean():
    s = train(_cfg(optimizer="sgd", schedule="step", epochs=1, max_steps=5))
    assert s["history"][0]["step"] == 5 and not s["completed"]


@pytest.mark.parametrize("schedule", ["cosine", "step", "robbins-monro", "constant"])
def test_schedules_follow_their_formulas(schedule):
    """The learning rate of every step against the closed forms, written here."""
    from kernelgeo.train import build_scheduler

    total, t0, p = 40, 10, 0.75
    formulas = {
        "cosine": lambda t: 0.5 * (1 + math.cos(math.pi * t / total)),
        "step": lambda t: 0.1 ** ((t >= 0.5 * total) + (t >= 0.75 * total)),
        "robbins-monro": lambda t: (1 + t / t0) ** -p,
        "constant": lambda t: 1.0,
    }
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.4)
    sched = build_scheduler(opt, _cfg(schedule=schedule, rm_t0=t0, rm_power=p), total, 5)
    for t in range(total + 1):
        assert opt.param_groups[0]["lr"] == pytest.approx(0.4 * formulas[schedule](t),
                                                          rel=1e-9, abs=1e-15), t
        opt.step()
        sched.step()


def test_compare_writes_report(tmp_path):
    from kernelgeo.compare import run_compare

    res = run_compare(_cfg(epochs=1, max_steps=3), ["euclidean", "sphere"], [0, 1],
                      tmp_path, title="t", log=lambda *_: None)
    report = (tmp_path / "report.md").read_text()
    assert "| euclidean | 2 |" in report and "±" in report
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert (tmp_path / "error.png").stat().st_size > 1000
    rows = (tmp_path / "results.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("dataset,geometry,seeds")
    assert len((tmp_path / "runs.csv").read_text().splitlines()) == 5
    assert res["rows"][1]["geometry"] == "sphere"
