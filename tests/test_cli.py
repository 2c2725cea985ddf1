"""The ``kernelgeo`` command line: help, errors (exit 2, no traceback), train/compare/demo."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest

from kernelgeo.cli import main


@pytest.fixture(autouse=True)
def _no_fallback_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ConvergentRSGD is not available")
        yield


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
    (["train", "--optimizer", "adam"], "invalid choice"),
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
