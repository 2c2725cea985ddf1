"""Loading trained runs (kernelgeo.load_run) and the normalization report on them."""

from __future__ import annotations

import io
import json
import math
import zipfile

import numpy as np
import pytest
import torch

from kernelgeo.checkpoint import CheckpointError
from kernelgeo.cli import main
from kernelgeo.runs import RunError, load_run
from kernelgeo.training import loop

GEOMETRIES = ("sphere", "stiefel", "euclidean")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three tiny digits runs trained by `kernelgeo train`'s own loop; for each, the model
    object the loop trained and its weights right after construction (epoch 0)."""
    from kernelgeo.train import TrainConfig, train

    root = tmp_path_factory.mktemp("runs")
    built = {}
    real_build = loop._build

    def spy(cfg, data, ctx):
        run = real_build(cfg, data, ctx)
        built[str(cfg.geometry)] = (run.model, {k: v.detach().clone()
                                                for k, v in run.model.state_dict().items()})
        return run

    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "_build", spy)
        for g in GEOMETRIES:
            train(TrainConfig(dataset="digits", epochs=1, geometry=g, out=str(root / g),
                              train_subset=512, test_subset=128, batch_size=64, seed=3,
                              quiet=True, threads=1))
            out[g] = (root / g, *built[g])
    return out


# ------------------------------------------------------------------------------ load_run
@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_load_run_round_trip(runs, geometry):
    path, trained, init = runs[geometry]
    rng = torch.get_rng_state()
    run = load_run(path)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's generators are untouched
    assert run.config.train_subset == 512 and run.epoch == 1 and run.step == 8
    assert len(run.history) == 1 and run.history[0]["epoch"] == 1
    # same manifolds, same weights, same outputs as the model the training loop produced
    for (n1, p1), (n2, p2) in zip(run.model.named_parameters(), trained.named_parameters()):
        assert n1 == n2 and type(p1) is type(p2) and torch.equal(p1, p2)
        assert repr(getattr(p1, "manifold", None)) == repr(getattr(p2, "manifold", None))
    x, y = run.train_batch(64)
    assert x.dtype == torch.float32 and x.shape == (64, 1, 8, 8)
    # normalised with the training set's statistics
    assert abs(float(run.train_batch(512)[0].mean())) < 0.05
    trained.eval()
    with torch.no_grad():
        assert torch.equal(run.model(x), trained(x))
    # the re-created initialization is the loop's epoch-0 state, bit for bit
    assert run.init_state.keys() == init.keys()
    for k in init:
        assert torch.equal(run.init_state[k], init[k]), k
    # optimizer state restored (momentum buffers of every trained parameter)
    opt = run.optimizer()
    assert all(opt.state[p] for p in run.model.parameters())
    # path lengths of every weight; a path is at least as long as the chord of its ends
    weights = [n for n, p in run.model.named_parameters() if p.dim() >= 2]
    assert run.path_note == "" and list(run.path_lengths) == weights
    for n in weights:
        chord = float((run.model.state_dict()[n].double() - init[n].double()).norm())
        assert run.path_lengths[n] >= chord * (1 - 1e-6) > 0, n


def test_load_run_refuses_missing_foreign_and_corrupt(runs, tmp_path):
    with pytest.raises(RunError, match="does not exist"):
        load_run(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(RunError, match="is a file"):
        load_run(f)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("hello")
    with pytest.raises(RunError, match="not a kernelgeo training run.*notes.txt"):
        load_run(foreign)
    bad = tmp_path / "bad"
    bad.mkdir()
    src = runs["sphere"][0]
    for name in ("config.json", "checkpoint.pt"):
        (bad / name).write_bytes((src / name).read_bytes())
    ck = bad / "checkpoint.pt"
    good = ck.read_bytes()
    ck.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_run(bad)
    # one flipped byte inside the largest tensor's data: the checksum refuses it
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        info = max(z.infolist(), key=lambda i: i.file_size)
    head = good[info.header_offset:info.header_offset + 30]
    off = info.header_offset + 30 + int.from_bytes(head[26:28], "little") \
        + int.from_bytes(head[28:30], "little")
    raw = bytearray(good)
    raw[off + info.file_size // 2] ^= 0x01
    ck.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_run(bad)


# -------------------------------------------------------------------- per-layer measures
def _sphere_product_curvature(x, u, v):
    """Independent oracle: Gauss equation on a product of spheres of radius r (rows of x):
    II_i(u, v) = -<u_i, v_i> x_i / r^2, so <II(u,u), II(v,v)> - |II(u,v)|^2 =
    sum_i (|u_i|^2 |v_i|^2 - <u_i, v_i>^2) / r^2."""
    x, u, v = (t.double().flatten(1) for t in (x, u, v))
    r2 = (x * x).sum(1)
    uu, vv, uv = (u * u).sum(1), (v * v).sum(1), (u * v).sum(1)
    num = ((uu * vv - uv * uv) / r2).sum()
    return float(num / (uu.sum() * vv.sum() - uv.sum() ** 2))


def test_layer_measures_against_closed_forms(runs):
    from kernelgeo.analysis.report import analyze_run, optimizer_directions

    res = {}
    for g in GEOMETRIES:
        run = load_run(runs[g][0])
        res[g] = (run, analyze_run(run, with_sharpness=False, with_slices=False,
                                   subset=64, interp_points=5))
    run, sph = res["sphere"]
    x, y = run.train_batch()
    grads, moms = optimizer_directions(run, x, y)
    params = dict(run.model.named_parameters())
    for lay in sph.layers:
        p = params[lay.name]
        if lay.name.startswith("fc"):
            assert (lay.removed, lay.symmetry, lay.curvature) == (0, 0, 0.0)
            continue
        out = p.shape[0]
        # conv -> batch norm: per-filter scale symmetry, exactly what the sphere removes
        assert lay.batch_norm and (lay.removed, lay.symmetry) == (out, out)
        assert (lay.symmetry_left, lay.restriction) == (0, 0)
        # float32 weights and directions: on the sphere and tangent only to ~1e-7
        want = _sphere_product_curvature(p.detach(), grads[lay.name], moms[lay.name])
        assert lay.curvature == pytest.approx(want, rel=1e-5)
        # normal curvature on a product of unit spheres: |II(u,u)|/|u|^2 = sqrt(sum|u_i|^4)/|u|^2
        u = grads[lay.name].double().flatten(1)
        want = float((u * u).sum(1).square().sum().sqrt() / (u * u).sum())
        assert lay.normal_grad == pytest.approx(want, rel=1e-5)
        assert math.isfinite(lay.distance) and lay.distance >= lay.chordal * (1 - 1e-9)
    _, st = res["stiefel"]
    for lay in st.layers:
        if lay.name.startswith("fc"):
            continue
        # St(n, p) blocks remove p(p+1)/2 each; per-filter scales are among them
        n_blocks, p_ = _stiefel_blocks(lay.geometry)
        assert lay.removed == n_blocks * p_ * (p_ + 1) // 2
        assert lay.symmetry_left == 0 and lay.restriction == lay.removed - lay.symmetry
    _, eu = res["euclidean"]
    for lay in eu.layers:
        if lay.batch_norm:  # nothing removed: every scale direction stays flat
            assert lay.removed == 0 and lay.symmetry_left == lay.symmetry == lay.shape[0]
            assert lay.curvature == 0.0 and lay.normal_grad == 0.0
            assert lay.distance == pytest.approx(lay.chordal, rel=1e-12)


def _stiefel_blocks(desc: str) -> tuple[int, int]:
    # "2 x St(9,8)(r=1)" -> (2, 8)
    count, rest = desc.split(" x St(")
    return int(count), int(rest.split(",")[1].split(")")[0])


def test_interpolation_grid_holds_0_and_1_exactly():
    from kernelgeo.analysis.report import interpolation_grid

    for n in (3, 5, 7, 13, 21, 100):
        ts = interpolation_grid(n)
        assert 0.0 in ts.tolist() and 1.0 in ts.tolist() and len(ts) == n
        assert np.all(np.diff(ts) > 0)
    with pytest.raises(ValueError):
        interpolation_grid(2, 0.1, 1.0)


# ----------------------------------------------------------------------------- the report
SECTIONS = ("## Runs", "## Invariance gap", "## Curvature along the optimizer's directions",
            "## Distance from initialization", "## Sharpness", "## 1-D interpolation",
            "## 2-D slices")


def test_report_on_two_runs_has_every_section(runs, tmp_path):
    from kernelgeo.analysis.plotting import image_variance
    from kernelgeo.analysis.report import normalization_report

    path = normalization_report([runs["sphere"][0], runs["stiefel"][0]], tmp_path / "rep",
                                points=3, subset=64, sharpness_subset=32, interp_points=5,
                                threads=1, log=lambda s: None)
    md = path.read_text()
    for s in SECTIONS:
        assert s in md, s
    # the 5-point grid on [-0.25, 1.25] has 0.125 and 0.875: they become 0 and 1
    for needle in ("sphere (sphere)", "stiefel (stiefel)", "St(", "K(g, m)", "path / geodesic",
                   "t = -0.25, 0, 0.5, 1, 1.25."):
        assert needle in md, needle
    for png in ("curvature_plane.png", "normal_curvature.png", "angular_step.png",
                "distance_from_init.png", "interpolation_1d.png", "landscape_manifold.png",
                "landscape_euclidean.png", "path_over_distance.png"):
        assert image_variance(tmp_path / "rep" / png) > 1e-4, png
        assert f"({png})" in md
    summary = json.loads((tmp_path / "rep" / "summary.json").read_text())
    assert set(summary) == {"sphere (sphere)", "stiefel (stiefel)"}
    assert all(math.isfinite(v["sharpness_riemannian"]) for v in summary.values())


# -------------------------------------------------------------------------- command line
def _run(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_cli_writes_runs_analyze_name(runs, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["analyze", str(runs["sphere"][0]), "--points", "3", "--subset", "32",
                 "--no-sharpness", "--interp-points", "5", "--threads", "1",
                 "--name", "a"]) == 0
    md = (tmp_path / "runs/analyze/a/report.md").read_text()
    assert all(s in md for s in SECTIONS) and "not computed (--no-sharpness)" in md
    # an existing report is never written into
    code, _, err = _run(["analyze", str(runs["sphere"][0]), "--name", "a"], capsys)
    assert code == 2 and "already holds a report" in err and "--force" in err


@pytest.mark.parametrize("argv, needle", [
    (["analyze"], "RUN_DIR"),
    (["analyze", "R", "--points", "1"], "--points: must be an integer >= 2"),
    (["analyze", "R", "--span", "nan"], "--span: must be a finite number > 0"),
    (["analyze", "R", "--subset", "0"], "--subset: must be a positive integer"),
    (["analyze", "R", "--seed", "-1"], "--seed: must be an integer in [0, 2**63)"),
    (["analyze", "R", "--threads", "x"], "--threads: must be a positive integer"),
    (["analyze", "R", "--epochs", "3"], "unrecognized arguments: --epochs"),
])
def test_cli_bad_options_exit_2(argv, needle, capsys):
    code, _, err = _run(argv, capsys)
    assert code == 2 and needle in err and "Traceback" not in err, err


def test_cli_bad_run_directories_exit_2_and_write_nothing(runs, tmp_path, capsys):
    out = tmp_path / "out"
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x.txt").write_text("x")
    for d, needle in [(tmp_path / "missing", "does not exist"),
                      (foreign, "not a kernelgeo training run")]:
        code, _, err = _run(["analyze", str(runs["sphere"][0]), str(d), "--out", str(out)],
                            capsys)
        lines = err.strip().splitlines()
        assert code == 2 and needle in lines[-1] and "Traceback" not in err, err
        assert not out.exists()


def test_cli_help_gives_every_default(capsys):
    code, out, _ = _run(["analyze", "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for opt, default in [("--points", "11"), ("--span", "1.0"), ("--subset", "256"),
                         ("--sharpness-subset", "128"), ("--interp-points", "13"),
                         ("--seed", "0")]:
        assert opt in text and f"(default: {default})" in text, opt
    for opt in ("--out", "--name", "--force", "--no-sharpness", "--no-slices", "--threads"):
        assert opt in text
    assert "runs/analyze/" in text


def test_uncertified_stiefel_distance_is_nan_with_the_reason(runs):
    from kernelgeo.analysis.report import analyze_run

    run = load_run(runs["stiefel"][0])
    name = "layer2.0.conv1.weight"
    # -X is far from X on St(144, 32): no certified minimising geodesic
    run.init_state[name] = -run.model.state_dict()[name].clone()
    res = analyze_run(run, with_sharpness=False, with_slices=False, subset=32,
                      interp_points=5)
    lay = next(lay for lay in res.layers if lay.name == name)
    assert math.isnan(lay.distance) and lay.distance_note.startswith("distance refused: ")
    assert "St(144,32)" in lay.distance_note and math.isfinite(lay.chordal)
    others = [lay for lay in res.layers if lay.name != name]
    assert all(math.isfinite(lay.distance) and not lay.distance_note for lay in others)


def test_stored_initial_weights_are_compared_and_used(runs, tmp_path):
    from kernelgeo.checkpoint import load_checkpoint, save_checkpoint
    from kernelgeo.runs import INIT_KEY

    src, _, init = runs["sphere"]
    for name, tamper, word in [("same", False, "identical"), ("other", True, "different")]:
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_bytes((src / "config.json").read_bytes())
        state = load_checkpoint(src / "checkpoint.pt")
        state.pop("checksums", None)
        stored = {k: v.clone() for k, v in init.items()}
        if tamper:
            stored["fc.bias"] += 1.0
        state[INIT_KEY] = stored
        save_checkpoint(state, d / "checkpoint.pt")
        run = load_run(d)
        assert word in run.init_note
        assert torch.equal(run.init_state["fc.bias"], stored["fc.bias"])
    assert "no epoch-0 weights" in load_run(src).init_note
    assert load_run(src, with_init=False).init_state is None
