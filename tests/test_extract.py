"""extract_features against per-seed preprocess + forward, mask tables, bad rows, spawn workers, I/O."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from fmcib import extract_features, get_features, preprocess, seeds_from_mask
from fmcib.exceptions import FmcibError, ImageReadError, SeedError, TableError
from fmcib.io import read_image
from fmcib.models import create_model


def _reference_features(model, table: pd.DataFrame) -> np.ndarray:
    """Independent path: one preprocess() call and one forward pass per seed."""
    out = []
    with torch.inference_mode():
        for _, r in table.iterrows():
            x = preprocess(r.image_path, (r.coordX, r.coordY, r.coordZ))[None]
            out.append(model(x)[0].numpy())
    return np.stack(out)


def test_extract_features_matches_per_seed_reference(synthetic_cases, tiny_model_dir):
    table = synthetic_cases[["image_path", "coordX", "coordY", "coordZ", "label", "site"]]
    # Interleave scans so batching and per-scan grouping must restore the input order.
    table = table.iloc[np.random.default_rng(0).permutation(len(table))].reset_index(drop=True)
    out = extract_features(table, weights=tiny_model_dir, batch_size=5, num_workers=0, progress=False)
    model = create_model(weights=tiny_model_dir, device="cpu")
    assert list(out.columns) == [*table.columns, *[f"pred_{i}" for i in range(64)], "fmcib_padding_fraction",
                                 "fmcib_warning"]
    assert (out.fmcib_warning == "").all()  # CT in HU: nothing to warn about
    pd.testing.assert_frame_equal(out[table.columns], table)
    np.testing.assert_allclose(out.filter(like="pred_").to_numpy(), _reference_features(model, table),
                               rtol=1e-4, atol=1e-5)
    prov = out.attrs["fmcib"]
    assert prov["model"] == "tiny_3d.test" and len(prov["weights"]["sha256"]) == 64
    assert prov["preprocess"]["patch_size"] == 50


def test_contract_and_provenance_are_known_before_the_encoder_loads(tiny_model_dir):
    """The loader starts before the weights load: config and provenance come from the resolved weights."""
    import hashlib

    from fmcib import FeatureExtractor

    extractor = FeatureExtractor(weights=tiny_model_dir, device="cpu", progress=False)
    before = extractor.provenance("lps")
    assert extractor.preprocess_config.patch_size == 50 and extractor.num_features == 64
    assert extractor._encoder is None  # nothing above built the model
    digest = hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).hexdigest()
    assert before["weights"]["sha256"] == digest and before["model"] == "tiny_3d.test"
    assert extractor.encoder.fmcib_weights == before["weights"]
    after = extractor.provenance("lps")
    assert {k: v for k, v in after.items() if k != "created"} == {k: v for k, v in before.items() if k != "created"}


def test_spawn_workers_give_the_same_features(synthetic_cases, tiny_model_dir):
    table = synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]].iloc[:6]
    serial = extract_features(table, weights=tiny_model_dir, num_workers=0, progress=False)
    spawned = extract_features(table, weights=tiny_model_dir, num_workers=2, start_method="spawn", progress=False)
    numeric = [c for c in serial.columns if c not in ("image_path", "fmcib_warning")]
    pd.testing.assert_series_equal(spawned.image_path, serial.image_path)
    np.testing.assert_allclose(spawned[numeric].to_numpy(float), serial[numeric].to_numpy(float), rtol=1e-5, atol=1e-6)


def test_mask_table_uses_label_centre_of_mass(synthetic_cases, tiny_model_dir):
    cases = synthetic_cases.drop_duplicates("image_path")
    masks = pd.DataFrame({"Image": cases.image_path.tolist() * 2, "Mask": cases.mask_path.tolist() * 2,
                          "Label": [1] * len(cases) + [2] * len(cases)})
    out = extract_features(masks, weights=tiny_model_dir, num_workers=0, progress=False)
    # Reference: centroid of the label's voxels in LPS mm, computed with numpy.
    seeds = []
    for _, r in masks.iterrows():
        m = sitk.ReadImage(r.Mask)
        idx = np.argwhere(sitk.GetArrayFromImage(m) == r.Label)[:, ::-1].mean(axis=0)
        seeds.append(m.TransformContinuousIndexToPhysicalPoint(idx.tolist()))
    ref_table = pd.DataFrame(seeds, columns=["coordX", "coordY", "coordZ"]).assign(image_path=masks.Image)
    ref = _reference_features(create_model(weights=tiny_model_dir, device="cpu"), ref_table)
    np.testing.assert_allclose(out.filter(like="pred_").to_numpy(), ref, rtol=1e-4, atol=1e-5)


def test_bad_rows_are_reported_and_good_rows_kept(synthetic_cases, tiny_model_dir, tmp_path):
    good = synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]].iloc[:3]
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not an image")
    flat = sitk.Image(20, 20, sitk.sitkInt16)
    sitk.WriteImage(flat, str(tmp_path / "slice.nrrd"))
    rgb = sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3)
    sitk.WriteImage(rgb, str(tmp_path / "rgb.nrrd"))
    bad = pd.DataFrame({
        "image_path": [str(tmp_path / "nope.nii.gz"), str(broken), str(tmp_path / "slice.nrrd"),
                       str(tmp_path / "rgb.nrrd"), good.image_path.iloc[0], good.image_path.iloc[0]],
        "coordX": [0, 0, 0, 0, 9999.0, np.nan], "coordY": [0] * 6, "coordZ": [0] * 6})
    table = pd.concat([good, bad], ignore_index=True)
    with pytest.warns(UserWarning, match="6 of 9 row"):
        out, failed = extract_features(table, weights=tiny_model_dir, num_workers=0, progress=False,
                                       return_errors=True)
    assert list(out.index) == [0, 1, 2]
    errors = failed.set_index("fmcib_row").fmcib_error
    assert "file not found" in errors[3] and "nope.nii.gz" in errors[3]
    assert "cannot read image" in errors[4]
    assert "3D volume" in errors[5] and "2D" in errors[5]
    assert "components" in errors[6]
    assert "outside the image" in errors[7] and "row 7" in errors[7]
    assert "NaN" in errors[8]
    with pytest.raises(FmcibError, match="row 8"):
        extract_features(table, weights=tiny_model_dir, num_workers=0, progress=False, on_error="raise")
    with pytest.raises(TableError, match=r"missing column\(s\) \['coordZ'\]"):
        extract_features(table.drop(columns="coordZ"), weights=tiny_model_dir)


def test_get_features_alias(synthetic_cases, tiny_model_dir, tmp_path):
    csv = tmp_path / "seeds.csv"
    synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]].iloc[:2].to_csv(csv, index=False)
    out = get_features(csv, weights_path=tiny_model_dir, num_workers=0)
    assert list(out.columns) == ["image_path", "coordX", "coordY", "coordZ", *[f"pred_{i}" for i in range(64)]]
    with pytest.raises(ValueError, match="precropped"):
        get_features(csv, weights_path=tiny_model_dir, precropped=True)


def test_seeds_from_mask_centroids_and_components(tmp_path):
    labels = np.zeros((20, 30, 40), np.uint8)
    labels[2:6, 3:9, 4:10] = 1   # component A
    labels[12:16, 20:24, 30:36] = 1  # component B, same label
    labels[8:10, 10:12, 10:12] = 2
    mask = sitk.GetImageFromArray(labels)
    mask.SetSpacing((0.5, 0.7, 2.0))
    mask.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(mask, str(tmp_path / "m.nii.gz"))
    whole = seeds_from_mask(tmp_path / "m.nii.gz", image="ct.nii.gz")
    idx = np.argwhere(labels == 1)[:, ::-1].mean(axis=0)
    np.testing.assert_allclose(whole[["coordX", "coordY", "coordZ"]].to_numpy()[0],
                               mask.TransformContinuousIndexToPhysicalPoint(idx.tolist()), atol=1e-9)
    assert whole.image_path[0] == "ct.nii.gz" and whole.volume_ml[0] == pytest.approx((144 + 96) * 0.7 / 1000)
    parts = seeds_from_mask(tmp_path / "m.nii.gz", components=True)
    assert len(parts) == 2 and sorted(parts.volume_ml.round(6)) == sorted([round(144 * 0.7 / 1000, 6), round(96 * 0.7 / 1000, 6)])
    assert len(seeds_from_mask(tmp_path / "m.nii.gz", label=None)) == 2
    with pytest.raises(SeedError, match="no voxel with label 5"):
        seeds_from_mask(tmp_path / "m.nii.gz", label=5)


def test_seeds_from_mask_checks_the_mask_against_its_image(tmp_path, caplog):
    import logging

    from click.testing import CliRunner

    from fmcib.cli import main
    from fmcib.datasets import make_synthetic_ct
    from fmcib.exceptions import SeedError
    from fmcib.seeds import mask_centroid

    case = make_synthetic_ct(size=(64, 64, 24), spacing=(0.8, 0.8, 2.5), n_lesions=1, random_state=0)
    rows = case.save(tmp_path, "c")
    ct, mask_path = rows.image_path[0], rows.mask_path[0]
    mask = read_image(mask_path)
    expected = mask_centroid(mask, 1)
    with caplog.at_level(logging.WARNING, logger="fmcib.seeds"):
        same = seeds_from_mask(mask_path, image=ct)
    assert not caplog.records
    np.testing.assert_allclose(same[["coordX", "coordY", "coordZ"]].to_numpy()[0], expected)

    # the same lesion on a finer grid in the same space: allowed, with a warning naming the difference
    fine = sitk.Resample(mask, [128, 128, 60], sitk.Transform(), sitk.sitkNearestNeighbor,
                         mask.GetOrigin(), [0.4, 0.4, 1.0], mask.GetDirection(), 0, mask.GetPixelID())
    sitk.WriteImage(fine, str(tmp_path / "fine.nii.gz"))
    with caplog.at_level(logging.WARNING, logger="fmcib.seeds"):
        resampled = seeds_from_mask(tmp_path / "fine.nii.gz", image=ct)
    assert "mask grid differs" in caplog.text and "spacing" in caplog.text
    np.testing.assert_allclose(resampled[["coordX", "coordY", "coordZ"]].to_numpy()[0], expected, atol=1.0)

    # a mask that lost its origin lies elsewhere in space: an error naming mask and image
    moved = sitk.Image(mask)
    moved.SetOrigin([o + 500.0 for o in mask.GetOrigin()])
    sitk.WriteImage(moved, str(tmp_path / "moved.nii.gz"))
    with pytest.raises(SeedError, match=r"moved\.nii\.gz.*outside the image .*c_ct\.nii\.gz"):
        seeds_from_mask(tmp_path / "moved.nii.gz", image=ct)

    table = pd.DataFrame({"Image": [ct, ct], "Mask": [mask_path, str(tmp_path / "moved.nii.gz")]})
    table.to_csv(tmp_path / "pairs.csv", index=False)
    res = CliRunner().invoke(main, ["seeds", "--csv", str(tmp_path / "pairs.csv"), "--out", str(tmp_path / "s.csv")])
    assert res.exit_code == 3 and "row 1" in res.output and "outside the image" in res.output
    assert len(pd.read_csv(tmp_path / "s.csv")) == 1  # the good row is kept


def test_dicom_series_equals_its_nifti(shared_data):
    folder = shared_data / "ibsi_sts_ct" / "dicom_example" / "STS_019" / "CT" / "image"
    dicom = read_image(folder)
    nifti = read_image(shared_data / "ibsi_sts_ct" / "nifti" / "STS_019" / "CT_image.nii.gz")
    assert dicom.GetSize() == nifti.GetSize()
    np.testing.assert_allclose(dicom.GetOrigin(), nifti.GetOrigin(), atol=1e-3)
    row = pd.read_csv(shared_data / "manifest.csv").set_index("case").loc["STS_019"]
    seed = (row.coordX, row.coordY, row.coordZ)
    np.testing.assert_allclose(preprocess(folder, seed).numpy(), preprocess(nifti, seed).numpy(), atol=1e-3)
    with pytest.raises(ImageReadError, match="no DICOM series with SeriesInstanceUID 1.2.3"):
        read_image(folder, series_uid="1.2.3")
