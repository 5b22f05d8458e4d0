"""Plots (matplotlib, headless): seed QC montages and t-SNE maps of features. KM curves: fmcib.survival.plot_km."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .io import atomic_path, read_table
from .preprocessing import PreprocessConfig

__all__ = ["qc_montage", "plot_tsne"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _page_paths(out: Path, pages: int) -> list[Path]:
    if pages == 1:
        return [out]
    return [out.with_name(f"{out.stem}_page{i + 1}{out.suffix}") for i in range(pages)]


def qc_montage(table: pd.DataFrame | str | os.PathLike, out: str | os.PathLike, coords: str = "lps",
               rows_per_page: int = 8, config: PreprocessConfig | None = None,
               window_hu: tuple[float, float] = (-1000.0, 400.0)) -> list[Path]:
    """Central axial, coronal and sagittal slices of every seed's patch, the patch centre marked.

    The marked centre voxel lies within one patch voxel (1 mm) of the seed on every axis.

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
    config : PreprocessConfig, optional
        Patch contract (default: the 50 mm, 1 mm patch of the default model).
    window_hu : (float, float), default=(-1000, 400)
        Display window in HU.

    Returns
    -------
    list of pathlib.Path
        The files written (atomically).
    """
    from .extract import ScanDataset, plan_scans

    base_dir = Path(table).parent if not isinstance(table, pd.DataFrame) else None
    df = read_table(table) if not isinstance(table, pd.DataFrame) else table
    cfg = config or PreprocessConfig()
    dataset = ScanDataset(plan_scans(df, base_dir=base_dir), coords, cfg)
    panels: dict[int, dict[str, Any]] = {}
    for i in range(len(dataset)):
        item = dataset[i]
        for row, patch, pad in zip(item["rows"], item["patches"], item["padding"]):
            panels[int(row)] = {"patch": patch[0] * cfg.hu_scale - cfg.hu_offset, "padding": float(pad)}
        for err in item["errors"]:
            panels[err.row] = {"error": err.message}
    plt = _pyplot()
    n, c = int(cfg.patch_size), int(cfg.patch_size) // 2
    rows = sorted(panels)
    pages = max(1, int(np.ceil(len(rows) / rows_per_page)))
    written = []
    for page, path in enumerate(_page_paths(Path(out), pages)):
        chunk = rows[page * rows_per_page:(page + 1) * rows_per_page]
        fig, axes = plt.subplots(max(1, len(chunk)), 3, figsize=(7.5, 2.5 * max(1, len(chunk))), squeeze=False)
        for r, row in enumerate(chunk):
            panel = panels[row]
            label = f"row {row}: {Path(str(df.iloc[row].get('image_path', df.iloc[row].get('Image', '')))).name}"
            if "error" in panel:
                for ax in axes[r]:
                    ax.axis("off")
                axes[r, 0].text(0, 0.5, panel["error"], wrap=True, fontsize=7, color="darkred",
                                transform=axes[r, 0].transAxes)
                axes[r, 0].set_title(label, fontsize=8, loc="left")
                continue
            vol = panel["patch"]  # (z, y, x), LPS-increasing axes
            views = [("axial", vol[c], "x", "y"), ("coronal", vol[:, c, :], "x", "z"),
                     ("sagittal", vol[:, :, c], "y", "z")]
            for ax, (name, img, xlab, ylab) in zip(axes[r], views):
                ax.imshow(img, cmap="gray", vmin=window_hu[0], vmax=window_hu[1], origin="lower")
                ax.plot([c], [c], marker="+", color="red", markersize=12, mew=1.5)
                ax.set_title(name if r == 0 else "", fontsize=8)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_xlabel(xlab, fontsize=7)
                ax.set_ylabel(ylab, fontsize=7)
            pad = f", {panel['padding']:.0%} outside scan" if panel["padding"] else ""
            axes[r, 0].set_title(f"{label}{pad}", fontsize=8, loc="left")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format=path.suffix.lstrip(".") or "png")
        plt.close(fig)
        written.append(path)
    return written


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
    plt = _pyplot()
    if ax is None:
        _, ax = plt.subplots(figsize=(5.5, 5))
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
