"""Figures (kernelgeo.analysis.plotting): headless, on small synthetic inputs."""

from __future__ import annotations

import statistics
from types import SimpleNamespace

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from kernelgeo.analysis import plotting as P  # noqa: E402

RUNS = {  # digits-like: 50 % at epoch 1 down to a few percent
    "sphere": [[0.50, 0.10, 0.040, 0.030], [0.55, 0.12, 0.030, 0.020],
               [0.45, 0.09, 0.050, 0.025]],
    "stiefel": [[0.52, 0.11, 0.045, 0.035, 0.5]],  # one seed, longer: fine on its own
}


@pytest.fixture
def captured(monkeypatch):
    """The figures the plot functions save (closed, but their artists remain)."""
    figs = []
    real = P._save

    def save(fig, path):
        figs.append(fig)
        return real(fig, path)

    monkeypatch.setattr(P, "_save", save)
    return figs


def _legend_texts(ax):
    return [t.get_text() for t in ax.get_legend().get_texts()]


def test_error_curves_mean_band_n_and_log_axis(tmp_path, captured):
    p = P.plot_error_curves(RUNS, tmp_path / "error.png", title="kernel geometries on UCI digits",
                            dataset="UCI digits (scikit-learn, 8x8)")
    assert p.exists() and P.image_variance(p) > 1e-3
    ax = captured[0].axes[0]
    texts = _legend_texts(ax)
    assert "sphere (n = 3 seeds)" in texts and "stiefel (n = 1 seed)" in texts
    assert "band: min–max over seeds" in texts
    assert ax.get_title() == "kernel geometries on UCI digits"  # data set not repeated
    assert ax.get_yscale() == "log" and "test error (%)" in ax.get_ylabel()
    assert "log scale" in ax.get_ylabel() and ax.get_xlabel() == "epoch"
    # the mean line and the band, against numpy
    a = 100 * np.array(RUNS["sphere"])
    line = next(ln for ln in ax.get_lines() if ln.get_label().startswith("sphere"))
    np.testing.assert_allclose(line.get_xdata(), [1, 2, 3, 4])
    np.testing.assert_allclose(line.get_ydata(), a.mean(0), rtol=1e-12)
    bands = ax.collections
    assert len(bands) == 1  # one seed: no band
    ys = bands[0].get_paths()[0].vertices[:, 1]
    np.testing.assert_allclose(ys.min(), a.min(), rtol=1e-12)
    np.testing.assert_allclose(ys.max(), a.max(), rtol=1e-12)
    for j in range(4):  # the band's vertices lie on the per-epoch min and max
        col = ys[np.isclose(bands[0].get_paths()[0].vertices[:, 0], j + 1)]
        assert np.isclose(col, a[:, j].min()).any() and np.isclose(col, a[:, j].max()).any()


def test_std_band_and_scale_choice():
    fig, ax = plt.subplots()
    info = P.draw_seed_curves(ax, {"g": [[3.0, 2.0], [4.0, 2.5], [5.0, 2.2]]}, band="std",
                              ylabel="loss")
    c = info["curves"]["g"]
    sd0 = statistics.stdev([3.0, 4.0, 5.0])
    assert c["mean"][0] == pytest.approx(4.0) and c["lo"][0] == pytest.approx(4.0 - sd0)
    assert c["hi"][1] == pytest.approx(statistics.mean([2.0, 2.5, 2.2])
                                       + statistics.stdev([2.0, 2.5, 2.2]))
    assert info["yscale"] == "linear" and ax.get_ylabel() == "loss"  # 2-5: no decade
    assert "band: mean ± 1 s.d. over seeds" in _legend_texts(ax)
    plt.close(fig)
    # a band reaching 0 error keeps a log axis above the smallest decade (symlog)
    fig, ax = plt.subplots()
    info = P.draw_seed_curves(ax, {"g": [[0.5, 0.02, 0.0], [0.4, 0.03, 0.01]]}, scale=100,
                              ylabel="test error (%)")
    assert info["yscale"] == "symlog" and ax.get_yscale() == "symlog"
    assert info["curves"]["g"]["lo"][-1] == 0 and "log scale above 0.1" in ax.get_ylabel()
    plt.close(fig)
    # the std band of a non-negative quantity is cut at 0
    fig, ax = plt.subplots()
    info = P.draw_seed_curves(ax, {"g": [[0.5, 0.0], [0.4, 0.3]]}, band="std")
    assert info["curves"]["g"]["lo"][1] == 0
    plt.close(fig)
    fig, ax = plt.subplots()
    assert P.draw_seed_curves(ax, {"g": [[1.0, 2.0]]}, yscale="log")["yscale"] == "log"
    with pytest.raises(ValueError, match="band"):
        P.draw_seed_curves(ax, {"g": [[1.0]]}, band="iqr")
    with pytest.raises(ValueError, match="yscale"):
        P.draw_seed_curves(ax, {"g": [[1.0]]}, yscale="cubic")
    plt.close(fig)


def test_seeds_cut_to_shortest_and_bad_input(tmp_path):
    fig, ax = plt.subplots()
    info = P.draw_seed_curves(ax, {"g": [[0.5, 0.4, 0.3], [0.6, 0.5]]})
    assert list(info["curves"]["g"]["epochs"]) == [1, 2] and info["curves"]["g"]["n"] == 2
    plt.close(fig)
    with pytest.raises(ValueError, match=r"fractions, not percent"):
        P.plot_error_curves({"g": [[50.0, 20.0]]}, tmp_path / "e.png")
    with pytest.raises(ValueError, match="'g': no values"):
        P.plot_error_curves({"g": [[]]}, tmp_path / "e.png")
    with pytest.raises(ValueError, match="no runs"):
        P.plot_error_curves({}, tmp_path / "e.png")


def test_seed_runs_from_summaries():
    hist = [{"test_error": 0.5}, {"test_error": 0.2}]
    summaries = [{"geometry": "sphere", "history": hist},
                 {"geometry": "euclidean", "history": hist[:1]},
                 {"geometry": "sphere", "history": hist},
                 {"geometry": "oblique", "history": []}]
    assert P.seed_runs(summaries, ["euclidean", "sphere", "oblique"]) == {
        "euclidean": [[0.5]], "sphere": [[0.5, 0.2], [0.5, 0.2]]}
    assert list(P.seed_runs(summaries)) == ["sphere", "euclidean"]


@pytest.mark.parametrize("title, dataset, expected", [
    ("kernelgeo demo: kernel geometries on UCI digits", "UCI digits (scikit-learn, 8x8)",
     "kernelgeo demo: kernel geometries on UCI digits"),
    ("ResNet-20", "CIFAR-10 (JPEG q75 copy)", "ResNet-20 — CIFAR-10 (JPEG q75 copy)"),
    ("ResNet-20 on cifar-10", "CIFAR-10 (JPEG q75 copy)", "ResNet-20 on cifar-10"),
    ("", "MNIST", "MNIST"), ("a title", "", "a title"),
])
def test_join_title(title, dataset, expected):
    assert P.join_title(title, dataset) == expected


def _slice(k, n=9):
    al = np.linspace(-1, 1, n)
    a, b = np.meshgrid(al, np.linspace(-0.5, 0.5, n + 2), indexing="ij")
    return SimpleNamespace(alphas=al, betas=np.linspace(-0.5, 0.5, n + 2),
                           loss=0.05 + k * (a**2 + 2 * b**2) + 0.1 * a)


def test_slices_are_2d_heatmaps_on_one_colour_scale(tmp_path, captured):
    slices = {g: _slice(k) for k, g in enumerate(["euclidean", "sphere", "oblique",
                                                   "stiefel"], 1)}
    p = P.plot_slices(slices, tmp_path / "s.png", title="Manifold-aware slices",
                      value="training loss")
    assert P.image_variance(p) > 1e-3
    fig = captured[0]
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_title()]
    assert [ax.get_title() for ax in panels] == list(slices)
    assert all(ax.name == "rectilinear" for ax in fig.axes)  # no 3-D surfaces
    meshes = [c for ax in panels for c in ax.collections if hasattr(c, "get_array")
              and c.__class__.__name__ == "QuadMesh"]
    assert len(meshes) == 4 and len({(m.norm.vmin, m.norm.vmax) for m in meshes}) == 1
    allz = np.log10(np.concatenate([s.loss.ravel() for s in slices.values()]))
    assert meshes[0].norm.vmin == pytest.approx(allz.min())
    assert meshes[0].norm.vmax == pytest.approx(np.quantile(allz, 0.95))
    # orientation: loss[i, j] is at (alphas[i], betas[j]), drawn with x = alpha
    arr = np.asarray(meshes[0].get_array()).reshape(11, 9)
    np.testing.assert_allclose(arr, np.log10(slices["euclidean"].loss).T)
    for ax in panels:  # the trained model at the centre of every panel
        star = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
        assert len(star) == 1 and list(star[0].get_xydata()[0]) == [0, 0]
    # axis labels once per row / column, not repeated into neighbouring panels
    ylabels = [ax.get_ylabel() for ax in panels]
    assert ylabels == [r"$\beta$ (direction 2)", "", "", r"$\beta$ (direction 2)"]
    assert [ax.get_xlabel() for ax in panels][1:] == [r"$\alpha$ (direction 1)"] * 3
    cbar = [ax for ax in fig.axes if "log10 training loss" in ax.get_ylabel()]
    assert len(cbar) == 1 and "95th percentile" in cbar[0].get_ylabel()
    assert fig.get_suptitle() == "Manifold-aware slices"
    with pytest.raises(ValueError, match="no slices"):
        P.plot_slices({}, tmp_path / "x.png")


def test_curves_1d_and_bars(tmp_path, captured):
    t = np.linspace(-0.25, 1.25, 7)
    c = {"sphere": {"t": t, "geodesic_loss": 0.2 + t**2, "linear_loss": 0.3 + t**2,
                    "geodesic_acc": 0.9 - 0.1 * t, "linear_acc": 0.8 - 0.1 * t}}
    p = P.plot_curves_1d(c, tmp_path / "c.png", title="init (t=0) to trained (t=1)")
    assert P.image_variance(p) > 1e-3
    ax1, ax2 = captured[-1].axes
    assert "geodesic (on the manifold)" in _legend_texts(ax1)
    assert ax2.get_ylabel() == "accuracy (%)"
    np.testing.assert_allclose(ax2.get_lines()[0].get_ydata(), 100 * (0.9 - 0.1 * t))
    p = P.plot_bars({"sphere": [1.0, 2.0], "stiefel": [0.5, 3.0]}, ["conv1", "conv2"],
                    tmp_path / "b.png", ylabel="path length", log=True)
    assert P.image_variance(p) > 1e-3
