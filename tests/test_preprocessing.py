"""Patch geometry and intensities against the original pipeline, linear ground truth and hand counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from fmcib.exceptions import SeedError
from fmcib.io import ImageGeometry, open_scan
from fmcib.preprocessing import (PreprocessConfig, extract_patch, lattice_anchor, patch_origin, patch_region,
                                 preprocess)
from reference_original import original_patch, resampled_volume, seed_voxel_index

PARITY_TOL = 1e-4


def _image(array_zyx: np.ndarray, spacing, origin, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> sitk.Image:
    img = sitk.GetImageFromArray(array_zyx)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return img


def _off_tie(volume, seed) -> bool:
    frac = seed_voxel_index(volume, seed) % 1.0
    return bool(np.all((frac > 1e-3) & (frac < 1 - 1e-3)))


def _assert_parity(image: sitk.Image, seeds) -> int:
    volume = resampled_volume(image)
    checked = 0
    for seed in seeds:
        if not _off_tie(volume, seed):
            continue
        ours, padding = extract_patch(image, seed)
        assert padding == 0.0
        ref = original_patch(volume, seed)
        assert ours.shape == ref.shape == (50, 50, 50)
        np.testing.assert_allclose(ours, ref, atol=PARITY_TOL, rtol=0)
        checked += 1
    return checked


def test_parity_with_original_on_real_ct(shared_data):
    manifest = pd.read_csv(shared_data / "manifest.csv")
    sts = manifest[manifest.source == "ibsi_sts_ct"]
    rng = np.random.default_rng(0)
    checked = 0
    for _, row in sts.iterrows():
        image = sitk.ReadImage(str(shared_data / row.image))
        centroid = np.array([row.coordX, row.coordY, row.coordZ])
        checked += _assert_parity(image, [centroid + rng.uniform(-6, 6, 3) for _ in range(2)])
    assert checked >= 70  # nearly all seeds are off-tie


@pytest.mark.parametrize(
    "direction",
    [
        (1, 0, 0, 0, 1, 0, 0, 0, 1),  # LPS-stored (DICOM-like)
        (-1, 0, 0, 0, -1, 0, 0, 0, 1),  # RAS-stored (NIfTI-like)
        (1, 0, 0, 0, 1, 0, 0, 0, -1),  # z flipped
        (0, 1, 0, 1, 0, 0, 0, 0, 1),  # axes permuted (x <-> y)
    ],
)
def test_parity_with_original_on_synthetic_geometries(direction):
    rng = np.random.default_rng(1)
    array = rng.normal(0, 300, size=(40, 70, 80)).astype(np.float32)  # (z, y, x), anisotropic spacing
    image = _image(array, spacing=(0.73, 0.91, 2.2), origin=(-31.7, 55.2, -402.3), direction=direction)
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([39.5, 34.5, 19.5]))
    seeds = [centre + rng.uniform(-3, 3, 3) for _ in range(4)]
    assert _assert_parity(image, seeds) >= 3


def _linear_image(direction, spacing=(0.8, 1.3, 2.0), origin=(12.0, -40.0, 90.0), size=(90, 80, 60)):
    """An image whose voxel values are a known linear function of the LPS position."""
    img = _image(np.zeros(size[::-1], np.float32), spacing, origin, direction)
    grad, offset = np.array([3.0, -2.0, 1.5]), 100.0
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), -1).reshape(-1, 3).astype(float)
    pts = np.array(origin) + idx @ (np.asarray(direction, float).reshape(3, 3) * np.array(spacing)).T
    values = (pts @ grad + offset).reshape(size).transpose(2, 1, 0)
    out = sitk.GetImageFromArray(values.astype(np.float64))
    out.CopyInformation(img)
    return out, grad, offset


@pytest.mark.parametrize("angle", [0.0, 0.3])
def test_patch_samples_the_expected_lattice_points_even_on_oblique_scans(angle):
    c, s = np.cos(angle), np.sin(angle)
    direction = (c, -s, 0, s, c, 0, 0, 0, 1)
    image, grad, offset = _linear_image(direction)
    seed = np.array(image.TransformContinuousIndexToPhysicalPoint([45.2, 40.1, 30.3]))
    cfg = PreprocessConfig(patch_size=16)
    patch, padding = extract_patch(image, seed, cfg)
    assert padding == 0.0
    # Expected lattice: anchored at the corner voxel centre with largest x, y and smallest z (LPS).
    size = image.GetSize()
    corners = np.array([image.TransformContinuousIndexToPhysicalPoint([b * (n - 1) for b, n in zip(bits, size)])
                        for bits in np.ndindex(2, 2, 2)])
    anchor = np.array([corners[:, 0].max(), corners[:, 1].max(), corners[:, 2].min()])
    start = anchor + np.floor(seed - anchor) - 8
    k = np.arange(16)
    z, y, x = np.meshgrid(start[2] + k, start[1] + k, start[0] + k, indexing="ij")
    expected_hu = grad[0] * x + grad[1] * y + grad[2] * z + offset  # trilinear is exact on a linear field
    np.testing.assert_allclose(patch, (expected_hu + 1024) / 3072, atol=2e-5)


def test_intensity_normalisation_is_unclipped():
    for hu in (-2000.0, -1024.0, 0.0, 2048.0, 4000.0):
        image = _image(np.full((30, 30, 30), hu, np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
        patch, _ = extract_patch(image, (14.5, 14.5, 14.5), PreprocessConfig(patch_size=10))
        np.testing.assert_allclose(patch, (hu + 1024) / 3072, rtol=1e-6)


def test_border_seed_stays_centred_and_padding_fraction_is_exact():
    # 1 mm voxels, extent x in [-0.5, 99.5]; seed 5.2 mm from the low-x face.
    array = np.random.default_rng(2).normal(0, 100, (100, 100, 100)).astype(np.float32)
    image = _image(array, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    seed = (4.7, 50.3, 50.6)
    patch, padding = extract_patch(image, seed)
    # Lattice is the voxel grid; patch x starts at 4 - 25 = -21: voxels x = -21..-1 lie outside (21 of 50).
    assert padding == pytest.approx(21 / 50)
    np.testing.assert_allclose(patch[:, :, :21], 0.0)  # -1024 HU -> 0
    # The part inside equals the plain voxel values (lattice == voxel centres here), so the seed stays centred.
    np.testing.assert_allclose(patch[:, :, 21:], (array[25:75, 25:75, 0:29] + 1024) / 3072, atol=1e-6)
    origin = patch_origin(image, seed, PreprocessConfig())
    np.testing.assert_allclose(origin, [-21.0, 25.0, 25.0])


def test_tie_seed_on_a_lattice_point_picks_that_point():
    image = _image(np.zeros((60, 60, 60), np.float32), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    np.testing.assert_allclose(lattice_anchor(image), [59.0, 59.0, 0.0])
    for seed in [(30.0, 30.0, 30.0), (30.0 - 1e-9, 30.0 + 1e-9, 30.0)]:
        np.testing.assert_allclose(patch_origin(image, seed, PreprocessConfig()), [5.0, 5.0, 5.0])


def test_preprocess_public_function_coords_and_errors(tmp_path):
    array = np.random.default_rng(3).normal(0, 100, (40, 50, 60)).astype(np.int16)
    image = _image(array, (0.9, 0.8, 2.0), (10.0, -20.0, 30.0), (-1, 0, 0, 0, -1, 0, 0, 0, 1))
    path = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(path))
    index = (20.3, 25.7, 18.2)
    lps = image.TransformContinuousIndexToPhysicalPoint(index)
    ras = (-lps[0], -lps[1], lps[2])
    a = preprocess(path, lps)
    assert tuple(a.shape) == (1, 50, 50, 50) and str(a.dtype) == "torch.float32"
    np.testing.assert_array_equal(a.numpy(), preprocess(image, ras, coords="ras").numpy())
    np.testing.assert_allclose(a.numpy(), preprocess(image, index, coords="voxel").numpy(), atol=1e-6)
    assert tuple(preprocess(image, lps, size=64, spacing=0.5).shape) == (1, 64, 64, 64)
    with pytest.raises(SeedError, match="outside the image"):
        preprocess(image, (lps[0] + 500, lps[1], lps[2]))
    with pytest.raises(SeedError, match="NaN"):
        preprocess(image, (float("nan"), 0, 0))


def test_parity_with_original_on_bundled_case():
    """Runs in a fresh clone without ../shared: the real CT case shipped in examples/data."""
    from conftest import EXAMPLE_DATA

    image = sitk.ReadImage(str(EXAMPLE_DATA / "STS_019" / "CT_image.nii.gz"))
    centroid = np.array([-21.84, -78.87, -154.74])
    offsets = [(0.31, 0.17, 0.45), (4.2, -3.7, 2.9), (-5.5, 6.1, -1.3)]
    assert _assert_parity(image, [centroid + np.array(o) for o in offsets]) == 3


@pytest.mark.parametrize("angle", [0.0, 0.4])
def test_patches_from_a_streamed_region_equal_patches_from_the_whole_scan(tmp_path, angle):
    # Only the region patch_region names is read from disk; patches (values and padding fraction)
    # must be bit-identical to those cut from the whole volume, also for border seeds and oblique scans.
    c, s = np.cos(angle), np.sin(angle)
    rng = np.random.default_rng(3)
    image = _image(rng.normal(0, 300, (70, 90, 80)).astype(np.int16), (0.9, 0.7, 2.5), (-30.0, 20.0, -60.0),
                   (c, -s, 0, s, c, 0, 0, 0, 1))
    path = tmp_path / "ct.nii.gz"
    sitk.WriteImage(image, str(path), useCompression=True)
    image = sitk.ReadImage(str(path))  # NIfTI stores geometry in float32: compare with what is on disk
    cfg = PreprocessConfig()
    scan = open_scan(path)
    assert scan.geometry == ImageGeometry.of(image)
    corner = np.array(image.TransformContinuousIndexToPhysicalPoint([1.0, 2.0, 3.0]))
    centre = np.array(image.TransformContinuousIndexToPhysicalPoint([40.3, 45.6, 35.2]))
    groups = [[centre], [corner], [centre, corner]]
    for seeds in groups:
        region = patch_region(scan.geometry, [patch_origin(scan.geometry, p, cfg) for p in seeds], cfg)
        part = scan.read(region)
        assert part.GetSize() == tuple(region[1]) and np.prod(part.GetSize()) <= np.prod(image.GetSize())
        for seed in seeds:
            want, want_pad = extract_patch(image, seed, cfg)
            got, got_pad = extract_patch(part, seed, cfg, geometry=scan.geometry)
            np.testing.assert_array_equal(got, want)
            assert got_pad == want_pad
    # a centre seed alone needs far less than the whole scan
    region = patch_region(scan.geometry, [patch_origin(scan.geometry, centre, cfg)], cfg)
    assert np.prod(region[1]) < 0.5 * np.prod(image.GetSize())
    assert patch_region(scan.geometry, [], cfg) is None


@pytest.mark.parametrize("direction", [
    (1, 0, 0, 0, 1, 0, 0, 0, 1),
    (0.96, -0.28, 0, 0.28, 0.96, 0, 0, 0, 1),  # rotated in-plane
    (1, 0, 0, 0, 0.94, -0.34, 0, 0.34, 0.94),  # oblique slices: the normal is not z
    (1, 0, 0, 0, -1, 0, 0, 0, -1),  # left-handed storage: the series is read back z-sorted
])
def test_dicom_region_reads_equal_the_whole_series(tmp_path, direction):
    from fmcib.datasets import write_dicom_series
    from fmcib.io import read_image

    rng = np.random.default_rng(4)
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    d /= np.linalg.norm(d, axis=0)  # exact unit columns
    image = _image(rng.normal(0, 300, (40, 70, 60)).astype(np.int16), (0.8, 0.7, 2.5), (-30.0, 20.0, -60.0),
                   tuple(d.ravel()))
    write_dicom_series(image, tmp_path / "series")
    whole = read_image(tmp_path / "series")  # ITK's series reader, every slice
    scan = open_scan(tmp_path / "series")
    assert scan._files is not None and len(scan._files) == 40  # geometry from two headers, not the voxels
    assert scan.geometry.GetSize() == whole.GetSize()
    for a, b in ((scan.geometry.GetOrigin(), whole.GetOrigin()), (scan.geometry.GetSpacing(), whole.GetSpacing()),
                 (scan.geometry.GetDirection(), whole.GetDirection())):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-9)
    cfg = PreprocessConfig()
    centre = np.array(whole.TransformContinuousIndexToPhysicalPoint([30.2, 35.7, 20.4]))
    corner = np.array(whole.TransformContinuousIndexToPhysicalPoint([1.0, 2.0, 38.5]))
    for seeds in ([centre], [corner], [centre, corner]):
        region = patch_region(scan.geometry, [patch_origin(scan.geometry, p, cfg) for p in seeds], cfg)
        part = scan.read(region)
        assert part.GetSize() == tuple(region[1])
        for seed in seeds:
            want, want_pad = extract_patch(whole, seed, cfg)
            got, got_pad = extract_patch(part, seed, cfg, geometry=scan.geometry)
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
            assert got_pad == pytest.approx(want_pad)
    region = patch_region(scan.geometry, [patch_origin(scan.geometry, centre, cfg)], cfg)
    assert region[1][2] < 30  # a 50 mm patch on 2.5 mm slices reads about 22 of the 40 slice files


def test_dicom_series_with_slices_off_their_normal_is_read_whole(tmp_path):
    from fmcib.datasets import write_dicom_series
    from fmcib.io import read_image

    image = _image(np.random.default_rng(5).normal(0, 300, (12, 30, 30)).astype(np.int16), (1.0, 1.0, 2.0),
                   (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    files = write_dicom_series(image, tmp_path / "tilted")
    for k, f in enumerate(files):  # gantry tilt: each slice also moves 0.5 mm in y
        plane = sitk.ReadImage(str(f))
        plane.SetMetaData("0020|0032", f"0\\{0.5 * k}\\{2.0 * k}")
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(f))
        writer.Execute(plane)
    scan = open_scan(tmp_path / "tilted")
    assert scan._files is None and scan._image is not None
    whole = read_image(tmp_path / "tilted")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(scan.read(((0, 0, 3), (5, 5, 2)))),
                                  sitk.GetArrayFromImage(whole))


def test_geometry_matches_simpleitk_transforms():
    image = _image(np.zeros((5, 6, 7), np.int16), (0.9, 0.7, 2.5), (-3.0, 2.0, 6.0), (0, -1, 0, 1, 0, 0, 0, 0, 1))
    geometry = ImageGeometry.of(image)
    for idx in ([0, 0, 0], [1.5, -0.5, 3.25], [6, 5, 4]):
        np.testing.assert_allclose(geometry.TransformContinuousIndexToPhysicalPoint(idx),
                                   image.TransformContinuousIndexToPhysicalPoint(idx), atol=1e-12)
