"""Reading CT volumes (SimpleITK, DICOM series) and tables; atomic writing of outputs."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .exceptions import ImageReadError, TableError

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
    """Read one DICOM series from ``folder``: the only one there, or the one named by ``series_uid``."""
    return _read_dicom_files(_dicom_series_files(folder, series_uid))


def _slice_header(path: str) -> sitk.ImageFileReader:
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return reader


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
        step = (np.asarray(_slice_header(files[-1]).GetOrigin()) - np.asarray(first.GetOrigin())) / (len(files) - 1)
        length = float(np.linalg.norm(step))
        if length == 0 or not np.allclose(step / length, direction[:, 2], atol=1e-4):
            return None
        spacing[2] = length
    return ImageGeometry((nx, ny, len(files)), tuple(first.GetOrigin()), tuple(spacing), tuple(direction.ravel()))


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
            raise ImageReadError(f"'{self.name}': file not found")
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
        self.geometry = ImageGeometry.of(reader)

    def _hold(self, image: sitk.Image, name: str) -> None:
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
            raise ImageReadError(f"'{name}': file not found")
        with _reader_errors(name):
            image = _read_dicom_series(p, series_uid) if p.is_dir() else sitk.ReadImage(str(p))
    _check_scalar_3d(name, image.GetDimension(), image.GetNumberOfComponentsPerPixel(), image.GetSize())
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


def read_table(path: PathLike) -> pd.DataFrame:
    """Read a CSV or Parquet table (by extension) into a DataFrame with a fresh RangeIndex.

    Raises
    ------
    TableError
        The file is missing or cannot be parsed.
    """
    p = Path(path)
    if not p.is_file():
        raise TableError(f"'{p}': table file not found")
    try:
        if p.suffix.lower() in (".parquet", ".pq"):
            df = pd.read_parquet(p)
        else:
            df = pd.read_csv(p)
    except ImportError as exc:
        raise TableError(f"'{p}': reading Parquet needs pyarrow: pip install 'fmcib[parquet]'") from exc
    except Exception as exc:  # pandas raises many parser error types
        raise TableError(f"'{p}': cannot parse table ({exc})") from exc
    return df.reset_index(drop=True)


@contextlib.contextmanager
def atomic_path(path: PathLike, keep_suffix: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` atomically.

    Readers never see a half-written file: either the old file or the complete new one exists.
    On error the temporary file is removed and ``path`` is left untouched. ``keep_suffix`` ends the
    temporary name with the target's suffix (``.nii.gz`` counts as one), for writers that choose the
    format from the file name.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".tmp"
    if keep_suffix:
        suffix += ".nii.gz" if target.name.endswith(".nii.gz") else target.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_image(image: sitk.Image, path: PathLike) -> None:
    """Write a SimpleITK image atomically; the format follows the suffix (``.nii.gz`` is compressed)."""
    with atomic_path(path, keep_suffix=True) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=str(path).endswith(".gz"))


def write_table(df: pd.DataFrame, path: PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``df`` atomically as Parquet (``.parquet``/``.pq``) or CSV (anything else).

    ``metadata`` (JSON-serialisable; default: the provenance in ``df.attrs["fmcib"]``, which
    :func:`fmcib.extract_features` sets) goes into the Parquet schema metadata under the key ``fmcib``;
    for CSV it is written atomically to the sidecar ``<path>.json``. Other ``df.attrs`` are not written.
    """
    target = Path(path)
    if metadata is None:
        metadata = df.attrs.get("fmcib")
    df = pd.DataFrame(df, copy=False)  # without attrs: pandas would try to serialise them into Parquet
    if target.suffix.lower() in (".parquet", ".pq"):
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as exc:
            raise TableError("writing Parquet needs pyarrow: pip install 'fmcib[parquet]' (or write .csv)") from exc
        table = pa.Table.from_pandas(df, preserve_index=False)
        if metadata is not None:
            merged = dict(table.schema.metadata or {})
            merged[b"fmcib"] = json.dumps(metadata).encode()
            table = table.replace_schema_metadata(merged)
        with atomic_path(target) as tmp:
            pq.write_table(table, tmp)
    else:
        with atomic_path(target) as tmp:
            df.to_csv(tmp, index=False)
        if metadata is not None:
            with atomic_path(_sidecar(target)) as tmp:
                tmp.write_text(json.dumps(metadata, indent=1))


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_table_metadata(path: PathLike) -> dict[str, Any] | None:
    """Return the fmcib metadata written by :func:`write_table` (Parquet metadata or JSON sidecar)."""
    p = Path(path)
    if p.suffix.lower() in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        raw = (pq.read_schema(p).metadata or {}).get(b"fmcib")
        return json.loads(raw) if raw else None
    side = _sidecar(p)
    return json.loads(side.read_text()) if side.is_file() else None
