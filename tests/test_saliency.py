"""Saliency: guided backprop against a hand-computed gradient, probe heads, NIfTI alignment, CLI."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner
from torch import nn

from fmcib.cli import main
from fmcib.models.architectures import build_architecture
from fmcib.probes import LogisticProbe, feature_matrix
from fmcib.saliency import EncoderWithHead, GuidedReLU, guided_relus, probe_head, smooth_guided_backprop

from conftest import TINY_ARGS

BUNDLED = Path(__file__).resolve().parents[1] / "examples" / "data"


class _TwoLayer(nn.Module):
    """score = w2 . relu(W1 x + b1): small enough to write its guided gradient down by hand."""

    def __init__(self, n_in: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(n_in, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def test_guided_backprop_equals_hand_computed_gradient():
    torch.manual_seed(0)
    model = _TwoLayer(4 ** 3, 32)
    patch = np.random.default_rng(1).normal(size=(4, 4, 4)).astype(np.float32)
    W1, b1 = model.fc1.weight.detach().double().numpy(), model.fc1.bias.detach().double().numpy()
    w2 = model.fc2.weight.detach().double().numpy()[0]
    active = (W1 @ patch.ravel().astype(np.float64) + b1) > 0
    # guided ReLU: gradient passes where the unit is active AND the gradient arriving from above is positive
    guided = W1.T @ (w2 * active * (w2 > 0))
    plain = W1.T @ (w2 * active)
    assert np.abs(guided - plain).max() > 0.5 * np.abs(guided).max()  # guided and plain gradients differ

    got = smooth_guided_backprop(model, patch, n_samples=1, noise=0.0, magnitude=False)
    np.testing.assert_allclose(got.ravel(), guided, rtol=1e-4, atol=1e-6)
    # magnitude mode with one noiseless sample is |gradient|
    got_abs = smooth_guided_backprop(model, patch, n_samples=1, noise=0.0)
    np.testing.assert_allclose(got_abs.ravel(), np.abs(guided), rtol=1e-4, atol=1e-6)
    # parameters keep their requires_grad and get no gradient
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_smooth_guided_backprop_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(0)
    model = _TwoLayer(4 ** 3, 16)
    patch = np.random.default_rng(2).normal(size=(4, 4, 4)).astype(np.float32)
    state = torch.random.get_rng_state()
    a = smooth_guided_backprop(model, patch, n_samples=4, random_state=3)
    assert torch.equal(state, torch.random.get_rng_state())
    b = smooth_guided_backprop(model, patch, n_samples=4, random_state=3)
    c = smooth_guided_backprop(model, patch, n_samples=4, random_state=4)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_guided_relus_swaps_every_relu_of_the_monai_resnet_and_restores_them():
    torch.manual_seed(0)
    encoder = build_architecture("monai_resnet", dict(TINY_ARGS)).eval()
    relus = {name: m for name, m in encoder.named_modules() if isinstance(m, nn.ReLU)}
    assert relus and all(not name.endswith("relu") for name in relus)  # MONAI names them "act"
    x = torch.rand(1, 1, 24, 24, 24)
    with torch.no_grad():
        before = encoder(x)
    with guided_relus(encoder) as n:
        assert n == len(relus)
        assert not any(isinstance(m, nn.ReLU) for m in encoder.modules())
        assert sum(isinstance(m, GuidedReLU) for m in encoder.modules()) == len(relus)
        with torch.no_grad():
            torch.testing.assert_close(encoder(x), before)  # forward is unchanged
    assert {name: m for name, m in encoder.named_modules() if isinstance(m, nn.ReLU)} == relus
    with pytest.raises(ValueError, match="no nn.ReLU"):
        smooth_guided_backprop(nn.Sequential(nn.Flatten(), nn.Linear(8, 1)), np.zeros((2, 2, 2), np.float32),
                               guided=True)


def test_a_vit_without_relus_gets_plain_smoothgrad():
    from monai.visualize import SmoothGrad

    from fmcib.models import create_model

    encoder = create_model("vit3d_tiny.random", device="cpu")
    scorer = EncoderWithHead(encoder, nn.Linear(192, 1)).eval()
    patch = np.random.default_rng(0).random((1, 16, 16, 16)).astype(np.float32)
    got = smooth_guided_backprop(scorer, patch, n_samples=3, random_state=4)
    torch.manual_seed(4)
    x = torch.from_numpy(patch[None])
    for p in scorer.parameters():
        p.requires_grad_(False)
    expected = SmoothGrad(scorer, stdev_spread=0.15, n_samples=3, magnitude=True, verbose=False)(x, index=0)
    np.testing.assert_allclose(got, expected[0, 0].numpy(), rtol=1e-5, atol=1e-8)
    assert np.abs(got).sum() > 0


def _features(n: int, d: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(rng.normal(size=(n, d)) * rng.uniform(0.5, 3, d) + rng.normal(size=d),
                        columns=[f"pred_{i}" for i in range(d)])


@pytest.mark.parametrize("n_classes", [2, 3])
def test_probe_head_reproduces_the_probe_decision_function(n_classes):
    X = _features(90, 12, 0)
    y = np.arange(90) % n_classes
    probe = LogisticProbe(n_trials=0, C=0.5).fit(X, y)
    head = probe_head(probe, 12)
    with torch.no_grad():
        got = head(torch.from_numpy(X.to_numpy(np.float32))).double().numpy()
    expected = probe.decision_function(X)
    np.testing.assert_allclose(got.reshape(expected.shape), expected, atol=1e-4)


def test_probe_head_on_a_feature_subset_in_any_order():
    X = _features(60, 20, 1)
    subset = ["pred_7", "pred_2", "pred_15"]
    probe = LogisticProbe(n_trials=0).fit(X[subset], np.arange(60) % 2)
    head = probe_head(probe, 20)
    with torch.no_grad():
        got = head(torch.from_numpy(X.to_numpy(np.float32)))[:, 0].double().numpy()
    np.testing.assert_allclose(got, probe.decision_function(X[subset]), atol=1e-4)
    assert set(np.flatnonzero(head.weight.detach().numpy()[0])) == {7, 2, 15}
    for bad in (["pred_3", "age"], ["pred_3", "pred_20"]):
        other = X.assign(age=1.0, pred_20=2.0)
        with pytest.raises(ValueError, match="not features of this encoder"):
            probe_head(LogisticProbe(n_trials=0).fit(other[bad], np.arange(60) % 2), 20)


def test_saliency_maps_are_aligned_with_the_scan_and_match_a_direct_computation(tiny_model_dir, tmp_path):
    import fmcib
    from fmcib.extract import FeatureExtractor
    from fmcib.io import write_table
    from fmcib.saliency import saliency_maps
    from fmcib.stability import perturb_seeds

    shutil.copytree(BUNDLED, tmp_path / "data")
    seeds_csv = tmp_path / "data" / "seeds.csv"
    extractor = FeatureExtractor(model="resnet50_3d.fmcib", weights=tiny_model_dir, num_workers=0, progress=False)
    seeds = pd.read_csv(seeds_csv)
    train = fmcib.extract_features(perturb_seeds(seeds, n=6, variance=25, random_state=0), model=extractor,
                                   base_dir=tmp_path / "data")
    labels = (train.coordX > train.coordX.median()).astype(int)
    probe = LogisticProbe(n_trials=0).fit(feature_matrix(train), labels)
    probe.save(tmp_path / "probe.json")

    table = seeds.copy()
    table.loc[len(table)] = ["STS_019/CT_image.nii.gz", 9999.0, 0.0, 0.0, "outside", "bad seed"]
    result = saliency_maps(table, tmp_path / "probe.json", tmp_path / "sal", model=extractor, n_samples=3,
                           name_column="lesion_id", base_dir=tmp_path / "data")
    assert result.row.tolist() == [0, 1, 2, 3]
    assert result.error.iloc[:3].eq("").all() and "outside" in result.error.iloc[3]
    assert Path(result.saliency_path[1]).name == "STS_019_x_10_row00001_saliency.nii.gz"

    scan = sitk.Cast(sitk.ReadImage(str(tmp_path / "data" / "STS_019" / "CT_image.nii.gz")), sitk.sitkFloat32)
    features = fmcib.extract_features(table.iloc[:3], model=extractor, base_dir=tmp_path / "data")
    scorer = EncoderWithHead(extractor.encoder, probe_head(probe, extractor.num_features)).eval()
    for i in range(3):
        patch_img = sitk.ReadImage(result.patch_path[i])
        sal_img = sitk.ReadImage(result.saliency_path[i])
        # the written patch sits on the scan: resampling the scan onto its grid gives its voxels back
        resampled = sitk.Resample(scan, patch_img, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
        np.testing.assert_allclose(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(patch_img), atol=2e-3)
        for getter in ("GetOrigin", "GetSpacing", "GetDirection", "GetSize"):
            np.testing.assert_allclose(getattr(sal_img, getter)(), getattr(patch_img, getter)(), atol=1e-5)
        # the map is the direct computation on the patch that fmcib.preprocess cuts for this seed
        patch = fmcib.preprocess(str(tmp_path / "data" / table.image_path[i]), table.loc[i, ["coordX", "coordY", "coordZ"]])
        expected = smooth_guided_backprop(scorer, patch, n_samples=3, random_state=0)
        np.testing.assert_allclose(sitk.GetArrayFromImage(sal_img), expected, rtol=1e-4, atol=1e-7)
        assert np.abs(expected).max() > 0
        # the score is the probe's log-odds on the extracted features
        assert result.score[i] == pytest.approx(probe.decision_function(feature_matrix(features.iloc[[i]]))[0],
                                                abs=1e-3)
        png = plt_imread(result.png_path[i])
        assert png.ndim == 3 and png.shape[0] > 100

    # the same through the command line: a failed row gives exit status 3 and is listed
    write_table(table, tmp_path / "data" / "with_bad.csv")
    res = CliRunner().invoke(main, [str(a) for a in (
        "saliency", "--csv", tmp_path / "data" / "with_bad.csv", "--probe", tmp_path / "probe.json",
        "--out-dir", tmp_path / "cli", "--weights", tiny_model_dir, "--n-samples", "3", "--num-workers", "0",
        "--name-col", "lesion_id")], catch_exceptions=False)
    assert res.exit_code == 3, res.output
    index = pd.read_csv(tmp_path / "cli" / "saliency.csv", keep_default_na=False)
    assert index.error.ne("").tolist() == [False, False, False, True]
    np.testing.assert_allclose(sitk.GetArrayFromImage(sitk.ReadImage(index.saliency_path[0])),
                               sitk.GetArrayFromImage(sitk.ReadImage(result.saliency_path[0])), rtol=1e-5)


def plt_imread(path: str) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)


def test_saliency_command_with_a_fine_tuned_checkpoint_head(tmp_path):
    import fmcib
    from fmcib.models import create_model, load_head, register_model

    from conftest import random_trunk, tiny_config

    cfg = register_model(tiny_config("tiny_3d.finetuned"), overwrite=True)
    torch.manual_seed(5)
    head = nn.Sequential(nn.Sequential(nn.Linear(64, 16), nn.ReLU()), nn.Sequential(nn.Linear(16, 3)))
    torch.save({"trunk_state_dict": random_trunk(cfg, seed=5), "head_state_dict": head.state_dict()},
               tmp_path / "task.torch")
    shutil.copytree(BUNDLED, tmp_path / "data")

    def run(*extra: object):
        return CliRunner().invoke(main, [str(a) for a in (
            "saliency", "--csv", tmp_path / "data" / "seeds.csv", "--model", cfg.name, "--weights",
            tmp_path / "task.torch", "--out-dir", tmp_path / "out", "--n-samples", "2", "--num-workers", "0",
            *extra)])

    res = run("--head", tmp_path / "task.torch", "--target-class", "2")
    assert res.exit_code == 0, res.output
    index = pd.read_csv(tmp_path / "out" / "saliency.csv", keep_default_na=False)
    assert index.explained.tolist() == [2, 2, 2] and index.error.eq("").all()
    encoder = create_model(cfg.name, weights=tmp_path / "task.torch", device="cpu")
    seeds = pd.read_csv(tmp_path / "data" / "seeds.csv")
    with torch.no_grad():
        for i, rec in seeds.iterrows():
            patch = fmcib.preprocess(tmp_path / "data" / rec.image_path, rec[["coordX", "coordY", "coordZ"]])
            expected = head(encoder(patch[None]))[0, 2].item()
            assert index.score[i] == pytest.approx(expected, abs=1e-4)
    assert isinstance(load_head(tmp_path / "task.torch")[0][1], nn.ReLU)

    assert run("--head", tmp_path / "task.torch", "--target-class", "lung").exit_code == 2
    assert run("--head", tmp_path / "task.torch", "--target-class", "3").exit_code == 1  # only outputs 0..2
    assert run().exit_code == 2  # neither --probe nor --head
