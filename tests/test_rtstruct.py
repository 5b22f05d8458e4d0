"""RTSTRUCT contours rasterised onto their CT series: hand-computed geometry, the real STS_019 case, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from fmcib.exceptions import SeedError

pydicom = pytest.importorskip("pydicom")

from fmcib.dicom import rasterize_contours, read_rtstruct, seeds_from_rtstruct  # noqa: E402


def _grid(size=(20, 20, 6), spacing=(0.5, 0.5, 2.0), origin=(-10.0, 30.0, 100.0)) -> sitk.Image:
    image = sitk.Image(list(size), sitk.sitkInt16)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    return image


def _contour(image: sitk.Image, ij: np.ndarray, k: float) -> np.ndarray:
    """LPS points of a polygon given in continuous voxel indices (i, j) on slice position k."""
    return np.array([image.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(k)]) for i, j in ij])


def test_a_square_with_a_hole_fills_the_voxels_whose_centres_are_inside():
    image = _grid()
    outer = np.array([[1.5, 1.5], [12.5, 1.5], [12.5, 9.5], [1.5, 9.5]])  # voxel centres 2..12 x 2..9 inside
    hole = np.array([[4.5, 3.5], [7.5, 3.5], [7.5, 6.5], [4.5, 6.5]])  # 5..7 x 4..6: removed (even-odd)
    mask = rasterize_contours([_contour(image, outer, 2), _contour(image, hole, 2)], image)
    expected = np.zeros((6, 20, 20), np.uint8)
    expected[2, 2:10, 2:13] = 1
    expected[2, 4:7, 5:8] = 0
    np.testing.assert_array_equal(mask, expected)


def test_a_circle_matches_the_voxel_centres_within_its_radius_and_goes_to_the_nearest_plane():
    image = _grid(size=(40, 40, 8), spacing=(0.8, 0.8, 2.5))
    centre, radius = np.array([19.0, 21.0]), 7.3  # no voxel centre lies within 1e-3 of the circle
    angles = np.linspace(0, 2 * np.pi, 720, endpoint=False)
    circle = centre + radius * np.column_stack([np.cos(angles), np.sin(angles)])
    mask = rasterize_contours([_contour(image, circle, 4.3)], image)  # between planes 4 and 5: nearest is 4
    jj, ii = np.mgrid[0:40, 0:40]
    inside = ((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2) < radius**2
    assert mask[4].sum() == inside.sum() and mask.sum() == inside.sum()
    np.testing.assert_array_equal(mask[4].astype(bool), inside)


def test_contours_off_their_planes_or_off_the_image_are_refused():
    image = _grid()
    square = np.array([[1.5, 1.5], [5.5, 1.5], [5.5, 5.5], [1.5, 5.5]])
    tilted = _contour(image, square, 2)
    tilted[:, 2] += np.array([0.0, 0.0, 3.0, 3.0])  # spans more than a slice: not in the CT's planes
    with pytest.raises(SeedError, match="spans slices"):
        rasterize_contours([tilted], image)
    with pytest.raises(SeedError, match="no contour lies on the image"):
        rasterize_contours([_contour(image, square, 40)], image)


def test_real_rtstruct_agrees_with_the_nifti_mask_made_from_it(shared_data, tmp_path):
    case = shared_data / "ibsi_sts_ct" / "dicom_example" / "STS_019" / "CT"
    rtstruct = next((case / "mask").iterdir())
    structures = read_rtstruct(rtstruct)
    assert [s.name for s in structures.structures] == ["GTV_Mass_CT"] and structures.series_uid
    seeds = seeds_from_rtstruct(rtstruct)  # the referenced series is found beside the RTSTRUCT
    assert Path(seeds.image_path[0]).resolve() == (case / "image").resolve()
    nifti = sitk.ReadImage(str(shared_data / "ibsi_sts_ct" / "nifti" / "STS_019" / "CT_mask.nii.gz"))
    ref = sitk.LabelShapeStatisticsImageFilter()
    ref.Execute(sitk.Cast(nifti > 0, sitk.sitkUInt8))
    # The NIfTI mask was made from the same contours by another tool: the rasterised ROI is voxel-identical.
    from fmcib.dicom import structure_mask
    from fmcib.io import open_scan

    ours = structure_mask(structures.structures[0], open_scan(case / "image").geometry)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), (sitk.GetArrayFromImage(nifti) > 0).astype(np.uint8))
    np.testing.assert_allclose(seeds[["coordX", "coordY", "coordZ"]].to_numpy()[0], ref.GetCentroid(1), atol=1e-4)
    assert seeds.volume_ml[0] == pytest.approx(ref.GetPhysicalSize(1) / 1000, rel=1e-6)
    with pytest.raises(SeedError, match=r"no ROI named 'GTV'\. Did you mean 'GTV_Mass_CT'"):
        seeds_from_rtstruct(rtstruct, image=case / "image", rois=["GTV"])


def test_rtstruct_seeds_command(shared_data, tmp_path):
    from click.testing import CliRunner

    from fmcib.cli import main

    case = shared_data / "ibsi_sts_ct" / "dicom_example" / "STS_019" / "CT"
    rtstruct = next((case / "mask").iterdir())
    res = CliRunner().invoke(main, ["seeds", "--rtstruct", str(rtstruct), "--image", str(case / "image"),
                                    "--roi", "GTV_Mass_CT", "--out", str(tmp_path / "seeds.csv")])
    assert res.exit_code == 0, res.output
    table = pd.read_csv(tmp_path / "seeds.csv")
    assert table.roi_name.tolist() == ["GTV_Mass_CT"] and table.volume_ml[0] > 0
    res = CliRunner().invoke(main, ["seeds", "--rtstruct", str(case / "image" / "000000.dcm"), "--out",
                                    str(tmp_path / "x.csv")])
    assert res.exit_code == 1 and "not an RTSTRUCT" in res.output


def test_tables_and_seeds_accept_an_rtstruct_as_mask(shared_data, tmp_path):
    from click.testing import CliRunner

    from fmcib.cli import main
    from fmcib.scans import ScanDataset, plan_scans
    from fmcib.preprocessing import PreprocessConfig

    case = shared_data / "ibsi_sts_ct" / "dicom_example" / "STS_019" / "CT"
    rtstruct = next((case / "mask").iterdir())
    expected = seeds_from_rtstruct(rtstruct, image=case / "image")
    table = pd.DataFrame({"Image": [str(case / "image")] * 3, "Mask": [str(rtstruct)] * 3,
                          "Label": ["GTV_Mass_CT", 1, "GTV"]})
    item = ScanDataset(plan_scans(table), "lps", PreprocessConfig())[0]
    assert item["rows"].tolist() == [0, 1] and "no ROI named 'GTV'" in item["errors"][0].message
    coords = table.iloc[:1].assign(image_path=str(case / "image"), coordX=expected.coordX[0],
                                   coordY=expected.coordY[0], coordZ=expected.coordZ[0])
    ref = ScanDataset(plan_scans(coords[["image_path", "coordX", "coordY", "coordZ"]]), "lps", PreprocessConfig())[0]
    np.testing.assert_array_equal(item["patches"][0], ref["patches"][0])  # the ROI's centre of mass, as a seed

    res = CliRunner().invoke(main, ["seeds", "--mask", str(rtstruct), "--image", str(case / "image"),
                                    "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "s.csv").roi_name.tolist() == ["GTV_Mass_CT"]


# ------------------------------------------------------------------------------------------------- DICOM SEG
def _write_seg(shared_data, path, fractional=False, reverse=False, label="GTV"):
    """A SEG made by highdicom from the STS_019 CT series and its NIfTI tumour mask."""
    hd = pytest.importorskip("highdicom")
    folder = shared_data / "ibsi_sts_ct" / "dicom_example" / "STS_019" / "CT" / "image"
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    mask = sitk.ReadImage(str(shared_data / "ibsi_sts_ct" / "nifti" / "STS_019" / "CT_mask.nii.gz"))
    array = (sitk.GetArrayFromImage(mask) > 0).astype(np.float32 if fractional else np.uint8)
    if fractional:
        array *= 0.8  # occupancy 0.8 inside: still inside at the 0.5 cut
    sources = [pydicom.dcmread(f) for f in files]
    if reverse:  # frames stored in the opposite order: placed by their positions, not their order
        sources, array = sources[::-1], array[::-1].copy()
    desc = hd.seg.SegmentDescription(
        segment_number=1, segment_label=label,
        segmented_property_category=hd.sr.CodedConcept("49755003", "SCT", "Morphologically Altered Structure"),
        segmented_property_type=hd.sr.CodedConcept("108369006", "SCT", "Tumor"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    kind = hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY
    seg = hd.seg.Segmentation(source_images=sources, pixel_array=array, segmentation_type=kind,
                              segment_descriptions=[desc], series_instance_uid=hd.UID(), series_number=100,
                              sop_instance_uid=hd.UID(), instance_number=1, manufacturer="fmcib tests",
                              manufacturer_model_name="tests", software_versions="0", device_serial_number="1")
    seg.save_as(str(path))
    return folder, mask


@pytest.mark.parametrize("fractional, reverse", [(False, False), (True, False), (False, True)])
def test_seg_segments_give_the_centre_of_mass_of_their_mask(shared_data, tmp_path, fractional, reverse):
    from fmcib.dicom import seeds_from_seg

    folder, mask = _write_seg(shared_data, tmp_path / "seg.dcm", fractional=fractional, reverse=reverse)
    ref = sitk.LabelShapeStatisticsImageFilter()
    ref.Execute(sitk.Cast(mask > 0, sitk.sitkUInt8))
    seeds = seeds_from_seg(tmp_path / "seg.dcm", image=folder)
    assert seeds.segment_label.tolist() == ["GTV"] and seeds.segment_number.tolist() == [1]
    np.testing.assert_allclose(seeds[["coordX", "coordY", "coordZ"]].to_numpy()[0], ref.GetCentroid(1), atol=1e-4)
    assert seeds.volume_ml[0] == pytest.approx(ref.GetPhysicalSize(1) / 1000, rel=1e-6)


def test_seg_bad_input_and_the_seeds_command(shared_data, tmp_path):
    from click.testing import CliRunner

    from fmcib.cli import main
    from fmcib.datasets import make_synthetic_ct, write_dicom_series
    from fmcib.dicom import seeds_from_seg

    folder, _ = _write_seg(shared_data, tmp_path / "seg.dcm")
    with pytest.raises(SeedError, match=r"no segment 'GTX'\. Did you mean 'GTV'"):
        seeds_from_seg(tmp_path / "seg.dcm", image=folder, segments=["GTX"])
    other = tmp_path / "other_series"
    write_dicom_series(make_synthetic_ct(size=(16, 16, 4), n_lesions=1, random_state=0).image, other)
    with pytest.raises(SeedError, match="was made on series"):
        seeds_from_seg(tmp_path / "seg.dcm", image=other)
    res = CliRunner().invoke(main, ["seeds", "--mask", str(tmp_path / "seg.dcm"), "--image", str(folder),
                                    "--out", str(tmp_path / "s.csv")])  # a SEG given as --mask is read as a SEG
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "s.csv").segment_label.tolist() == ["GTV"]
    res = CliRunner().invoke(main, ["seeds", "--seg", str(tmp_path / "seg.dcm"), "--image", str(other),
                                    "--out", str(tmp_path / "x.csv")])
    assert res.exit_code == 1 and "was made on series" in res.output and not (tmp_path / "x.csv").exists()


def test_a_table_row_can_name_a_seg_segment(shared_data, tmp_path):
    from fmcib.scans import ScanDataset, plan_scans
    from fmcib.preprocessing import PreprocessConfig

    folder, mask = _write_seg(shared_data, tmp_path / "seg.dcm")
    table = pd.DataFrame({"Image": [str(folder)] * 3, "Mask": [str(tmp_path / "seg.dcm")] * 3,
                          "Label": ["GTV", 1, 7]})
    item = ScanDataset(plan_scans(table), "lps", PreprocessConfig())[0]
    assert item["rows"].tolist() == [0, 1] and "no segment 7" in item["errors"][0].message
    nifti = pd.DataFrame({"Image": [str(folder)], "Mask": [str(shared_data / "ibsi_sts_ct" / "nifti" / "STS_019" /
                                                              "CT_mask.nii.gz")], "Label": [1]})
    ref = ScanDataset(plan_scans(nifti), "lps", PreprocessConfig())[0]
    np.testing.assert_array_equal(item["patches"][0], ref["patches"][0])


def test_an_rtstruct_whose_series_is_not_beside_it_says_what_to_give(shared_data, tmp_path):
    import shutil

    rtstruct = next((shared_data / "ibsi_sts_ct" / "dicom_example" / "STS_019" / "CT" / "mask").iterdir())
    alone = tmp_path / "alone" / "RS.dcm"
    alone.parent.mkdir()
    shutil.copy(rtstruct, alone)
    with pytest.raises(SeedError, match=r"its CT series 1\.3\.6\.1.* is not beside it; give the series folder"):
        seeds_from_rtstruct(alone)
