"""Patients over time: long tables as token sequences, the multimodal JEPA, CLIP-style alignment, fine-tuning
on patient labels, the layered schedule and the synthetic imaging cohort."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from click.testing import CliRunner

from fmcib.cli import main

COLUMNS = ["--patient-col", "patient", "--time-col", "month", "--clinical-prefix", "clin_"]
TARGETS = ["label", "aggressive", "smoker", "responder"]


@pytest.fixture(scope="module")
def cohort():
    """Feature-space patients (make_longitudinal_table): an unlabelled pool, a labelled set and a test set."""
    from fmcib.datasets import make_longitudinal_table

    return {"pool": make_longitudinal_table(300, random_state=0).drop(columns=TARGETS),
            "labelled": make_longitudinal_table(160, random_state=1),
            "test": make_longitudinal_table(120, random_state=2)}


def _patient_values(table: pd.DataFrame, column: str) -> np.ndarray:
    return table.groupby("patient", sort=False)[column].first().to_numpy()

def test_long_tables_become_padded_sequences_with_missing_modalities_and_dates():
    from fmcib.training.longitudinal import CLINICAL, IMAGE, read_sequences

    table = pd.DataFrame({
        "pid": ["a", "a", "b", "c", "c", "c"],
        "date": ["2020-03-01", "2020-01-01", "2021-06-01", "2019-01-01", "2019-02-01", "2019-03-01"],
        "pred_0": [1.0, 3.0, np.nan, 5.0, np.nan, 7.0], "pred_1": [0.0, 2.0, np.nan, 1.0, np.nan, 1.0],
        "clin_age": [60, 60, 70, np.nan, 55, np.nan], "clin_x": [1.0, np.nan, 0.0, np.nan, 2.0, np.nan]})
    seq, record = read_sequences(table, "pid", "date", clinical_prefix="clin_")
    assert seq.patients == ["a", "b", "c"] and record["columns"]["image"] == ["pred_0", "pred_1"]
    assert seq.valid.sum(1).tolist() == [4, 1, 3]  # a: 2 visits x 2 tokens; b: clinical only; c: 2 image + 1 clinical
    a = seq.modality[0][seq.valid[0]].tolist()
    assert a == [IMAGE, CLINICAL, IMAGE, CLINICAL]  # January first, then March
    assert seq.months[0][:4] == pytest.approx([60 / 30.4375] * 2 + [0, 0])  # months before the latest visit
    assert not np.isnan(seq.image).any() and not np.isnan(seq.clinical).any()  # missing values: never NaN
    mean, std = np.mean([1, 3, 5, 7]), np.std([1, 3, 5, 7])
    assert seq.image[0, 0, 0] == pytest.approx((3 - mean) / std)  # standardised with the table's statistics
    assert not seq.valid[1, 1:].any()  # padding
    # (image, clinical) tokens of the same visit: a's two visits; b has no image; c's visits have one modality each
    assert seq.pairs(0) == [(0, 1), (2, 3)] and seq.pairs(1) == [] and seq.pairs(2) == []
    assert seq.rows[0, :4].tolist() == [1, 1, 0, 0] and seq.rows[1, 1:].tolist() == [-1] * (seq.rows.shape[1] - 1)


def test_longitudinal_jepa_embeds_patients_without_collapse_and_beats_random_init(tmp_path):
    import shutil

    from click.testing import CliRunner
    from safetensors.torch import save_file

    from fmcib import embed_patients
    from fmcib.cli import main
    from fmcib.datasets import make_longitudinal_table
    from fmcib.evaluation import auc
    from fmcib.probes import LogisticProbe
    from fmcib.training.jepa import JEPA_COLLAPSE_THRESHOLDS
    from fmcib.training.longitudinal import LongitudinalEncoder

    torch.set_num_threads(2)
    targets = ["label", "aggressive", "smoker", "responder"]
    make_longitudinal_table(300, random_state=0).drop(columns=targets).to_csv(tmp_path / "pool.csv", index=False)
    labelled, test = make_longitudinal_table(120, random_state=1), make_longitudinal_table(120, random_state=2)
    out = tmp_path / "longitudinal"
    res = CliRunner().invoke(main, ["pretrain", "jepa-multimodal", "--table", str(tmp_path / "pool.csv"),
                                    "--patient-col", "patient", "--time-col", "month", "--clinical-prefix", "clin_",
                                    "--width", "64", "--epochs", "20", "--batch-size", "32", "--warmup-epochs", "2",
                                    "--out-dir", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["tune_rankme"].iloc[-1] > JEPA_COLLAPSE_THRESHOLDS["rankme"]  # no collapse
    assert metrics["tune_std"].iloc[-1] > 0.1 and metrics["train_loss"].iloc[-1] > 1e-3
    assert "no labels were used" in (out / "README.md").read_text()

    random_dir = tmp_path / "random"  # the same architecture, untrained: the baseline
    shutil.copytree(out, random_dir)
    config = json.loads((out / "config.json").read_text())
    torch.manual_seed(0)
    save_file(LongitudinalEncoder(**config["model_args"]).state_dict(), str(random_dir / "model.safetensors"))

    def mean_probe_auc(folder):  # over the label and the three hidden variables
        train, held = embed_patients(labelled, folder), embed_patients(test, folder)
        scores = []
        for target in targets:
            y_train = labelled.groupby("patient", sort=False)[target].first().to_numpy()
            y_test = test.groupby("patient", sort=False)[target].first().to_numpy()
            probe = LogisticProbe(n_trials=5, random_state=0).fit(train.filter(like="emb_"), y_train)
            scores.append(auc(y_test, probe.predict_proba(held.filter(like="emb_"))[:, 1]))
        return np.mean(scores)

    assert mean_probe_auc(out) > mean_probe_auc(random_dir)

    res = CliRunner().invoke(main, ["embed", "--table", str(tmp_path / "pool.csv"), "--model", str(out), "--out",
                                    str(tmp_path / "per_time.csv"), "--per-time"])
    assert res.exit_code == 0, res.output
    per_time = pd.read_csv(tmp_path / "per_time.csv")
    pool = pd.read_csv(tmp_path / "pool.csv")
    assert len(per_time) == len(pool.drop_duplicates(["patient", "month"]))
    assert list(per_time.columns[:3]) == ["patient", "month", "emb_0"] and per_time.filter(like="emb_").shape[1] == 64


# -- CLIP-style alignment ---------------------------------------------------------------------------------

def _reference_clip(image, clinical, temperature, valid):
    """CLIP's symmetric cross-entropy written out with numpy on the valid pairs only."""
    from scipy.special import logsumexp

    zi = image.double().numpy()[valid]
    zc = clinical.double().numpy()[valid]
    zi /= np.linalg.norm(zi, axis=1, keepdims=True)
    zc /= np.linalg.norm(zc, axis=1, keepdims=True)
    logits = zi @ zc.T / temperature
    rows = -(np.diag(logits) - logsumexp(logits, axis=1)).mean()
    cols = -(np.diag(logits) - logsumexp(logits, axis=0)).mean()
    return (rows + cols) / 2


def test_symmetric_nt_xent_is_clips_loss_over_the_valid_pairs():
    from fmcib.training.alignment import symmetric_nt_xent

    g = torch.Generator().manual_seed(5)
    image, clinical = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    valid = np.array([True, True, False, True, True, False])
    for t in (0.1, 0.5):
        assert symmetric_nt_xent(image, clinical, t).item() == pytest.approx(
            _reference_clip(image, clinical, t, np.ones(6, bool)), rel=1e-5)
        assert symmetric_nt_xent(image, clinical, t, torch.from_numpy(valid)).item() == pytest.approx(
            _reference_clip(image, clinical, t, valid), rel=1e-5)
    # matched pairs score lower than shuffled ones; no pair at all: zero, with a gradient path
    assert symmetric_nt_xent(image, image * 2, 0.1) < symmetric_nt_xent(image, image[torch.randperm(6)], 0.1)
    none = symmetric_nt_xent(image.requires_grad_(), clinical, 0.1, torch.zeros(6, dtype=torch.bool))
    none.backward()
    assert none.item() == 0 and image.grad is not None


def test_alignment_pairs_see_their_own_token_only_not_its_date_or_the_other_visits():
    """Both modalities share the visit dates: a pair matched on them would be a shortcut, not alignment."""
    from fmcib.datasets import make_longitudinal_table
    from fmcib.training.alignment import AlignmentModel
    from fmcib.training.longitudinal import LongitudinalEncoder, read_sequences

    seq, _ = read_sequences(make_longitudinal_table(20, missing=0.0, random_state=3), "patient", "month",
                                 clinical_prefix="clin_")
    torch.manual_seed(0)
    model = AlignmentModel(LongitudinalEncoder(16, 6, width=32)).eval()
    batch = seq.batch(0, 20)
    pair = torch.tensor([seq.pairs(i)[-1] for i in range(20)])
    with torch.no_grad():
        image, clinical = model(batch, pair)
        moved = {**batch, "months": batch["months"] + torch.rand(batch["months"].shape) * 30}
        others = {**batch, "image": batch["image"] + 5.0, "clinical": batch["clinical"] - 3.0}
        for i, (a, b) in enumerate(pair.tolist()):  # every token but the pair's changes
            others["image"][i, a], others["clinical"][i, b] = batch["image"][i, a], batch["clinical"][i, b]
        torch.testing.assert_close(model(moved, pair), (image, clinical))
        torch.testing.assert_close(model(others, pair), (image, clinical))
        changed = {**batch, "image": batch["image"] + 1.0}
        assert not torch.allclose(model(changed, pair)[0], image)


def test_alignment_stage_learns_to_match_each_patients_image_and_clinical_tokens(cohort, tmp_path):
    out = tmp_path / "aligned"
    res = CliRunner().invoke(main, ["pretrain", "align", "--table", _csv(cohort["pool"], tmp_path / "pool.csv"),
                                    *COLUMNS, "--width", "32", "--epochs", "20", "--batch-size", "64", "--lr", "1e-3",
                                    "--out-dir", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    metrics = pd.read_csv(out / "metrics.csv")
    # image -> clinical retrieval of the same visit among all patients: the true partner ranks high (0.5: chance)
    assert metrics["tune_retrieval_rank"].iloc[-1] < 0.4  # chance: 0.5 +- 0.02
    assert metrics["tune_retrieval_rank"].iloc[-1] < metrics["tune_retrieval_rank"].iloc[0] - 0.1
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["method"] == "alignment" and config["training"]["started_from"] is None
    assert "Symmetric NT-Xent" in (out / "README.md").read_text()


def _csv(frame: pd.DataFrame, path) -> str:
    frame.to_csv(path, index=False)
    return str(path)


# -- patient labels: fine-tuning and prediction ------------------------------------------------------------

def test_patient_labels_take_one_value_per_patient_and_name_the_conflicts():
    from fmcib.exceptions import TableError
    from fmcib.training.patients import patient_labels

    table = pd.DataFrame({"pid": ["a", "a", "b", "b", "c"], "y": [1, np.nan, 0, 0, np.nan]})
    assert patient_labels(table, "pid", "y").fillna(-1).to_dict() == {"a": 1, "b": 0, "c": -1}
    table.loc[3, "y"] = 1
    with pytest.raises(TableError, match=r"one value per patient.*'b': \[0.0, 1.0\]"):
        patient_labels(table, "pid", "y")


def test_finetune_and_predict_on_patient_tables_from_a_pretrained_folder(cohort, tmp_path):
    from fmcib.evaluation import auc

    torch.set_num_threads(2)
    pool_csv = _csv(pd.concat([cohort["pool"], cohort["labelled"].drop(columns=TARGETS)]), tmp_path / "pool.csv")
    jepa = tmp_path / "jepa"
    res = CliRunner().invoke(main, ["pretrain", "jepa-multimodal", "--table", pool_csv, *COLUMNS, "--width", "32",
                                    "--epochs", "8", "--batch-size", "64", "--out-dir", str(jepa), "--no-progress"])
    assert res.exit_code == 0, res.output
    labelled, test = _csv(cohort["labelled"], tmp_path / "labelled.csv"), _csv(cohort["test"], tmp_path / "test.csv")
    tuned = tmp_path / "tuned"
    res = CliRunner().invoke(main, ["finetune", "--table", labelled, "--label", "label", "--weights", str(jepa),
                                    "--epochs", "30", "--batch-size", "32", "--lr", "1e-3", "--out-dir", str(tuned),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    config = json.loads((tuned / "config.json").read_text())
    assert config["head"]["classes"] == [0, 1] and config["head"]["type"] == "mlp"
    assert config["training"]["started_from"]["method"] == "longitudinal-jepa"
    assert "labels: column `label`" in (tuned / "README.md").read_text()
    res = CliRunner().invoke(main, ["predict", "--table", test, "--model", str(tuned), "--out",
                                    str(tmp_path / "pred.csv")])
    assert res.exit_code == 0, res.output
    pred = pd.read_csv(tmp_path / "pred.csv")
    assert pred["patient"].tolist() == cohort["test"]["patient"].unique().tolist()
    np.testing.assert_allclose(pred[["prob_0", "prob_1"]].sum(axis=1), 1.0, rtol=1e-5)
    assert (pred["prediction"] == np.where(pred["prob_1"] > pred["prob_0"], 1, 0)).all()
    assert auc(_patient_values(cohort["test"], "label"), pred["prob_1"].to_numpy()) > 0.75
    res = CliRunner().invoke(main, ["embed", "--table", test, "--model", str(tuned), "--out",
                                    str(tmp_path / "emb.csv")])  # the fine-tuned encoder embeds too
    assert res.exit_code == 0 and pd.read_csv(tmp_path / "emb.csv").filter(like="emb_").shape == (120, 32)

    res = CliRunner().invoke(main, ["finetune", "--table", labelled, "--label", "label", "--out-dir",
                                    str(tmp_path / "x")])
    assert res.exit_code == 2 and "--weights DIR" in res.output and "--random-init" in res.output
    res = CliRunner().invoke(main, ["finetune", "--table", labelled, "--label", "label", "--weights", str(jepa),
                                    "--translate", "3", "--out-dir", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--translate" in res.output
    res = CliRunner().invoke(main, ["predict", "--table", test, "--model", str(jepa), "--out",
                                    str(tmp_path / "p.csv")])
    assert res.exit_code == 1 and "no classification head" in res.output


def test_supervised_baseline_from_random_init_has_the_starting_folders_architecture(cohort, tmp_path):
    from fmcib.training.longitudinal import Architecture, TableColumns, pretrain_longitudinal
    from fmcib.training.patients import finetune_patients

    start = tmp_path / "jepa"
    pretrain_longitudinal(cohort["pool"], start, columns=TableColumns("patient", "month", clinical_prefix="clin_"),
                          architecture=Architecture(width=16, depth=1), epochs=1, progress=False)
    result = finetune_patients(cohort["labelled"], "label", tmp_path / "scratch", start=start, pretrained=False,
                               epochs=1, progress=False)
    config = json.loads((tmp_path / "scratch" / "config.json").read_text())
    assert config["model_args"]["width"] == 16 and config["model_args"]["depth"] == 1
    assert config["training"]["started_from"] is None and "random initial weights" in config["training"]["summary"]
    assert config["normalisation"] == json.loads((start / "config.json").read_text())["normalisation"]
    assert result.counts["train"] + result.counts["tune"] == cohort["labelled"]["patient"].nunique()


# -- the layered schedule ----------------------------------------------------------------------------------

def test_layered_schedule_keeps_finished_stages_and_resumes_an_interrupted_one_exactly(cohort, tmp_path,
                                                                                       monkeypatch):
    from safetensors.torch import load_file

    from fmcib.exceptions import FmcibError
    from fmcib.training import layered
    from fmcib.training.finetune import ClassificationTask
    from fmcib.training.layered import train_layered
    from fmcib.training.longitudinal import Architecture, TableColumns

    torch.set_num_threads(2)
    table = pd.concat([cohort["pool"], cohort["labelled"]], ignore_index=True)  # pool patients have no label
    kwargs = {"label": "label", "columns": TableColumns("patient", "month", clinical_prefix="clin_"),
              "architecture": Architecture(width=16, depth=1), "jepa": {"epochs": 2}, "align": {"epochs": 2},
              "finetune": {"epochs": 3, "batch_size": 16}, "progress": False}
    reference = train_layered(table, tmp_path / "reference", **kwargs)  # uninterrupted
    assert [e["folder"] for e in reference["stages"]] == ["1-jepa", "2-align", "3-finetune"]
    assert reference["final"] == str(tmp_path / "reference" / "3-finetune")
    final = json.loads((tmp_path / "reference" / "3-finetune" / "config.json").read_text())
    assert final["training"]["started_from"]["method"] == "alignment"
    assert final["training"]["started_from"]["started_from"]["method"] == "longitudinal-jepa"

    calls = {"n": 0}
    original = ClassificationTask.loss

    def interrupted(self, model, batch):  # Ctrl-C during the 9th fine-tuning step (epoch 2)
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return original(self, model, batch)

    monkeypatch.setattr(ClassificationTask, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_layered(table, tmp_path / "run", **kwargs)
    monkeypatch.setattr(ClassificationTask, "loss", original)
    assert (tmp_path / "run" / "2-align" / "README.md").is_file()
    assert not (tmp_path / "run" / "3-finetune" / "config.json").exists()
    other = {**kwargs, "finetune": {"epochs": 3, "batch_size": 16, "class_weights": True}}  # not an engine setting
    with pytest.raises(FmcibError, match="3-finetune.*interrupted finetune stage started with other settings"):
        train_layered(table, tmp_path / "run", **other)

    ran = []
    real_run = layered._run_stage
    monkeypatch.setattr(layered, "_run_stage", lambda stage, *a: (ran.append((stage, a[-1])), real_run(stage, *a)))
    train_layered(table, tmp_path / "run", **kwargs)
    assert ran == [("finetune", True)]  # finished stages kept; the interrupted one resumed
    for stage in ("1-jepa", "2-align", "3-finetune"):
        ours, theirs = (load_file(str(tmp_path / d / stage / "model.safetensors")) for d in ("run", "reference"))
        assert ours.keys() == theirs.keys()
        for key in ours:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0)
    ran.clear()
    train_layered(table, tmp_path / "run", **kwargs)
    assert ran == []  # nothing left to do
    with pytest.raises(FmcibError, match="1-jepa.*other settings"):
        train_layered(table, tmp_path / "run", **{**kwargs, "jepa": {"epochs": 2, "sigreg_lambda": 0.05}})


def test_layered_command_runs_the_chosen_stages(cohort, tmp_path):
    table = _csv(pd.concat([cohort["pool"], cohort["labelled"]]), tmp_path / "long.csv")
    out = tmp_path / "layered"
    res = CliRunner().invoke(main, ["pretrain", "layered", "--table", table, *COLUMNS, "--stages", "jepa,finetune",
                                    "--label", "label", "--width", "16", "--depth", "1", "--jepa-epochs", "1",
                                    "--finetune-epochs", "1", "--out-dir", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out.iterdir()) == ["1-jepa", "2-finetune", "layered.json"]
    assert "final model" in res.output
    res = CliRunner().invoke(main, ["pretrain", "layered", "--table", table, *COLUMNS, "--stages", "finetune,jepa",
                                    "--label", "label", "--out-dir", str(tmp_path / "x")])
    assert res.exit_code == 2 and "in this order" in res.output
    res = CliRunner().invoke(main, ["pretrain", "layered", "--table", table, *COLUMNS, "--out-dir",
                                    str(tmp_path / "y")])
    assert res.exit_code == 1 and "needs --label" in res.output


# -- the synthetic imaging cohort ---------------------------------------------------------------------------

def test_synthetic_cohort_lesions_grow_shrink_or_stay_as_their_hidden_variables_say(tmp_path):
    import SimpleITK as sitk

    from fmcib.datasets import make_longitudinal_ct

    table = make_longitudinal_ct(tmp_path, n_patients=12, visits=(3, 4), size=(48, 48, 48), spacing=(1, 1, 1),
                                 noise_hu=0.0, missing=0.2, random_state=4)
    assert set(table.columns) >= {"patient", "month", "image_path", "coordX", "clin_marker", "label"}
    scans = table[table["image_path"] != ""]
    clinical_missing = table["clin_marker"].isna()
    assert not (clinical_missing & (table["image_path"] == "")).any()  # never both missing
    assert (table["label"] == (table["aggressive"] & ~table["responder"].astype(bool))).all()
    for _, row in scans.iterrows():
        image = sitk.ReadImage(row["image_path"])
        volume = sitk.GetArrayFromImage(image).astype(float)
        density = 90.0 if row["dense"] else 20.0
        index = image.TransformPhysicalPointToIndex((row["coordX"], row["coordY"], row["coordZ"]))
        assert volume[index[::-1]] == pytest.approx(density, abs=2)  # the seed is the lesion centre
        # half-way between the lesion and the 40 HU tissue around it (air is -1000 HU)
        inside = volume > 65 if row["dense"] else (volume < 30) & (volume > 0)
        if row["radius_mm"] >= 4:  # big enough for the voxel count to be the ball's volume
            assert inside.sum() == pytest.approx(4 / 3 * np.pi * row["radius_mm"] ** 3, rel=0.1)
    for _, visits in table.groupby("patient"):
        radius = visits.sort_values("month")["radius_mm"].to_numpy()
        first, last = visits.iloc[0], visits.sort_values("month").iloc[-1]
        if first["label"]:  # progression: grows at 4 % a month
            assert radius[-1] == pytest.approx(min(radius[0] * np.exp(0.04 * last["month"]), 16.0), rel=1e-6)
        elif not first["aggressive"]:
            assert np.abs(np.log(radius / radius[0])).max() < 0.15


# -- time-distance attention ----------------------------------------------------------------------------

def test_time_distance_attention_follows_the_tdvit_formula():
    from fmcib.training.longitudinal import TimeDistanceBlock

    torch.manual_seed(2)
    block = TimeDistanceBlock(8, 2).eval()
    with torch.no_grad():
        block.decay.copy_(torch.tensor([0.3, -0.1]))  # |a| is used: a negative value decays too
        block.offset.copy_(torch.tensor([1.0, 0.5]))
    x, months = torch.randn(1, 4, 8), torch.tensor([[0.0, 3.0, 3.0, 12.0]])
    keys = torch.tensor([[True, True, False, True]])
    with torch.no_grad():
        out = block(x, keys, months)
        qkv = block.qkv(block.norm1(x))[0].double().numpy()  # (4, 24): q, k, v of 2 heads of width 4
    attended = np.zeros((4, 8))
    for h in range(2):
        q, k, v = (qkv[:, part * 8 + h * 4: part * 8 + h * 4 + 4] for part in range(3))
        a, c = abs(block.decay[h].item()), abs(block.offset[h].item())
        for i in range(4):
            logits = []
            for j in range(4):
                distance = abs(months[0, i].item() - months[0, j].item())
                near = 1 / (1 + np.exp(a * distance - c))
                logits.append(max(q[i] @ k[j], 0.0) * near / 2.0 if keys[0, j] else -np.inf)  # sqrt(4) = 2
            weights = np.exp(np.array(logits) - max(logits))
            attended[i, h * 4:(h + 1) * 4] = (weights / weights.sum()) @ v
    with torch.no_grad():
        mid = x + block.proj(torch.from_numpy(attended).float()[None])
        expected = mid + block.mlp(block.norm2(mid))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_time_attention_encoder_trains_saves_and_embeds(cohort, tmp_path):
    out = tmp_path / "tdvit"
    res = CliRunner().invoke(main, ["pretrain", "jepa-multimodal", "--table", _csv(cohort["pool"], tmp_path / "p.csv"),
                                    *COLUMNS, "--width", "16", "--depth", "1", "--time-attention", "--epochs", "2",
                                    "--out-dir", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["time_attention"] is True
    from fmcib import embed_patients

    embedded = embed_patients(cohort["test"], out)
    assert embedded.filter(like="emb_").shape == (120, 16) and np.isfinite(embedded.filter(like="emb_")).all().all()


@pytest.mark.parametrize("command", [["align"], ["jepa-multimodal", "--sigreg-lambda", "0.05"]])
def test_longitudinal_stages_under_torchrun_split_the_patients_between_two_processes(cohort, tmp_path, command):
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "aligned"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fmcib", "pretrain", *command, "--table", _csv(cohort["pool"], tmp_path / "pool.csv"),
                          *COLUMNS, "--width", "16", "--depth", "1", "--epochs", "2", "--batch-size", "32",
                          "--device", "cpu", "--out-dir", str(out), "--no-progress"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    patients = cohort["pool"]["patient"].nunique()
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].tolist() == [(patients // 2) // 32 * e for e in (1, 2)]  # half the patients each
    assert np.isfinite(metrics["train_loss"]).all() and (out / "README.md").is_file()


def test_extract_output_of_the_imaging_cohort_joins_the_long_table(tmp_path):
    """CT per visit -> fmcib extract (its pred_* columns, input columns kept) -> long table with the visits that
    have no scan -> jepa-multimodal -> embed: one row per patient."""
    from fmcib.datasets import make_longitudinal_ct

    cohort = make_longitudinal_ct(tmp_path / "ct", n_patients=12, random_state=5)
    scanned = cohort["image_path"] != ""
    cohort[scanned].to_csv(tmp_path / "scans.csv", index=False)
    res = CliRunner().invoke(main, ["extract", "--csv", str(tmp_path / "scans.csv"), "--model", "resnet10_3d.random",
                                    "--patch-size", "16", "--spacing", "2", "--out", str(tmp_path / "features.csv"),
                                    "--no-progress"])
    assert res.exit_code == 0, res.output
    features = pd.read_csv(tmp_path / "features.csv")
    assert features.filter(like="pred_").shape == (scanned.sum(), 512) and "clin_marker" in features.columns
    long = pd.concat([features, cohort[~scanned]], ignore_index=True)
    long.to_csv(tmp_path / "long.csv", index=False)
    out = tmp_path / "jepa"
    res = CliRunner().invoke(main, ["pretrain", "jepa-multimodal", "--table", str(tmp_path / "long.csv"), *COLUMNS,
                                    "--width", "16", "--depth", "1", "--epochs", "2", "--batch-size", "4",
                                    "--out-dir", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert len(config["columns"]["image"]) == 512 and config["columns"]["clinical"] == [
        "clin_marker", "clin_smoking", "clin_weight", "clin_age"]
    assert config["training"]["tokens"] == scanned.sum() + cohort["clin_marker"].notna().sum()
    res = CliRunner().invoke(main, ["embed", "--table", str(tmp_path / "long.csv"), "--model", str(out), "--out",
                                    str(tmp_path / "emb.csv")])
    assert res.exit_code == 0, res.output
    assert pd.read_csv(tmp_path / "emb.csv")["patient"].tolist() == cohort["patient"].unique().tolist()
