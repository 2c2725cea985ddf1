"""The ``kernelgeo`` command line: help, errors (exit 2, no traceback), train/compare/demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kernelgeo.cli import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    out = capsys.readouterr()
    return ei.value.code, out.out, out.err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["compare", "--help"],
                                  ["demo", "--help"]])
def test_help(argv, capsys):
    code, out, _ = _run(argv, capsys)
    assert code == 0 and "usage: kernelgeo" in out
    if argv[0] in ("--help", "train"):
        assert "torchrun" in out and "--nnodes" in out  # multi-node epilog


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "kernelgeo", "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0 and "train" in r.stdout and "demo" in r.stdout


@pytest.mark.parametrize("argv,needle", [
    (["train", "--dataset", "imagenet"], "valid: digits, cifar10-jpeg"),
    (["train", "--model", "resnet21"], "valid: resnet20"),
    (["train", "--geometry", "spheer"], "valid names: euclidean, sphere"),
    (["train", "--geometry", "layer1.*=sphere,oops"], "rule #2"),
    (["train", "--geometry", "layer1.*=hyperbolic"], "valid names"),
    (["train", "--optimizer", "adagrad"], "invalid choice"),
    (["train", "--epochs", "0"], "positive integer"),
    (["compare", "--geometries", "sphere", "nope"], "valid names"),
])
def test_bad_input_exits_2_without_traceback(argv, needle, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2 and needle in err and "Traceback" not in err


def test_rule_matching_no_layer_exits_2(tmp_path, capsys):
    code, _, err = _run(["train", "--geometry", "block9.*=sphere", "--epochs", "1", "--quiet",
                         "--out", str(tmp_path)], capsys)
    assert code == 2 and "match no convolution layer" in err and "layer1.0.conv1" in err


def test_missing_data_exits_1(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("KERNELGEO_DATA", raising=False)
    code, _, err = _run(["train", "--dataset", "mnist", "--data-dir", str(tmp_path),
                         "--out", str(tmp_path / "o")], capsys)
    assert code == 1 and str(tmp_path) in err and "--download" in err
    assert "Traceback" not in err


def test_train_writes_outputs_and_corrupt_resume(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--geometry", "layer1.*=sphere,*=stiefel", "--epochs", "2",
            "--batch-size", "128", "--out", str(out), "--stop-after", "1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "epoch 1/2" in printed and "stopping after 1" in printed
    assert main(argv[:-2] + ["--resume", "--quiet"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["epochs_done"] == 2 and s["completed"] and s["max_constraint_error"] < 1e-5
    assert s["command"].startswith("kernelgeo train") and s["torch"] and s["machine"]["platform"]
    assert {"final_test_error", "best_test_error", "time_per_epoch"} <= set(s)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert "layer1.0.conv1" in (out / "geometry.md").read_text()
    (out / "checkpoint.pt").write_bytes((out / "checkpoint.pt").read_bytes()[:1000])
    code, _, err = _run(argv[:-2] + ["--resume", "--quiet"], capsys)
    assert code == 1 and "checkpoint.pt" in err and "truncated or corrupt" in err


def test_demo_runs(tmp_path, capsys):
    assert main(["demo", "--epochs", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"report: {tmp_path / 'report.md'}" in out
    for g in ("euclidean", "sphere", "oblique", "stiefel", "po:sphere+stiefel"):
        assert f"| {g} | 1 |" in out
    assert (tmp_path / "report.md").is_file() and (tmp_path / "error.png").is_file()


@pytest.mark.parametrize("argv,needle", [
    (["train", "--lr", "inf"], "--lr: expected a finite number > 0"),
    (["train", "--lr", "nan"], "--lr: expected a finite number > 0"),
    (["train", "--lr", "-1"], "--lr: expected a finite number > 0"),
    (["train", "--momentum", "inf"], "--momentum: expected a number in [0, 1)"),
    (["train", "--momentum", "5"], "--momentum: expected a number in [0, 1)"),
    (["train", "--weight-decay", "inf"], "--weight-decay: expected a finite number >= 0"),
    (["train", "--split-seed", "-1"], "--split-seed: expected an integer in [0, 4294967295]"),
    (["train", "--seed", "2**70"], "expected an integer, got '2**70'"),
    (["train", "--seed", str(2**70)], "--seed: expected an integer in [0, 9223372036854775807]"),
    (["train", "--seed", "-3"], "--seed: expected an integer in [0"),
    (["train", "--crop-padding", "-2"], "--crop-padding: expected an integer >= 0"),
    (["train", "--rm-power", "2"], "--rm-power: expected a number in (0.5, 1]"),
    (["train", "--print-freq", "0"], "--print-freq: expected a positive integer"),
    (["train", "--amp", "fp8"], "invalid choice"),
    (["compare", "--seeds", "0", "-1"], "--seeds: expected an integer in [0"),
    (["train", "--geometry", "po:2:sphere+stiefel+oblique+sphere"],
     "4 components for 2 group(s)"),
    (["train", "--geometry", "po:2:3:sphere"], "bad product spec"),
    (["train", "--geometry", "po:sphere+"], "empty component name"),
])
def test_bad_values_exit_2_with_one_line(argv, needle, capsys):
    code, _, err = _run(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and needle in err and "Traceback" not in err, err
    assert lines[-1].startswith("kernelgeo") and needle in lines[-1]


def test_bad_output_directories_exit_2(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    for out, needle in [(f, "is a file, not a directory"),
                        (f / "sub", "is a file, not a directory"),
                        ]:
        code, _, err = _run(["train", "--out", str(out), "--quiet"], capsys)
        assert code == 2 and needle in err and "Traceback" not in err
    code, _, err = _run(["train", "--out", str(tmp_path), "--name", "x"], capsys)
    assert code == 2 and "--out or --name, not both" in err
    code, _, err = _run(["train", "--out", str(tmp_path), "--resume", "--force"], capsys)
    assert code == 2 and "give one of them" in err
    for cmd in ("demo",):
        code, _, err = _run([cmd, "--out", str(tmp_path)], capsys)
        assert code == 2 and "already holds a" in err and "--resume" not in err
        assert "--force" in err and f.read_text() == "x"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root may write into read-only directories")
def test_unwritable_out_exits_2(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        code, _, err = _run(["train", "--out", str(ro / "run"), "--quiet"], capsys)
    finally:
        ro.chmod(0o700)
    assert code == 2 and "permission denied" in err and "Traceback" not in err


def test_uncreatable_out_exits_with_reason(capsys):
    code, _, err = _run(["train", "--out", "/proc/kernelgeo-no/run", "--epochs", "1",
                         "--max-steps", "1", "--quiet"], capsys)
    assert code in (1, 2) and "/proc/kernelgeo-no" in err and "Traceback" not in err


def test_existing_run_and_resume_messages(tmp_path, capsys):
    out = tmp_path / "r"
    base = ["train", "--epochs", "1", "--max-steps", "2", "--out", str(out), "--quiet"]
    assert main(base) == 0
    code, _, err = _run(base, capsys)
    assert code == 2 and "already holds a run" in err and "--force" in err
    code, _, err = _run(base + ["--resume", "--lr", "0.2", "--nesterov"], capsys)
    assert code == 2 and "lr: checkpoint 0.1 vs now 0.2" in err
    assert "nesterov: checkpoint False vs now True" in err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, _, err = _run(["train", "--out", str(tmp_path / "other"), "--resume"], capsys)
    assert code == 2 and "holds no checkpoint.pt" in err
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_geometry_is_parsed_once(tmp_path, monkeypatch):
    """The CLI builds each rule's manifold once (argparse), and the run uses those objects."""
    from kernelgeo.manifolds import registry

    calls = {"n": 0}
    real = registry._FACTORIES["sphere"]

    def counting(**kw):
        calls["n"] += 1
        return real(**kw)

    monkeypatch.setitem(registry._FACTORIES, "sphere", counting)
    assert main(["train", "--geometry", "layer1.*=sphere,*=euclidean", "--epochs", "1",
                 "--max-steps", "1", "--quiet", "--out", str(tmp_path / "r")]) == 0
    assert calls["n"] == 1


def test_torchrun_needs_an_explicit_output_name(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = _run(["train", "--epochs", "1"], capsys)
    assert code == 2 and "give --out or --name" in err


def test_diverging_run_exits_1_naming_layers(tmp_path, capsys):
    code, _, err = _run(["train", "--lr", "1e30", "--epochs", "2", "--quiet",
                         "--out", str(tmp_path / "r")], capsys)
    assert code == 1 and "non-finite gradient" in err and "conv1.weight" in err
    assert "Traceback" not in err


def test_train_with_riemannian_adam_keeps_kernels_and_resumes(tmp_path, capsys):
    out = tmp_path / "adam"
    argv = ["train", "--geometry", "stiefel", "--optimizer", "adam", "--lr", "0.03",
            "--epochs", "2", "--out", str(out), "--quiet"]
    assert main(argv + ["--stop-after", "1"]) == 0
    assert main(argv + ["--resume"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["epochs_done"] == 2 and s["max_constraint_error"] < 1e-5
    assert json.loads((out / "config.json").read_text())["optimizer"] == "adam"
    # the mean training loss falls from the first epoch to the second
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[1]["train_loss"] < rows[0]["train_loss"]
