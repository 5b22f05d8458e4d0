"""CT-like synthetic volumes with ellipsoid lesions, their label masks and a matching seeds table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

__all__ = ["SyntheticCT", "make_synthetic_ct", "write_dicom_series", "make_demo_features"]

# Typical HU levels of the tissues drawn.
AIR_HU, LUNG_HU, SOFT_TISSUE_HU, BONE_HU = -1000.0, -850.0, 40.0, 700.0


@dataclass
class SyntheticCT:
    """A synthetic scan: ``image`` (int16 HU), ``mask`` (uint8, lesion ``i`` has label ``i``) and ``seeds``.

    ``seeds`` has ``image_path`` (empty until :meth:`save`), ``coordX/Y/Z`` = lesion centres in LPS mm,
    ``label``, ``radius_mm`` (semi-axes x, y, z), ``density_hu`` and ``site`` ("lung" or "soft_tissue").
    """

    image: sitk.Image
    mask: sitk.Image
    seeds: pd.DataFrame

    def save(self, folder: str | os.PathLike, name: str = "case", suffix: str = ".nii.gz") -> pd.DataFrame:
        """Write ``<name>_ct<suffix>``, ``<name>_mask<suffix>`` and ``<name>_seeds.csv``; return the seeds with paths."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        image_path, mask_path = out / f"{name}_ct{suffix}", out / f"{name}_mask{suffix}"
        sitk.WriteImage(self.image, str(image_path), useCompression=suffix.endswith(".gz"))
        sitk.WriteImage(self.mask, str(mask_path), useCompression=suffix.endswith(".gz"))
        seeds = self.seeds.assign(image_path=str(image_path), mask_path=str(mask_path))
        seeds.to_csv(out / f"{name}_seeds.csv", index=False)
        return seeds


def make_synthetic_ct(
    size: Sequence[int] = (128, 128, 64),
    spacing: Sequence[float] = (0.8, 0.8, 2.5),
    origin: Sequence[float] | None = None,
    direction: Sequence[float] | None = None,
    n_lesions: int = 3,
    lesion_radius_mm: tuple[float, float] = (4.0, 15.0),
    noise_hu: float = 15.0,
    random_state: int | np.random.Generator | None = None,
) -> SyntheticCT:
    """Make a chest-like CT: air, a soft-tissue body, two lungs, a spine, and ellipsoid lesions.

    Parameters
    ----------
    size : (x, y, z) ints, default=(128, 128, 64)
        Voxels per axis (SimpleITK order).
    spacing : (x, y, z) floats, default=(0.8, 0.8, 2.5)
        Voxel spacing in mm.
    origin : (x, y, z) floats, optional
        LPS position of voxel (0, 0, 0); default centres the volume near (0, 0, 0).
    direction : 9 floats, optional
        Row-major direction cosines (default identity = LPS-aligned); flips and rotations allowed.
    n_lesions : int, default=3
        Lesions placed at random in the lungs or soft tissue.
    lesion_radius_mm : (min, max), default=(4, 15)
        Range of the lesions' semi-axes.
    noise_hu : float, default=15
        Standard deviation of the Gaussian noise.
    random_state : int or numpy.random.Generator, optional
        Seed for reproducibility.

    Returns
    -------
    SyntheticCT
    """
    rng = np.random.default_rng(random_state)
    nx, ny, nz = (int(v) for v in size)
    sx, sy, sz = (float(v) for v in spacing)
    # In-plane anatomy in mm relative to the volume centre (2D, broadcast along z).
    x = (np.arange(nx, dtype=np.float32) - (nx - 1) / 2) * sx
    y = (np.arange(ny, dtype=np.float32) - (ny - 1) / 2) * sy
    half_x, half_y = nx * sx / 2, ny * sy / 2
    yy, xx = np.meshgrid(y, x, indexing="ij")
    body = (xx / (0.9 * half_x)) ** 2 + (yy / (0.75 * half_y)) ** 2 <= 1
    lungs = np.zeros_like(body)
    for side in (-1, 1):
        lungs |= ((xx - side * 0.4 * half_x) / (0.3 * half_x)) ** 2 + ((yy + 0.05 * half_y) / (0.5 * half_y)) ** 2 <= 1
    spine = (xx / (0.1 * half_x)) ** 2 + ((yy - 0.55 * half_y) / (0.1 * half_y)) ** 2 <= 1
    plane = np.full((ny, nx), AIR_HU, np.float32)
    plane[body] = SOFT_TISSUE_HU
    plane[lungs & body] = LUNG_HU
    plane[spine] = BONE_HU
    volume = np.broadcast_to(plane, (nz, ny, nx)).copy()
    if noise_hu > 0:
        volume += rng.standard_normal(volume.shape, dtype=np.float32) * np.float32(noise_hu)
    labels = np.zeros((nz, ny, nx), np.uint8)

    image = sitk.GetImageFromArray(volume)  # geometry set below; lesions drawn in index space
    image.SetSpacing((sx, sy, sz))
    image.SetOrigin(tuple(origin) if origin is not None else (-(nx - 1) * sx / 2, -(ny - 1) * sy / 2, -(nz - 1) * sz / 2))
    if direction is not None:
        image.SetDirection(tuple(float(v) for v in direction))

    rows = []
    lo, hi = lesion_radius_mm
    for i in range(int(n_lesions)):
        radii = rng.uniform(lo, hi, size=3) * np.array([1.0, 1.0, rng.uniform(0.7, 1.2)])
        site = "lung" if rng.random() < 0.6 else "soft_tissue"
        allowed = (lungs if site == "lung" else (body & ~lungs & ~spine))
        cand = np.argwhere(allowed)
        if cand.size == 0:
            cand = np.argwhere(body)
        cy, cx = cand[rng.integers(len(cand))] + rng.uniform(-0.5, 0.5, size=2)
        margin = radii[2] / sz + 1
        cz = rng.uniform(min(margin, (nz - 1) / 2), max(nz - 1 - margin, (nz - 1) / 2))
        density = rng.uniform(-50.0, 120.0)
        # Bounding box of the ellipsoid in index space.
        r_idx = radii / np.array([sx, sy, sz])
        x0, x1 = max(int(cx - r_idx[0]) - 1, 0), min(int(cx + r_idx[0]) + 2, nx)
        y0, y1 = max(int(cy - r_idx[1]) - 1, 0), min(int(cy + r_idx[1]) + 2, ny)
        z0, z1 = max(int(cz - r_idx[2]) - 1, 0), min(int(cz + r_idx[2]) + 2, nz)
        gz, gy, gx = np.meshgrid(np.arange(z0, z1), np.arange(y0, y1), np.arange(x0, x1), indexing="ij")
        d2 = (((gx - cx) * sx / radii[0]) ** 2 + ((gy - cy) * sy / radii[1]) ** 2
              + ((gz - cz) * sz / radii[2]) ** 2)
        inside = d2 <= 1
        freq = rng.uniform(0.2, 0.8, size=3)
        texture = 25.0 * np.sin(freq[0] * gx * sx) * np.sin(freq[1] * gy * sy) * np.sin(freq[2] * gz * sz)
        sub = volume[z0:z1, y0:y1, x0:x1]
        sub[inside] = (density + texture + rng.standard_normal(sub.shape) * noise_hu)[inside]
        labels[z0:z1, y0:y1, x0:x1][inside] = i + 1
        centre = image.TransformContinuousIndexToPhysicalPoint((float(cx), float(cy), float(cz)))
        rows.append({"image_path": "", "coordX": centre[0], "coordY": centre[1], "coordZ": centre[2],
                     "label": i + 1, "radius_x_mm": radii[0], "radius_y_mm": radii[1], "radius_z_mm": radii[2],
                     "density_hu": density, "site": site})

    ct = sitk.GetImageFromArray(np.clip(np.rint(volume), -1024, 3071).astype(np.int16))
    ct.CopyInformation(image)
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    return SyntheticCT(image=ct, mask=mask, seeds=pd.DataFrame(rows))


def write_dicom_series(image: sitk.Image, folder: str | os.PathLike, series_uid: str | None = None) -> list[Path]:
    """Write a 3D CT (HU) as a DICOM series, one int16 file per slice, with the tags that place each slice.

    Per slice: ImageOrientationPatient (the first two direction columns), ImagePositionPatient (the
    slice's first voxel), PixelSpacing, SliceThickness, InstanceNumber, rescale slope 1 / intercept 0 and
    one SeriesInstanceUID, so that reading the folder back gives the same voxels in the same place
    (the slice order follows the normal, as GDCM sorts). Returns the files in slice order.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    volume = sitk.Cast(image, sitk.sitkInt16)
    direction = np.asarray(volume.GetDirection(), dtype=np.float64).reshape(3, 3)
    digits = "".join(str(d) for d in np.random.default_rng().integers(0, 10, 20))
    uid = series_uid or f"1.2.826.0.1.3680043.2.1125.{digits}"
    sx, sy, sz = volume.GetSpacing()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(volume.GetDepth()):
        plane = volume[:, :, k]
        tags = {
            "0008|0060": "CT", "0010|0020": "SYNTHETIC", "0020|000d": f"{uid}.1", "0020|000e": uid,
            "0008|0018": f"{uid}.2.{k + 1}", "0020|0013": str(k + 1),
            "0020|0037": "\\".join(f"{v:.10f}" for v in (*direction[:, 0], *direction[:, 1])),
            "0020|0032": "\\".join(f"{v:.6f}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))),
            "0028|0030": f"{sy:.6f}\\{sx:.6f}", "0018|0050": f"{sz:.6f}", "0028|1052": "0", "0028|1053": "1",
        }
        for tag, value in tags.items():
            plane.SetMetaData(tag, value)
        files.append(out / f"{k:04d}.dcm")
        writer.SetFileName(str(files[-1]))
        writer.Execute(plane)
    return files


def make_demo_features(n: int = 300, n_features: int = 16, signal: float = 1.0,
                       random_state: int | None = 0) -> pd.DataFrame:
    """A synthetic features table for trying the downstream statistics: no outcome data can be shipped.

    Columns: ``lesion_id``; ``pred_0 .. pred_{n_features-1}`` (standard normal, plus ``signal`` times the
    label in the first three); ``label`` (0/1); ``split`` (first half ``train``, next sixth ``tune``, the
    rest ``test``); ``is_tune``; ``time`` (months, exponential, shorter for label 1) and ``event`` (1 = observed,
    80%). The probe should find the signal and the survival curves should separate.
    """
    rng = np.random.default_rng(random_state)
    y = rng.integers(0, 2, n)
    table = pd.DataFrame(rng.normal(size=(n, n_features)), columns=[f"pred_{i}" for i in range(n_features)])
    table.iloc[:, :3] += signal * y[:, None]
    table.insert(0, "lesion_id", [f"L{i:04d}" for i in range(n)])
    table["label"] = y
    table["split"] = np.select([np.arange(n) < n // 2, np.arange(n) < 2 * n // 3], ["train", "tune"], "test")
    table["is_tune"] = table["split"] == "tune"
    table["time"] = np.round(rng.exponential(np.where(y == 1, 12.0, 30.0)), 2)
    table["event"] = (rng.random(n) < 0.8).astype(int)
    return table
