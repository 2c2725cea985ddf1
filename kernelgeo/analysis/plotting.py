"""Figures of the analysis and of geometry comparisons.

- :func:`plot_error_curves` / :func:`plot_seed_curves`: one curve per geometry over epochs,
  mean over seeds with a band (min-max or mean +- one standard deviation, named in the legend)
  and the number of seeds; log-scaled y axis when the values span a decade or more.
- :func:`plot_slices`: 2-D loss landscapes as heat maps with contour lines on one shared colour
  scale, the trained model marked at the centre.
- :func:`plot_curves_1d`, :func:`plot_bars`: interpolation curves and per-layer bars.

Matplotlib's non-interactive ``Agg`` backend is used; every ``plot_*`` function writes a PNG
and returns its path; the ``draw_*`` functions draw into a given axes (for tests and
multi-panel figures).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_error_curves", "plot_seed_curves", "draw_seed_curves", "seed_runs",
           "join_title", "plot_slices", "plot_curves_1d", "plot_bars", "image_variance"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` and release it (figures are never shown)."""
    path = Path(path)
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _log_loss(z: np.ndarray) -> np.ndarray:
    # losses span decades away from the minimum; log10 keeps the basin visible
    return np.log10(np.clip(z, 1e-8, None))


def join_title(title: str = "", dataset: str = "") -> str:
    """``"title — dataset"``, without repeating a data set the title already names.

    The data set counts as named when its label without a parenthesised remark (``"UCI
    digits"`` for ``"UCI digits (scikit-learn, 8x8)"``) occurs in the title, ignoring case.

    >>> join_title("kernel geometries on UCI digits", "UCI digits (scikit-learn, 8x8)")
    'kernel geometries on UCI digits'
    >>> join_title("ResNet-20", "CIFAR-10 (JPEG q75 copy)")
    'ResNet-20 — CIFAR-10 (JPEG q75 copy)'
    """
    title, dataset = title.strip(), dataset.strip()
    if not dataset:
        return title
    stem = dataset.split("(")[0].strip() or dataset
    if not title:
        return dataset
    if stem.lower() in title.lower():
        return title
    return f"{title} — {dataset}"


def _plain_log_ticks(ax) -> None:
    """Label a log y axis with plain numbers (0.5, 2, 10) rather than powers of ten."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _):
        lo, hi = ax.get_ylim()
        # within about a decade every minor tick needs its number, else 2 and 5 suffice
        few = lo > 0 and hi / lo < 8
        return f"{v:g}" if v > 0 and (few or f"{v:.0e}"[0] in "25") else ""

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(minor))
    ax.tick_params(axis="y", which="minor", labelsize=7)


# -------------------------------------------------------------------------- seed curves
def seed_runs(summaries: Sequence[Mapping], geometries: Sequence[str] | None = None, *,
              key: str = "test_error") -> dict[str, list[list[float]]]:
    """``{geometry: [per-seed list of per-epoch values]}`` from training summaries.

    Parameters
    ----------
    summaries : sequence of dict
        Summaries as returned by :func:`kernelgeo.training.train` (``geometry`` and
        ``history``, a list of per-epoch metric dicts).
    geometries : sequence of str, optional
        Order of the geometries (default: order of first appearance).
    key : str
        Metric of the history rows.
    """
    order = list(geometries) if geometries is not None else list(
        dict.fromkeys(s["geometry"] for s in summaries))
    out: dict[str, list[list[float]]] = {}
    for g in order:
        runs = [[float(h[key]) for h in s["history"]] for s in summaries
                if s["geometry"] == g and s.get("history")]
        if runs:
            out[g] = runs
    return out


def _stack(name: str, runs: Sequence[Sequence[float]]) -> np.ndarray:
    runs = [np.asarray(r, dtype=float).ravel() for r in runs]
    if not runs or min(len(r) for r in runs) == 0:
        raise ValueError(f"{name!r}: no values to plot (need at least one seed with one epoch)")
    n = min(len(r) for r in runs)
    # seeds interrupted at different epochs: compare over the epochs all of them reached
    return np.stack([r[:n] for r in runs])


def _choose_scale(values: np.ndarray, yscale: str) -> str:
    if yscale != "auto":
        if yscale not in ("linear", "log", "symlog"):
            raise ValueError(f"yscale must be 'auto', 'linear', 'log' or 'symlog', got "
                             f"{yscale!r}")
        return yscale
    v = values[np.isfinite(values)]
    pos = v[v > 0]
    if pos.size == 0 or (v < 0).any():
        return "linear"
    # a decade or more: small differences near the bottom (0-5 % error) would be squashed
    if pos.max() / pos.min() < 10:
        return "linear"
    return "symlog" if (v == 0).any() else "log"


def draw_seed_curves(ax, runs: Mapping[str, Sequence[Sequence[float]]], *,
                     band: str = "minmax", scale: float = 1.0, yscale: str = "auto",
                     ylabel: str = "", epochs_start: int = 1) -> dict:
    r"""Draw mean-over-seeds curves with spread bands into ``ax``.

    Parameters
    ----------
    ax : matplotlib.axes.Axes
    runs : mapping
        ``{label: [per-seed sequence of per-epoch values]}``; seeds are cut to the shortest.
    band : {"minmax", "std"}
        Shaded band: minimum to maximum over seeds, or mean :math:`\pm` one sample standard
        deviation (``ddof=1``; cut at 0 for non-negative values).  A single seed has no band.
    scale : float
        Multiplies the values (100 for percentages).
    yscale : {"auto", "linear", "log", "symlog"}
        ``auto``: logarithmic when the positive values span a factor of 10 or more
        (``symlog``, linear below the smallest positive value's decade, if some are 0).
    ylabel : str
        Axis label; the scale is appended when not linear.
    epochs_start : int
        Epoch number of the first value.

    Returns
    -------
    dict
        ``yscale``, ``band`` (the legend text of the band) and per label ``mean``, ``lo``,
        ``hi`` arrays and ``n`` seeds under ``curves``.
    """
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator, SymmetricalLogLocator

    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    if not runs:
        raise ValueError("no runs to plot")
    curves, allv = {}, []
    for k, (label, rs) in enumerate(runs.items()):
        a = _stack(label, rs) * scale
        mean = a.mean(0)
        if band == "minmax":
            lo, hi = a.min(0), a.max(0)
        else:
            sd = a.std(0, ddof=1) if len(a) > 1 else np.zeros_like(mean)
            lo, hi = mean - sd, mean + sd
            if (a >= 0).all():
                # a band below 0 for a non-negative quantity (error, loss) would mean nothing
                lo = np.maximum(lo, 0.0)
        x = np.arange(epochs_start, epochs_start + a.shape[1])
        col = f"C{k % 10}"
        n = len(a)
        ax.plot(x, mean, "-", color=col, lw=1.6,
                marker="o" if len(x) < 12 else None, ms=3,
                label=f"{label} (n = {n} seed{'s' if n != 1 else ''})")
        if n > 1:
            ax.fill_between(x, lo, hi, color=col, alpha=0.18, lw=0)
        curves[label] = {"mean": mean, "lo": lo, "hi": hi, "n": n, "epochs": x}
        allv.append(np.concatenate([mean, lo, hi]))
    allv = np.concatenate(allv)
    ys = _choose_scale(allv, yscale)
    band_text = ("band: min–max over seeds" if band == "minmax"
                 else "band: mean ± 1 s.d. over seeds")
    if ys == "symlog":
        pos = allv[allv > 0]
        lin = 10.0 ** np.floor(np.log10(pos.min())) if pos.size else 1.0
        ax.set_yscale("symlog", linthresh=lin, linscale=0.5)
        ax.yaxis.set_minor_locator(SymmetricalLogLocator(base=10, linthresh=lin,
                                                         subs=np.arange(2, 10)))
        ax.set_ylim(bottom=0)
    elif ys == "log":
        ax.set_yscale("log")
    if ys in ("log", "symlog"):
        _plain_log_ticks(ax)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    suffix = {"linear": "", "log": ", log scale",
              "symlog": f", log scale above {lin:g}" if ys == "symlog" else ""}[ys]
    ax.set_ylabel(f"{ylabel}{suffix}" if ylabel else suffix.lstrip(", "))
    ax.grid(alpha=0.3, which="major")
    ax.grid(alpha=0.1, which="minor")
    handles, labels = ax.get_legend_handles_labels()
    if any(c["n"] > 1 for c in curves.values()):
        handles.append(Patch(facecolor="0.5", alpha=0.3, label=band_text))
        labels.append(band_text)
    ax.legend(handles, labels, fontsize=8)
    return {"yscale": ys, "band": band_text, "curves": curves}


def plot_seed_curves(runs: Mapping[str, Sequence[Sequence[float]]], path: str | Path, *,
                     ylabel: str, title: str = "", dataset: str = "", band: str = "minmax",
                     scale: float = 1.0, yscale: str = "auto") -> Path:
    """One panel of :func:`draw_seed_curves` written to ``path`` (PNG); returns the path."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), layout="constrained")
    draw_seed_curves(ax, runs, band=band, scale=scale, yscale=yscale, ylabel=ylabel)
    t = join_title(title, dataset)
    if t:
        ax.set_title(t, fontsize=10)
    return _save(fig, path)


def plot_error_curves(runs: Mapping[str, Sequence[Sequence[float]]], path: str | Path, *,
                      title: str = "", dataset: str = "", band: str = "minmax",
                      yscale: str = "auto", what: str = "test error") -> Path:
    """Error rate over epochs per geometry: mean over seeds, spread band, ``n`` seeds.

    Parameters
    ----------
    runs : mapping
        ``{geometry: [per-seed list of per-epoch error rates in [0, 1]]}`` (e.g. from
        :func:`seed_runs`); drawn in percent.
    path : str or Path
        Output PNG.
    title, dataset : str
        Joined by :func:`join_title` (the data set is not repeated).
    band : {"minmax", "std"}
        See :func:`draw_seed_curves`; the legend says which.
    yscale : {"auto", "linear", "log", "symlog"}
        ``auto`` uses a log axis when the errors span a decade or more (e.g. 60 % at epoch 1
        down to 2 %), so that differences of a fraction of a percent stay visible.
    what : str
        What the values are (the axis label is ``"<what> (%)"``).

    Returns
    -------
    Path

    Examples
    --------
    >>> import tempfile, pathlib
    >>> runs = {"sphere": [[0.5, 0.1, 0.03], [0.6, 0.12, 0.02]], "euclidean": [[0.5, 0.2, 0.1]]}
    >>> p = plot_error_curves(runs, pathlib.Path(tempfile.mkdtemp()) / "error.png")
    >>> p.name
    'error.png'
    """
    for g, rs in runs.items():
        a = _stack(g, rs)
        if np.nanmin(a) < 0 or np.nanmax(a) > 1:
            raise ValueError(f"{g!r}: error rates must lie in [0, 1] (fractions, not percent); "
                             f"got values in [{np.nanmin(a):g}, {np.nanmax(a):g}]")
    return plot_seed_curves(runs, path, ylabel=f"{what} (%)", title=title, dataset=dataset,
                            band=band, scale=100.0, yscale=yscale)


# ---------------------------------------------------------------------------- landscapes
def plot_slices(slices: Mapping[str, object], path: str | Path, *, title: str = "",
                log: bool = True, vmax_quantile: float = 0.95, value: str = "loss",
                ncols: int | None = None) -> Path:
    r"""Heat maps with contour lines of several 2-D slices, one panel each, one colour scale.

    All panels share one colour scale (the minimum over all slices to the ``vmax_quantile``
    quantile of all values; higher values are drawn in the top colour), so that sharper and
    flatter basins can be compared by eye.  The trained model, at the centre
    :math:`(\alpha, \beta) = (0, 0)` of every slice, is marked.

    Parameters
    ----------
    slices : mapping
        ``{label: Slice2D}`` (anything with ``alphas, betas, loss``).
    path : str or Path
        Output PNG.
    title : str
        Figure title.
    log : bool
        Plot :math:`\log_{10}` of the values.
    vmax_quantile : float
        Top of the colour scale as a quantile of all values.
    value : str
        What ``loss`` holds, for the colour bar (e.g. ``"training loss"``).
    ncols : int, optional
        Panels per row (default: up to 3).
    """
    plt = _plt()
    from matplotlib import cm, colors

    if not slices:
        raise ValueError("no slices to plot")
    labels = list(slices)
    zs = [(_log_loss(s.loss) if log else np.asarray(s.loss, float)) for s in slices.values()]
    allz = np.concatenate([z.ravel() for z in zs])
    allz = allz[np.isfinite(allz)]
    if allz.size == 0:
        raise ValueError("every slice value is NaN or infinite; nothing to plot")
    vmin, vmax = float(allz.min()), float(np.quantile(allz, vmax_quantile))
    if vmax <= vmin:
        vmax = vmin + 1e-6
    norm = colors.Normalize(vmin=vmin, vmax=vmax)
    levels = np.linspace(vmin, vmax, 11)
    n = len(labels)
    ncols = ncols or min(3, n)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.3 * ncols + 1.0, 3.1 * nrows + 0.5),
                             squeeze=False, sharex=True, sharey=True, layout="constrained")
    for k, ax in enumerate(axes.flat):
        if k >= n:
            ax.set_visible(False)
            continue
        s, z = slices[labels[k]], zs[k]
        al, be = np.asarray(s.alphas, float), np.asarray(s.betas, float)
        # loss[i, j] is at (alphas[i], betas[j]): rows are alpha, so transpose for x = alpha
        ax.pcolormesh(al, be, z.T, cmap="viridis", norm=norm, shading="nearest")
        ax.contour(al, be, np.clip(z, vmin, vmax).T, levels=levels, colors="w",
                   linewidths=0.5, linestyles="solid", alpha=0.7)
        ax.plot([0], [0], marker="*", ms=11, color="#d62728", mec="w", mew=0.8, ls="none",
                label="trained model")
        ax.set_title(labels[k], fontsize=9)
        ax.set_aspect("equal")
        if k % ncols == 0:
            ax.set_ylabel(r"$\beta$ (direction 2)")
        if k // ncols == nrows - 1 or k + ncols >= n:
            ax.set_xlabel(r"$\alpha$ (direction 1)")
            ax.xaxis.set_tick_params(labelbottom=True)
    axes.flat[0].legend(loc="upper right", fontsize=7, framealpha=0.7)
    q = f"{100 * vmax_quantile:g}th percentile" if vmax_quantile < 1 else "maximum"
    # values above the cap are drawn in the top colour
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes, shrink=0.85,
                 label=(f"log10 {value}" if log else value) + f", capped at the {q}")
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_curves_1d(curves: Mapping[str, Mapping[str, np.ndarray]], path: str | Path, *,
                   title: str = "", value: str = "loss") -> Path:
    """Loss and accuracy along the geodesic (solid) and the straight line (dashed), per label.

    ``t = 0`` and ``t = 1`` are the two end points (marked by vertical lines).
    """
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), layout="constrained")
    for k, (label, c) in enumerate(curves.items()):
        col = f"C{k % 10}"
        ax1.plot(c["t"], c["geodesic_loss"], "-", color=col, label=f"{label}")
        ax1.plot(c["t"], c["linear_loss"], "--", color=col)
        ax2.plot(c["t"], 100 * np.asarray(c["geodesic_acc"], float), "-", color=col)
        ax2.plot(c["t"], 100 * np.asarray(c["linear_acc"], float), "--", color=col)
    for ax in (ax1, ax2):
        for t in (0, 1):
            ax.axvline(t, color="0.6", lw=0.8, ls=":")
        ax.set_xlabel("interpolation parameter t")
        ax.grid(alpha=0.3)
    ax1.set_yscale("log")
    _plain_log_ticks(ax1)
    ax1.set_ylabel(f"{value}, log scale")
    ax2.set_ylabel("accuracy (%)")
    from matplotlib.lines import Line2D

    h, lab = ax1.get_legend_handles_labels()
    h += [Line2D([], [], color="0.3", ls="-"), Line2D([], [], color="0.3", ls="--")]
    lab += ["geodesic (on the manifold)", "straight line"]
    ax1.legend(h, lab, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_bars(values: Mapping[str, Sequence[float]], labels: Sequence[str], path: str | Path,
              *, ylabel: str = "", title: str = "", log: bool = False) -> Path:
    """Grouped bars: one group per entry of ``labels`` (layers), one bar per key (geometry)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels) * max(1, len(values)) / 3)
                                    + 1.5, 3.6), layout="constrained")
    w = 0.8 / max(1, len(values))
    x = np.arange(len(labels))
    for k, (name, ys) in enumerate(values.items()):
        ax.bar(x + k * w, np.asarray(ys, dtype=float), width=w, label=name)
    ax.set_xticks(x + 0.4 - w / 2)
    ax.set_xticklabels(labels, rotation=20, fontsize=7)
    if log:
        ax.set_yscale("log")
        _plain_log_ticks(ax)
    ax.set_ylabel(ylabel)
    # outside the axes: bars reach any height, a legend inside would hide some
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def image_variance(path: str | Path) -> float:
    """Pixel variance of a written image (0 for a blank figure)."""
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    return float(np.asarray(img, dtype=float)[..., :3].var())
