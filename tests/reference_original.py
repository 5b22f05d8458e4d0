"""Test-only reference: fmcib 1.0.0's inference preprocessing, step by step, with whole-volume MONAI transforms.

Written from the steps in fmcib 1.0.0 (``get_transforms(precropped=False)`` and ``SeedBasedPatchCrop``):
read with ITK (array in x, y, z order; RAS affine), (HU + 1024) / 3072, ``Spacing(pixdim=1,
diagonal=True, align_corners=True)``, ``Orientation("LPS")``, LPS seed -> RAS -> voxel by the inverse
affine and ``int()``, crop [c - s//2, c + s//2) clamped, transpose to (z, y, x), symmetric pad.
It is deliberately slow (whole volume) and independent of fmcib's own geometry code.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Orientation, Spacing, SpatialPad


def itk_reader_like(image: sitk.Image) -> MetaTensor:
    """What MONAI's ITKReader + EnsureChannelFirst produce: (1, x, y, z) array, RAS affine."""
    array = sitk.GetArrayFromImage(image).T.astype(np.float32)
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    lps[:3, 3] = image.GetOrigin()
    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps
    return MetaTensor(torch.from_numpy(np.ascontiguousarray(array))[None], affine=torch.as_tensor(ras))


def resampled_volume(image: sitk.Image, spacing: float = 1.0) -> MetaTensor:
    """Steps 1-4: normalise, resample the whole volume, reorient to LPS."""
    x = itk_reader_like(image)
    x = (x + 1024.0) / 3072.0
    x = Spacing(pixdim=spacing, mode="bilinear", padding_mode="zeros", align_corners=True, diagonal=True)(x)
    return Orientation(axcodes="LPS", labels=(("L", "R"), ("P", "A"), ("I", "S")))(x)


def original_patch(volume: MetaTensor, seed_lps, size: int = 50) -> np.ndarray:
    """Steps 5-7 on an already resampled volume: truncating crop, transpose, symmetric pad."""
    x, y, z = (float(v) for v in seed_lps)
    centre = np.linalg.inv(np.asarray(volume.affine, dtype=np.float64)) @ np.array([-x, -y, z, 1.0])
    c = [int(v) for v in centre[:3]]
    _, H, W, D = volume.shape
    lo = [max(ci - size // 2, 0) for ci in c]
    hi = [min(ci + size // 2, n) for ci, n in zip(c, (H, W, D))]
    patch = volume[:, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    patch = patch.permute(0, 3, 2, 1)
    patch = SpatialPad(spatial_size=(size, size, size))(patch)
    return np.asarray(patch.as_tensor() if isinstance(patch, MetaTensor) else patch)[0]


def seed_voxel_index(volume: MetaTensor, seed_lps) -> np.ndarray:
    """Continuous (x, y, z) index of an LPS seed in the resampled LPS volume (to tell ties and borders)."""
    x, y, z = (float(v) for v in seed_lps)
    return (np.linalg.inv(np.asarray(volume.affine, dtype=np.float64)) @ np.array([-x, -y, z, 1.0]))[:3]
