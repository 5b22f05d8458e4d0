"""Downstream commands end to end: probe fit/predict, survival, stability (real CT), QC montage."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
from click.testing import CliRunner

from fmcib.cli import main
from fmcib.probes import load_probe

BUNDLED = Path(__file__).resolve().parents[1] / "examples" / "data"


def _cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_probe_fit_predict_and_survival_commands(tmp_path):
    rng = np.random.default_rng(0)
    n, d = 160, 12
    y = rng.integers(0, 2, n)
    X = rng.normal(size=(n, d))
    X[:, 0] += 1.5 * y
    table = pd.DataFrame(X, columns=[f"pred_{i}" for i in range(d)]).assign(
        case=[f"c{i}" for i in range(n)], label=y.astype(float), is_tune=np.arange(n) % 4 == 0)
    table.loc[5, "label"] = np.nan  # unlabeled rows are not used for fitting
    table.loc[7, "pred_3"] = np.nan  # missing features: dropped in fit, no prediction
    table.to_csv(tmp_path / "f.csv", index=False)
    res = _cli("probe", "fit", "--features", tmp_path / "f.csv", "--label", "label", "--tune-col", "is_tune",
               "--out", tmp_path / "probe.json", "--n-trials", "5")
    assert res.exit_code == 0, res.output
    assert load_probe(tmp_path / "probe.json").n_dropped_ == 1
    res = _cli("probe", "predict", "--model", tmp_path / "probe.json", "--features", tmp_path / "f.csv",
               "--out", tmp_path / "p.csv")
    assert res.exit_code == 0, res.output
    preds = pd.read_csv(tmp_path / "p.csv")
    assert len(preds) == n and preds.case.tolist() == table.case.tolist()
    assert preds.loc[7, ["prob_0.0", "prob_1.0"]].isna().all()
    np.testing.assert_allclose(preds[["prob_0.0", "prob_1.0"]].drop(index=7).sum(axis=1), 1.0)
    assert preds["prob_1.0"][y == 1].mean() > preds["prob_1.0"][y == 0].mean() + 0.3

    # a probe remembers which encoder made its features, and says so when given another one's
    from fmcib.files import write_table

    def provenance(model):
        return {"provenance": {"model": model, "weights": {"sha256": model * 8}, "preprocess": {"patch_size": 50}}}

    write_table(table, tmp_path / "a.csv", metadata=provenance("enc_a"))
    write_table(table, tmp_path / "b.csv", metadata=provenance("enc_b"))
    assert _cli("probe", "fit", "--features", tmp_path / "a.csv", "--label", "label", "--out", tmp_path / "pa.json",
                "--n-trials", "0").exit_code == 0
    assert load_probe(tmp_path / "pa.json").encoder_["model"] == "enc_a"
    same = _cli("probe", "predict", "--model", tmp_path / "pa.json", "--features", tmp_path / "a.csv",
                "--out", tmp_path / "pa.csv")
    other = _cli("probe", "predict", "--model", tmp_path / "pa.json", "--features", tmp_path / "b.csv",
                 "--out", tmp_path / "pb.csv")
    assert same.exit_code == other.exit_code == 0
    assert "warning" not in same.output and "trained on features of enc_a" in other.output

    # survival on the probe's score: times depend on the true label
    preds["time"] = rng.exponential(np.where(y == 1, 1.0, 3.0))
    preds["event"] = 1
    preds["is_tune"] = table.is_tune
    preds.to_csv(tmp_path / "p.csv", index=False)
    res = _cli("survival", "--predictions", tmp_path / "p.csv", "--time", "time", "--event", "event",
               "--score", "prob_1.0", "--tune-col", "is_tune", "--out-dir", tmp_path / "surv")
    assert res.exit_code == 0, res.output
    assert {"km.png", "km.svg", "survival.json", "cox.csv"} <= {p.name for p in (tmp_path / "surv").iterdir()}
    res = _cli("survival", "--predictions", tmp_path / "p.csv", "--time", "nope", "--event", "event",
               "--score", "prob_1.0", "--out-dir", tmp_path / "surv")
    assert res.exit_code == 1 and "'nope'" in res.output


def test_stability_perturb_on_real_ct_then_icc_and_qc(tiny_model_dir, tmp_path):
    shutil.copytree(BUNDLED, tmp_path / "data")
    seeds = tmp_path / "data" / "seeds.csv"
    out = tmp_path / "stab.csv"
    res = _cli("stability", "perturb", "--csv", seeds, "--out", out, "--n", "4", "--weights", tiny_model_dir,
               "--features-out", tmp_path / "perturbed.parquet", "--num-workers", "0", "--no-progress")
    assert res.exit_code == 0, res.output
    stab = pd.read_csv(out)
    feats = pd.read_parquet(tmp_path / "perturbed.parquet")
    assert len(feats) == 12 and feats.fmcib_seed_row.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert feats.lesion_id.iloc[4] == "STS_019_x+10"  # user columns carried through
    from fmcib.io import read_table_metadata

    provenance = read_table_metadata(tmp_path / "perturbed.parquet")  # extraction provenance kept with the table
    assert provenance["model"] == "tiny_3d.test" and provenance["preprocess"]["patch_size"] == 50
    n_features = sum(c.startswith("pred_") for c in feats.columns)
    assert len(stab) == n_features and (stab.n_perturbations == 4).all() and (stab.n_lesions == 3).all()
    finite = stab.icc.dropna()
    assert len(finite) > 0 and (finite <= 1).all()

    # the same perturbations again, now with a probe: the spread of its predictions per lesion
    from fmcib.probes import LogisticProbe, feature_matrix

    probe = LogisticProbe(n_trials=0).fit(feature_matrix(feats), (feats.fmcib_offset_x_mm > 0).astype(int))
    probe.save(tmp_path / "probe.json")
    with_bad = pd.read_csv(seeds)
    with_bad.loc[len(with_bad)] = ["STS_019/CT_image.nii.gz", 9999.0, 0.0, 0.0, "outside", "bad seed"]
    with_bad.to_csv(tmp_path / "data" / "with_bad.csv", index=False)
    res = _cli("stability", "perturb", "--csv", tmp_path / "data" / "with_bad.csv", "--out", out, "--n", "4",
               "--weights", tiny_model_dir, "--probe", tmp_path / "probe.json", "--num-workers", "0", "--no-progress")
    assert res.exit_code == 3, res.output  # the failed perturbed seeds go to an errors file, the rest is written
    failed = pd.read_csv(tmp_path / "stab.errors.csv")
    assert len(failed) == 4 and set(failed.lesion_id) == {"outside"} and failed.fmcib_error.str.contains("outside").all()
    spread = pd.read_csv(tmp_path / "stab.prediction_spread.csv")
    assert spread.lesion_id.tolist() == ["STS_019", "STS_019_x+10", "STS_019_yz"]  # the lesions' own columns
    p = pd.Series(probe.predict_proba(feature_matrix(feats))[:, 1]).groupby(feats.fmcib_seed_row)
    np.testing.assert_allclose(spread["mean"], p.mean().to_numpy(), atol=1e-6)
    np.testing.assert_allclose(spread["std"], p.std().to_numpy(), atol=1e-6)
    assert spread["n"].tolist() == [4, 4, 4]

    # test-retest ICC: perturbation 0 vs 1 as two "sessions"
    test = feats[feats.fmcib_perturbation == 0]
    retest = feats[feats.fmcib_perturbation == 1]
    test.to_csv(tmp_path / "t.csv", index=False)
    retest.to_csv(tmp_path / "r.csv", index=False)
    res = _cli("stability", "icc", "--test", tmp_path / "t.csv", "--retest", tmp_path / "r.csv",
               "--key", "lesion_id", "--out", tmp_path / "icc.csv")
    assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "icc.csv")) == n_features

    # QC montage over two pages, with one failing row shown instead of stopping the run
    table = pd.read_csv(seeds)
    table.loc[len(table)] = ["STS_019/CT_image.nii.gz", 9999.0, 0.0, 0.0, "outside", "bad seed"]
    table.to_csv(tmp_path / "data" / "qc.csv", index=False)
    res = _cli("qc", "--csv", tmp_path / "data" / "qc.csv", "--out", tmp_path / "qc.png", "--rows-per-page", "3")
    assert res.exit_code == 0, res.output
    pages = sorted(tmp_path.glob("qc_page*.png"))
    assert [p.name for p in pages] == ["qc_page1.png", "qc_page2.png"]
    from PIL import Image

    assert Image.open(pages[0]).size[1] > Image.open(pages[1]).size[1]  # 3 rows vs the failed row alone


def test_tsne_command(tmp_path):
    rng = np.random.default_rng(0)
    table = pd.DataFrame(rng.normal(size=(40, 6)), columns=[f"pred_{i}" for i in range(6)])
    table["site"] = np.repeat(["lung", "liver"], 20)
    table.loc[table.site == "liver", "pred_0"] += 4
    table.to_parquet(tmp_path / "f.parquet")
    res = _cli("tsne", "--features", tmp_path / "f.parquet", "--label", "site", "--out", tmp_path / "t.png",
               "--perplexity", "8")
    assert res.exit_code == 0, res.output
    import matplotlib.image

    assert matplotlib.image.imread(tmp_path / "t.png").shape[0] > 100
    res = CliRunner().invoke(main, ["tsne", "--features", str(tmp_path / "f.parquet"), "--label", "stage",
                                    "--out", str(tmp_path / "u.png")])
    assert res.exit_code == 1 and "no column 'stage'" in res.output and not (tmp_path / "u.png").exists()


def test_tsne_plot_runs_headless():
    from fmcib.plots import plot_tsne

    rng = np.random.default_rng(0)
    y = np.repeat(["a", "b"], 30)
    X = rng.normal(size=(60, 10)) + (y == "b")[:, None] * 3
    ax = plot_tsne(pd.DataFrame(X, columns=[f"pred_{i}" for i in range(10)]), y, perplexity=10)
    assert len(ax.collections) >= 2 and ax.get_legend() is not None


def test_downstream_example_script_runs(tmp_path):
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "examples" / "downstream_example.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "test AUC" in done.stdout and (tmp_path / "survival" / "km.png").is_file() and (tmp_path / "qc.png").is_file()


def test_perturbation_stability_select_and_qc_on_shared_ct(shared_data, tiny_model_dir, tmp_path):
    """Real CT from ../shared/data (soft-tissue sarcoma and lung slabs) through perturbation, selection and QC."""
    import fmcib
    from fmcib.extract import FeatureExtractor
    from fmcib.io import write_table
    from fmcib.plots import qc_montage
    from fmcib.stability import perturb_seeds, perturbation_stability

    manifest = pd.read_csv(shared_data / "manifest.csv")
    cases = pd.concat([manifest[manifest.source == s].head(2) for s in ("ibsi_sts_ct", "lidc_slabs")])
    seeds = cases.assign(image_path=[str(shared_data / p) for p in cases.image])[
        ["image_path", "coordX", "coordY", "coordZ", "case"]].reset_index(drop=True)
    extractor = FeatureExtractor(model="resnet50_3d.fmcib", weights=tiny_model_dir, num_workers=0, progress=False)

    # zero variance: every perturbation is the seed itself, so within-lesion spread is 0 and ICC(1,1) = 1
    same = fmcib.extract_features(perturb_seeds(seeds, n=3, variance=0.0, random_state=0), model=extractor)
    exact = perturbation_stability(same)
    varies = exact.icc.notna()
    assert varies.sum() > 10 and np.allclose(exact.icc[varies], 1.0) and np.allclose(exact.cv.dropna(), 0.0)

    moved = fmcib.extract_features(perturb_seeds(seeds, n=5, variance=16.0, random_state=1), model=extractor)
    stab = perturbation_stability(moved)
    assert len(moved) == 20 and (stab.icc.dropna() < 0.999).mean() > 0.5  # moving the seed changes features

    features = fmcib.extract_features(seeds, model=extractor)
    write_table(features, tmp_path / "f.parquet")
    write_table(stab, tmp_path / "stab.csv")
    res = _cli("stability", "select", "--features", tmp_path / "f.parquet", "--stability", tmp_path / "stab.csv",
               "--min", "0.5", "--out", tmp_path / "f_stable.parquet")
    assert res.exit_code == 0, res.output
    kept = pd.read_parquet(tmp_path / "f_stable.parquet")
    expected = stab.feature[stab.icc >= 0.5].tolist()
    assert [c for c in kept.columns if c.startswith("pred_")] == expected
    assert kept.case.tolist() == seeds.case.tolist()  # non-feature columns stay
    assert 0 < len(expected) < len(stab)

    pages = qc_montage(seeds, tmp_path / "qc.png", rows_per_page=2)
    assert [p.name for p in pages] == ["qc_page1.png", "qc_page2.png"]
