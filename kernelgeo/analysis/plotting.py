"""Figures of the analysis: landscapes (contour + surface, shared colour scale), 1-D curves,
per-layer bars.  Uses matplotlib's non-interactive ``Agg`` backend; every function writes a
PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

__all__ = ["plot_slices", "plot_curves_1d", "plot_bars", "image_variance"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` and release it (figures are never shown)."""
    path = Path(path)
    fig.savefig(path, dpi=80)
    _plt().close(fig)
    return path


def _log_loss(z: np.ndarray) -> np.ndarray:
    # losses span decades away from the minimum; log10 keeps the basin visible
    return np.log10(np.clip(z, 1e-8, None))


def plot_slices(slices: Mapping[str, object], path: str | Path, *, title: str = "",
                log: bool = True, vmax_quantile: float = 0.95) -> Path:
    """Contour (top row) and surface (bottom row) plot of several 2-D slices, one column each.

    All panels share one colour scale and z-range (the min over all slices to the
    ``vmax_quantile`` quantile of all values), so that sharper and flatter basins can be
    compared by eye.

    Parameters
    ----------
    slices : mapping
        ``{label: Slice2D}`` (anything with ``alphas, betas, loss``).
    path : str or Path
        Output PNG.
    log : bool
        Plot :math:`\\log_{10}` of the loss.
    """
    plt = _plt()
    from matplotlib import cm, colors

    labels = list(slices)
    zs = [(_log_loss(s.loss) if log else s.loss) for s in slices.values()]
    allz = np.concatenate([z.ravel() for z in zs])
    allz = allz[np.isfinite(allz)]
    vmin, vmax = float(allz.min()), float(np.quantile(allz, vmax_quantile))
    if vmax <= vmin:
        vmax = vmin + 1e-6
    norm = colors.Normalize(vmin=vmin, vmax=vmax)
    ncol = len(labels)
    fig = plt.figure(figsize=(3.6 * ncol, 7.0))
    levels = np.linspace(vmin, vmax, 21)
    for k, (label, z) in enumerate(zip(labels, zs)):
        s = slices[label]
        a, b = np.meshgrid(s.alphas, s.betas, indexing="ij")
        zc = np.clip(z, vmin, vmax)
        ax = fig.add_subplot(2, ncol, k + 1)
        ax.contourf(a, b, zc, levels=levels, cmap="viridis", norm=norm)
        ax.contour(a, b, zc, levels=levels[::2], colors="k", linewidths=0.3)
        ax.plot([0], [0], "r+", ms=8)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("alpha")
        ax.set_ylabel("beta")
        ax3 = fig.add_subplot(2, ncol, ncol + k + 1, projection="3d")
        ax3.plot_surface(a, b, zc, cmap="viridis", norm=norm, linewidth=0, antialiased=True)
        ax3.set_zlim(vmin, vmax)
        ax3.set_xlabel("alpha")
        ax3.set_ylabel("beta")
    fig.colorbar(cm.ScalarMappable(norm=norm, cmap="viridis"), ax=fig.axes, shrink=0.6,
                 label="log10 loss" if log else "loss")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_curves_1d(curves: Mapping[str, Mapping[str, np.ndarray]], path: str | Path, *,
                   title: str = "") -> Path:
    """Loss and accuracy along geodesic (solid) and straight line (dashed), per label."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for k, (label, c) in enumerate(curves.items()):
        col = f"C{k % 10}"
        ax1.plot(c["t"], c["geodesic_loss"], "-", color=col, label=f"{label} geodesic")
        ax1.plot(c["t"], c["linear_loss"], "--", color=col, label=f"{label} linear")
        ax2.plot(c["t"], c["geodesic_acc"], "-", color=col)
        ax2.plot(c["t"], c["linear_acc"], "--", color=col)
    ax1.set_yscale("log")
    ax1.set_xlabel("t")
    ax1.set_ylabel("loss")
    ax2.set_xlabel("t")
    ax2.set_ylabel("accuracy")
    ax1.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(fig, path)


def plot_bars(values: Mapping[str, Sequence[float]], labels: Sequence[str], path: str | Path,
              *, ylabel: str = "", title: str = "", log: bool = False) -> Path:
    """Grouped bars: one group per entry of ``labels`` (layers), one bar per key (geometry)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(labels) * max(1, len(values)) / 3), 3.6))
    w = 0.8 / max(1, len(values))
    x = np.arange(len(labels))
    for k, (name, ys) in enumerate(values.items()):
        ax.bar(x + k * w, np.asarray(ys, dtype=float), width=w, label=name)
    ax.set_xticks(x + 0.4 - w / 2)
    ax.set_xticklabels(labels, rotation=20, fontsize=7)
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save(fig, path)


def image_variance(path: str | Path) -> float:
    """Pixel variance of a written image (0 for a blank figure)."""
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    return float(np.asarray(img, dtype=float)[..., :3].var())
