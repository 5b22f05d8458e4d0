"""The preprocessing contract: seed point -> (1, D, H, W) patch on the original pipeline's 1 mm lattice.

Only the patch's own output grid is resampled (SimpleITK ``Resample`` onto an explicit origin,
spacing, size and identity direction); the whole volume is never resampled. See
``docs/preprocessing.md`` for the derivation and the measured parity with fmcib 1.0.0.
Array axis order is (z, y, x) = (D, H, W), as ``SimpleITK.GetArrayFromImage`` returns for an
LPS-aligned grid; nothing else in the package transposes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from .io import ImageGeometry, Region, open_scan
from .seeds import CoordinateSystem, check_inside, continuous_index, to_lps

if TYPE_CHECKING:
    import torch

__all__ = ["PreprocessConfig", "lattice_anchor", "patch_origin", "patch_region", "extract_patch", "patch_image",
           "preprocess"]

# A seed closer than this (in lattice units) to a lattice point counts as lying on it.
TIE_TOLERANCE = 1e-6
# Largest patch edge accepted from a config (256^3 float32 is 64 MB per patch already).
MAX_PATCH_SIZE = 256


@dataclass(frozen=True)
class PreprocessConfig:
    """Input contract of an encoder: patch geometry and intensity normalisation.

    Parameters
    ----------
    patch_size : int, default=50
        Edge of the cubic patch in voxels.
    spacing_mm : float, default=1.0
        Isotropic output spacing in millimetres.
    hu_offset, hu_scale : float, default=1024, 3072
        Intensities become ``(HU + hu_offset) / hu_scale``, without clipping.
    pad_hu : float, default=-1024
        Value (HU) of patch voxels outside the scan; 0 after normalisation with the defaults.
    """

    patch_size: int = 50
    spacing_mm: float = 1.0
    hu_offset: float = 1024.0
    hu_scale: float = 3072.0
    pad_hu: float = -1024.0

    def __post_init__(self) -> None:
        for name in ("spacing_mm", "hu_offset", "hu_scale", "pad_hu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.patch_size, bool) or int(self.patch_size) != self.patch_size \
                or not 1 <= self.patch_size <= MAX_PATCH_SIZE:
            raise ValueError(f"patch_size must be an integer from 1 to {MAX_PATCH_SIZE}, got {self.patch_size!r}")
        if not self.spacing_mm > 0:
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm!r}")
        if not self.hu_scale > 0:
            raise ValueError(f"hu_scale must be positive, got {self.hu_scale!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``preprocess`` block of a model's config.json)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Build from :meth:`to_dict` output; unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown preprocessing settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**dict(data))


def lattice_anchor(image: sitk.Image | ImageGeometry, spacing_mm: float = 1.0) -> np.ndarray:
    """A point (LPS mm) of the world-axis-aligned lattice the original pipeline resamples onto.

    MONAI ``Spacingd(diagonal=True)`` anchors its lattice at the bounding-box corner of the voxel
    centres with the smallest RAS coordinates. In LPS that is the largest x, the largest y and the
    smallest z over the eight corner voxel centres. The lattice is ``anchor + spacing_mm * k``.
    """
    size = image.GetSize()
    corners = np.array(
        [image.TransformContinuousIndexToPhysicalPoint([float(b * (n - 1)) for b, n in zip(bits, size)])
         for bits in np.ndindex(2, 2, 2)]
    )
    return np.array([corners[:, 0].max(), corners[:, 1].max(), corners[:, 2].min()])


def patch_origin(image: sitk.Image | ImageGeometry, seed_lps: Sequence[float],
                 config: PreprocessConfig) -> np.ndarray:
    """LPS position of the patch's first voxel (smallest x, y, z).

    Per axis: the largest lattice point at or below the seed, minus ``patch_size // 2`` steps,
    which is where fmcib 1.0.0's truncating crop starts for a seed inside the scan.
    """
    s = float(config.spacing_mm)
    anchor = lattice_anchor(image, s)
    steps = np.floor((np.asarray(seed_lps, dtype=np.float64) - anchor) / s + TIE_TOLERANCE)
    return anchor + (steps - config.patch_size // 2) * s


def _outside_fraction(image: sitk.Image | ImageGeometry, origin: np.ndarray, config: PreprocessConfig) -> float:
    """Share of patch voxel centres outside the image's physical extent."""
    n, s = int(config.patch_size), float(config.spacing_mm)
    base = continuous_index(image, origin[None, :])[0]
    step = continuous_index(image, (origin + np.eye(3) * s)) - base  # index change per patch step, per axis
    k = np.arange(n, dtype=np.float64)
    size = np.asarray(image.GetSize(), dtype=np.float64)
    inside = np.ones((n, n, n), dtype=bool)  # axes (x, y, z) of the patch
    for a in range(3):
        idx = (base[a] + step[0, a] * k[:, None, None] + step[1, a] * k[None, :, None]
               + step[2, a] * k[None, None, :])
        inside &= (idx >= -0.5) & (idx <= size[a] - 0.5)
    return 1.0 - float(inside.mean())


def patch_region(image: sitk.Image | ImageGeometry, origins: Sequence[Sequence[float]],
                 config: PreprocessConfig) -> Region | None:
    """Smallest voxel region ``(index, size)`` of the scan that yields the same patches as the whole scan.

    Per patch (given by its :func:`patch_origin`), the bounding box of its grid's continuous indices
    widened by one voxel on each side (linear interpolation reads the two neighbours, and a point
    must not fall within half a voxel of a region border that is not also the scan's border), then
    clipped to the scan and united over all patches. None when ``origins`` is empty.
    """
    if len(origins) == 0:
        return None
    n, s = int(config.patch_size), float(config.spacing_mm)
    size = np.asarray(image.GetSize(), dtype=np.int64)
    corners = np.array([np.asarray(o, np.float64) + np.array(bits) * (n - 1) * s
                        for o in origins for bits in np.ndindex(2, 2, 2)])
    idx = continuous_index(image, corners)
    lo = np.clip(np.floor(idx.min(axis=0)).astype(np.int64) - 1, 0, size - 1)
    hi = np.clip(np.ceil(idx.max(axis=0)).astype(np.int64) + 1, 0, size - 1)
    hi = np.maximum(hi, lo)
    return tuple(int(v) for v in lo), tuple(int(v) for v in hi - lo + 1)


def extract_patch(
    image: sitk.Image, seed_lps: Sequence[float], config: PreprocessConfig | None = None,
    geometry: ImageGeometry | None = None,
) -> tuple[np.ndarray, float]:
    """Resample one normalised patch around an LPS seed.

    Parameters
    ----------
    image : SimpleITK.Image
        3D scalar CT in HU: the whole scan, or a region of it holding :func:`patch_region`.
    seed_lps : sequence of 3 floats
        Seed in LPS mm; must lie inside the image (see :func:`fmcib.seeds.check_inside`).
    config : PreprocessConfig, optional
        Patch contract (default: 50^3 voxels at 1 mm).
    geometry : ImageGeometry, optional
        Geometry of the whole scan when ``image`` is only a region of it (the lattice and the
        padding fraction depend on the whole scan); default: ``image`` itself.

    Returns
    -------
    patch : numpy.ndarray of shape (patch_size,) * 3, float32
        Axes (z, y, x) in increasing LPS order, values ``(HU + 1024) / 3072``; trilinear inside the
        scan, ``pad_hu`` outside. The patch stays centred on the seed near borders.
    padding_fraction : float
        Share of the patch outside the scan.
    """
    cfg = config or PreprocessConfig()
    seed = np.asarray(seed_lps, dtype=np.float64)
    scan = geometry if geometry is not None else image
    origin = patch_origin(scan, seed, cfg)
    n = int(cfg.patch_size)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([n, n, n])
    resampler.SetOutputOrigin(origin.tolist())
    resampler.SetOutputSpacing([float(cfg.spacing_mm)] * 3)
    resampler.SetOutputDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(float(cfg.pad_hu))
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    patch = sitk.GetArrayFromImage(resampler.Execute(image))  # a copy: a view would outlive its image
    patch += np.float32(cfg.hu_offset)
    patch /= np.float32(cfg.hu_scale)
    return patch, _outside_fraction(scan, origin, cfg)


def patch_image(patch: np.ndarray, origin: Sequence[float], config: PreprocessConfig | None = None) -> sitk.Image:
    """A patch (or a map over it, e.g. a saliency map) as an image placed in the scan's physical space.

    ``patch`` has axes (z, y, x) as :func:`extract_patch` returns them; ``origin`` is its first voxel
    in LPS mm (:func:`patch_origin`). The image has identity direction and the patch spacing, so
    writing it to NIfTI puts it exactly over the scan in any viewer.
    """
    cfg = config or PreprocessConfig()
    image = sitk.GetImageFromArray(np.asarray(patch))
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing([float(cfg.spacing_mm)] * 3)
    image.SetDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    return image


def preprocess(
    image: str | os.PathLike | sitk.Image,
    seed: Sequence[float],
    coords: CoordinateSystem | str = "lps",
    size: int = 50,
    spacing: float = 1.0,
) -> torch.Tensor:
    """Turn an image and a seed point into the encoder's input patch.

    Parameters
    ----------
    image : path or SimpleITK.Image
        CT volume in HU (any format SimpleITK reads, or a DICOM series folder).
    seed : sequence of 3 floats
        Lesion seed ``(x, y, z)`` in the system named by ``coords``.
    coords : {"lps", "ras", "voxel"}, default="lps"
        Coordinate system of ``seed`` (see :func:`fmcib.seeds.to_lps`).
    size : int, default=50
        Patch edge in voxels.
    spacing : float, default=1.0
        Isotropic patch spacing in mm.

    Returns
    -------
    torch.Tensor of shape (1, size, size, size)
        float32, axes (channel, z, y, x).

    Raises
    ------
    SeedError
        The seed is not finite or lies outside the image.
    ImageReadError
        The image cannot be read or is not a 3D scalar volume.
    """
    import torch

    cfg = PreprocessConfig(patch_size=size, spacing_mm=spacing)
    scan = open_scan(image)
    seed_lps = to_lps(seed, coords, scan.geometry)
    check_inside(scan.geometry, seed_lps)
    region = patch_region(scan.geometry, [patch_origin(scan.geometry, seed_lps, cfg)], cfg)
    patch, _ = extract_patch(scan.read(region), seed_lps, cfg, geometry=scan.geometry)
    return torch.from_numpy(patch)[None]
