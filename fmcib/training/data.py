"""Training data: seed-point patches cut by the extraction path, with 3D augmentations drawn per sample.

Every scan is read once (:func:`~fmcib.training.crops.read_crops`, in memory or in a crop store), and each seed's crop is
the model's own patch enlarged by a margin on every side, on the same lattice. Translations move the
window inside that margin and small rotations / scalings sample inside it, so augmented patches hold
real CT, never padding invented by the augmentation. Without augmentation a sample is exactly the
patch that :func:`fmcib.extract_features` feeds the encoder (the same lattice, the same voxels).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..preprocessing import PreprocessConfig, model_input
from ..scans import RowError

__all__ = ["Augmentation", "PatchDataset", "report_unreadable"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Augmentation:
    """3D augmentations of a training patch (MONAI array transforms; the defaults are the paper's fine-tuning).

    Parameters
    ----------
    translate_voxels : int, default=10
        Largest shift per axis, in patch voxels (whole voxels: no interpolation).
    flip : bool, default=True
        Random flips along each axis (p = 0.5 each).
    rotate90 : bool, default=True
        Random 90-degree rotations in the axial plane (when its two sizes are equal).
    rotate_degrees : float, default=0
        Largest small rotation about each axis (trilinear, inside the crop's margin).
    scale : float, default=0
        Largest relative zoom in or out (a random resized crop), e.g. 0.1 for +-10 %.
    intensity_shift_hu : float, default=0
        Largest shift of all intensities, in HU.
    noise_hu : float, default=0
        Standard deviation of Gaussian noise, in HU (applied with p = 0.5).
    histogram_shift : bool, default=False
        MONAI's random histogram shift (non-linear intensity remapping, p = 0.5).
    blur_sigma : float, default=0
        Largest Gaussian blur, in patch voxels (sigma drawn in [0.25, blur_sigma] per axis, p = 0.5).
    """

    translate_voxels: int = 10
    flip: bool = True
    rotate90: bool = True
    rotate_degrees: float = 0.0
    scale: float = 0.0
    intensity_shift_hu: float = 0.0
    noise_hu: float = 0.0
    histogram_shift: bool = False
    blur_sigma: float = 0.0

    def __post_init__(self) -> None:
        if self.translate_voxels < 0 or self.rotate_degrees < 0 or not 0 <= self.scale < 1:
            raise ValueError("translate_voxels and rotate_degrees must be >= 0, scale in [0, 1)")

    def resample_margin(self, config: PreprocessConfig) -> int:
        """Voxels of real CT needed around the patch so that a rotation / scaling never samples outside."""
        if not (self.rotate_degrees or self.scale):
            return 0
        half = max(config.size_xyz) / 2 * math.sqrt(3)  # the farthest corner from the centre
        theta = math.radians(self.rotate_degrees) * math.sqrt(3)  # three axes compose to at most this angle
        return int(math.ceil(half * (theta + self.scale * (1 + theta)))) + 1

    def margin(self, config: PreprocessConfig) -> int:
        """Crop margin per side: translations plus :meth:`resample_margin`."""
        return int(self.translate_voxels) + self.resample_margin(config)

    def transforms(self, config: PreprocessConfig) -> Any:
        """The MONAI transforms applied to a ``(channels, z, y, x)`` patch (translation is done by cropping)."""
        from monai import transforms as mt

        steps: list[Any] = []
        x, y, z = config.size_xyz
        if self.rotate_degrees or self.scale:
            r = math.radians(self.rotate_degrees)
            steps.append(mt.RandAffine(prob=1.0, rotate_range=(r, r, r), scale_range=(self.scale,) * 3,
                                       spatial_size=(z, y, x), mode="bilinear", padding_mode="border"))
        if self.flip:
            steps += [mt.RandFlip(prob=0.5, spatial_axis=a) for a in range(3)]
        if self.rotate90 and x == y:
            steps.append(mt.RandRotate90(prob=0.5, max_k=3, spatial_axes=(1, 2)))
        if self.intensity_shift_hu:
            steps.append(mt.RandShiftIntensity(offsets=self.intensity_shift_hu / config.hu_scale, prob=1.0))
        if self.noise_hu:
            steps.append(mt.RandGaussianNoise(prob=0.5, std=self.noise_hu / config.hu_scale))
        if self.histogram_shift:
            steps.append(mt.RandHistogramShift(num_control_points=10, prob=0.5))
        if self.blur_sigma:
            sigma = (0.25, max(0.25, self.blur_sigma))
            steps.append(mt.RandGaussianSmooth(sigma_x=sigma, sigma_y=sigma, sigma_z=sigma, prob=0.5))
        return mt.Compose(steps)


def report_unreadable(errors: Sequence[RowError], is_main: bool = True) -> None:
    """Log the rows a training run leaves out because they could not be read (the first 20), on rank 0."""
    if errors and is_main:
        logger.warning("%d row(s) could not be read and are left out:\n%s", len(errors),
                       "\n".join(e.message for e in errors[:20]))


class PatchDataset(Dataset):
    """Patches of seed points (crops held in memory) with per-sample augmentation and a target per row.

    Item ``i`` is ``{"input": (channels, z, y, x) float32 tensor, "target": targets[i], "row": table row}``.
    With an :class:`Augmentation` the sample's randomness comes from ``(seed, epoch, i)`` only (see
    :meth:`set_epoch`), so it does not depend on loader workers or on where a run was resumed.

    Parameters
    ----------
    crops : array ``(n, z, y, x)``
        From :func:`read_crops`, enlarged by ``augmentation.margin(config)`` (or by ``margin``).
    config : PreprocessConfig
        The model's contract: the size of the samples.
    targets : array, optional
        One target per crop (class index, or anything a task needs); default: the row numbers.
    augmentation : Augmentation, optional
        None: the central patch, unchanged (evaluation).
    margin : int, optional
        The crops' margin, when it differs from what ``augmentation`` needs (it must be at least that).
    """

    def __init__(self, crops: np.ndarray, config: PreprocessConfig, targets: Any = None, rows: Any = None,
                 augmentation: Augmentation | None = None, margin: int | None = None, seed: int = 0) -> None:
        self.crops = np.asanyarray(crops, dtype=np.float32)  # a store's map stays one
        self.config = config
        self.augmentation = augmentation
        self.seed = int(seed)
        self.epoch = 0
        x, y, z = config.size_xyz
        needed = augmentation.margin(config) if augmentation is not None else 0
        self.margin = needed if margin is None else int(margin)
        if self.margin < needed:
            raise ValueError(f"crops have a margin of {self.margin} voxels; the augmentation needs {needed}")
        if self.crops.ndim != 4 or self.crops.shape[1:] != (z + 2 * self.margin, y + 2 * self.margin,
                                                            x + 2 * self.margin):
            raise ValueError(f"crops of shape {self.crops.shape[1:]} do not match the contract {config.describe()} "
                             f"with a margin of {self.margin}")
        n = len(self.crops)
        self.rows = np.arange(n) if rows is None else np.asarray(rows)
        self.targets = self.rows if targets is None else np.asarray(targets)
        if len(self.targets) != n or len(self.rows) != n:
            raise ValueError(f"{n} crops but {len(self.targets)} targets and {len(self.rows)} rows")
        self._transforms = augmentation.transforms(config) if augmentation is not None else None

    def __len__(self) -> int:
        return len(self.crops)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (called by the trainer before each epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, index: int) -> dict[str, Any]:
        crop = self.crops[index]
        x, y, z = self.config.size_xyz
        aug = self.augmentation
        if aug is None:
            m = self.margin
            patch = crop[m:m + z, m:m + y, m:m + x]
        else:
            state = np.random.RandomState(np.random.SeedSequence([self.seed, self.epoch, int(index)]).generate_state(1))
            inner = aug.resample_margin(self.config)
            base = self.margin - aug.translate_voxels - inner
            t = aug.translate_voxels
            dz, dy, dx = (base + state.randint(0, 2 * t + 1) for _ in range(3))
            patch = crop[dz:dz + z + 2 * inner, dy:dy + y + 2 * inner, dx:dx + x + 2 * inner]
            self._transforms.set_random_state(seed=int(state.randint(0, 2**31 - 1)))
            patch = self._transforms(np.ascontiguousarray(patch)[None])
            patch = np.asarray(patch.array if hasattr(patch, "array") else patch)[0]
        sample = model_input(np.ascontiguousarray(patch, dtype=np.float32), self.config)
        target = self.targets[index]
        return {"input": torch.from_numpy(np.ascontiguousarray(sample)),
                "target": torch.as_tensor(target), "row": int(self.rows[index])}
