"""The preprocessing contract: seed point -> (1, D, H, W) patch on the original pipeline's 1 mm lattice.

Only the patch's own output grid is resampled (SimpleITK ``Resample`` onto an explicit origin,
spacing, size and identity direction); the whole volume is never resampled. See
``docs/preprocessing.md`` for the derivation and the measured parity with fmcib 1.0.0.
Array axis order is (z, y, x) = (D, H, W), as ``SimpleITK.GetArrayFromImage`` returns for an
LPS-aligned grid; nothing else in the package transposes.
"""

from __future__ import annotations

import dataclasses
import functools
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
           "model_input", "contract_of", "preprocess"]

# A seed closer than this (in lattice units) to a lattice point counts as lying on it.
TIE_TOLERANCE = 1e-6
# Largest patch edge accepted from a config (256^3 float32 is 64 MB per patch already).
MAX_PATCH_SIZE = 256


Triple = tuple[float, float, float]


def _per_axis(value: Any, name: str, kind: type) -> Any:
    """``value`` as one number (the same on every axis) or an (x, y, z) triple; lists from JSON become tuples."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != 3:
            raise ValueError(f"{name} must be one number or three (x, y, z), got {list(value)!r}")
        values = tuple(value)
        if len({float(v) for v in values}) == 1:  # (50, 50, 50) is 50: one spelling per contract
            values = values[0]
    else:
        values = value
    for v in values if isinstance(values, tuple) else (values,):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not np.isfinite(v):
            raise ValueError(f"{name} must be finite numbers, got {value!r}")
        if kind is int and int(v) != v:
            raise ValueError(f"{name} must be whole numbers of voxels, got {value!r}")
    if isinstance(values, tuple):
        return tuple(kind(v) for v in values)
    return kind(values)


@dataclass(frozen=True)
class PreprocessConfig:
    """Input contract of an encoder: patch geometry, intensity mapping and channels.

    Per-axis values are given as one number (the same on every axis) or an ``(x, y, z)`` triple, the
    order SimpleITK and DICOM use for sizes and spacings; the patch array itself has axes (z, y, x).

    Parameters
    ----------
    patch_size : int or (int, int, int), default=50
        Patch size in voxels.
    spacing_mm : float or (float, float, float), default=1.0
        Output voxel spacing in millimetres.
    hu_offset, hu_scale : float, default=1024, 3072
        Intensities become ``(HU + hu_offset) / hu_scale``.
    pad_hu : float, default=-1024
        Value (HU) of patch voxels outside the scan; 0 after normalisation with the defaults.
    clip_hu : (float, float), optional
        HU window applied before the mapping (default: none, as the published fmcib encoder).
    channels : int, default=1
        Input channels of the encoder; the normalised patch is repeated in each.
    """

    patch_size: int | tuple[int, int, int] = 50
    spacing_mm: float | Triple = 1.0
    hu_offset: float = 1024.0
    hu_scale: float = 3072.0
    pad_hu: float = -1024.0
    clip_hu: tuple[float, float] | None = None
    channels: int = 1

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)
        set_("patch_size", _per_axis(self.patch_size, "patch_size", int))
        set_("spacing_mm", _per_axis(self.spacing_mm, "spacing_mm", float))
        for name in ("hu_offset", "hu_scale", "pad_hu"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)) \
                    or not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if not all(1 <= n <= MAX_PATCH_SIZE for n in self.size_xyz):
            raise ValueError(f"patch_size must be from 1 to {MAX_PATCH_SIZE} voxels per axis, got {self.patch_size!r}")
        if not all(s > 0 for s in self.spacing_xyz):
            raise ValueError(f"spacing_mm must be positive, got {self.spacing_mm!r}")
        if not self.hu_scale > 0:
            raise ValueError(f"hu_scale must be positive, got {self.hu_scale!r}")
        if self.clip_hu is not None:
            lo, hi = (float(v) for v in self.clip_hu)
            if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
                raise ValueError(f"clip_hu must be (low, high) HU with low < high, got {self.clip_hu!r}")
            set_("clip_hu", (lo, hi))
        if isinstance(self.channels, bool) or int(self.channels) != self.channels or self.channels < 1:
            raise ValueError(f"channels must be a positive integer, got {self.channels!r}")
        set_("channels", int(self.channels))

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Patch size in voxels along x, y, z."""
        n = self.patch_size
        return n if isinstance(n, tuple) else (n, n, n)

    @property
    def spacing_xyz(self) -> Triple:
        """Patch spacing in mm along x, y, z."""
        s = self.spacing_mm
        return s if isinstance(s, tuple) else (s, s, s)

    @property
    def input_shape(self) -> tuple[int, int, int, int]:
        """Shape of one encoder input, ``(channels, z, y, x)``."""
        x, y, z = self.size_xyz
        return (self.channels, z, y, x)

    def describe(self) -> str:
        """Short human form, e.g. ``"50^3 @ 1 mm"`` or ``"64x64x32 @ 0.8x0.8x2 mm"``."""
        size = f"{self.patch_size}^3" if isinstance(self.patch_size, int) else "x".join(map(str, self.patch_size))
        spacing = "x".join(f"{s:g}" for s in self.spacing_xyz) if isinstance(self.spacing_mm, tuple) \
            else f"{self.spacing_mm:g}"
        extra = f", HU clipped to {self.clip_hu[0]:g}..{self.clip_hu[1]:g}" if self.clip_hu else ""
        return f"{size} @ {spacing} mm{extra}" + (f", {self.channels} channels" if self.channels > 1 else "")

    def normalise(self, hu: np.ndarray) -> np.ndarray:
        """HU -> encoder intensities, in place on a float32 array: clip (if set), then ``(HU + offset) / scale``."""
        if self.clip_hu is not None:
            np.clip(hu, self.clip_hu[0], self.clip_hu[1], out=hu)
        hu += np.float32(self.hu_offset)
        hu /= np.float32(self.hu_scale)
        return hu

    def to_hu(self, values: np.ndarray) -> np.ndarray:
        """Encoder intensities -> HU (inverse of :meth:`normalise`, up to the clipping)."""
        return np.asarray(values, dtype=np.float64) * self.hu_scale - self.hu_offset

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``preprocess`` block of a model's config.json); an isotropic cube keeps the
        scalar form that configs written by fmcib 0.x use."""
        data = asdict(self)
        for key in ("patch_size", "spacing_mm", "clip_hu"):
            if isinstance(data[key], tuple):
                data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PreprocessConfig:
        """Build from :meth:`to_dict` output (or an older config lacking the newer keys); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown preprocessing settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**dict(data))

    def enlarged(self, margin_voxels: int) -> PreprocessConfig:
        """The same contract with ``margin_voxels`` more on each side of every axis (a crop to translate within)."""
        return dataclasses.replace(self, patch_size=tuple(n + 2 * int(margin_voxels) for n in self.size_xyz))


def lattice_anchor(image: sitk.Image | ImageGeometry) -> np.ndarray:
    """A point (LPS mm) of the world-axis-aligned lattice the original pipeline resamples onto.

    MONAI ``Spacingd(diagonal=True)`` anchors its lattice at the bounding-box corner of the voxel
    centres with the smallest RAS coordinates. In LPS that is the largest x, the largest y and the
    smallest z over the eight corner voxel centres. The lattice is ``anchor + spacing * k`` per axis.
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
    s = np.asarray(config.spacing_xyz, dtype=np.float64)
    anchor = lattice_anchor(image)
    steps = np.floor((np.asarray(seed_lps, dtype=np.float64) - anchor) / s + TIE_TOLERANCE)
    return anchor + (steps - np.asarray(config.size_xyz) // 2) * s


def _outside_fraction(image: sitk.Image | ImageGeometry, origin: np.ndarray, config: PreprocessConfig) -> float:
    """Share of patch voxel centres outside the image's physical extent."""
    n, s = config.size_xyz, np.asarray(config.spacing_xyz, dtype=np.float64)
    base = continuous_index(image, origin[None, :])[0]
    step = continuous_index(image, (origin + np.diag(s))) - base  # index change per patch step, per axis
    kx, ky, kz = (np.arange(m, dtype=np.float64) for m in n)
    size = np.asarray(image.GetSize(), dtype=np.float64)
    inside = np.ones(n, dtype=bool)  # axes (x, y, z) of the patch
    for a in range(3):
        idx = (base[a] + step[0, a] * kx[:, None, None] + step[1, a] * ky[None, :, None]
               + step[2, a] * kz[None, None, :])
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
    extent = (np.asarray(config.size_xyz) - 1) * np.asarray(config.spacing_xyz, dtype=np.float64)
    size = np.asarray(image.GetSize(), dtype=np.int64)
    corners = np.array([np.asarray(o, np.float64) + np.array(bits) * extent
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
    patch : numpy.ndarray of shape (z, y, x) sizes, float32
        Axes (z, y, x) in increasing LPS order, values ``(HU + hu_offset) / hu_scale`` (after the clip
        window, if any); trilinear inside the scan, ``pad_hu`` outside. The patch stays centred on the
        seed near borders. One channel: :func:`model_input` repeats it for multi-channel encoders.
    padding_fraction : float
        Share of the patch outside the scan.
    """
    cfg = config or PreprocessConfig()
    seed = np.asarray(seed_lps, dtype=np.float64)
    scan = geometry if geometry is not None else image
    origin = patch_origin(scan, seed, cfg)
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize(list(cfg.size_xyz))
    resampler.SetOutputOrigin(origin.tolist())
    resampler.SetOutputSpacing(list(cfg.spacing_xyz))
    resampler.SetOutputDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(float(cfg.pad_hu))
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    patch = sitk.GetArrayFromImage(resampler.Execute(image))  # a copy: a view would outlive its image
    return cfg.normalise(patch), _outside_fraction(scan, origin, cfg)


def patch_image(patch: np.ndarray, origin: Sequence[float], config: PreprocessConfig | None = None) -> sitk.Image:
    """A patch (or a map over it, e.g. a saliency map) as an image placed in the scan's physical space.

    ``patch`` has axes (z, y, x) as :func:`extract_patch` returns them; ``origin`` is its first voxel
    in LPS mm (:func:`patch_origin`). The image has identity direction and the patch spacing, so
    writing it to NIfTI puts it exactly over the scan in any viewer.
    """
    cfg = config or PreprocessConfig()
    image = sitk.GetImageFromArray(np.asarray(patch))
    image.SetOrigin([float(v) for v in origin])
    image.SetSpacing(list(cfg.spacing_xyz))
    image.SetDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    return image


def model_input(patches: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Patches ``(..., z, y, x)`` from :func:`extract_patch` as encoder input ``(..., channels, z, y, x)``
    (the single channel repeated ``config.channels`` times, without copying when there is one)."""
    patches = np.asarray(patches)[..., None, :, :, :]
    if config.channels == 1:
        return patches
    return np.repeat(patches, config.channels, axis=-4)


def contract_of(model: Any = None) -> PreprocessConfig:
    """The input contract of ``model``: a :class:`PreprocessConfig` (returned as is), a registry name, an
    encoder from :func:`fmcib.create_model` (its ``fmcib_config``), or None for the fmcib default."""
    if model is None:
        return PreprocessConfig()
    if isinstance(model, PreprocessConfig):
        return model
    if isinstance(model, str):
        from .models.registry import get_model_config

        return get_model_config(model).preprocess
    config = getattr(model, "fmcib_config", None) or getattr(model, "preprocess_config", None)
    if isinstance(config, PreprocessConfig):
        return config
    if config is not None and isinstance(getattr(config, "preprocess", None), PreprocessConfig):
        return config.preprocess
    raise TypeError(f"cannot tell the input contract of {type(model).__name__}: pass a PreprocessConfig, a "
                    "model name or an encoder made by fmcib.create_model")


def preprocess(
    image: str | os.PathLike | sitk.Image,
    seed: Sequence[float],
    coords: CoordinateSystem | str = "lps",
    size: int | Sequence[int] | None = None,
    spacing: float | Sequence[float] | None = None,
    model: Any = None,
) -> torch.Tensor:
    """Turn an image and a seed point into an encoder's input patch, following the encoder's contract.

    Parameters
    ----------
    image : path or SimpleITK.Image
        CT volume in HU (any format SimpleITK reads, or a DICOM series folder).
    seed : sequence of 3 floats
        Lesion seed ``(x, y, z)`` in the system named by ``coords``.
    coords : {"lps", "ras", "voxel"}, default="lps"
        Coordinate system of ``seed`` (see :func:`fmcib.seeds.to_lps`).
    size, spacing : optional
        Override the contract's patch size (voxels) and spacing (mm): one number or ``(x, y, z)``.
    model : str, encoder or PreprocessConfig, optional
        Whose contract to follow (see :func:`contract_of`); default: the published fmcib encoder's
        (50^3 voxels at 1 mm, ``(HU + 1024) / 3072``).

    Returns
    -------
    torch.Tensor of shape (channels, z, y, x)
        float32, exactly what :func:`fmcib.extract_features` feeds the encoder for this seed.

    Raises
    ------
    SeedError
        The seed is not finite or lies outside the image.
    ImageReadError
        The image cannot be read or is not a 3D scalar volume.
    """
    import torch

    cfg = contract_of(model)
    changes = {k: v for k, v in (("patch_size", size), ("spacing_mm", spacing)) if v is not None}
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    scan = open_scan(image)
    seed_lps = to_lps(seed, coords, scan.geometry)
    check_inside(scan.geometry, seed_lps)
    region = patch_region(scan.geometry, [patch_origin(scan.geometry, seed_lps, cfg)], cfg)
    patch, _ = extract_patch(scan.read(region), seed_lps, cfg, geometry=scan.geometry)
    return torch.from_numpy(np.ascontiguousarray(model_input(patch, cfg)))
