"""Nothing lost, nothing silently wrong: inputs never overwritten, content-checked resume, reserved columns,
DICOM slice checks, clean shutdown, guards on impossible values, library defects."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from fmcib.cli import main
from fmcib.exceptions import FmcibError, ImageReadError, TableError

pytest.importorskip("torch")


def _cli(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args])


def _seeds(synthetic_cases: pd.DataFrame, n: int, tmp_path: Path, name: str = "s.csv") -> Path:
    base = synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]]
    table = pd.concat([base] * (n // len(base) + 1), ignore_index=True).iloc[:n].copy()
    table[["coordX", "coordY", "coordZ"]] += np.random.default_rng(1).uniform(-2, 2, size=(n, 3))
    table["lesion_id"] = [f"L{i:03d}" for i in range(n)]
    table.to_csv(tmp_path / name, index=False)
    return tmp_path / name


# ---------------------------------------------------------------------------------- 1. inputs are never lost
def test_no_command_overwrites_or_deletes_its_input(synthetic_cases, tiny_model_dir, tmp_path):
    seeds = _seeds(synthetic_cases, 3, tmp_path)
    before = seeds.read_bytes()
    res = _cli("extract", "--csv", seeds, "--out", seeds, "--weights", tiny_model_dir, "--num-workers", 0)
    assert res.exit_code == 1 and "is the --csv table" in res.output and seeds.read_bytes() == before

    # retrying an errors file into the output it belongs to would delete it once every row succeeds
    errors = tmp_path / "f.errors.csv"
    errors.write_bytes(before)
    res = _cli("extract", "--csv", errors, "--out", tmp_path / "f.csv", "--weights", tiny_model_dir)
    assert res.exit_code == 1 and "errors file" in res.output and errors.read_bytes() == before
    # ... while retrying it into another output works (its bookkeeping columns are left out)
    res = _cli("extract", "--csv", errors, "--out", tmp_path / "retry.csv", "--weights", tiny_model_dir,
               "--num-workers", 0, "--no-progress")
    assert res.exit_code == 0, res.output
    assert errors.read_bytes() == before and len(pd.read_csv(tmp_path / "retry.csv")) == 3

    mask = Path(synthetic_cases.mask_path[0])
    mask_bytes = mask.read_bytes()
    res = _cli("seeds", "--mask", mask, "--out", mask)
    assert res.exit_code == 1 and mask.read_bytes() == mask_bytes

    features = tmp_path / "f.parquet"
    pd.DataFrame({"pred_0": [0.1, 0.2], "pred_1": [1.0, 2.0]}).to_parquet(features)
    feature_bytes = features.read_bytes()
    probe = tmp_path / "p.json"
    probe.write_text("{}")
    res = _cli("probe", "predict", "--model", probe, "--features", features, "--out", features)
    assert res.exit_code == 1 and "is the --features" in res.output and features.read_bytes() == feature_bytes


def test_unknown_output_suffix_is_refused_before_the_model_loads(synthetic_cases, tmp_path):
    seeds = _seeds(synthetic_cases, 2, tmp_path)
    for out in ("f.xlsx", "features"):
        # offline, the default model has no weights: the suffix must be refused before that is found out
        res = _cli("extract", "--csv", seeds, "--out", tmp_path / out)
        assert res.exit_code == 1 and "output tables are .csv or .parquet" in res.output, res.output
        assert not (tmp_path / out).exists()


# ------------------------------------------------------------------------------------- 2. content-keyed resume
def test_resume_refuses_an_output_sorted_after_it_was_written(synthetic_cases, tiny_model_dir, tmp_path):
    seeds = _seeds(synthetic_cases, 6, tmp_path)
    out = tmp_path / "f.csv"
    args = ["extract", "--csv", seeds, "--out", out, "--weights", tiny_model_dir, "--num-workers", 0, "--no-progress"]
    assert _cli(*args).exit_code == 0
    table = pd.read_csv(out)
    table.sort_values("coordX", ascending=False).to_csv(out, index=False)  # re-sorted in place, sidecar kept
    res = _cli(*args, "--resume")
    assert res.exit_code == 1 and "no longer match its run metadata" in res.output
    # a table written without its sidecar being updated (a run that died in between): same refusal
    table.iloc[:4].to_csv(out, index=False)
    res = _cli(*args, "--resume")
    assert res.exit_code == 1 and "no longer match" in res.output


def test_resume_settings_include_the_network_not_only_the_weights_file(synthetic_cases, tiny_model_dir, tmp_path):
    seeds = _seeds(synthetic_cases, 2, tmp_path)
    out = tmp_path / "f.csv"
    args = ["extract", "--csv", seeds, "--out", out, "--weights", tiny_model_dir, "--num-workers", 0, "--no-progress"]
    assert _cli(*args).exit_code == 0
    sidecar = out.with_name(out.name + ".json")
    meta = json.loads(sidecar.read_text())
    assert meta["provenance"]["model_args"]["depth"] == 10
    meta["provenance"]["model_args"]["conv1_t_stride"] = 1  # same weights file, another network
    sidecar.write_text(json.dumps(meta))
    res = _cli(*args, "--resume")
    assert res.exit_code == 1 and "different settings (model_args)" in res.output


def _interrupt_after(monkeypatch, batches: int) -> None:
    """Make the encoder raise KeyboardInterrupt (as Ctrl-C/SIGTERM do) after ``batches`` batches."""
    from fmcib.extract import FeatureExtractor

    real = FeatureExtractor._forward
    calls = {"n": 0}

    def forward(self, patches):
        calls["n"] += 1
        if calls["n"] > batches:
            raise KeyboardInterrupt
        return real(self, patches)

    monkeypatch.setattr(FeatureExtractor, "_forward", forward)


def test_progress_is_kept_through_interruptions_and_failed_runs(synthetic_cases, tiny_model_dir, tmp_path,
                                                                monkeypatch):
    from fmcib.runs import partial_dir

    seeds = _seeds(synthetic_cases, 6, tmp_path)
    out = tmp_path / "f.parquet"
    args = ["extract", "--csv", seeds, "--out", out, "--weights", tiny_model_dir, "--num-workers", 0,
            "--batch-size", 2, "--no-progress"]
    with monkeypatch.context() as m:
        _interrupt_after(m, 2)
        res = _cli(*args)
    assert res.exit_code == 130
    assert "interrupted: 4 row(s) saved" in res.output and "--resume" in res.output
    assert len(list(partial_dir(out).glob("chunk-*.npz"))) == 2 and not out.exists()

    res = _cli(*args)  # without --resume: asks, deletes nothing
    assert res.exit_code == 1 and "--resume" in res.output and "--overwrite" in res.output
    assert len(list(partial_dir(out).glob("chunk-*.npz"))) == 2

    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"")  # a zero-byte checkpoint: a failed run that must leave the progress usable
    res = _cli("extract", "--csv", seeds, "--out", out, "--weights", bad, "--resume", "--num-workers", 0)
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert len(list(partial_dir(out).glob("chunk-*.npz"))) == 2

    res = _cli(*args, "--resume")
    assert res.exit_code == 0 and "(4 reused)" in res.output, res.output
    whole = tmp_path / "whole.parquet"
    assert _cli(*[a if a != out else whole for a in args]).exit_code == 0
    np.testing.assert_allclose(pd.read_parquet(out).filter(like="pred_"), pd.read_parquet(whole).filter(like="pred_"),
                               rtol=1e-5, atol=1e-6)


def test_a_second_run_on_the_same_output_refuses_and_a_stale_lock_is_taken_over(synthetic_cases, tiny_model_dir,
                                                                                tmp_path):
    seeds = _seeds(synthetic_cases, 2, tmp_path)
    out = tmp_path / "f.csv"
    lock = tmp_path / "f.csv.lock"
    lock.write_text(str(os.getppid()))  # a live process holds it
    args = ["extract", "--csv", seeds, "--out", out, "--weights", tiny_model_dir, "--num-workers", 0, "--no-progress"]
    res = _cli(*args)
    assert res.exit_code == 1 and f"another fmcib run (pid {os.getppid()})" in res.output and not out.exists()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock.write_text(str(dead.pid))  # its process is gone
    assert _cli(*args).exit_code == 0 and out.exists() and not lock.exists()


# ------------------------------------------------------------------------------------------ 3. reserved names
def test_tables_with_fmcib_output_columns_are_refused_before_the_model_loads(synthetic_cases, tmp_path):
    seeds = _seeds(synthetic_cases, 2, tmp_path)
    table = pd.read_csv(seeds).assign(pred_0=1.0, fmcib_padding_fraction=0.0)
    table.to_csv(tmp_path / "previous_output.csv", index=False)
    res = _cli("extract", "--csv", tmp_path / "previous_output.csv", "--out", tmp_path / "o.csv")
    assert res.exit_code == 1 and "pred_0, fmcib_padding_fraction" in res.output and "weights" not in res.output


def test_probe_predict_does_not_overwrite_prediction_columns(tmp_path):
    from fmcib.probes import LogisticProbe, prediction_table

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.normal(size=(40, 3)), columns=["pred_0", "pred_1", "pred_2"])
    y = (X.pred_0 > 0).astype(int).to_numpy()
    probe = LogisticProbe(n_trials=0).fit(X, y)
    for clash in ("prediction", "prob_1"):
        with pytest.raises(ValueError, match=clash):
            prediction_table(probe, X.assign(**{clash: 7}))
    X.loc[3, "pred_1"] = np.inf  # a non-finite feature: no prediction, not the first class
    out = prediction_table(probe, X)
    assert out.prediction.isna().tolist() == [i == 3 for i in range(40)]
    np.testing.assert_array_equal(out.prediction.dropna().astype(int), probe.predict(X.drop(index=3)))


# ------------------------------------------------------------------------------ 4. DICOM slices checked
def test_dicom_series_with_missing_duplicate_or_shuffled_slices(tmp_path):
    from fmcib.datasets import make_synthetic_ct, write_dicom_series
    from fmcib.io import read_image

    case = make_synthetic_ct(size=(32, 32, 12), spacing=(1.0, 1.0, 2.5), n_lesions=1, random_state=0)
    files = write_dicom_series(case.image, tmp_path / "missing")
    files[4].unlink()
    files[7].unlink()
    with pytest.raises(ImageReadError, match=r"missing slice\(s\) between z=.* and z="):
        read_image(tmp_path / "missing")
    files = write_dicom_series(case.image, tmp_path / "dup")
    (tmp_path / "dup" / "copy.dcm").write_bytes(files[5].read_bytes())
    with pytest.raises(ImageReadError, match="two slices at z="):
        read_image(tmp_path / "dup")
    from fmcib.io import open_scan

    with pytest.raises(ImageReadError, match="two slices at z="):
        open_scan(tmp_path / "dup")
    files = write_dicom_series(case.image, tmp_path / "shuffled")
    order = np.random.default_rng(3).permutation(len(files))
    for k, f in enumerate(files):  # names no longer follow the slice order
        f.rename(tmp_path / "shuffled" / f"x{order[k]:03d}.dcm")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(tmp_path / "shuffled")),
                                  sitk.GetArrayFromImage(case.image))


# ------------------------------------------------------------------------------------- 5. clean shutdown
def _children(pid: int) -> list[int]:
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_the_main_process_leaves_no_workers(sig, synthetic_cases, tiny_model_dir, tmp_path):
    from fmcib.runs import partial_dir

    seeds = _seeds(synthetic_cases, 60, tmp_path)
    out = tmp_path / "f.parquet"
    cmd = [sys.executable, "-m", "fmcib", "extract", "--csv", str(seeds), "--out", str(out), "--weights",
           str(tiny_model_dir), "--num-workers", "2", "--batch-size", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and len(list(partial_dir(out).glob("chunk-*.npz"))) < 3:
        workers = _children(proc.pid) or workers
        time.sleep(0.01)
    workers = _children(proc.pid) or workers
    assert len(workers) == 2, "the loader workers were not seen"
    os.kill(proc.pid, sig)
    _, stderr = proc.communicate(timeout=60)
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers), "loader workers outlived the main process"
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "interrupted:" in stderr and "--resume" in stderr
        assert "Traceback" not in stderr
    assert len(list(partial_dir(out).glob("chunk-*.npz"))) >= 3  # progress kept either way


# --------------------------------------------------------------------------- 6. impossible values refused
def test_configs_with_impossible_preprocessing_values_are_refused(tiny_model_dir, tmp_path):
    import shutil

    from fmcib.exceptions import WeightsError
    from fmcib.models import create_model

    for key, value, message in [("hu_scale", float("nan"), "hu_scale must be a finite number"),
                                ("hu_scale", -3072.0, "hu_scale must be positive"),
                                ("patch_size", 100000, "patch_size must be from 1 to 256 voxels per axis"),
                                ("clip_hu", [400, -400], "clip_hu must be")]:
        folder = tmp_path / f"{key}{value}"
        shutil.copytree(tiny_model_dir, folder)
        config = json.loads((folder / "config.json").read_text())
        config.setdefault("preprocess", {})[key] = value
        (folder / "config.json").write_text(json.dumps(config))
        with pytest.raises(WeightsError, match=message):
            create_model(weights=folder, device="cpu")
    folder = tmp_path / "width"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_features"] = 4096  # the network gives 64
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match=r"says 4096 features.*shape \(1, 64\)"):
        create_model(weights=folder, device="cpu")
    config.update(num_features=64, architecture="vit9000")
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(WeightsError, match="unknown architecture 'vit9000'"):
        create_model(weights=folder, device="cpu")


def test_integer_weights_are_refused(tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from fmcib.exceptions import WeightsError
    from fmcib.models import create_model

    folder = tmp_path / "int"
    shutil.copytree(tiny_model_dir, folder)
    state = load_file(str(folder / "model.safetensors"))
    state["conv1.weight"] = state["conv1.weight"].to(torch.int64)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(WeightsError, match=r"must be floating point.*conv1.weight \(torch.int64\)"):
        create_model(weights=folder, device="cpu")


def test_probe_files_are_validated(tmp_path):
    from fmcib.probes import LogisticProbe, load_probe

    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(30, 4)), np.arange(30) % 2
    LogisticProbe(n_trials=0).fit(X, y).save(tmp_path / "p.json")
    good = json.loads((tmp_path / "p.json").read_text())
    cases = [("coef", [[float("nan")] * 4], "non-finite coef"), ("coef", [[1.0] * 3], "do not fit"),
             ("scaler", {**good["scaler"], "scale": [0.0] * 4}, "scaler scale <= 0")]
    for key, value, message in cases:
        (tmp_path / "bad.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(ValueError, match=message):
            load_probe(tmp_path / "bad.json")
    (tmp_path / "bad.json").write_text(json.dumps({k: v for k, v in good.items() if k != "intercept"}))
    with pytest.raises(ValueError, match=r"lacks \['intercept'\]"):
        load_probe(tmp_path / "bad.json")


def _nifti_with_pixdim(path: Path, value: float) -> None:
    image = sitk.GetImageFromArray(np.zeros((12, 12, 12), np.int16))
    sitk.WriteImage(image, str(path))
    raw = bytearray(path.read_bytes())
    raw[80:84] = struct.pack("<f", value)  # pixdim[1] of the NIfTI-1 header
    path.write_bytes(bytes(raw))


def test_degenerate_geometry_fails_the_row_with_a_clear_reason(synthetic_cases, tiny_model_dir, tmp_path):
    from fmcib import extract_features

    _nifti_with_pixdim(tmp_path / "zero.nii", 0.0)
    _nifti_with_pixdim(tmp_path / "nan.nii", float("nan"))
    skewed = sitk.GetImageFromArray(np.zeros((12, 12, 12), np.int16))
    skewed.SetDirection((1, 0, 0, 0.5, 1, 0, 0, 0, 1))  # axes not at right angles
    sitk.WriteImage(skewed, str(tmp_path / "skewed.nrrd"))
    good = synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]].iloc[:1]
    bad = pd.DataFrame({"image_path": [str(tmp_path / n) for n in ("zero.nii", "nan.nii", "skewed.nrrd")],
                        "coordX": 5.0, "coordY": 5.0, "coordZ": 5.0})
    with pytest.warns(UserWarning, match="3 of 4"):
        out, failed = extract_features(pd.concat([good, bad], ignore_index=True), weights=tiny_model_dir,
                                       num_workers=0, progress=False, return_errors=True)
    assert len(out) == 1
    assert failed.fmcib_error.str.contains("degenerate geometry").all()
    assert "voxel sizes [0.0" in failed.fmcib_error[0] and "not orthonormal" in failed.fmcib_error[2]


def test_images_that_are_not_hounsfield_units_get_a_warning(synthetic_cases, tiny_model_dir, tmp_path, caplog):
    import logging

    from fmcib import extract_features

    row = synthetic_cases.iloc[0]
    ct = sitk.ReadImage(row.image_path, sitk.sitkFloat32)
    sitk.WriteImage((ct + 1024.0) / 4096.0, str(tmp_path / "normalised.nii.gz"))  # 0..1, not HU
    table = pd.DataFrame({"image_path": [row.image_path, str(tmp_path / "normalised.nii.gz")],
                          "coordX": row.coordX, "coordY": row.coordY, "coordZ": row.coordZ})
    with caplog.at_level(logging.WARNING, logger="fmcib.extract"):
        out = extract_features(table, weights=tiny_model_dir, num_workers=0, progress=False)
    assert out.fmcib_warning[0] == "" and "does not look like CT in Hounsfield units" in out.fmcib_warning[1]
    assert "row 1" in caplog.text and "Hounsfield" in caplog.text


# ----------------------------------------------------------------------------- 7. a first run that helps
def test_devices_are_checked_when_options_are_parsed(synthetic_cases, tmp_path):
    import torch

    seeds = _seeds(synthetic_cases, 2, tmp_path)
    out = tmp_path / "f.csv"
    res = _cli("extract", "--csv", seeds, "--out", out, "--device", "gpu")
    assert res.exit_code == 2 and "'gpu' is not a device" in res.output
    if not torch.cuda.is_available():
        res = _cli("extract", "--csv", seeds, "--out", out, "--device", "cuda")
        assert res.exit_code == 2 and "sees no CUDA GPU" in res.output
    assert not any(tmp_path.glob("f.csv*"))  # nothing left behind


def test_python_dash_m_fmcib_knows_every_command():
    from fmcib.cli import main as group

    listing = subprocess.run([sys.executable, "-m", "fmcib", "--help"], capture_output=True, text=True, check=True)
    for name in group.commands:
        assert f"  {name} " in listing.stdout or f"  {name}\n" in listing.stdout, name


def test_outputs_get_the_users_umask_permissions(tmp_path):
    from fmcib.files import write_table

    old = os.umask(0o022)
    try:
        write_table(pd.DataFrame({"a": [1]}), tmp_path / "t.csv", metadata={"x": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "t.csv").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "t.csv.json").stat().st_mode & 0o777 == 0o644


def test_relative_paths_prefer_the_tables_folder_and_say_where_they_looked(tmp_path, monkeypatch, caplog):
    import logging

    from fmcib.tables import resolve_path

    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "ct.nii.gz").write_bytes(b"beside")
    (tmp_path / "ct.nii.gz").write_bytes(b"cwd")
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fmcib.tables"):
        chosen = resolve_path("ct.nii.gz", tmp_path / "tables")
    assert chosen.read_bytes() == b"beside" and "exists beside the table" in caplog.text
    assert resolve_path("other.nii.gz", tmp_path / "tables") == tmp_path / "tables" / "other.nii.gz"
    with pytest.raises(ImageReadError, match=r"file not found \(looked for .*tables/other.nii.gz\)"):
        from fmcib.io import open_scan

        open_scan(resolve_path("other.nii.gz", tmp_path / "tables"))


def test_stability_select_reads_retest_icc_tables():
    from fmcib.stability import stable_features

    icc_table = pd.DataFrame({"feature": ["pred_0", "pred_1"], "ICC(1,1)": [0.9, 0.5]})
    assert stable_features(icc_table, threshold=0.75) == ["pred_0"]


def test_survival_without_tuning_set_says_its_threshold_is_optimistic(tmp_path):
    from fmcib.survival import survival_report

    rng = np.random.default_rng(0)
    table = pd.DataFrame({"t": rng.exponential(10, 60), "e": rng.integers(0, 2, 60), "s": rng.normal(size=60)})
    report = survival_report(table, "t", "e", "s", out_dir=tmp_path)
    assert "optimistic" in report.threshold_source
    assert "optimistic" in json.loads((tmp_path / "survival.json").read_text())["threshold_source"]


# ---------------------------------------------------------------------------------- 8. library defects
def test_extraction_results_concatenate_and_merge(synthetic_cases, tiny_model_dir):
    from fmcib import extract_features

    table = synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]].assign(lesion=range(len(synthetic_cases)))
    a = extract_features(table.iloc[:2], weights=tiny_model_dir, num_workers=0, progress=False)
    bad = table.iloc[2:4].assign(coordX=1e6)
    with pytest.warns(UserWarning):
        b = extract_features(pd.concat([table.iloc[4:5], bad]), weights=tiny_model_dir, num_workers=0,
                             progress=False)
    both = pd.concat([a, b])
    assert len(both) == 3
    merged = a.merge(table[["lesion"]].assign(site="x"), on="lesion")
    assert len(merged) == 2
    json.dumps(a.attrs)  # plain JSON-able provenance only


def test_plotting_leaves_the_process_backend_alone(tmp_path):
    code = f"""
import matplotlib
matplotlib.use("svg")
import numpy as np, pandas as pd
from fmcib.plots import plot_tsne, qc_montage
from fmcib.survival import survival_report
rng = np.random.default_rng(0)
t = pd.DataFrame(rng.normal(size=(30, 4)), columns=[f"pred_{{i}}" for i in range(4)])
plot_tsne(t, np.arange(30) % 2, perplexity=5)
s = pd.DataFrame({{"t": rng.exponential(10, 40), "e": rng.integers(0, 2, 40), "s": rng.normal(size=40)}})
survival_report(s, "t", "e", "s", out_dir={str(tmp_path)!r})
qc_montage({str(Path(__file__).resolve().parents[1] / "examples" / "data" / "seeds.csv")!r}, {str(tmp_path / "qc.png")!r})
print(matplotlib.get_backend())
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "svg"
    assert (tmp_path / "km.png").is_file() and (tmp_path / "qc.png").is_file()


def test_statistics_do_not_import_the_imaging_stack():
    code = ("import sys, fmcib.probes, fmcib.survival, fmcib.stability, fmcib.evaluation; "
            "print([m for m in ('SimpleITK', 'torch', 'monai') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_table_errors_are_fmcib_errors():
    assert issubclass(TableError, FmcibError)


def test_a_full_disk_gives_one_line_and_keeps_the_earlier_output(synthetic_cases, tiny_model_dir, tmp_path,
                                                                  monkeypatch):
    import errno

    seeds = _seeds(synthetic_cases, 2, tmp_path)
    out = tmp_path / "f.csv"
    args = ["extract", "--csv", seeds, "--out", out, "--weights", tiny_model_dir, "--num-workers", 0, "--no-progress"]
    assert _cli(*args).exit_code == 0
    before = out.read_bytes()

    def full(self, path, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pd.DataFrame, "to_csv", full)
    res = _cli(*args)
    assert res.exit_code == 1 and "No space left on device" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    assert out.read_bytes() == before and not list(tmp_path.glob(".f.csv.*"))


def test_long_saliency_names_are_shortened_with_a_hash():
    from fmcib.saliency import _file_stem

    names = pd.DataFrame({"id": ["x" * 300 + "a", "x" * 300 + "b", "short id/1"]})
    stems = [_file_stem(names, i, "id") for i in range(3)]
    assert all(len(s) < 100 for s in stems) and stems[0] != stems[1]
    assert stems[2] == "short_id_1_row00002"


def test_parquet_without_pyarrow_is_reported_before_the_model_loads(synthetic_cases, tmp_path, monkeypatch):
    seeds = _seeds(synthetic_cases, 2, tmp_path)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if pyarrow were not installed
    res = _cli("extract", "--csv", seeds, "--out", tmp_path / "f.parquet")  # offline: no weights either
    assert res.exit_code == 1 and "needs pyarrow" in res.output and "weights" not in res.output


def test_the_provenance_says_where_relative_paths_were_resolved(synthetic_cases, tiny_model_dir, tmp_path):
    from fmcib.files import read_table_metadata

    seeds = _seeds(synthetic_cases, 2, tmp_path)
    assert _cli("extract", "--csv", seeds, "--out", tmp_path / "f.csv", "--weights", tiny_model_dir,
                "--num-workers", 0, "--no-progress").exit_code == 0
    meta = read_table_metadata(tmp_path / "f.csv")
    assert meta["provenance"]["relative_paths_from"] == str(tmp_path.resolve())


def test_an_output_folder_may_hold_the_input_but_not_overwrite_it(tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame({"t": rng.exponential(10, 60), "e": rng.integers(0, 2, 60), "s": rng.normal(size=60)})
    table.to_csv(tmp_path / "preds.csv", index=False)
    base = ["survival", "--time", "t", "--event", "e", "--score", "s", "--out-dir", tmp_path]
    res = _cli(*base[:1], "--predictions", tmp_path / "preds.csv", *base[1:])
    assert res.exit_code == 0, res.output  # the report goes beside its input
    table.to_csv(tmp_path / "cox.csv", index=False)
    before = (tmp_path / "cox.csv").read_bytes()
    res = _cli(*base[:1], "--predictions", tmp_path / "cox.csv", *base[1:])
    assert res.exit_code == 1 and "is the --predictions" in res.output
    assert (tmp_path / "cox.csv").read_bytes() == before
