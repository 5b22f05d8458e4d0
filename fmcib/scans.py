"""Scans from a seeds table: rows grouped by scan, each scan read once and every seed's patch cut from it.

The loader half of extraction (the engine is :mod:`fmcib.extract`); training crops and QC montages read
scans through the same :class:`ScanDataset`, so every path sees the same patches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .exceptions import FmcibError
from .io import ImageGeometry, open_scan, read_image
from .preprocessing import PreprocessConfig, extract_patch, model_input, patch_origin, patch_region
from .seeds import _validate_coords, check_inside, mask_centroid, to_lps
from .tables import SERIES_COLUMN, resolve_path, table_kind

__all__ = ["SeedRow", "ScanTask", "RowError", "plan_scans", "shard_scans", "ScanDataset", "intensity_warning",
           "MIN_HU_SPAN"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeedRow:
    """One table row to extract: a point (``coords`` system) or a mask + label."""

    row: int
    point: tuple[Any, Any, Any] | None = None
    mask: str | None = None
    label: Any = 1


@dataclass(frozen=True)
class ScanTask:
    """All rows that share one image (read once)."""

    image: str
    series_uid: str | None
    seeds: tuple[SeedRow, ...]


@dataclass
class RowError:
    """A row that could not be extracted, with the reason (names row, file and problem); ``cli_message`` is the
    same reason in command-line wording (flags), where it differs."""

    row: int
    message: str
    cli_message: str | None = None


def plan_scans(df: pd.DataFrame, base_dir: str | os.PathLike | None = None,
               rows: Sequence[int] | None = None, name: str = "table") -> list[ScanTask]:
    """Group table rows by scan (image path + optional SeriesInstanceUID), keeping first-seen order.

    Raises
    ------
    TableError
        Required columns missing (checked before any image is read).
    """
    kind = table_kind(df, name)
    base = Path(base_dir) if base_dir is not None else None
    image_col = "image_path" if kind == "seeds" else "Image"
    groups: dict[tuple[str, str | None], list[SeedRow]] = {}
    selected = range(len(df)) if rows is None else rows
    for i in selected:
        rec = df.iloc[i]
        raw_path = rec[image_col]
        image = "" if pd.isna(raw_path) else str(resolve_path(raw_path, base))
        uid = rec.get(SERIES_COLUMN) if SERIES_COLUMN in df.columns else None
        uid = None if uid is None or pd.isna(uid) else str(uid)
        if kind == "seeds":
            seed = SeedRow(row=int(i), point=(rec["coordX"], rec["coordY"], rec["coordZ"]))
        else:
            label = rec["Label"] if "Label" in df.columns and not pd.isna(rec["Label"]) else 1
            mask = "" if pd.isna(rec["Mask"]) else str(resolve_path(rec["Mask"], base))
            seed = SeedRow(row=int(i), mask=mask, label=label)
        groups.setdefault((image, uid), []).append(seed)
    return [ScanTask(image=img, series_uid=uid, seeds=tuple(s)) for (img, uid), s in groups.items()]


def _read_mask(path: str) -> Any:
    """A label image; the structure set of an RTSTRUCT (rasterised on each scan's grid when used); a DICOM SEG."""
    from .dicom import dicom_modality, read_rtstruct, read_seg

    modality = dicom_modality(path)
    if modality == "RTSTRUCT":
        return read_rtstruct(path)
    return read_seg(path) if modality == "SEG" else read_image(path)


def _label_value(label: Any) -> int:
    value = float(label)
    if not value.is_integer():
        raise ValueError(f"label {label!r} is not an integer")
    return int(value)


class ScanDataset:
    """Map-style dataset: item ``i`` reads scan ``i`` once and cuts every seed's patch.

    Picklable (plain data only), so it works with DataLoader workers under fork and spawn.
    Each item is a dict with ``rows`` (int array), ``patches`` ``(k, channels, z, y, x)`` float32,
    ``padding`` (k,), ``origins`` ``(k, 3)`` (LPS mm of each patch's first voxel, see
    :func:`fmcib.preprocessing.patch_image`) and ``errors`` (list of :class:`RowError`).
    """

    def __init__(self, tasks: Sequence[ScanTask], coords: str, config: PreprocessConfig) -> None:
        self.tasks = list(tasks)
        self.coords = _validate_coords(coords)
        self.config = config

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        task = self.tasks[index]
        shape = self.config.input_shape
        try:
            if not task.image:
                raise FmcibError("image path is empty")
            scan = open_scan(task.image, task.series_uid)  # header only, for image files
        except FmcibError as exc:
            errors = [RowError(s.row, f"row {s.row}: {exc}") for s in task.seeds]
            return {"rows": np.zeros(0, np.int64), "patches": np.zeros((0, *shape), np.float32),
                    "padding": np.zeros(0), "origins": np.zeros((0, 3)), "warnings": np.zeros(0, dtype=object),
                    "errors": errors}
        errors: list[RowError] = []
        seeds: list[tuple[int, np.ndarray]] = []
        masks: dict[str, sitk.Image] = {}
        for s in task.seeds:
            try:
                seeds.append((s.row, self._seed(s, scan.geometry, masks)))
            except Exception as exc:  # never let one odd row stop the run
                errors.append(self._row_error(s.row, task.image, exc))
        origins = [patch_origin(scan.geometry, p, self.config) for _, p in seeds]
        region = patch_region(scan.geometry, origins, self.config)
        try:
            image = scan.read(region) if seeds else None  # only the voxels the patches need
        except FmcibError as exc:
            errors += [RowError(row, f"row {row}: {exc}") for row, _ in seeds]
            seeds = []
        rows, patches, padding, kept_origins, notes = [], [], [], [], []
        for (row, seed), origin in zip(seeds, origins):
            try:
                patch, pad = extract_patch(image, seed, self.config, geometry=scan.geometry)
            except Exception as exc:
                errors.append(self._row_error(row, task.image, exc))
                continue
            rows.append(row)
            patches.append(patch)
            padding.append(pad)
            kept_origins.append(origin)
            notes.append(intensity_warning(patch, pad, self.config))
        for row, note in zip(rows, notes):
            if note:
                logger.warning("row %d: '%s': %s", row, task.image, note)
        errors.sort(key=lambda e: e.row)
        stacked = model_input(np.stack(patches), self.config) if patches else np.zeros((0, *shape), np.float32)
        return {"rows": np.asarray(rows, np.int64), "patches": stacked,
                "padding": np.asarray(padding, np.float64), "origins": np.asarray(kept_origins).reshape(-1, 3),
                "warnings": np.asarray(notes, dtype=object), "errors": errors}

    def _seed(self, s: SeedRow, geometry: ImageGeometry, masks: dict[str, sitk.Image]) -> np.ndarray:
        """LPS seed of one row (from its coordinates or its mask), checked to lie inside the scan."""
        if s.mask is not None:
            if s.mask not in masks:
                masks[s.mask] = _read_mask(s.mask)
            try:
                if isinstance(masks[s.mask], sitk.Image):
                    seed = mask_centroid(masks[s.mask], _label_value(s.label))
                else:  # an RTSTRUCT or SEG: Label names the ROI / segment (or gives its number)
                    from .dicom import centroid_of

                    seed = centroid_of(masks[s.mask], s.label, geometry)
            except (FmcibError, ValueError) as exc:
                raise FmcibError(f"mask '{s.mask}': {exc}") from exc
        else:
            seed = to_lps(s.point, self.coords, geometry)
        check_inside(geometry, seed)
        return seed

    @staticmethod
    def _row_error(row: int, image: str, exc: Exception) -> RowError:
        if not isinstance(exc, FmcibError):
            return RowError(row, f"row {row}: '{image}': {type(exc).__name__}: {exc}")

        def worded(text: str) -> str:
            return f"row {row}: " + (text if text.startswith(("'", "mask '")) else f"'{image}': {text}")

        return RowError(row, worded(str(exc)), worded(exc.cli) if exc.cli else None)


# A real CT region a patch wide spans far more than this (noise alone is 10-20 HU standard deviation).
MIN_HU_SPAN = 20.0


def intensity_warning(patch: np.ndarray, padding_fraction: float, config: PreprocessConfig) -> str:
    """A note when a patch's intensities do not look like CT in Hounsfield units, else ``""``.

    The voxels inside the scan must span at least ``MIN_HU_SPAN`` HU: an image normalised to 0..1, a mask,
    or a constant volume fails that, and its features would be meaningless without any error.
    """
    hu = config.to_hu(patch)
    pad = float(config.to_hu(config.normalise(np.array([config.pad_hu], np.float32)))[0])  # after any clipping
    inside = hu if padding_fraction == 0 else hu[~np.isclose(hu, pad)]
    if inside.size == 0:
        return ""
    lo, hi = float(inside.min()), float(inside.max())
    if hi - lo < MIN_HU_SPAN:
        return (f"intensities around the seed span only {lo:.4g}..{hi:.4g}: this does not look like CT in "
                "Hounsfield units (a normalised or non-CT image?)")
    return ""


def shard_scans(tasks: Sequence[ScanTask], n_shards: int) -> list[list[ScanTask]]:
    """Split scans between ``n_shards`` processes, balanced by seed count; each scan goes to exactly one.

    Largest scans first, each to the shard with the fewest seeds so far (ties: the lower shard); within a
    shard the scans keep their table order. Deterministic, so every process computes the same split.
    """
    if n_shards < 1:
        raise ValueError(f"n_shards must be >= 1, got {n_shards}")
    load = [0] * n_shards
    owner: dict[int, int] = {}
    for i in sorted(range(len(tasks)), key=lambda i: -len(tasks[i].seeds)):  # stable: table order among equals
        shard = min(range(n_shards), key=lambda k: (load[k], k))
        owner[i] = shard
        load[shard] += len(tasks[i].seeds)
    return [[t for i, t in enumerate(tasks) if owner[i] == k] for k in range(n_shards)]
