"""The training engine (schedule, LARS, exact resume, DDP under torchrun), training patches, and fine-tuning."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

torch = pytest.importorskip("torch")

from training_toys import NoisyPoints, PointsTask, ddp_settings  # noqa: E402

from fmcib.training import LARS, Trainer, TrainingConfig, lr_factor  # noqa: E402
from fmcib.training.engine import BEST_NAME, CHECKPOINT_DIR, METRICS_NAME, STATE_NAME  # noqa: E402

HERE = Path(__file__).resolve().parent


def _best(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / CHECKPOINT_DIR / BEST_NAME))


def test_schedule_is_linear_warmup_then_cosine():
    cfg = TrainingConfig(epochs=10, warmup_epochs=2, schedule="cosine", min_lr_ratio=0.1)
    steps = 5  # per epoch: 10 warm-up steps, then 40 of cosine
    assert lr_factor(0, cfg, steps) == pytest.approx(1 / 10)
    assert lr_factor(9, cfg, steps) == pytest.approx(1.0)
    assert lr_factor(10, cfg, steps) == pytest.approx(1.0)
    assert lr_factor(30, cfg, steps) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 20 / 40)))
    assert lr_factor(50, cfg, steps) == pytest.approx(0.1)
    step = TrainingConfig(epochs=10, schedule="step", step_epochs=3, step_gamma=0.5)
    assert [lr_factor(s, step, 2) for s in (0, 5, 6, 12)] == pytest.approx([1, 1, 0.5, 0.25])


def test_lars_scales_each_layer_by_its_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    w.grad, b.grad = torch.tensor([[0.6, 0.8]]), torch.tensor([2.0])  # |g| = 1
    LARS([w, b], lr=0.1, momentum=0.0, eta=0.01).step()
    # weight: lr * eta * |w| / |g| * g = 0.1 * 0.05 * g; bias (1-D): plain SGD
    assert torch.allclose(w.detach(), torch.tensor([[3.0 - 0.005 * 0.6, 4.0 - 0.005 * 0.8]]))
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.2]))


def test_runs_are_seeded_and_resume_exactly_after_an_interrupt(tmp_path):
    cfg = TrainingConfig(epochs=4, batch_size=4, lr=0.05, optimizer="sgd", momentum=0.9, warmup_epochs=1,
                         checkpoint_every=3, seed=3)
    train, tune = NoisyPoints(30), NoisyPoints(16, augment=False)
    straight = Trainer(PointsTask(), cfg, tmp_path / "a", device="cpu", progress=False).fit(train, tune)
    again = Trainer(PointsTask(), cfg, tmp_path / "b", device="cpu", progress=False).fit(train, tune)
    for k, v in _best(tmp_path / "a").items():
        assert torch.equal(v, _best(tmp_path / "b")[k]), k
    # 30 samples / 4 = 7 steps an epoch; stop in the middle of epoch 3 (after 17 steps), then resume
    with pytest.raises(KeyboardInterrupt):
        Trainer(PointsTask(fail_at_call=18), cfg, tmp_path / "c", device="cpu", progress=False).fit(train, tune)
    saved = torch.load(tmp_path / "c" / CHECKPOINT_DIR / STATE_NAME, weights_only=True)
    assert saved["state"]["global_step"] == 17 and saved["state"]["epoch"] == 2
    resumed = Trainer(PointsTask(seed=99), cfg, tmp_path / "c", device="cpu", progress=False).fit(train, tune,
                                                                                                resume=True)
    final_a, final_c = _best(tmp_path / "a"), _best(tmp_path / "c")
    for k, v in final_a.items():
        assert torch.equal(v, final_c[k]), k
    strip = [{k: v for k, v in row.items() if k != "seconds"} for row in straight.history]
    assert strip == [{k: v for k, v in row.items() if k != "seconds"} for row in resumed.history]
    metrics = pd.read_csv(tmp_path / "c" / METRICS_NAME)
    assert metrics["epoch"].tolist() == [1, 2, 3, 4] and "tune_accuracy" in metrics
    assert again.best_epoch == straight.best_epoch


def test_resume_with_other_settings_is_refused(tmp_path):
    from fmcib.exceptions import FmcibError

    cfg = TrainingConfig(epochs=1, batch_size=4, lr=0.05)
    Trainer(PointsTask(), cfg, tmp_path, device="cpu", progress=False).fit(NoisyPoints(8))
    other = TrainingConfig(epochs=2, batch_size=4, lr=0.01)
    with pytest.raises(FmcibError, match=r"lr: 0.05 then, 0.01 now"):
        Trainer(PointsTask(), other, tmp_path, device="cpu", progress=False).fit(NoisyPoints(8), resume=True)
    with pytest.raises(FmcibError, match="nothing to resume"):
        Trainer(PointsTask(), cfg, tmp_path / "new", device="cpu", progress=False).fit(NoisyPoints(8), resume=True)


def test_two_gloo_processes_under_torchrun_equal_one_process_with_twice_the_batch(tmp_path):
    """DDP averages the ranks' gradients: 2 ranks of batch 4 take the same steps as 1 process of batch 8."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(HERE / "training_toys.py"), str(tmp_path / "ddp"), "4"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    Trainer(PointsTask(batchnorm=False), ddp_settings(8), tmp_path / "one", device="cpu",
            progress=False).fit(NoisyPoints(augment=False))
    ddp, one = _best(tmp_path / "ddp"), _best(tmp_path / "one")
    assert set(ddp) == set(one)
    for k in one:
        assert torch.allclose(ddp[k], one[k], atol=1e-6), k
    assert not torch.equal(one["0.weight"], PointsTask(batchnorm=False).model[0].weight.detach())  # it trained
    saved = torch.load(tmp_path / "ddp" / CHECKPOINT_DIR / STATE_NAME, weights_only=True)
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2


# -- training patches and fine-tuning -------------------------------------------------------------------

def _bright_lesions(folder: Path, scans: int, seed0: int = 0) -> pd.DataFrame:
    """Synthetic scans of five lesions each; in every odd scan all lesions are 500 HU brighter, so the label
    ``bright`` is visible in the image, and a patch's neighbouring lesions agree with its own label. (With
    many lesions a scan, later lesions overwrite some earlier ones' seed voxels: noisy labels.)"""
    import SimpleITK as sitk

    from fmcib.datasets import make_synthetic_ct

    frames = []
    for k in range(seed0, seed0 + scans):
        ct = make_synthetic_ct(size=(80, 80, 40), spacing=(1.0, 1.0, 2.0), n_lesions=5, lesion_radius_mm=(7, 11),
                               random_state=k)
        bright = k % 2 == 1
        if bright:
            arr = sitk.GetArrayFromImage(ct.image)
            arr[sitk.GetArrayFromImage(ct.mask) > 0] += 500
            image = sitk.GetImageFromArray(arr)
            image.CopyInformation(ct.image)
            ct.image = image
        ct.seeds["bright"] = int(bright)
        frames.append(ct.save(folder, f"case{k}"))
    return pd.concat(frames, ignore_index=True)


def test_training_patches_are_the_extraction_patches_and_augment_reproducibly(synthetic_cases):
    from fmcib.preprocessing import PreprocessConfig, preprocess
    from fmcib.training import Augmentation, PatchDataset, read_crops

    cfg = PreprocessConfig(patch_size=(20, 24, 16), spacing_mm=(1.0, 1.5, 2.0), channels=2)
    aug = Augmentation(translate_voxels=3, rotate90=True)
    rows, crops, errors = read_crops(synthetic_cases, cfg, margin=aug.margin(cfg))
    assert not errors and rows.tolist() == list(range(len(synthetic_cases)))
    plain = PatchDataset(crops, cfg, margin=aug.margin(cfg))
    for i in (0, 5):
        rec = synthetic_cases.iloc[i]
        expected = preprocess(rec["image_path"], (rec["coordX"], rec["coordY"], rec["coordZ"]), model=cfg)
        assert expected.shape == (2, 16, 24, 20)
        assert torch.equal(plain[i]["input"], expected)
    augmented = PatchDataset(crops, cfg, augmentation=aug, seed=1)
    first = augmented[3]["input"]
    assert first.shape == (2, 16, 24, 20) and torch.equal(first, augmented[3]["input"])
    augmented.set_epoch(1)
    assert not torch.equal(first, augmented[3]["input"])
    # translations, flips and rotations by 90 degrees only move voxels: the sample is a window of the crop
    window = crops[3]
    assert float(first.min()) >= float(window.min()) and float(first.max()) <= float(window.max())
    assert not torch.equal(first, plain[3]["input"])


def _copied_cases(synthetic_cases: pd.DataFrame, folder: Path) -> pd.DataFrame:
    """The synthetic scans copied to ``folder`` (a test may change them), with a missing file in row 1 and a seed
    outside its scan in row 6: the crops of rows in between and after must move into place."""
    import shutil

    folder.mkdir()
    table = synthetic_cases.copy()
    for path in table["image_path"].unique():
        shutil.copy(path, folder / Path(path).name)
    table["image_path"] = [str(folder / Path(p).name) for p in table["image_path"]]
    table.loc[1, "image_path"] = str(folder / "missing.nii.gz")
    table.loc[6, "coordX"] = 1e4
    return table


def test_crop_store_holds_the_in_memory_crops_and_is_reused_until_a_file_changes(synthetic_cases, tmp_path,
                                                                                   monkeypatch):
    import fmcib.training.crops as crops_module
    from fmcib.preprocessing import PreprocessConfig
    from fmcib.training import read_crops

    cfg = PreprocessConfig(patch_size=(12, 10, 8), spacing_mm=2.0)
    clean = read_crops(synthetic_cases, cfg, margin=2)
    table = _copied_cases(synthetic_cases, tmp_path / "scans")
    rows, crops, errors = read_crops(table, cfg, margin=2)
    assert [e.row for e in errors] == [1, 6] and rows.tolist() == [r for r in range(len(table)) if r not in (1, 6)]
    assert np.array_equal(crops, clean[1][rows])  # every good row keeps its own crop, in table order
    store = tmp_path / "store"
    s_rows, s_crops, s_errors = read_crops(table, cfg, margin=2, store=store)
    assert isinstance(s_crops, np.memmap) and not s_crops.flags.writeable
    assert np.array_equal(s_rows, rows) and np.array_equal(s_crops, crops)
    assert [(e.row, e.message) for e in s_errors] == [(e.row, e.message) for e in errors]
    assert (store / "crops.f32").stat().st_size == crops.nbytes and not list(store.glob("*.partial"))

    class Unreadable:  # a store that matches is read without opening any scan
        def __init__(self, *args, **kwargs):
            pass

        def __len__(self):
            raise AssertionError("a scan was read")

    with monkeypatch.context() as m:
        m.setattr(crops_module, "ScanDataset", Unreadable)
        again = read_crops(table, cfg, margin=2, store=store)
        assert np.array_equal(again[0], rows) and np.array_equal(again[1], crops)
        changed = table["image_path"].iloc[0]
        os.utime(changed, ns=(os.stat(changed).st_atime_ns, os.stat(changed).st_mtime_ns + 10**9))
        with pytest.raises(AssertionError, match="a scan was read"):
            read_crops(table, cfg, margin=2, store=store)  # a file changed: the store is made again
        with pytest.raises(AssertionError, match="a scan was read"):
            read_crops(table, cfg, margin=3, store=store)  # another margin, another contract
    assert np.array_equal(read_crops(table, cfg, margin=2, store=store)[1], crops)


def test_crops_too_large_for_memory_are_pointed_to_a_store(synthetic_cases, monkeypatch, caplog):
    import fmcib.training.crops as crops_module
    from fmcib.preprocessing import PreprocessConfig

    cfg = PreprocessConfig(patch_size=8, spacing_mm=4.0)
    crop_bytes = 12 * 8 ** 3 * 4  # 12 crops of 8^3 float32
    monkeypatch.setattr(crops_module, "_available_memory", lambda: 4 * crop_bytes)
    with caplog.at_level("WARNING", logger="fmcib.training.crops"):
        crops_module.read_crops(synthetic_cases, cfg)
    assert not caplog.records  # half of what is available
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # three processes of one machine: three copies
    with caplog.at_level("WARNING", logger="fmcib.training.crops"):
        crops_module.read_crops(synthetic_cases, cfg)
    assert len(caplog.records) == 1 and "--crop-store" in caplog.text and "3 process" in caplog.text
    monkeypatch.undo()
    if Path("/proc/meminfo").is_file():  # Linux: MemAvailable, at most the machine's memory
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        assert 0 < crops_module._available_memory() <= total


def test_stored_crops_pickle_by_reference_and_serve_spawned_loader_workers(synthetic_cases, tmp_path):
    import pickle

    from fmcib.preprocessing import PreprocessConfig
    from fmcib.training import PatchDataset, read_crops
    from fmcib.training.crops import StoredCrops

    cfg = PreprocessConfig(patch_size=(12, 10, 8), spacing_mm=2.0)
    rows, crops, _ = read_crops(synthetic_cases, cfg, margin=2, store=tmp_path / "store")
    assert isinstance(crops, StoredCrops)
    for part in (crops, crops[3:], crops[5:9].reshape(-1, *crops.shape[2:])):  # the map and views of it
        blob = pickle.dumps(part)
        back = pickle.loads(blob)
        assert len(blob) < 1000 < part.nbytes and isinstance(back, np.memmap) and np.array_equal(back, part)
    copied = crops[[0, 4]]  # fancy indexing copies: pickled by value
    assert np.array_equal(pickle.loads(pickle.dumps(copied)), copied)
    dataset = PatchDataset(crops, cfg, margin=2)
    assert isinstance(dataset.crops, np.memmap) and len(pickle.dumps(dataset)) < 10_000
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=1, multiprocessing_context="spawn")
    served = torch.cat([batch["input"] for batch in loader])
    assert torch.equal(served, torch.stack([dataset[i]["input"] for i in range(len(dataset))]))


CROP_STORE_SCRIPT = """
import json, sys
import numpy as np, pandas as pd
import fmcib.training.crops as crops_module
from fmcib.distributed import init_distributed
from fmcib.preprocessing import PreprocessConfig

context = init_distributed("cpu")
read = []
original = crops_module.ScanDataset.__getitem__
def recording(self, index):
    read.append(self.tasks[index].image)
    return original(self, index)
crops_module.ScanDataset.__getitem__ = recording
out = sys.argv[2]
rows, crops, errors = crops_module.read_crops(pd.read_csv(sys.argv[1]), PreprocessConfig(patch_size=(12, 10, 8),
                                              spacing_mm=2.0), margin=2, store=out + "/store", context=context)
json.dump(read, open(f"{out}/read-{context.rank}.json", "w"))
if context.is_main:
    np.save(f"{out}/rows.npy", rows)
    np.save(f"{out}/crops.npy", np.asarray(crops))
"""


def test_two_processes_share_one_crop_store_each_reading_its_scans(synthetic_cases, tmp_path):
    from fmcib.preprocessing import PreprocessConfig
    from fmcib.training import read_crops

    table = _copied_cases(synthetic_cases, tmp_path / "scans")
    table.to_csv(tmp_path / "seeds.csv", index=False)
    (tmp_path / "store_script.py").write_text(CROP_STORE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(tmp_path / "store_script.py"), str(tmp_path / "seeds.csv"), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    read = [set(json.loads((tmp_path / f"read-{r}.json").read_text())) for r in (0, 1)]
    assert read[0] and read[1] and not read[0] & read[1]  # each scan read by one process only
    assert read[0] | read[1] == set(table["image_path"])
    rows, crops, _ = read_crops(table, PreprocessConfig(patch_size=(12, 10, 8), spacing_mm=2.0), margin=2)
    assert np.array_equal(np.load(tmp_path / "rows.npy"), rows)
    assert np.array_equal(np.load(tmp_path / "crops.npy"), crops)


def test_simclr_trains_the_same_from_a_crop_store(synthetic_cases, tmp_path):
    from fmcib.training.simclr import pretrain_simclr

    torch.set_num_threads(2)
    runs = {}
    for name, store in (("memory", None), ("store", tmp_path / "crops")):
        pretrain_simclr(synthetic_cases, tmp_path / name, model="resnet10_3d.random", epochs=1, batch_size=4,
                        random_negatives=1, optimizer="adamw", lr=1e-3, warmup_epochs=0, patch_size=12,
                        spacing_mm=3.0, monitor_samples=4, crop_store=store, progress=False)
        runs[name] = _best(tmp_path / name)
    assert (tmp_path / "crops" / "random-negatives.f32").is_file()
    assert (tmp_path / "crops" / "random-patches" / "crops.json").is_file()
    for key, value in runs["memory"].items():
        assert torch.equal(value, runs["store"][key]), key


def test_finetune_learns_a_visible_label_and_its_folder_extracts_and_predicts(tmp_path):
    from fmcib import extract_features
    from fmcib.evaluation import auc
    from fmcib.models import create_model
    from fmcib.training import Augmentation, finetune, predict

    torch.set_num_threads(2)
    data = _bright_lesions(tmp_path / "data", 18)
    test = data[data["image_path"].str.contains("case1[4-7]_", regex=True)]  # 4 held-out scans, 2 of them bright
    train = data.drop(test.index).reset_index(drop=True)
    train["is_tune"] = train.index % 5 == 0
    train.loc[train.index[-1], "bright"] = np.nan  # a row without a label: left out and counted
    train.to_csv(tmp_path / "train.csv", index=False)
    test.to_csv(tmp_path / "test.csv", index=False)
    out = tmp_path / "tuned"
    result = finetune(tmp_path / "train.csv", "bright", out, tune_col="is_tune", model="resnet10_3d.random",
                      epochs=20, batch_size=8, lr=1e-3, optimizer="adamw", augmentation=Augmentation(translate_voxels=3),
                      patch_size=24, spacing_mm=2.0, progress=False)
    assert result.counts["unlabelled"] == 1 and result.counts["train"] + result.counts["tune"] == 69
    assert result.classes == [0, 1]
    preds = predict(tmp_path / "test.csv", out, progress=False, num_workers=0)
    assert len(preds) == len(test) and preds["prediction"].isin([0, 1]).all()
    assert np.allclose(preds["prob_0"] + preds["prob_1"], 1.0)
    assert auc(preds["bright"], preds["prob_1"]) > 0.85  # chance is 0.5; 0.95-1.0 over four data seeds
    # the folder is an encoder for extraction, with the contract it was trained with
    config = json.loads((out / "config.json").read_text())
    assert config["preprocess"]["patch_size"] == 24 and config["head"]["classes"] == [0, 1]
    feats = extract_features(tmp_path / "test.csv", weights=out, progress=False, num_workers=0)
    encoder = create_model(weights=out, device="cpu")
    assert encoder.fmcib_config.preprocess.spacing_mm == 2.0 and feats.filter(like="pred_").shape[1] == 512
    card = (out / "README.md").read_text()
    assert "Label: `bright`" in card and "without a label" in card and "resnet10_3d.random" in card
    assert pd.read_csv(out / METRICS_NAME)["epoch"].tolist() == list(range(1, 21))


def test_finetune_and_predict_from_the_command_line(tmp_path):
    from click.testing import CliRunner

    from fmcib.cli import main

    data = _bright_lesions(tmp_path / "data", 4)
    data.to_csv(tmp_path / "train.csv", index=False)
    runner = CliRunner()
    res = runner.invoke(main, ["finetune", "--csv", str(tmp_path / "train.csv"), "--label", "bright", "--out-dir",
                               str(tmp_path / "tuned"), "--model", "resnet10_3d.random", "--epochs", "1",
                               "--batch-size", "4", "--patch-size", "16", "--spacing", "3", "--fraction", "0.5",
                               "--head", "mlp", "--no-progress"])
    assert res.exit_code == 0, res.output
    config = json.loads((tmp_path / "tuned" / "config.json").read_text())
    assert config["head"]["widths"] == [512, 256, 2] and config["training"]["fraction"] == 0.5
    assert config["training"]["counts"]["train"] == 8  # half of the 16 training rows, stratified
    bad = data.copy()
    bad.loc[0, "image_path"] = str(tmp_path / "missing.nii.gz")
    bad.to_csv(tmp_path / "test.csv", index=False)
    res = runner.invoke(main, ["predict", "--csv", str(tmp_path / "test.csv"), "--model", str(tmp_path / "tuned"),
                               "--out", str(tmp_path / "preds.csv"), "--num-workers", "0", "--no-progress"])
    assert res.exit_code == 3, res.output
    preds = pd.read_csv(tmp_path / "preds.csv")
    assert len(preds) == len(data) - 1 and {"prob_0", "prob_1", "prediction", "bright"} <= set(preds.columns)
    errors = pd.read_csv(tmp_path / "preds.errors.csv")
    assert errors["fmcib_row"].tolist() == [0] and "missing.nii.gz" in errors["fmcib_error"][0]
    # the folder explains itself: its encoder as --weights, its head as --head; the maps explain the class
    # that predict chose for each row (two code paths: the Classifier, and the head read back by load_head)
    res = runner.invoke(main, ["saliency", "--csv", str(tmp_path / "test.csv"), "--weights", str(tmp_path / "tuned"),
                               "--head", str(tmp_path / "tuned"), "--out-dir", str(tmp_path / "maps"), "--n-samples",
                               "2", "--num-workers", "0", "--no-progress"])
    assert res.exit_code == 3, res.output  # the missing scan again
    maps = pd.read_csv(tmp_path / "maps" / "saliency.csv").query("error.isna()", engine="python")
    assert len(maps) == len(preds)
    assert maps["explained"].astype(int).tolist() == preds["prediction"].astype(int).tolist()
    first = sitk.ReadImage(maps["saliency_path"].iloc[0])
    assert first.GetSize() == (16, 16, 16) and first.GetSpacing() == (3.0, 3.0, 3.0)  # the folder's contract
    res = runner.invoke(main, ["finetune", "--csv", str(tmp_path / "train.csv"), "--label", "nope", "--out-dir",
                               str(tmp_path / "x"), "--model", "resnet10_3d.random"])
    assert res.exit_code != 0 and "--label" in res.output and "nope" in res.output
