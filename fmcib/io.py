"""Reading CT volumes (SimpleITK, DICOM series) and tables; atomic writing of outputs."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import SimpleITK as sitk

from .exceptions import ImageReadError, TableError

__all__ = [
    "read_image",
    "read_table",
    "write_table",
    "read_table_metadata",
    "atomic_path",
    "describe_image",
]

PathLike = str | os.PathLike


def _read_dicom_series(folder: Path, series_uid: str | None) -> sitk.Image:
    """Read one DICOM series from ``folder``: the only one there, or the one named by ``series_uid``."""
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
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


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
        try:
            image = _read_dicom_series(p, series_uid) if p.is_dir() else sitk.ReadImage(str(p))
        except ImageReadError:
            raise
        except RuntimeError as exc:  # SimpleITK reports every reader failure as RuntimeError
            first = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise ImageReadError(f"'{name}': cannot read image ({first})") from exc
    if image.GetDimension() != 3:
        raise ImageReadError(
            f"'{name}': expected a 3D volume, got a {image.GetDimension()}D image of size {image.GetSize()}"
        )
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(
            f"'{name}': expected one intensity per voxel, got {image.GetNumberOfComponentsPerPixel()} "
            "components (colour or vector image)"
        )
    return image


def describe_image(image: sitk.Image) -> str:
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
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path`` atomically.

    Readers never see a half-written file: either the old file or the complete new one exists.
    On error the temporary file is removed and ``path`` is left untouched.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_table(df: pd.DataFrame, path: PathLike, metadata: Mapping[str, Any] | None = None) -> None:
    """Write ``df`` atomically as Parquet (``.parquet``/``.pq``) or CSV (anything else).

    ``metadata`` (JSON-serialisable) goes into the Parquet schema metadata under the key ``fmcib``;
    for CSV it is written atomically to the sidecar ``<path>.json``.
    """
    target = Path(path)
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
