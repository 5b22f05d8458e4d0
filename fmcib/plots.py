"""Plots (matplotlib; the process's backend is never switched): seed QC montages and t-SNE maps of features. KM curves: fmcib.survival.plot_km."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .files import atomic_path
from .preprocessing import contract_of

__all__ = ["qc_montage", "plot_tsne", "plot_saliency", "save_figure"]


def new_figure(**kwargs: Any) -> Any:
    """A matplotlib ``Figure`` outside pyplot: drawing it to a file neither needs nor changes the process's
    backend (a notebook keeps its own), and it is freed with its last reference."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def interactive_axes(figsize: tuple[float, float]) -> Any:
    """Axes of a new pyplot figure, for functions that return axes to draw on (shown in notebooks); pyplot
    picks its backend as usual and fmcib never switches it."""
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=figsize)[1]


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110, close: bool = True, **kwargs: Any) -> Path:
    """Write a matplotlib figure atomically, in the format its suffix names (default PNG); close it unless told not to."""
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, dpi=dpi, format=target.suffix.lstrip(".") or "png", **kwargs)
    if close and getattr(fig.canvas, "manager", None) is not None:  # a pyplot figure: release it from pyplot
        import matplotlib.pyplot as plt

        plt.close(fig)
    return target


def _page_paths(out: Path, pages: int) -> list[Path]:
    if pages == 1:
        return [out]
    return [out.with_name(f"{out.stem}_page{i + 1}{out.suffix}") for i in range(pages)]


def qc_montage(table: pd.DataFrame | str | os.PathLike, out: str | os.PathLike, coords: str = "lps",
               rows_per_page: int = 8, model: Any = None,
               window_hu: tuple[float, float] = (-1000.0, 400.0)) -> list[Path]:
    """Central axial, coronal and sagittal slices of every seed's patch, the patch centre marked.

    The marked centre voxel lies within one patch voxel (1 mm) of the seed on every axis. Views follow
    the radiological convention: patient's right on the image's left, anterior and superior up.

    Shows whether seeds land on lesions (the most common failure in practice). Each scan is read once.
    Rows that fail (missing file, seed outside, ...) get a panel with the reason instead of images.

    Parameters
    ----------
    table : DataFrame or path
        A seeds table as for :func:`fmcib.extract_features`.
    out : path
        PNG (or PDF/SVG) file; with more rows than ``rows_per_page``, pages go to ``<stem>_page<i><suffix>``.
    coords : {"lps", "ras", "voxel"}, default="lps"
    rows_per_page : int, default=8
    model : str, encoder or PreprocessConfig, optional
        Whose patch contract to show (see :func:`fmcib.preprocessing.contract_of`); default: the published
        fmcib encoder's.
    window_hu : (float, float), default=(-1000, 400)
        Display window in HU.

    Returns
    -------
    list of pathlib.Path
        The files written (atomically).
    """
    from .scans import ScanDataset, plan_scans
    from .tables import load_seed_table

    df, base_dir, name = load_seed_table(table)
    cfg = contract_of(model)
    dataset = ScanDataset(plan_scans(df, base_dir=base_dir, name=name), coords, cfg)
    panels: dict[int, dict[str, Any]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        for row, patch, pad in zip(item["rows"], item["patches"], item["padding"]):
            panels[int(row)] = {"patch": cfg.to_hu(patch[0]), "padding": float(pad)}
        for err in item["errors"]:
            panels[err.row] = {"error": err.message}
    cx, cy, cz = (n // 2 for n in cfg.size_xyz)  # the seed's voxel (see fmcib.preprocessing.patch_origin)
    rows = sorted(panels)
    pages = max(1, int(np.ceil(len(rows) / rows_per_page)))
    written = []
    for page, path in enumerate(_page_paths(Path(out), pages)):
        chunk = rows[page * rows_per_page:(page + 1) * rows_per_page]
        fig = new_figure(figsize=(7.5, 2.5 * max(1, len(chunk))))
        axes = fig.subplots(max(1, len(chunk)), 3, squeeze=False)
        for r, row in enumerate(chunk):
            panel = panels[row]
            label = f"row {row}: {Path(str(df.iloc[row].get('image_path', df.iloc[row].get('Image', '')))).name}"
            if "error" in panel:
                for ax in axes[r]:
                    ax.axis("off")
                message = axes[r, 0].text(0, 0.5, textwrap.fill(panel["error"], 110), fontsize=7, color="darkred",
                                          transform=axes[r, 0].transAxes, va="center")
                message.set_in_layout(False)  # it spans the row's three (empty) panels
                axes[r, 0].set_title(label, fontsize=8, loc="left")
                continue
            _show_views(axes[r], panel["patch"], window_hu)
            for ax, (u, v) in zip(axes[r], ((cx, cy), (cx, cz), (cy, cz))):  # axial, coronal, sagittal
                ax.plot([u], [v], marker="+", color="red", markersize=12, mew=1.5)
            pad = f", {panel['padding']:.0%} outside scan" if panel["padding"] else ""
            axes[r, 0].set_title(f"{label}{pad}", fontsize=8, loc="left")
        fig.tight_layout()
        written.append(save_figure(fig, path))
    return written


def _central_views(volume: np.ndarray) -> list[tuple[str, np.ndarray, str, str, str]]:
    """Central axial, coronal and sagittal slices of a (z, y, x) volume with LPS-increasing axes.

    Each view: name, slice, x-axis label, y-axis label and imshow ``origin``, chosen for the
    radiological convention (patient's right on the image's left, anterior and superior up).
    """
    c = [n // 2 for n in volume.shape]
    return [("axial", volume[c[0]], "R - L", "P - A", "upper"),
            ("coronal", volume[:, c[1], :], "R - L", "I - S", "lower"),
            ("sagittal", volume[:, :, c[2]], "A - P", "I - S", "lower")]


def _show_views(axes: Any, volume: np.ndarray, window_hu: tuple[float, float]) -> None:
    for ax, (name, img, xlab, ylab, origin) in zip(axes, _central_views(volume)):
        ax.imshow(img, cmap="gray", vmin=window_hu[0], vmax=window_hu[1], origin=origin)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(f"{name}: {xlab}", fontsize=7)
        ax.set_ylabel(ylab, fontsize=7)


def plot_saliency(patch_hu: np.ndarray, saliency: np.ndarray, out: str | os.PathLike,
                  window_hu: tuple[float, float] = (-1000.0, 400.0), title: str = "") -> Path:
    """Central axial, coronal and sagittal slices of a patch (grey) with its saliency map overlaid.

    The map is shown from its 50th to its 99.5th percentile (over the whole patch), transparent below.
    Both arrays have axes (z, y, x) as :func:`fmcib.preprocessing.extract_patch` returns them. The
    figure is written atomically; returns its path.
    """
    lo, hi = np.percentile(saliency, [50.0, 99.5])
    hi = hi if hi > lo else lo + 1e-12
    fig = new_figure(figsize=(8.5, 3.0))
    axes = fig.subplots(1, 3, squeeze=False)
    _show_views(axes[0], patch_hu, window_hu)
    for ax, (_, sal, _, _, origin) in zip(axes[0], _central_views(saliency)):
        shown = np.ma.masked_less(np.clip((sal - lo) / (hi - lo), 0, 1), 0.05)
        mappable = ax.imshow(shown, cmap="inferno", vmin=0, vmax=1, alpha=0.6, origin=origin)
    fig.colorbar(mappable, ax=axes[0].tolist(), fraction=0.02, label="saliency (rel.)")
    if title:
        fig.suptitle(title, fontsize=8, x=0.02, ha="left")
    return save_figure(fig, out)


def plot_tsne(features: pd.DataFrame | np.ndarray, labels: Any, ax: Any = None, perplexity: float = 30.0,
              contours: bool = True, random_state: int | None = 0) -> Any:
    """t-SNE map (scikit-learn) of feature vectors coloured by ``labels``, with per-class density contours.

    Rows with missing features are dropped with their labels. Returns the axes.
    """
    from scipy.stats import gaussian_kde
    from sklearn.manifold import TSNE
    from sklearn.preprocessing import StandardScaler

    from .probes import drop_missing, feature_matrix

    X = feature_matrix(features) if isinstance(features, pd.DataFrame) else np.asarray(features, dtype=np.float64)
    X, y, _ = drop_missing(X, np.asarray(labels))
    X = StandardScaler().fit_transform(np.asarray(X, dtype=np.float64))
    perplexity = min(float(perplexity), max(1.0, (len(X) - 1) / 3))
    emb = TSNE(n_components=2, perplexity=perplexity, random_state=random_state, init="pca").fit_transform(X)
    if ax is None:
        ax = interactive_axes((5.5, 5))
    gx, gy = np.meshgrid(np.linspace(*np.percentile(emb[:, 0], [0, 100]), 80),
                         np.linspace(*np.percentile(emb[:, 1], [0, 100]), 80))
    for k, cls in enumerate(pd.unique(y)):
        pts = emb[y == cls]
        colour = f"C{k % 10}"
        ax.scatter(pts[:, 0], pts[:, 1], s=12, color=colour, label=f"{cls} (n={len(pts)})", alpha=0.8)
        if contours and len(pts) > 3:
            try:
                dens = gaussian_kde(pts.T)(np.vstack([gx.ravel(), gy.ravel()])).reshape(gx.shape)
                ax.contour(gx, gy, dens, levels=4, colors=colour, linewidths=0.8, alpha=0.6)
            except np.linalg.LinAlgError:  # points on a line: no density
                pass
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("t-SNE 1")
    ax.set_ylabel("t-SNE 2")
    ax.legend(fontsize=7, frameon=False)
    return ax
