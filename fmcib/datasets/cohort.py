"""A synthetic longitudinal cohort: patients with a CT scan and a clinical vector at every visit.

The imaging counterpart of :func:`fmcib.datasets.make_longitudinal_table` (which works in feature space):
hidden binary variables drive both a lesion that grows or shrinks across the CT scans of a patient's
visits and the clinical values recorded at those visits, and the label follows a known rule. Tables join
``fmcib extract`` output on ``patient`` and ``month``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from .synthetic import AIR_HU, SOFT_TISSUE_HU

__all__ = ["COHORT_LATENTS", "make_cohort_benchmark", "make_longitudinal_ct"]

COHORT_LATENTS = ("aggressive", "responder", "dense", "smoker")
CLINICAL_COLUMNS = ("clin_marker", "clin_smoking", "clin_weight", "clin_age")


def _lesion_scan(radius_mm: float, density_hu: float, size: Sequence[int], spacing: Sequence[float],
                 noise_hu: float, rng: np.random.Generator) -> tuple[sitk.Image, tuple[float, float, float]]:
    """A soft-tissue body with one spherical lesion near the centre; returns the scan and the lesion's LPS centre."""
    nx, ny, nz = (int(v) for v in size)
    sp = np.array([float(v) for v in spacing])
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (nz, ny, nx)), indexing="ij")
    body = ((xx - (nx - 1) / 2) / (0.46 * nx)) ** 2 + ((yy - (ny - 1) / 2) / (0.42 * ny)) ** 2 <= 1
    volume = np.where(body, SOFT_TISSUE_HU, AIR_HU).astype(np.float32)
    centre = (np.array([nx, ny, nz]) - 1) / 2 + rng.uniform(-2.0, 2.0, 3) / sp
    dist_mm = np.sqrt(((xx - centre[0]) * sp[0]) ** 2 + ((yy - centre[1]) * sp[1]) ** 2
                      + ((zz - centre[2]) * sp[2]) ** 2)
    weight = 1 / (1 + np.exp((dist_mm - radius_mm) / 0.7))
    volume = (1 - weight) * volume + weight * density_hu
    volume += rng.standard_normal(volume.shape).astype(np.float32) * np.float32(noise_hu)
    image = sitk.GetImageFromArray(np.clip(np.rint(volume), -1024, 3071).astype(np.int16))
    image.SetSpacing(tuple(sp))
    image.SetOrigin(tuple(-(np.array([nx, ny, nz]) - 1) * sp / 2))
    point = image.TransformContinuousIndexToPhysicalPoint(tuple(float(c) for c in centre))
    return image, point


def make_longitudinal_ct(
    folder: str | os.PathLike,
    n_patients: int = 100,
    visits: tuple[int, int] = (2, 4),
    size: Sequence[int] = (48, 48, 24),
    spacing: Sequence[float] = (1.0, 1.0, 2.0),
    missing: float = 0.1,
    noise_hu: float = 15.0,
    prefix: str = "P",
    random_state: int | None = 0,
) -> pd.DataFrame:
    """Write a CT per visit of ``n_patients`` synthetic patients under ``folder``; return the long table.

    Per patient four hidden variables are drawn with probability 1/2 (:data:`COHORT_LATENTS`):

    - ``aggressive``: the lesion grows (radius x e^(0.04 / month)); otherwise it stays within a few percent;
    - ``responder``: an aggressive lesion shrinks after month 6 instead (treatment response);
    - ``dense``: lesion density 90 instead of 20 HU (seen on every scan, unrelated to the label);
    - ``smoker``: clinical only.

    The baseline radius (4-7 mm) is drawn independently, so a single scan says little about the label:
    ``label`` = aggressive and not responder (progression), seen only across visits. Clinical values per
    visit: ``clin_marker`` (log lesion volume plus noise: a tumour marker), ``clin_smoking`` (smoker plus
    noise), ``clin_weight`` (losing weight with progression) and ``clin_age`` (unrelated). Visits: month 0
    and up to three more within 24 months; the scan (``image_path`` empty) or the clinical values (NaN)
    are missing at ``missing`` of the visits each, never both.

    Columns: ``patient``, ``month``, ``image_path``, ``coordX/Y/Z`` (LPS mm, NaN without a scan), the clinical
    columns, ``radius_mm``, the four latents and ``label``.
    """
    rng = np.random.default_rng(random_state)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for p in range(int(n_patients)):
        latent = {name: int(rng.random() < 0.5) for name in COHORT_LATENTS}
        progression = latent["aggressive"] and not latent["responder"]
        r0, age = rng.uniform(4.0, 7.0), rng.normal(0.0, 1.0)
        count = int(rng.integers(visits[0], visits[1] + 1))
        months = np.concatenate([[0.0], np.sort(rng.uniform(3.0, 24.0, count - 1))]).round(1)
        for month in months:
            if latent["aggressive"]:
                rate = 0.04 * month if not latent["responder"] else 0.04 * min(month, 6.0) - 0.05 * max(month - 6, 0)
            else:
                rate = rng.normal(0.0, 0.02)
            radius = float(np.clip(r0 * np.exp(rate), 2.5, 16.0))
            clinical = {"clin_marker": 3 * np.log(radius) + rng.normal(0, 0.5),
                        "clin_smoking": latent["smoker"] + rng.normal(0, 0.5),
                        "clin_weight": -0.03 * month * progression + rng.normal(0, 0.3),
                        "clin_age": age + rng.normal(0, 0.1)}
            drop = rng.random()
            row = {"patient": f"{prefix}{p:04d}", "month": float(month), "image_path": "", "coordX": np.nan,
                   "coordY": np.nan, "coordZ": np.nan}
            if drop >= missing:  # the scan exists
                image, point = _lesion_scan(radius, 90.0 if latent["dense"] else 20.0, size, spacing, noise_hu, rng)
                path = out / f"{prefix}{p:04d}_m{month:04.1f}.nii.gz"
                sitk.WriteImage(image, str(path), useCompression=True)
                row.update(image_path=str(path), coordX=point[0], coordY=point[1], coordZ=point[2])
            if missing <= drop < 2 * missing:
                clinical = dict.fromkeys(clinical, np.nan)
            rows.append({**row, **clinical, "radius_mm": radius, **latent, "label": int(progression)})
    return pd.DataFrame(rows)


def make_cohort_benchmark(folder: str | os.PathLike, pool_patients: int = 200, labelled_patients: int = 100,
                          test_patients: int = 100, random_state: int = 0, **kwargs: object) -> dict[str, Path]:
    """Write three disjoint cohorts of :func:`make_longitudinal_ct` under ``folder``: ``pool.csv`` (no latent or
    label columns: for self-supervised pretraining), ``labelled.csv`` and ``test.csv``; returns their paths."""
    out = Path(folder)
    tables: dict[str, Path] = {}
    for split, count, offset, prefix in (("pool", pool_patients, 0, "U"), ("labelled", labelled_patients, 1, "L"),
                                         ("test", test_patients, 2, "T")):
        table = make_longitudinal_ct(out / split, count, prefix=prefix, random_state=random_state * 10 + offset,
                                     **kwargs)  # type: ignore[arg-type]
        if split == "pool":
            table = table.drop(columns=[*COHORT_LATENTS, "label", "radius_mm"])
        tables[split] = out / f"{split}.csv"
        table.to_csv(tables[split], index=False)
    return tables
