"""Run directories and checkpoints: nothing is overwritten, mixed, half-written or silently
corrupted; resume checks every setting; extension; fp16 loss scaling; progress lines."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import strip_times

import kernelgeo.checkpoint as ckmod
from kernelgeo.checkpoint import CheckpointError, StorageError, load_checkpoint, save_checkpoint
from kernelgeo.cli import main
from kernelgeo.training import ConfigError, TrainConfig, rundir, train

REPO = Path(__file__).resolve().parent.parent


def _cfg(**kw):
    base = dict(dataset="digits", epochs=1, batch_size=64, lr=0.1, quiet=True, device="cpu",
                max_steps=3)
    base.update(kw)
    return TrainConfig(**base)


def _snapshot(d: Path) -> dict:
    """Every file under ``d`` (relative path -> bytes, mtime) and every directory."""
    return {str(p.relative_to(d)): (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file()
            else "dir" for p in sorted(d.rglob("*"))}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-epoch run (3 steps) with the geometry on two rule globs."""
    out = tmp_path_factory.mktemp("runs") / "done"
    train(_cfg(out=str(out), geometry="layer1.*=sphere,*=stiefel", schedule="constant"))
    return out


# ------------------------------------------------------------------------ existing runs
def test_existing_run_is_refused_and_left_unchanged(finished):
    before = _snapshot(finished)
    with pytest.raises(ConfigError, match="already holds a run.*--resume.*--force"):
        train(_cfg(out=str(finished), geometry="layer1.*=sphere,*=stiefel",
                   schedule="constant"))
    assert _snapshot(finished) == before


def test_force_moves_the_old_run_aside(tmp_path):
    out = tmp_path / "r"
    train(_cfg(out=str(out)))
    before = _snapshot(out)
    train(_cfg(out=str(out), force=True, lr=0.05))
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(moved) == 1 and _snapshot(moved[0]) == before
    assert json.loads((out / "config.json").read_text())["lr"] == 0.05
    train(_cfg(out=str(out), force=True))  # a second --force gets its own unique sibling
    assert len([p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]) == 2


def test_resume_and_force_together_refused(tmp_path):
    with pytest.raises(ConfigError, match="give one of them"):
        train(_cfg(out=str(tmp_path), resume=True, force=True))


@pytest.mark.parametrize("change", [
    {"split_seed": 1}, {"augment": "crop"}, {"nesterov": True},
    {"manifold_weight_decay": 1e-4}, {"geometry": "layer1.*=sphere,*=oblique"},
    {"model": "resnet20"}, {"lr": 0.2}, {"schedule": "robbins-monro"}, {"batch_size": 32},
    {"momentum": 0.5}, {"weight_decay": 0.0}, {"seed": 1}, {"train_subset": 500},
    {"include_linear": True}, {"amp": "bf16"}, {"crop_padding": 2}, {"step_rule": "none"},
    {"optimizer": "geoopt"}, {"plateau_tol": 0.05}, {"plateau_window": 2},
    {"plateau_decays": 1},
])
def test_resume_refuses_every_result_changing_setting(finished, change):
    before = _snapshot(finished)
    kw = dict(geometry="layer1.*=sphere,*=stiefel", schedule="constant", resume=True)
    kw.update(change)
    key = next(iter(change))
    with pytest.raises(ConfigError, match=rf"other settings \(.*{key}: checkpoint"):
        train(_cfg(out=str(finished), **kw))
    assert _snapshot(finished) == before


def test_resume_accepts_settings_that_do_not_change_results(finished, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    s = train(_cfg(out=str(out), geometry="layer1.*=sphere,*=stiefel", schedule="constant",
                   resume=True, print_freq=7, threads=1, sync_check_every=3, quiet=True))
    assert s["epochs_done"] == 1


def test_extension_constant_schedule_equals_longer_run(tmp_path):
    kw = dict(geometry="po:sphere+stiefel", schedule="constant", max_steps=None,
              train_subset=400)
    full = train(_cfg(out=str(tmp_path / "full"), epochs=2, **kw))
    short = train(_cfg(out=str(tmp_path / "ext"), epochs=1, **kw))
    assert short["completed"] and len(short["history"]) == 1
    ext = train(_cfg(out=str(tmp_path / "ext"), epochs=2, resume=True, **kw))
    assert ext["completed"] and strip_times(ext["history"]) == strip_times(full["history"])
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "ext" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_extension_of_length_dependent_schedule_refused(tmp_path):
    out = tmp_path / "cos"
    train(_cfg(out=str(out), schedule="cosine"))
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="cosine schedule depends on the number of epochs"):
        train(_cfg(out=str(out), schedule="cosine", epochs=2, resume=True))
    assert _snapshot(out) == before
    out = tmp_path / "const"
    kw = dict(schedule="constant", train_subset=128, max_steps=None)
    train(_cfg(out=str(out), epochs=2, **kw))
    before = _snapshot(out)
    with pytest.raises(ConfigError, match="2 epochs done, more than --epochs 1"):
        train(_cfg(out=str(out), epochs=1, resume=True, **kw))
    assert _snapshot(out) == before


# --------------------------------------------------------------------------- checksums
def _tensor_record(path: Path) -> tuple[int, int]:
    """(offset, size) in the file of the largest tensor storage of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename),
                   key=lambda i: i.file_size)
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        head = f.read(30)
    name_len = int.from_bytes(head[26:28], "little")
    extra_len = int.from_bytes(head[28:30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def test_flipped_tensor_bytes_are_refused(tmp_path):
    p = tmp_path / "c.pt"
    save_checkpoint({"w": torch.randn(1000, dtype=torch.float64), "n": 3}, p)
    off, size = _tensor_record(p)
    raw = bytearray(p.read_bytes())
    raw[off + size // 2] ^= 0x01  # one bit of one float64
    p.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=r"c\.pt is corrupt: the SHA-256 checksum of "
                                              r"tensor\(s\) w does not match"):
        load_checkpoint(p)


def test_corrupt_checkpoint_stops_resume_and_changes_nothing(finished, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(finished, out)
    ck = out / "checkpoint.pt"
    off, size = _tensor_record(ck)
    raw = bytearray(ck.read_bytes())
    raw[off + 3] ^= 0xFF
    ck.write_bytes(bytes(raw))
    before = _snapshot(out)
    with pytest.raises(CheckpointError, match="is corrupt"):
        train(_cfg(out=str(out), geometry="layer1.*=sphere,*=stiefel", schedule="constant",
                   resume=True, epochs=2))
    assert _snapshot(out) == before


def test_checkpoint_without_checksums_refused(tmp_path):
    p = tmp_path / "old.pt"
    torch.save({"model": {}}, p)
    with pytest.raises(CheckpointError, match="no checksums"):
        load_checkpoint(p)


def test_checkpoint_path_is_a_directory(tmp_path, capsys):
    out = tmp_path / "r"
    (out / "checkpoint.pt").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="is a directory"):
        load_checkpoint(out / "checkpoint.pt")
    with pytest.raises(SystemExit) as ei:
        main(["train", "--out", str(out), "--resume", "--quiet"])
    err = capsys.readouterr().err
    assert ei.value.code == 2 and "checkpoint.pt is a directory" in err


# -------------------------------------------------------------------- failing storage
def test_bad_write_never_replaces_a_good_checkpoint(tmp_path, monkeypatch):
    p = tmp_path / "c.pt"
    save_checkpoint({"a": torch.ones(100)}, p)
    good = p.read_bytes()
    real_fdopen = os.fdopen

    class Flipping:
        """A file whose writes arrive damaged (one byte flipped), as a failing disk would."""

        def __init__(self, f):
            self.f = f

        def write(self, b):
            b = bytearray(b)
            b[len(b) // 2] ^= 0xFF
            return self.f.write(bytes(b))

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

    monkeypatch.setattr(ckmod.os, "fdopen", lambda *a, **k: Flipping(real_fdopen(*a, **k)))
    with pytest.raises(StorageError, match="input/output error writing .*c.pt"):
        save_checkpoint({"a": torch.zeros(100)}, p)
    monkeypatch.undo()
    assert p.read_bytes() == good and [f.name for f in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "no space left on device"),
                                        (errno.EACCES, "permission denied"),
                                        (errno.EDQUOT, "disk quota exceeded")])
def test_storage_errors_are_named(tmp_path, monkeypatch, code, words):
    p = tmp_path / "c.pt"
    save_checkpoint({"a": torch.ones(3)}, p)

    def fail(fd):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ckmod.os, "fsync", fail)
    with pytest.raises(StorageError) as ei:
        save_checkpoint({"a": torch.zeros(3)}, p)
    monkeypatch.undo()
    assert str(ei.value).startswith(f"{words} writing {p}")
    assert "previous file is kept" in str(ei.value) and ei.value.errno == code
    assert torch.equal(load_checkpoint(p)["a"], torch.ones(3))
    assert [f.name for f in tmp_path.iterdir()] == ["c.pt"]


def test_disk_full_during_training_keeps_last_checkpoint(tmp_path, monkeypatch, capsys):
    from kernelgeo.training import loop

    out = tmp_path / "r"
    argv = ["train", "--epochs", "3", "--schedule", "constant", "--batch-size", "128",
            "--train-subset", "256", "--out", str(out), "--quiet"]
    full = {"disk": False, "saves": 0}
    real_fsync, real_save = ckmod.os.fsync, loop.save_checkpoint

    def fsync(fd):
        if full["disk"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    def save(*a, **k):
        full["saves"] += 1
        full["disk"] = full["saves"] >= 2  # the disk fills up before the second checkpoint
        return real_save(*a, **k)

    monkeypatch.setattr(ckmod.os, "fsync", fsync)
    monkeypatch.setattr(loop, "save_checkpoint", save)
    with pytest.raises(SystemExit) as ei:
        main(argv)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert ei.value.code == 1 and "Traceback" not in err and "unexpected pos" not in err
    assert f"no space left on device writing {out / 'checkpoint.pt'}" in err
    assert load_checkpoint(out / "checkpoint.pt")["epoch"] == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    assert main(argv + ["--resume"]) == 0  # and the run continues from there
    assert json.loads((out / "summary.json").read_text())["epochs_done"] == 3


# ------------------------------------------------------------------------ kill -9
def test_sigkill_then_resume_is_bitwise_equal(tmp_path):
    """SIGKILL in the middle of epoch 2, then --resume: same metrics and weights as a run
    that was never interrupted."""
    kw = dict(epochs=3, batch_size=64, train_subset=320, geometry="po:sphere+stiefel",
              augment="crop", threads=1, max_steps=None, schedule="cosine")
    full = train(_cfg(out=str(tmp_path / "full"), **kw))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "kernelgeo", "train", "--epochs", "3", "--batch-size", "64",
           "--train-subset", "320", "--geometry", "po:sphere+stiefel", "--augment", "crop",
           "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "k"),
           "--print-freq", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 2/3 batch 3/"):
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert load_checkpoint(tmp_path / "k" / "checkpoint.pt")["epoch"] == 1
    rest = train(_cfg(out=str(tmp_path / "k"), resume=True, **kw))
    assert strip_times(rest["history"]) == strip_times(full["history"])
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "k" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------- fp16
def test_fp16_loss_scaling_skips_overflowing_steps(tmp_path, monkeypatch):
    """With an absurd initial scale every fp16 gradient overflows: GradScaler must skip the
    steps (ConvergentRSGD raises on a non-finite gradient, so it must never see one)."""
    from kernelgeo.training import loop

    monkeypatch.setattr(loop, "FP16_INIT_SCALE", 2.0**100)
    s = train(_cfg(geometry="sphere", amp="fp16", max_steps=4, out=str(tmp_path / "r")))
    assert s["amp_skipped_steps"] == 4 and s["amp"] == "fp16"
    w = load_checkpoint(tmp_path / "r" / "checkpoint.pt")["model"]
    assert all(torch.isfinite(v).all() for v in w.values() if v.is_floating_point())


def test_fp16_training_runs_and_resumes(tmp_path):
    kw = dict(geometry="sphere", amp="fp16", max_steps=None, train_subset=256, epochs=2,
              schedule="constant")
    full = train(_cfg(out=str(tmp_path / "a"), **kw))
    assert full["amp_skipped_steps"] < 4 and full["max_constraint_error"] < 1e-5
    train(_cfg(out=str(tmp_path / "b"), stop_after=1, **kw))
    rest = train(_cfg(out=str(tmp_path / "b"), resume=True, **kw))
    assert strip_times(rest["history"]) == strip_times(full["history"])


# ----------------------------------------------------------------- progress and names
def test_print_freq_lines_when_piped(tmp_path, capsys):
    assert main(["train", "--epochs", "1", "--batch-size", "64", "--train-subset", "640",
                 "--print-freq", "4", "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    lines = [x for x in out.splitlines() if " batch " in x]
    assert [x.split(" batch ")[1].split()[0] for x in lines] == ["4/10", "8/10", "10/10"]
    assert "train loss" in lines[0] and "img/s" in lines[0]


def test_optimizer_errors_name_the_layer():
    from kernelgeo import constrain
    from kernelgeo.models import get_model
    from kernelgeo.optim import NonFiniteGradientError
    from kernelgeo.training import build_optimizer

    model = get_model("resnet-digits", 10, 1)
    constrain(model, "sphere", on_invalid="skip")
    opt = build_optimizer(model, _cfg(optimizer="rsgd"))
    for _, p in model.named_parameters():
        p.grad = torch.zeros_like(p)
    model.layer1[0].conv1.weight.grad[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"layer1\.0\.conv1\.weight"):
        opt.step()
    names = [n for g in opt.param_groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())


def test_include_linear_puts_the_classifier_on_the_manifold():
    s = train(_cfg(geometry="sphere", include_linear=True))
    fc = [e for e in s["layers"] if e["kind"] == "Linear"]
    assert fc and all(e["status"] == "manifold" for e in fc)
    s = train(_cfg(geometry="sphere"))
    assert not [e for e in s["layers"] if e["kind"] == "Linear"]


def test_default_output_folders(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert rundir.default_out("train", "x") == Path("runs/train/x")
    a = rundir.default_out("compare")
    assert a.parent == Path("runs/compare") and len(a.name) == len("20261129-204500")
    a.mkdir(parents=True)
    assert rundir.default_out("compare") != a  # unique within the same second
    with pytest.raises(ConfigError, match="plain directory name"):
        rundir.default_out("train", "../x")
    assert main(["train", "--epochs", "1", "--max-steps", "2", "--name", "first",
                 "--quiet"]) == 0
    assert (tmp_path / "runs/train/first/summary.json").is_file()
    assert main(["train", "--epochs", "1", "--max-steps", "2", "--quiet"]) == 0
    assert len(list((tmp_path / "runs/train").iterdir())) == 2


def test_compare_refuses_existing_runs_and_force_moves_them(tmp_path, capsys):
    from kernelgeo.compare import run_compare

    out = tmp_path / "cmp"
    run_compare(_cfg(max_steps=2), ["euclidean"], [0], out, log=lambda *_: None)
    before = _snapshot(out)
    with pytest.raises(ConfigError, match=r"euclidean/seed0 already holds a run"):
        run_compare(_cfg(max_steps=2), ["sphere", "euclidean"], [0], out, log=lambda *_: None)
    assert _snapshot(out) == before
    # the command line refuses any non-empty --out
    with pytest.raises(SystemExit) as ei:
        main(["compare", "--geometries", "sphere", "--out", str(out), "--quiet"])
    assert ei.value.code == 2 and "already holds a comparison" in capsys.readouterr().err
    assert _snapshot(out) == before
    # other geometries may be added to a comparison (runs are kept apart by directory)
    run_compare(_cfg(max_steps=2), ["sphere"], [0], out, log=lambda *_: None)
    assert (out / "sphere/seed0/summary.json").is_file() and (out / "euclidean").is_dir()
    res = run_compare(_cfg(max_steps=2, force=True), ["sphere"], [0], out,
                      log=lambda *_: None)
    assert res["rows"][0]["geometry"] == "sphere" and not (out / "euclidean").exists()
    assert any(p.name.startswith("cmp.old-") for p in tmp_path.iterdir())
    with pytest.raises(ConfigError, match="geometries must be distinct"):
        run_compare(_cfg(), ["sphere", " sphere"], [0], tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_every_setting_outside_the_exempt_list_is_compared_on_resume():
    import dataclasses

    from kernelgeo.training.config import NOT_RESULT_FIELDS, config_dict, resume_differences

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert NOT_RESULT_FIELDS <= fields
    old = config_dict(TrainConfig())
    for name in fields - NOT_RESULT_FIELDS:
        new = dict(old, **{name: ("changed", old[name])})
        assert resume_differences(old, new) == [
            f"{name}: checkpoint {old[name]!r} vs now {new[name]!r}"]
    for name in NOT_RESULT_FIELDS:
        assert resume_differences(old, dict(old, **{name: "changed"})) == []


def test_optimizer_choices_match_the_factories():
    from kernelgeo.training import OPTIMIZERS, optimizers

    assert tuple(optimizers._FACTORIES) == OPTIMIZERS


def test_loop_reads_data_only_through_make_loader(monkeypatch):
    """The loop uses the attributes shared by in-memory and streaming data sets and builds
    its loaders with make_loader only (never x_train/x_test)."""
    from kernelgeo.data import load_dataset
    from kernelgeo.training import loaders

    shared = ("name", "num_classes", "mean", "std", "flip", "label", "source", "in_channels",
              "image_size", "describe")

    class Streaming:
        def __init__(self, d):
            self._d = d

        def __getattr__(self, k):
            if k in shared:
                return getattr(self._d, k)
            raise AttributeError(f"FolderData-like data has no {k!r}")

    calls = []
    real = loaders.make_loader

    def spy(data, split, batch_size, **kw):
        calls.append((split, batch_size, kw["shuffle"] if "shuffle" in kw else False))
        return real(data._d, split, batch_size, **kw)

    monkeypatch.setattr(loaders, "make_loader", spy)
    s = train(_cfg(max_steps=2), data=Streaming(load_dataset("digits")))
    assert s["history"][0]["step"] == 2
    assert calls == [("train", 64, True), ("test", 500, False)]


@pytest.mark.parametrize("spec,needle", [
    ("po:2:sphere+stiefel+oblique+sphere", "4 components for 2 group(s)"),
    ("pio:2x2:sphere+oblique+sphere+oblique+stiefel", "5 components for 4 group(s)"),
    ("pi:1:sphere+stiefel", "2 components for 1 group(s)"),
    ("po:0:sphere", "groups must be >= 1"),
    ("po:2:3:sphere", "bad product spec"),
    ("pio:2:sphere", "AxB for pio"),
    ("po:sphere++stiefel", "empty component name"),
    ("xx:sphere", "unknown manifold 'xx:sphere'"),
    ("layer1.*=po:2:a+b", "rule #1"),
])
def test_geometry_grammar_refuses_extra_and_unknown_parts(spec, needle):
    from kernelgeo.manifolds import GeometryError, parse_geometry

    with pytest.raises(GeometryError) as ei:
        parse_geometry(spec)
    assert needle in str(ei.value) and spec in str(ei.value)


def test_parsed_geometry_objects_are_the_ones_constrain_uses():
    from kernelgeo import constrain
    from kernelgeo.manifolds import parse_geometry
    from kernelgeo.models import get_model

    g = parse_geometry("layer1.*=po:2:sphere+stiefel, *=oblique")
    assert g.is_rules and g.slug() == "layer1.--po-2-sphere+stiefel----oblique"
    assert parse_geometry(g) is g
    model = get_model("resnet-digits", 10, 1)
    constrain(model, g.constrain_spec(), on_invalid="skip")
    by_glob = {r.glob: r.manifold for r in g.rules}
    assert model.layer1[0].conv1.weight.manifold is by_glob["layer1.*"]
    ok = parse_geometry("pio:2x2:sphere+oblique+sphere+oblique")
    assert len(ok.rules[0].manifold.components) == 4


@pytest.mark.parametrize("schedule", ["step", "robbins-monro", "cosine"])
def test_resume_is_exact_for_every_schedule(tmp_path, schedule):
    kw = dict(schedule=schedule, epochs=2, train_subset=256, max_steps=None,
              geometry="sphere", rm_t0=2.0)
    full = train(_cfg(out=str(tmp_path / "full"), **kw))
    train(_cfg(out=str(tmp_path / "part"), stop_after=1, **kw))
    rest = train(_cfg(out=str(tmp_path / "part"), resume=True, **kw))
    assert strip_times(rest["history"]) == strip_times(full["history"])
    assert full["history"][1]["lr"] < full["history"][0]["lr"]  # the schedule acted


def test_radius_in_the_geometry_is_trained_and_restored(tmp_path):
    """``sphere@2`` / ``stiefel@r`` kernels keep norm r through training, and
    :func:`kernelgeo.load_run` rebuilds them on the same radius (not the default 1)."""
    from kernelgeo import load_run

    for geom, r in (("sphere@2", 2.0), ("stiefel@1.4142135623730951", 2 ** 0.5)):
        out = tmp_path / geom.split("@")[0]
        s = train(_cfg(out=str(out), geometry=geom))
        assert s["geometry"] == geom and s["max_constraint_error"] < 1e-5
        run = load_run(out)
        convs = [(n, p) for n, p in run.model.named_parameters() if p.dim() == 4]
        assert convs and all(p.manifold.radius == r for _, p in convs)
        for n, p in convs:
            norms = p.detach().flatten(1).norm(dim=1)
            assert torch.allclose(norms, torch.full_like(norms, r), atol=1e-5), n
