"""Path length travelled by the weights (kernelgeo.training.path), against sums written here."""

import math

import pytest
import torch

from kernelgeo import constrain
from kernelgeo.models import get_model
from kernelgeo.optim import ConvergentRSGD
from kernelgeo.train import TrainConfig, train
from kernelgeo.training.path import PathMeter


def _snap(model):
    return {n: p.detach().double().clone() for n, p in model.named_parameters() if p.dim() >= 2}


def _steps(model, opt, meter, n, after=lambda: None):
    for _ in range(n):
        x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        meter.update()
        after()


def _model(seed, geometry, lr):
    torch.manual_seed(seed)
    model = get_model("resnet-digits", 10, 1)
    constrain(model, geometry)
    return model, ConvergentRSGD(model.parameters(), lr=lr, momentum=0.9)


def test_meter_sums_the_step_lengths():
    model, opt = _model(0, "sphere", 0.3)
    meter = PathMeter(model)
    snaps = [_snap(model)]
    _steps(model, opt, meter, 6, lambda: snaps.append(_snap(model)))
    per = meter.layer_lengths()
    assert set(per) == set(snaps[0]) and "fc.weight" in per and "bn1.weight" not in per
    for name in per:
        ref = sum(float((b[name] - a[name]).norm()) for a, b in zip(snaps, snaps[1:]))
        assert per[name] == pytest.approx(ref, rel=1e-5)
        # a path is at least as long as the chord between its ends
        assert per[name] >= float((snaps[-1][name] - snaps[0][name]).norm()) * (1 - 1e-6)
    tot = sum(math.sqrt(sum(float((b[n] - a[n]).norm()) ** 2 for n in per))
              for a, b in zip(snaps, snaps[1:]))
    assert meter.total_length() == pytest.approx(tot, rel=1e-5)
    # the whole-model length is at most the sum of the layers' lengths (triangle inequality)
    assert meter.total_length() <= sum(per.values())


def test_meter_state_round_trip_and_missing_state():
    model = torch.nn.Linear(3, 2)
    meter = PathMeter(model)
    with torch.no_grad():
        model.weight.add_(1.0)
    meter.update()
    assert meter.total_length() == pytest.approx(math.sqrt(6))
    other = PathMeter(model)
    other.load_state_dict(meter.state_dict())
    assert other.layer_lengths() == meter.layer_lengths()
    lost = PathMeter(model)
    lost.load_state_dict(None)
    assert lost.total_length() is None and lost.layer_lengths() is None
    assert "does not hold the path length" in lost.unavailable
    wrong = PathMeter(torch.nn.Sequential(torch.nn.Linear(3, 2)))
    wrong.load_state_dict(meter.state_dict())
    assert wrong.total_length() is None and "other weights" in wrong.unavailable


def test_training_records_path_length(tmp_path):
    cfg = dict(dataset="digits", epochs=2, batch_size=64, quiet=True, device="cpu",
               geometry="oblique")
    s = train(TrainConfig(**cfg))
    lengths = [h["path_length"] for h in s["history"]]
    assert 0 < lengths[0] < lengths[1] == s["path_length"]
    assert s["path_length_note"] == "" and len(s["path_length_per_layer"]) == 6
    off = train(TrainConfig(track_path=False, **cfg))
    assert off["path_length"] is None and "track_path=False" in off["path_length_note"]
    assert [h["test_error"] for h in off["history"]] == [h["test_error"] for h in s["history"]]
    # resuming a checkpoint written without path lengths: unavailable, not restarted at 0
    out = str(tmp_path / "r")
    train(TrainConfig(out=out, stop_after=1, track_path=False, **cfg))
    rest = train(TrainConfig(out=out, resume=True, **cfg))
    assert rest["path_length"] is None
    assert "does not hold the path length" in rest["path_length_note"]


def test_meter_agrees_with_the_geodesic_path_recorder():
    """The training loop's chordal per-step sums against the analysis' geodesic ones."""
    from kernelgeo.analysis.geodesics import PathRecorder

    model, opt = _model(1, "po:sphere+oblique", 0.2)
    rec, meter = PathRecorder(model, opt), PathMeter(model)
    _steps(model, opt, meter, 4)
    per = meter.layer_lengths()
    for name, length in rec.length.items():
        # chord <= arc, and they agree to second order in the (small) step
        assert per[name] <= length * (1 + 1e-6)
        assert per[name] == pytest.approx(length, rel=1e-3)
