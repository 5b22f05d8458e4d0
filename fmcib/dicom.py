"""DICOM RTSTRUCT contours and DICOM SEG segments as label masks on their CT series' grid, and seeds from them.

Needs pydicom, and highdicom for SEG (``pip install 'fmcib[dicom]'``). SEG objects are read with highdicom
(binary and fractional, any frame order: it places each frame by its position). Contours (CLOSED_PLANAR polygons in LPS mm) are
rasterised onto the slices of the referenced CT series: a contour goes to the image plane nearest to it,
a voxel belongs to the structure when its centre lies inside an odd number of the structure's
polygons on that plane (the even-odd rule: an inner contour cuts a hole). No maintained library does
this without heavy dependencies (OpenCV, ITK's RT modules), so this module is fmcib's own.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .exceptions import FmcibError, ImageReadError, SeedError
from .io import ImageGeometry, open_scan
from .seeds import continuous_index, seeds_from_mask

__all__ = ["Structure", "StructureSet", "read_rtstruct", "rasterize_contours", "structure_mask",
           "seeds_from_rtstruct", "find_series", "is_rtstruct", "roi_centroid", "is_seg", "read_seg", "segment_mask",
           "seeds_from_seg", "dicom_modality", "centroid_of"]

logger = logging.getLogger(__name__)

# A contour lying further than this (in slices) from its nearest image plane is not on the CT's slices.
MAX_OFF_PLANE = 0.5


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise FmcibError("reading DICOM RTSTRUCT needs pydicom: pip install 'fmcib[dicom]'") from exc
    return pydicom


@dataclass
class Structure:
    """One ROI of a structure set: its number, name and closed planar contours ``(n_points, 3)`` in LPS mm."""

    number: int
    name: str
    contours: list[np.ndarray] = field(default_factory=list)


@dataclass
class StructureSet:
    """An RTSTRUCT file: its ROIs and the CT series (SeriesInstanceUID) its contours were drawn on."""

    path: Path
    structures: list[Structure]
    series_uid: str | None

    def get(self, name: str) -> Structure:
        """The ROI called ``name``; raises :class:`SeedError` listing the ROIs (close matches first)."""
        for s in self.structures:
            if s.name == name:
                return s
        names = [s.name for s in self.structures]
        close = difflib.get_close_matches(name, names, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise SeedError(f"'{self.path}': no ROI named {name!r}.{hint} ROIs: {names}")


def read_rtstruct(path: str | os.PathLike) -> StructureSet:
    """Read the ROIs and contours of an RTSTRUCT file (no pixel data is involved).

    Raises
    ------
    ImageReadError
        Not a readable DICOM file, or not an RTSTRUCT.
    """
    pydicom = _pydicom()
    p = Path(path)
    try:
        ds = pydicom.dcmread(str(p))
    except Exception as exc:  # pydicom raises several types for unreadable files
        raise ImageReadError(f"'{p}': not a readable DICOM file ({exc})") from exc
    if getattr(ds, "Modality", None) != "RTSTRUCT":
        raise ImageReadError(f"'{p}': not an RTSTRUCT (Modality {getattr(ds, 'Modality', None)!r})")
    names = {int(r.ROINumber): str(r.ROIName) for r in getattr(ds, "StructureSetROISequence", [])}
    structures = {n: Structure(n, name) for n, name in names.items()}
    for roi in getattr(ds, "ROIContourSequence", []):
        number = int(roi.ReferencedROINumber)
        structure = structures.setdefault(number, Structure(number, f"ROI {number}"))
        for contour in getattr(roi, "ContourSequence", []):
            if str(getattr(contour, "ContourGeometricType", "CLOSED_PLANAR")) not in ("CLOSED_PLANAR", ""):
                continue  # points and open polylines enclose no volume
            points = np.asarray(contour.ContourData, dtype=np.float64).reshape(-1, 3)
            if len(points) >= 3:
                structure.contours.append(points)
    series_uid = None
    for frame in getattr(ds, "ReferencedFrameOfReferenceSequence", []):
        for study in getattr(frame, "RTReferencedStudySequence", []):
            for series in getattr(study, "RTReferencedSeriesSequence", []):
                series_uid = series_uid or str(series.SeriesInstanceUID)
    return StructureSet(p, sorted(structures.values(), key=lambda s: s.number), series_uid)


def dicom_modality(path: str | os.PathLike) -> str | None:
    """The Modality of a DICOM file (its header only is read), or None for anything else or without pydicom."""
    p = Path(path)
    if not p.is_file():
        return None
    try:
        import pydicom

        ds = pydicom.dcmread(str(p), stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:  # not DICOM, unreadable, or no pydicom
        return None
    return getattr(ds, "Modality", None)


def is_rtstruct(path: str | os.PathLike) -> bool:
    """True for a DICOM RTSTRUCT file."""
    return dicom_modality(path) == "RTSTRUCT"


def is_seg(path: str | os.PathLike) -> bool:
    """True for a DICOM SEG file."""
    return dicom_modality(path) == "SEG"


def read_seg(path: str | os.PathLike) -> Any:
    """A DICOM SEG object (highdicom ``Segmentation``).

    Raises
    ------
    ImageReadError
        Not readable as a DICOM SEG.
    """
    try:
        import highdicom
    except ImportError as exc:
        raise FmcibError("reading DICOM SEG needs highdicom: pip install 'fmcib[dicom]'") from exc
    try:
        return highdicom.seg.segread(str(path))
    except Exception as exc:  # highdicom/pydicom raise several types
        raise ImageReadError(f"'{path}': not a readable DICOM SEG ({exc})") from exc


def _segment_number(seg: Any, key: Any, source: str) -> int:
    """A segment given by label, or by number when no segment has that label."""
    labels = {int(n): str(seg.get_segment_description(n).segment_label) for n in seg.segment_numbers}
    for number, label in labels.items():
        if label == str(key):
            return number
    text = str(key)
    if text.replace(".", "", 1).isdigit() and float(text).is_integer() and int(float(text)) in labels:
        return int(float(text))
    close = difflib.get_close_matches(text, list(labels.values()), n=3, cutoff=0.4)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise SeedError(f"'{source}': no segment {key!r}.{hint} Segments: "
                    + ", ".join(f"{n} {label!r}" for n, label in labels.items()))


def segment_mask(seg: Any, number: int) -> sitk.Image:
    """One segment of a SEG as a uint8 label image (1 inside) on the SEG's own grid (its non-empty frames).

    Fractional segments (probability or occupancy) count a voxel inside from 0.5.
    """
    volume = seg.get_volume(segment_numbers=[int(number)], combine_segments=False, rescale_fractional=True)
    if volume.number_of_channel_dimensions:
        volume = volume.squeeze_channel()
    image = volume.to_simpleitk()
    fractional = "FRACTIONAL" in str(seg.segmentation_type).upper()
    return sitk.Cast(image >= 0.5 if fractional else image > 0, sitk.sitkUInt8)


def _referenced_series(seg: Any) -> str | None:
    refs = getattr(seg, "ReferencedSeriesSequence", None)
    return str(refs[0].SeriesInstanceUID) if refs else None


def centroid_of(source: Any, key: Any, geometry: sitk.Image | ImageGeometry) -> np.ndarray:
    """Centre of mass (LPS mm) of an RTSTRUCT ROI (rasterised on ``geometry``) or of a SEG segment, by name or
    number: the seed of a table row whose ``Mask`` is such a file and whose ``Label`` names the structure."""
    from .seeds import mask_centroid

    if isinstance(source, StructureSet):
        return roi_centroid(source, key, geometry)
    return mask_centroid(segment_mask(source, _segment_number(source, key, "SEG")), 1)


def roi_centroid(structure_set: StructureSet, roi: Any, geometry: sitk.Image | ImageGeometry) -> np.ndarray:
    """Centre of mass (LPS mm) of an ROI given by name, or by number when no ROI has that name."""
    from .seeds import mask_centroid

    names = {s.name: s for s in structure_set.structures}
    key = str(roi)
    if key not in names and key.lstrip("-").replace(".", "", 1).isdigit():
        by_number = {s.number: s for s in structure_set.structures}
        if float(key).is_integer() and int(float(key)) in by_number:
            return mask_centroid(structure_mask(by_number[int(float(key))], geometry), 1)
    return mask_centroid(structure_mask(structure_set.get(key), geometry), 1)


def rasterize_contours(contours: Sequence[np.ndarray], geometry: sitk.Image | ImageGeometry,
                       name: str = "structure") -> np.ndarray:
    """Voxels of ``geometry`` inside the contours: a ``(z, y, x)`` uint8 array, 1 inside.

    Each contour is assigned to the image plane nearest to it (rounded mean slice index) and filled by the
    even-odd rule with the structure's other contours on that plane; a voxel is inside when its centre is.

    Raises
    ------
    SeedError
        A contour that does not lie in one image plane (drawn on other slices or another orientation), or
        no contour on the image at all.
    """
    from matplotlib.path import Path as Polygon

    size = [int(v) for v in geometry.GetSize()]
    mask = np.zeros(size[::-1], dtype=bool)
    used = 0
    for points in contours:
        idx = continuous_index(geometry, points)
        k = float(np.mean(idx[:, 2]))
        plane = int(np.floor(k + 0.5))
        if np.ptp(idx[:, 2]) > 2 * MAX_OFF_PLANE:
            raise SeedError(f"{name}: a contour spans slices {idx[:, 2].min():.1f}..{idx[:, 2].max():.1f}; "
                            "contours must lie in the CT's slice planes")
        if not 0 <= plane < size[2]:
            continue  # off the image along the slice axis
        lo = np.clip(np.floor(idx[:, :2].min(axis=0)).astype(int), 0, [size[0] - 1, size[1] - 1])
        hi = np.clip(np.ceil(idx[:, :2].max(axis=0)).astype(int), 0, [size[0] - 1, size[1] - 1])
        if np.any(hi < lo):
            continue
        ii, jj = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="xy")
        inside = Polygon(idx[:, :2]).contains_points(np.column_stack([ii.ravel(), jj.ravel()]))
        window = mask[plane, lo[1]:hi[1] + 1, lo[0]:hi[0] + 1]
        window ^= inside.reshape(ii.shape)  # even-odd: a second contour over the same voxels removes them
        used += 1
    if used == 0:
        raise SeedError(f"{name}: no contour lies on the image")
    return mask.astype(np.uint8)


def structure_mask(structure: Structure, image: sitk.Image | ImageGeometry) -> sitk.Image:
    """A structure as a uint8 label image (1 inside) on the grid of ``image``."""
    array = rasterize_contours(structure.contours, image, name=f"ROI {structure.name!r}")
    mask = sitk.GetImageFromArray(array)
    mask.SetOrigin(tuple(image.GetOrigin()))
    mask.SetSpacing(tuple(image.GetSpacing()))
    mask.SetDirection(tuple(image.GetDirection()))
    return mask


def find_series(near: str | os.PathLike, series_uid: str, max_depth: int = 3) -> Path | None:
    """A folder holding the DICOM series ``series_uid``: the RTSTRUCT's own folder, its parent, or a folder
    below the parent (``max_depth`` levels), searched in that order."""
    start = Path(near).resolve()
    start = start.parent if start.is_file() else start
    seen: set[Path] = set()
    for root in (start, start.parent):
        level = [root]
        for _ in range(max_depth + 1):  # breadth first, never deeper than max_depth below root
            for folder in level:
                if folder not in seen:
                    seen.add(folder)
                    if _holds_series(folder, series_uid):
                        return folder
            level = sorted(child for folder in level for child in folder.iterdir() if child.is_dir())
    return None


def seeds_from_rtstruct(
    rtstruct: str | os.PathLike,
    image: str | os.PathLike | None = None,
    rois: Sequence[str] | None = None,
    components: bool = False,
) -> pd.DataFrame:
    """Seed points (LPS mm) of the ROIs of an RTSTRUCT: the centre of mass of each rasterised ROI.

    Parameters
    ----------
    rtstruct : path
        The RTSTRUCT file.
    image : path, optional
        The CT series folder the contours were drawn on; by default the series the RTSTRUCT references,
        looked for beside it (its folder, its parent and their subfolders).
    rois : sequence of str, optional
        ROI names (default: every ROI with contours). An absent name fails, listing the ROIs.
    components : bool, default=False
        One row per connected component of each ROI.

    Returns
    -------
    pandas.DataFrame
        Columns ``roi_name, roi_number, image_path, coordX, coordY, coordZ, component, volume_ml, mask_path``
        (``mask_path`` is the RTSTRUCT).

    Raises
    ------
    SeedError, ImageReadError, FmcibError
        Absent ROI, contours off the image, unreadable files, a referenced series not found.
    """
    structure_set = read_rtstruct(rtstruct)
    referenced = structure_set.series_uid
    image = _image_for(rtstruct, referenced, image)
    scan = open_scan(image, series_uid=referenced if referenced and _holds_series(image, referenced) else None)
    chosen = [structure_set.get(r) for r in rois] if rois else [s for s in structure_set.structures if s.contours]
    frames = []
    for structure in chosen:
        if not structure.contours:
            raise SeedError(f"'{rtstruct}': ROI {structure.name!r} has no contours")
        mask = structure_mask(structure, scan.geometry)
        seeds = seeds_from_mask(mask, image=str(image), label=1, components=components)
        seeds.insert(0, "roi_number", structure.number)
        seeds.insert(0, "roi_name", structure.name)
        frames.append(seeds.drop(columns=["label"]).assign(mask_path=str(rtstruct)))
    return pd.concat(frames, ignore_index=True)


def _holds_series(folder: str | os.PathLike, series_uid: str) -> bool:
    if not Path(folder).is_dir():
        return False
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # GDCM warns about every folder without a series
    try:
        return series_uid in (sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)


def _image_for(source: str | os.PathLike, series_uid: str | None, image: str | os.PathLike | None) -> Path:
    """The CT an RTSTRUCT or SEG belongs to: ``image`` checked against the series it references, or that series
    found beside the file."""
    if image is not None:
        _check_reference(source, series_uid, image)
        return Path(image)
    if series_uid is None:
        raise SeedError(f"'{source}': references no CT series; give the series folder (image=... / --image)")
    found = find_series(source, series_uid)
    if found is None:
        raise SeedError(f"'{source}': its CT series {series_uid} is not beside it; give the series folder "
                        "(image=... / --image)")
    return found


def _check_reference(source: str | os.PathLike, series_uid: str | None, image: str | os.PathLike) -> None:
    """A DICOM series folder given for a structure set or SEG must hold the series it was drawn on."""
    if series_uid is None or not Path(image).is_dir() or _holds_series(image, series_uid):
        if series_uid is not None and not Path(image).is_dir():
            logger.info("'%s': placed on '%s' by physical coordinates (its series %s cannot be checked there)",
                        source, image, series_uid)
        return
    found = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(image)) or ())
    raise SeedError(f"'{source}' was made on series {series_uid}, but '{image}' holds {found or 'no DICOM series'}: "
                    "give the series it was made on")


def seeds_from_seg(
    seg_path: str | os.PathLike,
    image: str | os.PathLike | None = None,
    segments: Sequence[Any] | None = None,
    components: bool = False,
) -> pd.DataFrame:
    """Seed points (LPS mm) of the segments of a DICOM SEG: the centre of mass of each segment.

    Parameters
    ----------
    seg_path : path
        The SEG file (binary or fractional; fractional voxels count from 0.5).
    image : path, optional
        The CT the seeds belong to (written to ``image_path``, and every seed checked to lie inside it); by
        default the series the SEG references, looked for beside it.
    segments : sequence of str or int, optional
        Segment labels or numbers (default: every segment). An absent one fails, listing the segments.
    components : bool, default=False
        One row per connected component of each segment.

    Returns
    -------
    pandas.DataFrame
        Columns ``segment_label, segment_number, image_path, coordX, coordY, coordZ, component, volume_ml,
        mask_path`` (``mask_path`` is the SEG).
    """
    seg = read_seg(seg_path)
    image = _image_for(seg_path, _referenced_series(seg), image)
    numbers = [_segment_number(seg, k, str(seg_path)) for k in segments] if segments else \
        [int(n) for n in seg.segment_numbers]
    frames = []
    for number in numbers:
        mask = segment_mask(seg, number)
        seeds = seeds_from_mask(mask, image=str(image), label=1, components=components)
        seeds.insert(0, "segment_number", number)
        seeds.insert(0, "segment_label", str(seg.get_segment_description(number).segment_label))
        frames.append(seeds.drop(columns=["label"]).assign(mask_path=str(seg_path)))
    return pd.concat(frames, ignore_index=True)
