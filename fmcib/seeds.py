"""Seed points: coordinate systems (LPS, RAS, voxel), bounds checks and seeds from label masks."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .exceptions import FmcibError, SeedError, TableError
from .io import ImageGeometry, describe_image, open_scan, read_image

__all__ = ["COORDINATE_SYSTEMS", "to_lps", "check_inside", "mask_centroid", "seeds_from_mask", "seeds_from_table",
           "grid_differences"]

logger = logging.getLogger(__name__)

CoordinateSystem = Literal["lps", "ras", "voxel"]
COORDINATE_SYSTEMS: tuple[str, ...] = ("lps", "ras", "voxel")


def _validate_coords(coords: str) -> str:
    key = str(coords).lower()
    if key not in COORDINATE_SYSTEMS:
        raise ValueError(f"coords must be one of {COORDINATE_SYSTEMS}, got {coords!r}")
    return key


def to_lps(point: Sequence[float], coords: CoordinateSystem | str,
           image: sitk.Image | ImageGeometry | None = None) -> np.ndarray:
    """Convert a seed to LPS physical millimetres (the convention of ITK, SimpleITK and DICOM).

    Parameters
    ----------
    point : sequence of 3 floats
        ``(x, y, z)`` in the system named by ``coords``.
    coords : {"lps", "ras", "voxel"}
        ``"lps"``: physical mm, x to the patient's Left, y Posterior, z Superior (DICOM/ITK).
        ``"ras"``: physical mm, x Right, y Anterior (NIfTI/nibabel/3D Slicer); x and y are negated.
        ``"voxel"``: zero-based continuous voxel index ``(i, j, k)`` in SimpleITK order (i along the
        first image axis), converted through the image's origin, spacing and direction.
    image : SimpleITK.Image or ImageGeometry, optional
        Required for ``coords="voxel"``.

    Returns
    -------
    numpy.ndarray of shape (3,)
        The seed in LPS mm.

    Raises
    ------
    SeedError
        Not three finite numbers.
    """
    key = _validate_coords(coords)
    try:
        p = np.asarray([float(v) for v in point], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise SeedError(f"seed {tuple(point)!r} is not three numbers") from exc
    if p.shape != (3,):
        raise SeedError(f"seed must have 3 coordinates (x, y, z), got {p.size}")
    if not np.all(np.isfinite(p)):
        raise SeedError(f"seed ({', '.join(f'{v:g}' for v in p)}) has a missing (NaN) or infinite coordinate")
    if key == "ras":
        return p * np.array([-1.0, -1.0, 1.0])
    if key == "voxel":
        if image is None:
            raise ValueError("coords='voxel' needs the image to convert indices to physical points")
        return np.asarray(image.TransformContinuousIndexToPhysicalPoint(p.tolist()), dtype=np.float64)
    return p


def continuous_index(image: sitk.Image | ImageGeometry, points_lps: np.ndarray) -> np.ndarray:
    """Continuous voxel indices (SimpleITK order) of LPS points, vectorised: ``(N, 3) -> (N, 3)``."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    origin = np.asarray(image.GetOrigin(), dtype=np.float64)
    index_to_physical = direction * spacing  # columns scaled: physical = origin + D @ diag(s) @ index
    return np.linalg.solve(index_to_physical, (np.atleast_2d(points_lps) - origin).T).T


def inside_mask(image: sitk.Image | ImageGeometry, points_lps: np.ndarray) -> np.ndarray:
    """True for points inside the image's physical extent (voxel edges, i.e. index in [-0.5, n-0.5])."""
    idx = continuous_index(image, points_lps)
    size = np.asarray(image.GetSize())
    return np.all((idx >= -0.5) & (idx <= size - 0.5), axis=1)


def check_inside(image: sitk.Image | ImageGeometry, seed_lps: np.ndarray) -> None:
    """Raise :class:`SeedError` when an LPS seed lies outside the image's physical extent."""
    if not inside_mask(image, np.asarray(seed_lps))[0]:
        x, y, z = seed_lps
        where = f"seed (x={x:.2f}, y={y:.2f}, z={z:.2f}) mm LPS lies outside the image ({describe_image(image)}); "
        raise SeedError(where + "seeds are LPS physical mm unless coords='ras' or 'voxel' is given",
                        cli=where + "seeds are LPS physical mm unless --coords ras or --coords voxel is given")


def grid_differences(a: sitk.Image | ImageGeometry, b: sitk.Image | ImageGeometry) -> list[str]:
    """How two voxel grids differ (size, spacing, origin to 1% of a voxel, direction); empty when they match."""
    ga, gb = ImageGeometry.of(a), ImageGeometry.of(b)
    diffs = []
    if tuple(ga.GetSize()) != tuple(gb.GetSize()):
        diffs.append(f"size {tuple(ga.GetSize())} vs {tuple(gb.GetSize())}")
    if not np.allclose(ga.GetSpacing(), gb.GetSpacing(), rtol=1e-4, atol=0):
        diffs.append(f"spacing {np.round(ga.GetSpacing(), 4).tolist()} vs {np.round(gb.GetSpacing(), 4).tolist()}")
    if not np.allclose(ga.GetOrigin(), gb.GetOrigin(), rtol=0, atol=0.01 * min(min(ga.GetSpacing()), min(gb.GetSpacing()))):
        diffs.append(f"origin {np.round(ga.GetOrigin(), 3).tolist()} vs {np.round(gb.GetOrigin(), 3).tolist()}")
    if not np.allclose(ga.GetDirection(), gb.GetDirection(), rtol=0, atol=1e-4):
        diffs.append("direction")
    return diffs


def mask_centroid(mask: sitk.Image, label: int = 1) -> np.ndarray:
    """Centre of mass (LPS mm) of the voxels of ``mask`` equal to ``label``.

    Raises
    ------
    SeedError
        The mask holds no voxel with that label.
    """
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(_as_label_image(mask))
    if not stats.HasLabel(int(label)):
        present = [int(v) for v in stats.GetLabels()]
        raise SeedError(f"mask has no voxel with label {label} (labels present: {present or 'none'})")
    return np.asarray(stats.GetCentroid(int(label)), dtype=np.float64)


def _as_label_image(mask: sitk.Image) -> sitk.Image:
    pixel = mask.GetPixelID()
    if pixel in (sitk.sitkFloat32, sitk.sitkFloat64):
        mask = sitk.Cast(sitk.Round(mask), sitk.sitkInt32)
    elif pixel not in (sitk.sitkUInt8, sitk.sitkUInt16, sitk.sitkUInt32, sitk.sitkUInt64, sitk.sitkInt8,
                       sitk.sitkInt16, sitk.sitkInt32, sitk.sitkInt64):
        mask = sitk.Cast(mask, sitk.sitkInt32)
    return mask


def seeds_from_mask(
    mask: str | os.PathLike | sitk.Image,
    image: str | os.PathLike | None = None,
    label: int | None = 1,
    components: bool = False,
    fully_connected: bool = False,
) -> pd.DataFrame:
    """Seed points (LPS mm) from a label image: one row per label, or per connected component.

    Parameters
    ----------
    mask : path or SimpleITK.Image
        Label image (NIfTI, NRRD, ...). Voxels equal to ``label`` form the lesion.
    image : path, optional
        CT the seeds belong to; written to the ``image_path`` column (default: the mask path). When it
        exists, its header is read: every seed must lie inside it, and a mask on another voxel grid is
        logged as a warning (an image not found is logged too, and not checked).
    label : int or None, default=1
        Label value to use; ``None`` takes every non-zero label (one row each).
    components : bool, default=False
        Split each label into connected components, one row per component, so a scan with several
        lesions drawn with the same label gives several seeds.
    fully_connected : bool, default=False
        Component connectivity: faces only (6-connected) or faces, edges and corners (26-connected).

    Returns
    -------
    pandas.DataFrame
        Columns ``image_path, coordX, coordY, coordZ, label, component, volume_ml, mask_path``;
        ``component`` is 0 when ``components=False``.
    """
    mask_image = read_image(mask)
    mask_name = str(mask) if not isinstance(mask, sitk.Image) else ""
    scan = None  # header only: the seeds must lie inside it
    if image is not None and Path(image).exists():
        scan = open_scan(image)
    elif image is not None:
        logger.warning("'%s': image '%s' not found from here; its seeds are not checked against it", mask_name,
                       image)
    if scan is not None and (diffs := grid_differences(mask_image, scan.geometry)):
        logger.warning("'%s': mask grid differs from image '%s' (%s); centres of mass are computed in physical "
                       "space, which is right only if both are in the same patient space", mask_name or "<image>",
                       image, "; ".join(diffs))
    label_image = _as_label_image(mask_image)
    stats = sitk.LabelShapeStatisticsImageFilter()
    stats.Execute(label_image)
    present = [int(v) for v in stats.GetLabels()]
    labels = present if label is None else [int(label)]
    if label is not None and int(label) not in present:
        raise SeedError(f"'{mask_name or '<image>'}': mask has no voxel with label {label} (labels present: {present or 'none'})")
    rows = []
    for lab in labels:
        if components:
            binary = sitk.BinaryThreshold(label_image, lab, lab, 1, 0)
            cc = sitk.ConnectedComponent(binary, fully_connected)
            cc = sitk.RelabelComponent(cc)  # components ordered by size, largest first
            part_stats = sitk.LabelShapeStatisticsImageFilter()
            part_stats.Execute(cc)
            parts = [(int(c), part_stats) for c in part_stats.GetLabels()]
        else:
            parts = [(lab, stats)]
        for comp_label, st in parts:
            x, y, z = st.GetCentroid(comp_label)
            if scan is not None and not inside_mask(scan.geometry, np.array([[x, y, z]]))[0]:
                raise SeedError(
                    f"'{mask_name or '<image>'}': centre of mass (x={x:.2f}, y={y:.2f}, z={z:.2f}) mm LPS of label "
                    f"{lab} lies outside the image '{image}' ({describe_image(scan.geometry)}): the mask does not "
                    "belong to this image, or one of them lost its geometry (origin, direction)")
            rows.append(
                {
                    "image_path": str(image) if image is not None else mask_name,
                    "coordX": x,
                    "coordY": y,
                    "coordZ": z,
                    "label": lab,
                    "component": comp_label if components else 0,
                    "volume_ml": st.GetPhysicalSize(comp_label) / 1000.0,
                    "mask_path": mask_name,
                }
            )
    return pd.DataFrame(rows, columns=["image_path", "coordX", "coordY", "coordZ", "label", "component",
                                       "volume_ml", "mask_path"])


def seeds_from_table(
    table: str | os.PathLike | pd.DataFrame,
    label: int | None = None,
    all_labels: bool = False,
    components: bool = False,
) -> tuple[pd.DataFrame, list[str]]:
    """Seeds for every row of a pyradiomics-style table (``Image``, ``Mask``[, ``Label``]).

    Each row's mask gives its seed(s) as :func:`seeds_from_mask` does; the row's other columns (patient or
    lesion ids) are carried to its seeds. Relative paths are taken from the table's folder.

    Parameters
    ----------
    table : path or pandas.DataFrame
        CSV/Parquet or DataFrame with ``Image`` and ``Mask`` columns, optionally ``Label``.
    label : int, optional
        Label for every row (default: the row's ``Label``, else 1).
    all_labels : bool, default=False
        One seed per non-zero label of each mask instead.
    components : bool, default=False
        One seed per connected component.

    Returns
    -------
    seeds : pandas.DataFrame
        Carried columns, then those of :func:`seeds_from_mask`.
    failures : list of str
        One line per row that gave no seed (``row i: 'mask': reason``); the other rows are kept.

    Raises
    ------
    TableError
        ``Image`` or ``Mask`` missing.
    SeedError
        No row gave a seed (the message lists why).
    """
    from .tables import load_seed_table, resolve_path

    df, base, name = load_seed_table(table)
    missing = [c for c in ("Image", "Mask") if c not in df.columns]
    if missing:
        raise TableError(f"{name}: missing column(s) {missing} (a mask table has Image, Mask[, Label])")
    frames, failures = [], []
    for i, rec in df.reset_index(drop=True).iterrows():
        row_label = label if label is not None else (
            int(rec["Label"]) if "Label" in df.columns and not pd.isna(rec["Label"]) else 1)
        carried = {c: rec[c] for c in df.columns if c not in ("Image", "Mask", "Label")}
        mask = resolve_path(rec["Mask"], base)
        try:
            found = seeds_from_mask(mask, image=resolve_path(rec["Image"], base),
                                    label=None if all_labels else row_label, components=components)
        except FmcibError as exc:
            failures.append(f"row {i}: '{mask}': {exc}")
            continue
        for k, (col, value) in enumerate(c for c in carried.items() if c[0] not in found.columns):
            found.insert(k, col, value)
        frames.append(found)
    if not frames:  # nothing to write: say why instead of leaving an empty table behind
        raise SeedError("no seeds: " + "; ".join(failures))
    return pd.concat(frames, ignore_index=True), failures
