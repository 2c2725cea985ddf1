"""The plateau schedule: train until the training loss has plateaued (``--schedule plateau``)."""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import strip_times

from kernelgeo.train import TrainConfig, train
from kernelgeo.training.config import config_dict, resume_differences
from kernelgeo.training.plateau import PlateauLR, relative_change


def _opt(lr=0.1):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


def test_relative_change_is_the_stated_formula():
    assert math.isnan(relative_change([1.0, 0.9, 0.8], 3))
    assert relative_change([2.0, 9.0, 9.0, 1.5], 3) == pytest.approx(0.25)
    assert relative_change([1.0, 1.1], 1) == pytest.approx(0.1)
    assert relative_change([0.0, 1.0], 1) == math.inf


def _feed(s, losses):
    return [s.epoch_end(x) for x in losses]


def test_rate_divided_at_each_plateau_and_stop_at_the_last():
    opt = _opt(0.5)
    s = PlateauLR(opt, tol=0.02, window=2, decays=2)
    # level 0: 1.0, 0.8, 0.79 (25% change), 0.785 (1.9% vs 0.8) -> plateau after epoch 4
    assert _feed(s, [1.0, 0.8, 0.79, 0.785]) == [False] * 4
    assert s.level == 1 and s.decay_epochs == [4]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    # the epochs before the division do not count at the new rate: 3 epochs are needed
    assert _feed(s, [0.70, 0.70]) == [False, False] and s.level == 1
    assert _feed(s, [0.70]) == [False] and s.level == 2 and s.decay_epochs == [4, 7]
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    # a change of exactly tol is not a plateau
    assert _feed(s, [0.5, 0.5, 0.49]) == [False, False, False]
    assert _feed(s, [0.495]) == [True] and s.converged
    assert _feed(s, [0.1]) == [True] and s.epochs_seen == 11  # nothing more is recorded
    # the per-step schedule keeps the level's rate
    for _ in range(5):
        opt.step()
        s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.005)
    assert s.describe() == {"tol": 0.02, "window": 2, "decays": 2, "factor": 0.1,
                            "converged": True, "decay_epochs": [4, 7], "epochs": 11}


def test_zero_decays_stops_at_the_first_plateau_and_rising_loss_is_no_plateau():
    opt = _opt()
    s = PlateauLR(opt, tol=0.05, window=1, decays=0)
    assert _feed(s, [1.0, 1.5, 1.49]) == [False, False, True]
    assert s.level == 0 and opt.param_groups[0]["lr"] == 0.1


def test_state_dict_continues_the_same_decisions():
    # divisions after epochs 3 and 7, the stop at epoch 10; cut in the middle of level 1
    losses = [1.0, 0.999, 0.998, 0.7, 0.69, 0.689, 0.688, 0.6, 0.6, 0.6]
    ref = PlateauLR(_opt(), tol=0.01, window=2, decays=2)
    want = _feed(ref, losses)
    a = PlateauLR(_opt(), tol=0.01, window=2, decays=2)
    first = _feed(a, losses[:5])
    b_opt = _opt()
    b = PlateauLR(b_opt, tol=0.01, window=2, decays=2)
    b_opt.load_state_dict(a.optimizer.state_dict())
    b.load_state_dict(a.state_dict())
    assert first + _feed(b, losses[5:]) == want
    assert want[-1] and ref.decay_epochs == [3, 7]
    assert b.describe() == ref.describe()
    assert b_opt.param_groups[0]["lr"] == pytest.approx(ref.optimizer.param_groups[0]["lr"])


@pytest.mark.parametrize("kw, match", [
    ({"tol": 0.0}, "tol"), ({"tol": 1.0}, "tol"), ({"window": 0}, "window"),
    ({"window": 1.5}, "window"), ({"decays": -1}, "decays"), ({"factor": 1.0}, "factor"),
])
def test_bad_arguments_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        PlateauLR(_opt(), **kw)


def _cfg(**kw):
    base = dict(dataset="digits", epochs=40, batch_size=64, lr=0.1, quiet=True, device="cpu",
                schedule="plateau", plateau_tol=0.3, plateau_window=1, plateau_decays=1,
                geometry="sphere", deterministic=True)
    base.update(kw)
    return TrainConfig(**base)


def test_training_stops_at_the_final_plateau_and_resumes_exactly(tmp_path):
    full = train(_cfg(out=str(tmp_path / "full")))
    p = full["plateau"]
    h = full["history"]
    assert p["converged"] and full["completed"] and full["epochs_done"] < 40
    assert p["epochs"] == len(h) and len(p["decay_epochs"]) == 1
    d = p["decay_epochs"][0]
    # every epoch up to the division at the first rate, every later one at a tenth of it
    assert all(r["lr"] == pytest.approx(0.1) for r in h[:d])
    assert all(r["lr"] == pytest.approx(0.01) for r in h[d:])
    # the stop is the stated criterion, at the final rate
    assert relative_change([r["train_loss"] for r in h[d:]], 1) < 0.3
    assert relative_change([r["train_loss"] for r in h[d:-1]], 1) >= 0.3 or len(h) - d == 2
    # interrupted after one epoch and resumed: the same decisions and numbers
    part = train(_cfg(out=str(tmp_path / "part"), stop_after=1))
    assert not part["completed"]
    rest = train(_cfg(out=str(tmp_path / "part"), resume=True))
    assert rest["plateau"] == p and strip_times(rest["history"]) == strip_times(h)
    # a finished run resumed with more epochs allowed trains nothing more
    again = train(_cfg(out=str(tmp_path / "full"), epochs=60, resume=True))
    assert again["epochs_done"] == len(h) and again["plateau"]["converged"]


def test_budget_reached_without_plateau_is_reported():
    s = train(_cfg(epochs=2, plateau_tol=1e-9, geometry="euclidean", deterministic=False))
    assert s["completed"] and s["epochs_done"] == 2
    assert s["plateau"]["converged"] is False and s["plateau"]["decay_epochs"] == []
    assert train(_cfg(epochs=1, schedule="cosine", deterministic=False))["plateau"] is None


def test_checkpoints_from_before_the_plateau_fields_still_resume():
    new = config_dict(TrainConfig(schedule="cosine"))
    old = {k: v for k, v in new.items() if not k.startswith("plateau_")}
    assert resume_differences(old, new) == []
    other = config_dict(TrainConfig(schedule="cosine", plateau_tol=0.05))
    assert resume_differences(old, other) == ["plateau_tol: not in checkpoint vs now 0.05"]


@pytest.mark.parametrize("argv, msg", [
    (["--plateau-tol", "1.5"], "--plateau-tol: expected a number in (0, 1)"),
    (["--plateau-window", "0"], "--plateau-window: expected a positive integer"),
    (["--plateau-decays", "-1"], "--plateau-decays: expected an integer >= 0"),
])
def test_cli_checks_the_plateau_options(argv, msg, capsys):
    from kernelgeo.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--schedule", "plateau", *argv])
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_study_workers_claim_each_run_once(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "analysis"))
    from studies import _claim

    assert _claim(None, "a")  # no claims folder: every run is this process's
    assert _claim(tmp_path, "a") and not _claim(tmp_path, "a")
    assert _claim(tmp_path, "b")
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
