"""CT-like synthetic volumes with ellipsoid lesions, their label masks and a matching seeds table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

__all__ = ["SyntheticCT", "make_synthetic_ct", "make_latent_ct", "make_lesion_benchmark", "LATENTS",
           "make_longitudinal_table", "write_dicom_series", "make_demo_features"]

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


# The independent binary latent variables of :func:`make_latent_ct` lesions, and what each level draws.
LATENTS: dict[str, str] = {
    "size": "0: semi-axis 4-5.5 mm; 1: 8-10 mm",
    "elongation": "0: round; 1: one in-plane axis 1.8x longer, the others 1.3x shorter",
    "density": "0: 0 HU; 1: 90 HU (the organ around is 40 HU)",
    "texture": "0: smooth (scanner noise only); 1: coarse internal texture (smoothed noise, SD 35 HU)",
    "margin": "0: sharp edge; 1: blurred edge (logistic, 1.5 mm wide)",
}


def make_latent_ct(
    size: Sequence[int] = (96, 96, 40),
    spacing: Sequence[float] = (1.0, 1.0, 2.0),
    n_lesions: int = 4,
    noise_hu: float = 15.0,
    random_state: int | np.random.Generator | None = None,
) -> SyntheticCT:
    """A CT-like scan whose lesions are driven by independent binary latent variables (:data:`LATENTS`).

    A 3D counterpart of the synthetic environment of Li et al.: a soft-tissue body (40 HU) in air, with
    ``n_lesions`` lesions placed apart from each other; each draws ``size``, ``elongation``, ``density``,
    ``texture`` and ``margin`` independently with probability 1/2, so a label can only be read from the
    lesion's own appearance. ``seeds`` holds the LPS centres, ``label`` and the five latents (0/1).
    """
    from scipy import ndimage

    rng = np.random.default_rng(random_state)
    nx, ny, nz = (int(v) for v in size)
    sp = np.array([float(v) for v in spacing])  # x, y, z
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (nz, ny, nx)), indexing="ij")
    body = ((xx - (nx - 1) / 2) / (0.46 * nx)) ** 2 + ((yy - (ny - 1) / 2) / (0.42 * ny)) ** 2 <= 1
    volume = np.where(body, SOFT_TISSUE_HU, AIR_HU).astype(np.float32)
    labels = np.zeros((nz, ny, nx), np.uint8)
    image = sitk.GetImageFromArray(volume)
    image.SetSpacing(tuple(sp))
    image.SetOrigin(tuple(-(np.array([nx, ny, nz]) - 1) * sp / 2))
    rows: list[dict[str, object]] = []
    centres: list[np.ndarray] = []
    for i in range(int(n_lesions)):
        latent = {name: int(rng.random() < 0.5) for name in LATENTS}
        r = rng.uniform(8.0, 10.0) if latent["size"] else rng.uniform(4.0, 5.5)
        radii = np.array([r, r, r])
        if latent["elongation"]:
            long_axis = int(rng.integers(2))
            radii = radii / 1.3
            radii[long_axis] = r * 1.8
        reach = radii.max() + 4.0  # mm kept inside the body and away from other lesions
        semi = np.array([0.46 * nx * sp[0], 0.42 * ny * sp[1]]) - reach  # the body's ellipse, shrunk by reach
        for _ in range(500):
            centre = rng.uniform(reach / sp, np.array([nx, ny, nz]) - 1 - reach / sp)
            offset = (centre[:2] - (np.array([nx, ny]) - 1) / 2) * sp[:2]
            inside = bool(np.all(semi > 0) and np.sum((offset / semi) ** 2) <= 1)
            far = all(np.linalg.norm((centre - c) * sp) > reach + 14.0 for c in centres)
            if inside and far:
                break
        centres.append(centre)
        dist = np.sqrt((((xx - centre[0]) * sp[0] / radii[0]) ** 2 + ((yy - centre[1]) * sp[1] / radii[1]) ** 2
                        + ((zz - centre[2]) * sp[2] / radii[2]) ** 2))
        edge_mm = (dist - 1.0) * radii.min()  # about the signed distance to the surface, in mm
        weight = 1 / (1 + np.exp(edge_mm / 0.5)) if not latent["margin"] else 1 / (1 + np.exp(edge_mm / 1.5))
        value = np.full(volume.shape, 90.0 if latent["density"] else 0.0, np.float32)
        if latent["texture"]:
            coarse = ndimage.gaussian_filter(rng.standard_normal(volume.shape).astype(np.float32), sigma=1.2)
            value += coarse / max(float(coarse.std()), 1e-6) * 35.0
        volume = (1 - weight) * volume + weight * value
        labels[dist <= 1] = i + 1
        point = image.TransformContinuousIndexToPhysicalPoint(tuple(float(c) for c in centre))
        rows.append({"image_path": "", "coordX": point[0], "coordY": point[1], "coordZ": point[2], "label": i + 1,
                     **latent})
    if noise_hu > 0:
        volume += rng.standard_normal(volume.shape).astype(np.float32) * np.float32(noise_hu)
    ct = sitk.GetImageFromArray(np.clip(np.rint(volume), -1024, 3071).astype(np.int16))
    ct.CopyInformation(image)
    mask = sitk.GetImageFromArray(labels)
    mask.CopyInformation(image)
    return SyntheticCT(image=ct, mask=mask, seeds=pd.DataFrame(rows))


def make_lesion_benchmark(folder: str | os.PathLike, pool_scans: int = 40, labelled_scans: int = 20,
                          test_scans: int = 20, lesions_per_scan: int = 4, size: Sequence[int] = (96, 96, 40),
                          spacing: Sequence[float] = (1.0, 1.0, 2.0), random_state: int = 0) -> dict[str, Path]:
    """Write the synthetic lesion benchmark: an unlabelled pool, a labelled set and a fixed test set.

    Every scan comes from :func:`make_latent_ct` with its own seed (``random_state`` + a per-split offset),
    so the three sets share no scan. Returns the seeds tables: ``pool.csv`` (no latent columns: it is for
    self-supervised pretraining), ``labelled.csv`` and ``test.csv`` (with the five latents), under ``folder``.
    """
    out = Path(folder)
    tables: dict[str, Path] = {}
    for split, count, offset in (("pool", pool_scans, 0), ("labelled", labelled_scans, 100_000),
                                 ("test", test_scans, 200_000)):
        frames = [make_latent_ct(size, spacing, lesions_per_scan, random_state=random_state + offset + k)
                  .save(out / split, f"{split}{k:04d}") for k in range(count)]
        table = pd.concat(frames, ignore_index=True).drop(columns=["mask_path"])
        if split == "pool":
            table = table.drop(columns=list(LATENTS))
        tables[split] = out / f"{split}.csv"
        table.to_csv(tables[split], index=False)
    return tables


def make_longitudinal_table(n_patients: int = 200, time_points: tuple[int, int] = (2, 5), image_dim: int = 16,
                            clinical_dim: int = 6, missing: float = 0.2, noise: float = 2.0,
                            random_state: int | None = 0) -> pd.DataFrame:
    """A long table of patients over time: image features (``pred_*``) and a clinical vector (``clin_*``) per
    visit, both driven by three hidden binary variables, and a label from a known rule.

    Per patient, ``aggressive``, ``smoker`` and ``responder`` are drawn with probability 1/2. Image features:
    a fixed random loading of ``smoker`` and ``responder``, plus growth over time for aggressive lesions,
    slowed for responders (aggressiveness is visible only across visits); clinical values: another loading of the latents plus a drift with time for smokers.
    Visits are 2-5 (``time_points``) at irregular months; each modality is missing at ``missing`` of the
    visits (never both). ``label`` = aggressive and not responder. Columns: ``patient``, ``month``,
    ``pred_*``, ``clin_*``, the three latents and ``label``.
    """
    rng = np.random.default_rng(random_state)
    load_img = np.random.default_rng(1234).normal(size=(3, image_dim))
    load_img[0] = 0.0  # aggressiveness shows only as growth over time, never in a single visit
    load_cli = np.random.default_rng(4321).normal(size=(3, clinical_dim))
    growth = np.random.default_rng(99).normal(size=image_dim)
    rows = []
    for p in range(int(n_patients)):
        z = rng.integers(0, 2, 3)
        visits = int(rng.integers(time_points[0], time_points[1] + 1))
        months = np.sort(rng.uniform(0, 36, visits)).round(1)
        for month in months:
            slope = 0.04 * z[0] * (1 - 0.8 * z[2])
            img = z @ load_img + slope * month * growth + rng.normal(scale=noise, size=image_dim)
            cli = z @ load_cli + 0.03 * z[1] * month + rng.normal(scale=noise, size=clinical_dim)
            drop = rng.random()
            if drop < missing:
                img[:] = np.nan
            elif drop < 2 * missing:
                cli[:] = np.nan
            rows.append({"patient": f"P{p:04d}", "month": float(month),
                         **{f"pred_{j}": v for j, v in enumerate(img)}, **{f"clin_{j}": v for j, v in enumerate(cli)},
                         "aggressive": int(z[0]), "smoker": int(z[1]), "responder": int(z[2]),
                         "label": int(z[0] and not z[2])})
    return pd.DataFrame(rows)
