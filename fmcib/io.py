"""Reading CT volumes (SimpleITK, DICOM series) and writing images. Table helpers live in :mod:`fmcib.files`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .exceptions import ImageReadError
from .files import atomic_path, read_table, read_table_metadata, write_table

__all__ = [
    "read_image",
    "open_scan",
    "Scan",
    "ImageGeometry",
    "read_table",
    "write_table",
    "write_image",
    "read_table_metadata",
    "atomic_path",
    "describe_image",
    "check_geometry",
    "check_slice_positions",
]

PathLike = str | os.PathLike


def _dicom_series_files(folder: Path, series_uid: str | None) -> list[str]:
    """Files of one DICOM series in ``folder`` (the only one there, or ``series_uid``), sorted along the slice normal."""
    series_ids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)) or ())
    if not series_ids:
        raise ImageReadError(f"'{folder}': folder holds no DICOM series (and is not an image file)")
    if series_uid is None:
        if len(series_ids) > 1:
            raise ImageReadError(
                f"'{folder}': folder holds {len(series_ids)} DICOM series ({', '.join(series_ids)}); "
                "choose one with a 'SeriesInstanceUID' column (or series_uid=...)"
            )
        series_uid = series_ids[0]
    elif series_uid not in series_ids:
        raise ImageReadError(
            f"'{folder}': no DICOM series with SeriesInstanceUID {series_uid}; found {', '.join(series_ids)}"
        )
    return list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))


def _read_dicom_files(files: Sequence[str]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(list(files))
    return reader.Execute()


def _read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    """Read one DICOM series from ``folder``: the only one there, or the one named by ``series_uid``; its slice
    positions checked (:func:`check_slice_positions`)."""
    files = _dicom_series_files(folder, series_uid)
    if len(files) > 1:
        first = _slice_header(files[0])
        normal = np.asarray(first.GetDirection(), dtype=np.float64).reshape(3, 3)[:, 2]
        check_slice_positions(str(folder), [_slice_position(f, normal) for f in files])
    return _read_dicom_files(files)


def _slice_header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


# Slice positions along the normal may differ from an even step by this share of the step (scanner rounding).
SLICE_STEP_TOLERANCE = 0.01


def check_slice_positions(name: str, positions: Sequence[float]) -> None:
    """Slice positions (mm along the slice normal, in series order) must be distinct and evenly spaced.

    Raises
    ------
    ImageReadError
        ``"two slices at z=..."`` for a repeated position, ``"missing slice(s) between z=... and z=..."`` for a
        gap, or an uneven step: a series read regardless would be stretched or folded without any error.
    """
    z = np.sort(np.asarray(positions, dtype=np.float64))
    if len(z) < 2:
        return
    steps = np.diff(z)
    dup = np.flatnonzero(steps < 1e-3)
    if len(dup):
        raise ImageReadError(f"'{name}': two slices at z={z[dup[0]]:.3f} mm (a duplicated file?); "
                             f"{len(dup)} repeated position(s) in all")
    step = float(np.median(steps))
    off = np.flatnonzero(np.abs(steps - step) > SLICE_STEP_TOLERANCE * step)
    if len(off):
        i = off[0]
        gap = steps[i] / step
        what = (f"missing slice(s) between z={z[i]:.3f} and z={z[i + 1]:.3f} mm"
                if abs(gap - round(gap)) <= SLICE_STEP_TOLERANCE * round(gap) and round(gap) >= 2
                else f"uneven slice spacing: {steps[i]:.3f} mm between z={z[i]:.3f} and z={z[i + 1]:.3f} mm")
        raise ImageReadError(f"'{name}': {what}, where the series steps {step:.3f} mm; the volume would be "
                             "misplaced (check the series is complete)")


def _slice_position(path: str, normal: np.ndarray) -> float:
    return float(np.dot(np.asarray(_slice_header(path).GetOrigin(), dtype=np.float64), normal))


def _dicom_geometry(name: str, files: Sequence[str]) -> ImageGeometry | None:
    """Geometry of a sorted DICOM series from its first and last slice headers, as ITK's series reader sets it.

    In-plane size, spacing and direction come from the first slice; the slice step is (last position -
    first position) / (n - 1). None when the step does not follow the slice normal (gantry tilt,
    odd sorting): such a series is read whole instead.
    """
    first = _slice_header(files[0])
    _check_scalar_3d(name, first.GetDimension(), first.GetNumberOfComponents(), first.GetSize())
    nx, ny = (int(v) for v in first.GetSize()[:2])
    spacing = list(first.GetSpacing())
    direction = np.asarray(first.GetDirection(), dtype=np.float64).reshape(3, 3)
    if len(files) > 1:
        check_slice_positions(name, [_slice_position(f, direction[:, 2]) for f in files])
        step = (np.asarray(_slice_header(files[-1]).GetOrigin()) - np.asarray(first.GetOrigin())) / (len(files) - 1)
        length = float(np.linalg.norm(step))
        if length == 0 or not np.allclose(step / length, direction[:, 2], atol=1e-4):
            return None
        spacing[2] = length
    geometry = ImageGeometry((nx, ny, len(files)), tuple(first.GetOrigin()), tuple(spacing), tuple(direction.ravel()))
    check_geometry(name, geometry)
    return geometry


Region = tuple[Sequence[int], Sequence[int]]  # (index, size) in voxels, SimpleITK (i, j, k) order


@dataclass(frozen=True)
class ImageGeometry:
    """Where a volume's voxels lie in LPS space, without the voxels.

    Answers the geometry queries of ``SimpleITK.Image`` under the same names (``GetSize``,
    ``GetOrigin``, ``GetSpacing``, ``GetDirection``, ``TransformContinuousIndexToPhysicalPoint``),
    so every function of the package that only needs geometry accepts either.
    """

    size: tuple[int, ...]
    origin: tuple[float, ...]
    spacing: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image | sitk.ImageFileReader | ImageGeometry) -> ImageGeometry:
        """Geometry of an image, of a reader after ``ReadImageInformation()``, or itself."""
        if isinstance(image, ImageGeometry):
            return image
        return cls(tuple(int(v) for v in image.GetSize()), tuple(image.GetOrigin()), tuple(image.GetSpacing()),
                   tuple(image.GetDirection()))

    def GetSize(self) -> tuple[int, ...]:  # noqa: N802 - SimpleITK's name
        """Voxels per axis (i, j, k)."""
        return self.size

    def GetOrigin(self) -> tuple[float, ...]:  # noqa: N802
        """LPS position (mm) of voxel (0, 0, 0)."""
        return self.origin

    def GetSpacing(self) -> tuple[float, ...]:  # noqa: N802
        """Voxel spacing (mm) along i, j, k."""
        return self.spacing

    def GetDirection(self) -> tuple[float, ...]:  # noqa: N802
        """Row-major 3x3 direction cosines (columns: LPS directions of i, j, k)."""
        return self.direction

    def TransformContinuousIndexToPhysicalPoint(self, index: Sequence[float]) -> tuple[float, ...]:  # noqa: N802
        """LPS point (mm) of a continuous voxel index."""
        d = np.asarray(self.direction, dtype=np.float64).reshape(3, 3)
        point = np.asarray(self.origin) + d @ (np.asarray(self.spacing) * np.asarray(index, dtype=np.float64))
        return tuple(float(v) for v in point)


def check_geometry(name: str, image: sitk.Image | sitk.ImageFileReader | ImageGeometry) -> None:
    """Spacing finite and positive, direction orthonormal (a rotation or reflection): else no seed can be placed.

    Raises
    ------
    ImageReadError
        ``"degenerate geometry: ..."`` naming the bad spacing or direction.
    """
    stored = nifti_pixdim(name)
    if stored is not None and not all(np.isfinite(v) and v > 0 for v in stored):
        raise ImageReadError(f"'{name}': degenerate geometry: the NIfTI header stores voxel sizes "
                             f"{[float(v) for v in stored]} mm (ITK would read them as 1 mm)")
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    if not (np.all(np.isfinite(spacing)) and np.all(spacing > 0)):
        raise ImageReadError(f"'{name}': degenerate geometry: voxel spacing {spacing.tolist()} mm (must be finite "
                             "and positive)")
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    if not np.all(np.isfinite(direction)) or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-3):
        raise ImageReadError(f"'{name}': degenerate geometry: direction matrix {np.round(direction, 4).tolist()} is "
                             "not orthonormal (singular or skewed)")


def nifti_pixdim(path: str | os.PathLike) -> tuple[float, float, float] | None:
    """Voxel sizes as stored in a NIfTI-1/2 header (``pixdim[1..3]``), or None for other files.

    ITK replaces a zero, negative or NaN pixdim by 1.0 mm without a word; the raw header tells the truth.
    """
    import gzip
    import struct

    name = str(path).lower()
    if not name.endswith((".nii", ".nii.gz")):
        return None
    try:
        with (gzip.open if name.endswith(".gz") else open)(path, "rb") as f:
            head = f.read(540)
    except OSError:
        return None
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348:
            return struct.unpack(order + "3f", head[80:92])
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540:
            return struct.unpack(order + "3d", head[112:136])
    return None


def _check_scalar_3d(name: str, dimension: int, components: int, size: Sequence[int]) -> None:
    if dimension != 3:
        raise ImageReadError(f"'{name}': expected a 3D volume, got a {dimension}D image of size {tuple(size)}")
    if components != 1:
        raise ImageReadError(
            f"'{name}': expected one intensity per voxel, got {components} components (colour or vector image)"
        )


@contextlib.contextmanager
def _reader_errors(name: str) -> Iterator[None]:
    """Turn SimpleITK's RuntimeError into an :class:`ImageReadError` naming the file."""
    try:
        yield
    except ImageReadError:
        raise
    except RuntimeError as exc:  # SimpleITK reports every reader failure as RuntimeError
        first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise ImageReadError(f"'{name}': cannot read image ({first})") from exc


class Scan:
    """One CT volume opened for patch extraction: its geometry at once, its voxels on request.

    For an image file only the header is read when the scan is opened; :meth:`read` then reads just
    the voxel region it is asked for (SimpleITK streams it: a ``.nii.gz`` is inflated only up to
    the region's last slice). For a DICOM series folder the slice files are listed and the first and
    last headers read; :meth:`read` then reads only the slice files of the region. An in-memory image,
    or a DICOM series whose slices do not step along their normal, is held whole.
    """

    def __init__(self, path: PathLike | sitk.Image, series_uid: str | None = None) -> None:
        self._image: sitk.Image | None = None
        self._files: list[str] | None = None
        if isinstance(path, sitk.Image):
            self._hold(read_image(path), "<SimpleITK.Image>")
            return
        self.name = str(Path(path))
        if not Path(path).exists():
            raise ImageReadError(f"'{self.name}': file not found (looked for {Path(path).resolve()})")
        if Path(path).is_dir():
            with _reader_errors(self.name):
                files = _dicom_series_files(Path(path), series_uid)
                geometry = _dicom_geometry(self.name, files)
            if geometry is None:  # slices off their normal: read them all, as listed, and let ITK place them
                with _reader_errors(self.name):
                    self._hold(_read_dicom_files(files), self.name)
            else:
                self._files, self.geometry = files, geometry
            return
        reader = self._reader()
        with _reader_errors(self.name):
            reader.ReadImageInformation()
        _check_scalar_3d(self.name, reader.GetDimension(), reader.GetNumberOfComponents(), reader.GetSize())
        check_geometry(self.name, reader)
        self.geometry = ImageGeometry.of(reader)

    def _hold(self, image: sitk.Image, name: str) -> None:
        check_geometry(name, image)
        self._image, self.name, self.geometry = image, name, ImageGeometry.of(image)

    def _reader(self) -> sitk.ImageFileReader:
        reader = sitk.ImageFileReader()
        reader.SetFileName(self.name)
        return reader

    def read(self, region: Region | None = None) -> sitk.Image:
        """Voxels of ``region`` (index, size), or of the whole scan; geometry stays in scan space.

        When the whole scan is already in memory it is returned as is (it contains every region).
        """
        if self._image is not None:
            return self._image
        if self._files is not None:
            return self._read_slices(region)
        reader = self._reader()  # a fresh reader: no region left over from an earlier call
        if region is not None:
            index, size = region
            reader.SetExtractIndex([int(v) for v in index])
            reader.SetExtractSize([int(v) for v in size])
        with _reader_errors(self.name):
            return reader.Execute()

    def _read_slices(self, region: Region | None) -> sitk.Image:
        """The region's slice files only, cropped in-plane, placed with the series' own geometry."""
        assert self._files is not None
        index, size = region if region is not None else ((0, 0, 0), self.geometry.GetSize())
        index, size = [int(v) for v in index], [int(v) for v in size]
        with _reader_errors(self.name):
            image = _read_dicom_files(self._files[index[2]:index[2] + size[2]])
            _check_scalar_3d(self.name, image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize())
            if tuple(image.GetSize()[:2]) != tuple(self.geometry.GetSize()[:2]):
                raise ImageReadError(f"'{self.name}': slices {index[2]}..{index[2] + size[2] - 1} are "
                                     f"{image.GetSize()[:2]} voxels, the first slice {self.geometry.GetSize()[:2]}")
            image = sitk.RegionOfInterest(image, [size[0], size[1], size[2]], [index[0], index[1], 0])
        image.SetOrigin(self.geometry.TransformContinuousIndexToPhysicalPoint([float(v) for v in index]))
        image.SetSpacing(self.geometry.GetSpacing())
        image.SetDirection(self.geometry.GetDirection())
        return image


def open_scan(path: PathLike | sitk.Image, series_uid: str | None = None) -> Scan:
    """Open a CT volume for patch extraction (see :class:`Scan`); reads only its header when it can."""
    return Scan(path, series_uid)


def read_image(path: PathLike | sitk.Image, series_uid: str | None = None) -> sitk.Image:
    """Read a 3D scalar CT volume: any file SimpleITK reads, or a DICOM series folder.

    Parameters
    ----------
    path : str, PathLike or SimpleITK.Image
        Image file (NIfTI, NRRD, MHA/MHD, ...) or a folder holding a DICOM series. An image that is
        already a ``SimpleITK.Image`` is only validated.
    series_uid : str, optional
        SeriesInstanceUID to pick when the folder holds several DICOM series.

    Returns
    -------
    SimpleITK.Image
        The volume with its geometry (origin, spacing, direction in LPS).

    Raises
    ------
    ImageReadError
        Missing or unreadable file, or an image that is not 3D with one component.
    """
    if isinstance(path, sitk.Image):
        image, name = path, "<SimpleITK.Image>"
    else:
        p = Path(path)
        name = str(p)
        if not p.exists():
            raise ImageReadError(f"'{name}': file not found (looked for {p.resolve()})")
        with _reader_errors(name):
            image = _read_dicom_series(p, series_uid) if p.is_dir() else sitk.ReadImage(str(p))
    _check_scalar_3d(name, image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize())
    check_geometry(name, image)
    return image


def describe_image(image: sitk.Image | ImageGeometry) -> str:
    """One line with size, spacing, origin and physical extent (LPS mm) of an image, for messages."""
    size = image.GetSize()
    corners = [
        image.TransformContinuousIndexToPhysicalPoint([(-0.5 if c == 0 else n - 0.5) for c, n in zip(bits, size)])
        for bits in ((i & 1, (i >> 1) & 1, (i >> 2) & 1) for i in range(8))
    ]
    lo = [min(c[a] for c in corners) for a in range(3)]
    hi = [max(c[a] for c in corners) for a in range(3)]
    extent = ", ".join(f"{ax} {a:.1f}..{b:.1f}" for ax, a, b in zip("xyz", lo, hi))
    spacing = "x".join(f"{s:.3g}" for s in image.GetSpacing())
    return f"size {size[0]}x{size[1]}x{size[2]}, spacing {spacing} mm, extent (LPS mm) {extent}"


def write_image(image: sitk.Image, path: PathLike) -> None:
    """Write a SimpleITK image atomically; the format follows the suffix (``.nii.gz`` is compressed)."""
    with atomic_path(path, keep_suffix=True) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=str(path).endswith(".gz"))


