"""Smoke tests of the study scripts in ``analysis/`` (tiny settings) and of the helpers they
share: the runner's resume and refusal to overwrite, the basin width and the t-interval."""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ANALYSIS = Path(__file__).resolve().parent.parent / "analysis"
sys.path.insert(0, str(ANALYSIS))

import studies  # noqa: E402
import study_cifar10  # noqa: E402
import study_converged  # noqa: E402
import study_depth  # noqa: E402
import study_lr_sweep  # noqa: E402


def _tiny_cifar_dir() -> str:
    from kernelgeo.data import find_file

    path = find_file("cifar10_tiny_1k200.npz")
    if path is None:
        pytest.skip("cifar10_tiny_1k200.npz not found (../shared/data or $KERNELGEO_DATA)")
    return str(path.parent)


def _rows(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _check_csv(path: Path, n: int) -> list[dict]:
    rows = _rows(path)
    assert len(rows) == n
    for col in studies.CSV_COLUMNS[:13]:
        assert col in rows[0], col
    for r in rows:
        assert r["status"] in ("completed", "diverged")
        if r["status"] == "completed":
            assert 0.0 <= float(r["final_test_error"]) <= 1.0
            assert math.isfinite(float(r["final_train_loss"]))
    return rows


def test_lr_sweep_resume_and_no_overwrite(tmp_path, capsys):
    out = tmp_path / "lr"
    argv = ["--out", str(out), "--lrs", "0.01", "0.1", "--geometries", "sphere",
            "--seeds", "0", "--epochs", "1"]
    assert study_lr_sweep.main(argv) == 0
    rows = _check_csv(out / "runs.csv", 2)
    assert {r["lr"] for r in rows} == {"0.01", "0.1"}
    assert {r["geometry"] for r in rows} == {"sphere"}
    assert float(rows[0]["max_constraint_error"]) < 1e-5
    for name in ("report.md", "basins.csv", "error_vs_lr.png"):
        assert (out / name).stat().st_size > 0
    assert not list(out.glob("runs/*/checkpoint.pt"))  # results only
    summary = out / "runs" / rows[0]["run"] / "summary.json"
    before = summary.stat().st_mtime_ns
    capsys.readouterr()
    assert study_lr_sweep.main(argv + ["--resume"]) == 0
    assert "skipped" in capsys.readouterr().out
    assert summary.stat().st_mtime_ns == before  # finished runs are not retrained
    with pytest.raises(FileExistsError, match="--resume"):
        study_lr_sweep.main(argv)


def test_basin_width():
    lrs = [0.001, 0.01, 0.1, 1.0, 10.0]
    b = study_lr_sweep.basin(lrs, [0.5, 0.05, 0.04, 0.045, 0.9], margin=0.01)
    assert (b["lr_lo"], b["lr_hi"], b["best_lr"]) == (0.01, 1.0, 0.1)
    assert b["decades"] == pytest.approx(2.0)
    # a good point not connected to the best one is counted but does not widen the basin
    b = study_lr_sweep.basin(lrs, [0.041, 0.5, 0.04, 0.5, 0.5], margin=0.01)
    assert b["decades"] == 0.0 and b["good_points"] == 2


def test_t_interval_closed_form():
    # mean 2, s.d. 1, n = 3: half-width t_{0.975, 2} / sqrt(3), t_{0.975, 2} = 4.302652729...
    m, lo, hi = studies.t_interval([1.0, 2.0, 3.0])
    half = 4.302652729749464 / math.sqrt(3)
    assert m == pytest.approx(2.0)
    assert (lo, hi) == (pytest.approx(2.0 - half), pytest.approx(2.0 + half))
    assert math.isnan(studies.t_interval([1.0])[1])


def test_depth_records_grad_norms_every_epoch(tmp_path):
    out = tmp_path / "depth"
    assert study_depth.main(["--out", str(out), "--depths", "3", "--geometries", "euclidean",
                             "oblique", "--lrs", "0.05", "--seeds", "0", "--epochs", "2",
                             "--grad-batch", "16"]) == 0
    rows = _check_csv(out / "runs.csv", 2)
    assert {r["depth"] for r in rows} == {"3"}
    for r in rows:
        extra = json.loads(studies.extra_file(out / "runs" / r["run"]).read_text())
        assert sorted(extra) == ["0", "1", "2"]  # initial model and after each epoch
        assert all(len(v["rgrad"]) == 3 and min(v["rgrad"]) > 0 for v in extra.values())
    assert (out / "grad_norm_vs_layer.png").stat().st_size > 0
    grads = _rows(out / "grad_norms.csv")
    assert len(grads) == 2 * 3 * 3  # runs x measurements x layers


def test_plain_models():
    from kernelgeo.models import get_model

    m = get_model("plain-5-8", 10, 1)
    assert sum(isinstance(x, torch.nn.Conv2d) for x in m.modules()) == 5
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    nobn = get_model("resnet-digits-nobn", 10, 1)
    assert not any(isinstance(x, torch.nn.BatchNorm2d) for x in nobn.modules())
    assert nobn(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="depth and width"):
        get_model("plain-0")


def _has_fashion() -> bool:
    from kernelgeo.data import DataNotFoundError, load_dataset

    try:
        load_dataset("fashion-mnist")
    except DataNotFoundError:
        return False
    return True


@pytest.mark.data
def test_converged_paired(tmp_path):
    if not _has_fashion():
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")
    out = tmp_path / "conv"
    assert study_converged.main([
        "--out", str(out), "--train-subset", "256", "--test-subset", "100", "--image-size",
        "8", "--epochs", "1", "--seeds", "0", "1", "--variants", "euclidean",
        "euclidean (no batch norm)", "--concurrent", "2"]) == 0
    rows = _check_csv(out / "runs.csv", 4)
    # the images really are 8x8 (image_size was once ignored for in-memory data sets)
    summary = json.loads((out / "runs" / "euclidean_s0" / "summary.json").read_text())
    assert "28x28 -> 8x8" in summary["dataset_label"]
    assert {r["batch_norm"] for r in rows} == {"True", "False"}
    pairs = _rows(out / "paired.csv")
    assert len(pairs) == 1 and pairs[0]["n"] == "2"
    by = {(r["variant"], r["seed"]): float(r["final_test_error"]) for r in rows}
    diffs = [by[("euclidean (no batch norm)", s)] - by[("euclidean", s)] for s in ("0", "1")]
    assert float(pairs[0]["mean_diff"]) == pytest.approx(sum(diffs) / 2)
    md = (out / "report.md").read_text()
    assert "REDUCED" in md and "downsampled from 28x28 to 8x8" in md
    assert "**Verdict at this budget**" in md and "No geometry beats the baseline" in md


@pytest.mark.data
def test_cifar10_script(tmp_path):
    shared = _tiny_cifar_dir()
    out = tmp_path / "c10"
    assert study_cifar10.main([
        "--data-dir", shared, "--dataset", "cifar10-tiny", "--train-subset", "64",
        "--test-subset", "32", "--batch-size", "32", "--epochs", "1", "--geometries",
        "euclidean", "sphere", "--seeds", "0", "--out", str(out)]) == 0
    rows = _check_csv(out / "runs.csv", 2)
    assert {r["model"] for r in rows} == {"resnet20"}


@pytest.mark.slow
@pytest.mark.data
def test_cifar10_concurrent_workers(tmp_path):
    shared = _tiny_cifar_dir()
    out = tmp_path / "c10"
    argv = ["--data-dir", shared, "--dataset", "cifar10-tiny", "--train-subset", "64",
            "--test-subset", "32", "--batch-size", "32", "--epochs", "1", "--geometries",
            "euclidean", "sphere", "--seeds", "0", "--concurrent", "2", "--out", str(out)]
    assert study_cifar10.main(argv) == 0
    _check_csv(out / "runs.csv", 2)
    with pytest.raises(SystemExit):  # a second launch without --resume is refused
        study_cifar10.main(argv)


def test_converged_plateau_schedule_on_digits(tmp_path):
    """``--schedule plateau``: every run stops at its own plateau or at --epochs; the table says
    which, the figures draw each run, and a variant with its own rate is trained at it."""
    out = tmp_path / "plateau"
    argv = ["--out", str(out), "--dataset", "digits", "--schedule", "plateau", "--epochs", "40",
            "--seeds", "0", "--variants", "euclidean", "oblique (lr 1)", "--concurrent", "2"]
    assert study_converged.main(argv) == 0
    rows = {r["run"]: r for r in _check_csv(out / "runs.csv", 2)}
    assert set(rows) == {"euclidean_s0", "oblique-lr1_s0"}
    assert float(rows["oblique-lr1_s0"]["lr"]) == 1.0 and float(rows["euclidean_s0"]["lr"]) == 0.1
    for name, r in rows.items():
        s = json.loads((out / "runs" / name / "summary.json").read_text())
        assert r["plateaued"] == str(s["plateau"]["converged"])
        assert r["rate_divided_after"] == " ".join(map(str, s["plateau"]["decay_epochs"]))
        assert int(r["epochs_done"]) == s["plateau"]["epochs"] <= 40
        if s["plateau"]["converged"]:  # the stop is the stated criterion, at the last rate
            assert float(r["train_loss_rel_change_3"]) < 0.02
            assert len(s["plateau"]["decay_epochs"]) == 2
    md = (out / "report.md").read_text()
    assert "## Runs" in md and "it is the stopping rule of every run" in md
    assert "- date: runs finished " in md
    for png in ("test_error.png", "train_loss.png", "final_error.png", "paired.png"):
        assert (out / png).stat().st_size > 0


def test_report_dates_and_machine_come_from_the_runs():
    rows = [{"_summary": {"date": "2026-01-02 03:04:05 +0000",
                          "machine": {"cpu": "CPU A", "cpu_count": 2, "torch": "2.0",
                                      "python": "3.11"}}},
            {"_summary": {"date": "2026-01-02 05:06:07 +0200",
                          "machine": {"cpu": "CPU A", "cpu_count": 2, "torch": "2.0",
                                      "python": "3.11", "gpu": "GPU B"}}},
            {"_summary": {}}]
    line = studies.date_line(rows)
    # 05:06 at +02:00 is 03:06 UTC: the same day, so the end is given as a time
    assert line.startswith("runs finished 2026-01-02 03:04 to 03:06 UTC; report written ")
    rows[1]["_summary"]["date"] = "2026-01-03 05:06:07 +0000"
    assert studies.date_line(rows).startswith("runs finished 2026-01-02 03:04 to "
                                              "2026-01-03 05:06 UTC")
    assert studies.machine_line(rows) == ("CPU A, 2 logical cores (shared), torch 2.0, python "
                                          "3.11; GPU B, CPU A, 2 logical cores (shared), "
                                          "torch 2.0, python 3.11")
    assert "runs finished" not in studies.date_line([])
