"""Self-supervised pretraining: NT-Xent against a reference, the global-batch loss under torchrun, collapse
monitors, random negatives, SimCLR end to end on the synthetic lesion benchmark, and publishing to the Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

torch = pytest.importorskip("torch")

from pretraining_toys import (  # noqa: E402
    ONE_SIDED,
    PAIRED,
    clip_and_grad,
    fixed_batch,
    fixed_model,
    loss_and_grad,
    sigreg_and_grad,
)

from fmcib.training.monitors import collapse_warning, embedding_health  # noqa: E402
from fmcib.training.simclr import background_points, nt_xent  # noqa: E402

HERE = Path(__file__).resolve().parent


def _reference_nt_xent(z1, z2, negatives, temperature):
    """NT-Xent written out anchor by anchor (SimCLR's definition, extra negatives in every denominator)."""
    z = torch.nn.functional.normalize(torch.cat([z1, z2]).double(), dim=1)
    extra = torch.nn.functional.normalize(negatives.double(), dim=1)
    n = len(z1)
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        others = [float(z[i] @ z[j]) / temperature for j in range(2 * n) if j != i]
        others += [float(z[i] @ e) / temperature for e in extra]
        total += -(float(z[i] @ z[positive]) / temperature - np.log(np.sum(np.exp(others))))
    return total / (2 * n)


def test_nt_xent_is_simclrs_loss_with_extra_negatives():
    g = torch.Generator().manual_seed(3)
    z1, z2, neg = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g), torch.randn(3, 7, generator=g)
    for t in (0.1, 0.5):
        assert nt_xent(z1, z2, neg, temperature=t).item() == pytest.approx(_reference_nt_xent(z1, z2, neg, t), rel=1e-5)
    # no extra negatives: the plain SimCLR loss; perfect pairs with distinct samples give a lower loss
    same = nt_xent(z1, z1.clone(), None, temperature=0.1).item()
    assert same == pytest.approx(_reference_nt_xent(z1, z1, torch.zeros(0, 7), 0.1), rel=1e-5)
    assert same < nt_xent(z1, z2, None, temperature=0.1).item()


def test_two_gloo_processes_give_the_global_batch_losses_and_gradients(tmp_path):
    """NT-Xent, SIGReg and CLIP's loss: two ranks with half the batch each equal one process with all of it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    env.pop("WORLD_SIZE", None)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(HERE / "pretraining_toys.py"), str(tmp_path)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    model = fixed_model()
    loss = loss_and_grad(model, *fixed_batch())  # one process, the whole batch
    assert ddp["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    torch.testing.assert_close(ddp["weight_grad"], model.weight.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(ddp["bias_grad"], model.bias.grad, rtol=1e-5, atol=1e-7)
    # without the gather each rank would only see its own half: a different loss
    x1, x2, neg = fixed_batch()
    half = loss_and_grad(fixed_model(), x1[:4], x2[:4], neg[:2]).item()
    assert abs(half - loss.item()) > 1e-3
    regulariser = fixed_model()
    value = sigreg_and_grad(regulariser, x1)
    assert ddp["sigreg"].item() == pytest.approx(value.item(), rel=1e-5)
    torch.testing.assert_close(ddp["sigreg_grad"], regulariser.weight.grad, rtol=1e-4, atol=1e-7)
    assert abs(sigreg_and_grad(fixed_model(), x1[:4]).item() - value.item()) > 1e-3
    aligned = fixed_model()  # uneven pairs per rank (3 and 4): still the global batch's mean
    clip = clip_and_grad(aligned, x1, x2, PAIRED)
    assert ddp["clip"].item() == pytest.approx(clip.item(), rel=1e-5)
    torch.testing.assert_close(ddp["clip_grad"], aligned.weight.grad, rtol=1e-4, atol=1e-7)
    lopsided = fixed_model()  # a rank without any pair still takes part (no hang) and the result is the same
    one_sided = clip_and_grad(lopsided, x1, x2, ONE_SIDED)
    assert ddp["one_sided"].item() == pytest.approx(one_sided.item(), rel=1e-5)
    torch.testing.assert_close(ddp["one_sided_grad"], lopsided.weight.grad, rtol=1e-4, atol=1e-7)


def test_sigreg_matches_the_reference_values():
    from fmcib.training import sigreg
    from fmcib.training.regularizers import slice_generator

    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 64, generator=g)

    def value(x):
        return sigreg(x, generator=slice_generator(0)).item()

    # LeJEPA's reference values for N=256, D=64, 256 slices, 17 knots on [0, 3]
    gaussian = [sigreg(torch.randn(256, 64, generator=g), generator=slice_generator(s)).item() for s in range(8)]
    assert np.mean(gaussian) == pytest.approx(1.05, abs=0.1)
    assert value(torch.zeros(256, 64)) == pytest.approx(103, rel=0.03)
    assert value(3 * z) == pytest.approx(133, rel=0.05)
    assert value(0.1 * z) == pytest.approx(99, rel=0.05)
    assert value(z + 1) == pytest.approx(99, rel=0.1)
    rank2 = z[:, :2] @ torch.randn(2, 64, generator=g) / np.sqrt(2)
    assert 10 < value(rank2) < 40  # the reference 22.6 depends on how the two directions are drawn
    assert value(torch.zeros(1024, 64)) > 3 * value(torch.zeros(256, 64))  # grows with N
    # a scalar with gradients that pull a collapsed batch apart
    collapsed = (0.1 * z).requires_grad_()
    loss = sigreg(collapsed, generator=slice_generator(1))
    loss.backward()
    assert loss.ndim == 0 and collapsed.grad is not None
    stepped = (0.1 * z - 0.5 * collapsed.grad).detach()
    assert sigreg(stepped, generator=slice_generator(1)).item() < loss.item()


def test_collapse_monitors_on_known_embeddings():
    g = torch.Generator().manual_seed(0)
    spread = torch.randn(400, 32, generator=g)
    healthy = embedding_health(spread, spread + 0.01 * torch.randn(400, 32, generator=g))
    assert healthy["std"] == pytest.approx(1.0, abs=0.1)  # even spread over the sphere: std ~ 1/sqrt(d) per dim
    assert healthy["rankme"] > 25 and abs(healthy["mean_cosine"]) < 0.05 and healthy["alignment"] < 0.01
    assert collapse_warning(healthy) == ""
    one_point = torch.ones(400, 32) + 1e-4 * torch.randn(400, 32, generator=g)
    collapsed = embedding_health(one_point)
    assert collapsed["std"] < 0.01 and collapsed["mean_cosine"] > 0.99  # (RankMe ignores scale: not here)
    assert "collapsing" in collapse_warning(collapsed)
    # dimensional collapse: spread, but along 1 direction only
    line = torch.randn(400, 1, generator=g) * torch.randn(1, 32, generator=g)
    assert embedding_health(line)["rankme"] == pytest.approx(1.0, abs=0.05)
    assert "RankMe" in collapse_warning(embedding_health(line))
    # uniformity: log E exp(-2 |zi - zj|^2), hand-computed for two orthogonal unit vectors (|zi - zj|^2 = 2)
    assert embedding_health(torch.eye(2))["uniformity"] == pytest.approx(-4.0)


def test_random_negatives_lie_in_the_scan_away_from_every_seed(synthetic_cases):
    from fmcib.io import open_scan
    from fmcib.preprocessing import PreprocessConfig
    from fmcib.seeds import inside_mask

    config = PreprocessConfig(patch_size=16, spacing_mm=2.0)
    points = background_points(synthetic_cases, 2, config, seed=1)
    assert len(points) == len(synthetic_cases) * 2 * 4  # 4 candidates per wanted patch
    assert points["lesion"].value_counts().eq(8).all()
    for image, group in points.groupby("image_path"):
        seeds = synthetic_cases.loc[synthetic_cases.image_path == image, ["coordX", "coordY", "coordZ"]].to_numpy()
        xyz = group[["coordX", "coordY", "coordZ"]].to_numpy()
        gaps = np.linalg.norm(xyz[:, None] - seeds[None], axis=2).min(axis=1)
        assert gaps.min() >= 16.0  # half a patch width: 16 voxels x 2 mm / 2
        assert inside_mask(open_scan(image).geometry, xyz).all()
    assert points.equals(background_points(synthetic_cases, 2, config, seed=1))  # seeded


@pytest.fixture(scope="module")
def lesion_benchmark(tmp_path_factory):
    from fmcib.datasets import make_lesion_benchmark

    return make_lesion_benchmark(tmp_path_factory.mktemp("benchmark"), pool_scans=10, labelled_scans=8,
                                 test_scans=8, size=(64, 64, 24), spacing=(1.5, 1.5, 3.0))


def test_simclr_pretraining_writes_an_encoder_whose_features_beat_random_init(lesion_benchmark, tmp_path):
    from click.testing import CliRunner

    from fmcib import extract_features
    from fmcib.cli import main
    from fmcib.datasets import LATENTS
    from fmcib.evaluation import auc
    from fmcib.probes import LogisticProbe
    from fmcib.tables import feature_matrix

    torch.set_num_threads(2)
    pool = pd.read_csv(lesion_benchmark["pool"])
    assert not set(LATENTS) & set(pool.columns)  # the pool carries no labels
    out = tmp_path / "simclr"
    res = CliRunner().invoke(main, [
        "pretrain", "simclr", "--csv", str(lesion_benchmark["pool"]), "--out-dir", str(out), "--model",
        "resnet10_3d.random", "--epochs", "5", "--batch-size", "16", "--optimizer", "adamw", "--lr", "1e-3",
        "--warmup-epochs", "1", "--patch-size", "16", "--spacing", "2", "--data-description",
        "Synthetic lesions of fmcib.datasets.make_lesion_benchmark (not patient data)", "--no-progress"])
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    training = config["training"]
    assert training["method"] == "simclr" and training["counts"]["lesions"] == 40
    assert training["random_negatives"] == 1 and training["counts"]["random_negatives_found"] > 30
    assert config["preprocess"]["patch_size"] == 16 and config["name"] == "resnet10_3d.simclr"
    card = (out / "README.md").read_text()
    assert "Synthetic lesions" in card and "no labels were used" in card and "NT-Xent, temperature 0.1" in card
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["epoch"].tolist() == [1, 2, 3, 4, 5]
    assert {"tune_std", "tune_rankme", "tune_mean_cosine", "tune_alignment", "tune_uniformity"} <= set(metrics)
    from safetensors.torch import load_file

    assert not any(k.startswith("projector") for k in load_file(str(out / "model.safetensors")))  # encoder only

    # The folder is an encoder for extraction; its features against random init, probed on each latent.
    kw = {"patch_size": 16, "spacing_mm": 2.0, "progress": False, "num_workers": 0}
    aucs = {}
    for name, weights in (("random", None), ("simclr", out)):
        feats = {split: extract_features(lesion_benchmark[split], model="resnet10_3d.random", weights=weights, **kw)
                 for split in ("labelled", "test")}
        for latent in LATENTS:
            probe = LogisticProbe(n_trials=5, random_state=0).fit(feature_matrix(feats["labelled"]),
                                                                  feats["labelled"][latent])
            aucs[name, latent] = auc(feats["test"][latent], probe.predict_proba(feature_matrix(feats["test"]))[:, 1])
    assert any(aucs["simclr", k] > aucs["random", k] for k in LATENTS), aucs


def test_hub_push_uploads_the_folder_and_hf_hub_loads_it_back(tiny_model_dir, synthetic_cases, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub
    from click.testing import CliRunner
    from conftest import put_in_hub_cache
    from huggingface_hub.utils import filter_repo_objects

    from fmcib import extract_features
    from fmcib.cli import main
    from fmcib.models.hub import PUSH_IGNORE
    from fmcib.preprocessing import PreprocessConfig
    from fmcib.training import read_crops

    folder = tmp_path / "trained"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "README.md").write_text("# tiny\nTrained on nothing: random weights for a test.\n")
    (folder / "checkpoints").mkdir()
    (folder / "checkpoints" / "training_state.pt").write_bytes(b"resume state")
    read_crops(synthetic_cases.iloc[:2], PreprocessConfig(patch_size=8, spacing_mm=4.0), store=folder / "crops")
    read_crops(synthetic_cases.iloc[:2], PreprocessConfig(patch_size=8, spacing_mm=4.0), store=folder)
    assert (folder / "crops" / "crops.f32").is_file() and (folder / "crops.json").is_file()
    calls = []

    class FakeApi:  # the Hub's side: what upload_folder would send, placed where hf_hub_download finds it
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))

        def create_branch(self, repo_id, **kwargs):
            calls.append(("create_branch", repo_id, kwargs))

        def upload_folder(self, *, folder_path, repo_id, revision=None, ignore_patterns=None, **kwargs):
            names = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
            sent = list(filter_repo_objects(names, ignore_patterns=ignore_patterns))
            calls.append(("upload_folder", repo_id, sorted(sent)))
            put_in_hub_cache(repo_id, {n: Path(folder_path) / n for n in sent}, revision=revision or "main")
            return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/0"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    res = CliRunner().invoke(main, ["hub", "push", str(folder), "lab/tiny-encoder", "--private", "--revision", "v1"])
    assert res.exit_code == 0, res.output
    assert calls[0] == ("create_repo", "lab/tiny-encoder", {"repo_type": "model", "private": True, "exist_ok": True})
    assert calls[1][0] == "create_branch" and calls[1][2]["branch"] == "v1"
    assert calls[2][2] == ["README.md", "config.json", "model.safetensors"]  # no resume state, no crop store
    assert PUSH_IGNORE[0] == "checkpoints/*"

    seeds = synthetic_cases.iloc[:3]
    local = extract_features(seeds, weights=folder, progress=False, num_workers=0)
    hub = extract_features(seeds, model="hf-hub:lab/tiny-encoder@v1", progress=False, num_workers=0)
    pd.testing.assert_frame_equal(hub.filter(like="pred_"), local.filter(like="pred_"))

    (folder / "README.md").unlink()
    res = CliRunner().invoke(main, ["hub", "push", str(folder), "lab/tiny-encoder"])
    assert res.exit_code == 1 and "README.md" in res.output  # published weights say what made them


# -- JEPA ---------------------------------------------------------------------------------------------------

def test_multiblock_masks_are_disjoint_blocks_of_the_asked_scale():
    from fmcib.training.jepa import MaskSpec, multiblock_mask

    grid = (6, 6, 6)
    for seed in range(20):
        rng = np.random.default_rng(seed)
        context, target = multiblock_mask(grid, MaskSpec(targets=1, target_scale=(0.15, 0.2)), rng)
        assert context.any() and target.any() and not (context & target).any()
        box = np.argwhere(target.reshape(grid))
        extent = box.max(0) - box.min(0) + 1
        assert np.prod(extent) == target.sum()  # one box
        assert 0.05 * 216 <= target.sum() <= 0.35 * 216  # 15-20 % of the grid, after rounding each side
    tubes = multiblock_mask(grid, MaskSpec(tube=True), np.random.default_rng(0))[1].reshape(grid)
    assert (tubes.any(axis=0) == tubes.all(axis=0)).all()  # every targeted column spans the whole depth
    tiny = multiblock_mask((2, 2, 2), MaskSpec(), np.random.default_rng(1))
    assert tiny[0].any() and tiny[1].any()  # even a 2x2x2 grid keeps a context and a target


def test_ema_target_moves_towards_the_encoder_with_a_rising_momentum():
    from fmcib.models.vit3d import ViT3d
    from fmcib.training.jepa import JEPAModel, MaskedJEPATask

    model = JEPAModel(ViT3d(patch_size=4, dim=12, depth=1, heads=2), "ema")
    assert not any(p.requires_grad for p in model.target.parameters())
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target.parameters()]
    online = [p.clone() for p in model.encoder.parameters()]
    MaskedJEPATask(model).after_step(model, step=50, total_steps=100)
    momentum = 0.996 + (1.0 - 0.996) * 0.5
    for t, b, o in zip(model.target.parameters(), before, online):
        torch.testing.assert_close(t, momentum * b + (1 - momentum) * o)


def test_jepa_pretraining_writes_a_vit_that_extracts_finetunes_and_beats_random_init(lesion_benchmark, tmp_path):
    from click.testing import CliRunner

    from fmcib import extract_features
    from fmcib.cli import main
    from fmcib.datasets import LATENTS
    from fmcib.evaluation import auc
    from fmcib.probes import LogisticProbe
    from fmcib.tables import feature_matrix
    from fmcib.training import finetune
    from fmcib.training.jepa import JEPA_COLLAPSE_THRESHOLDS, pretrain_jepa

    torch.set_num_threads(2)
    out = tmp_path / "jepa"
    res = CliRunner().invoke(main, [
        "pretrain", "jepa", "--csv", str(lesion_benchmark["pool"]), "--out-dir", str(out), "--model",
        "vit3d_tiny.random", "--mode", "ema", "--keep", "context", "--epochs", "5", "--batch-size", "8",
        "--warmup-epochs", "1", "--patch-size", "24", "--spacing", "2", "--data-description",
        "Synthetic lesions (not patient data)", "--no-progress"])  # 25 steps: the EMA target has hardly moved yet
    assert res.exit_code == 0, res.output
    config = json.loads((out / "config.json").read_text())
    assert config["name"] == "vit3d_tiny.jepa-ema" and config["training"]["token_grid"] == [3, 3, 3]
    assert config["training"]["kept_encoder"] == "context"
    metrics = pd.read_csv(out / "metrics.csv")
    last = metrics.iloc[-1]
    assert last["tune_rankme"] > JEPA_COLLAPSE_THRESHOLDS["rankme"] and last["tune_std"] > 1e-3  # no collapse
    assert metrics["train_loss"].iloc[-1] < metrics["train_loss"].iloc[0]

    kw = {"patch_size": 24, "spacing_mm": 2.0, "progress": False, "num_workers": 0}
    aucs = {}
    for name, weights in (("random", None), ("jepa", out)):
        feats = {split: extract_features(lesion_benchmark[split], model="vit3d_tiny.random", weights=weights, **kw)
                 for split in ("labelled", "test")}
        assert feats["test"].filter(like="pred_").shape[1] == 192
        for latent in LATENTS:
            probe = LogisticProbe(n_trials=5, random_state=0).fit(feature_matrix(feats["labelled"]),
                                                                  feats["labelled"][latent])
            aucs[name, latent] = auc(feats["test"][latent], probe.predict_proba(feature_matrix(feats["test"]))[:, 1])
    assert any(aucs["jepa", k] > aucs["random", k] for k in LATENTS), aucs

    tuned = finetune(lesion_benchmark["labelled"], "size", tmp_path / "tuned", weights=out, epochs=1, batch_size=8,
                     optimizer="adamw", lr=1e-4, progress=False)  # the folder's own contract (24^3 at 2 mm)
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["preprocess"]["patch_size"] == 24
    assert tuned.counts["train"] > 0

    lejepa = pretrain_jepa(lesion_benchmark["pool"], tmp_path / "lejepa", mode="lejepa", views=2, epochs=2,
                           batch_size=8, warmup_epochs=0, patch_size=24, spacing_mm=2.0, progress=False)
    assert np.isfinite(lejepa.history[-1]["train_loss"]) and "tune_sigreg" in lejepa.history[-1]
    assert json.loads((tmp_path / "lejepa" / "config.json").read_text())["training"]["sigreg_lambda"] == 0.05


@pytest.mark.parametrize("method", ["simclr", "jepa-ema", "jepa-lejepa"])
def test_pretraining_depends_on_its_seed_only_not_on_the_process_random_state(method, synthetic_cases, tmp_path):
    """The same run after different work in the process (here: other global seeds) gives the same weights."""
    from safetensors.torch import load_file

    from fmcib.training.jepa import pretrain_jepa
    from fmcib.training.simclr import pretrain_simclr

    torch.set_num_threads(2)
    weights = []
    for k, global_seed in enumerate((1, 2)):
        torch.manual_seed(global_seed)
        np.random.seed(global_seed)
        common = {"epochs": 1, "batch_size": 4, "warmup_epochs": 0, "monitor_samples": 4, "spacing_mm": 3.0,
                  "progress": False}
        if method == "simclr":
            pretrain_simclr(synthetic_cases, tmp_path / str(k), model="resnet10_3d.random", patch_size=12,
                            optimizer="adamw", lr=1e-3, **common)
        else:
            pretrain_jepa(synthetic_cases, tmp_path / str(k), model="vit3d_tiny.random", mode=method[5:],
                          patch_size=16, views=2, **common)
        weights.append(load_file(str(tmp_path / str(k) / "checkpoints" / "best.safetensors")))
    assert set(weights[0]) == set(weights[1])
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key
    # the folder holds the EMA target in the masked mode (as I-JEPA evaluates), else the context encoder
    kept = "target." if method == "jepa-ema" else "encoder."
    folder = load_file(str(tmp_path / "0" / "model.safetensors"))
    assert folder and all(torch.equal(v, weights[0][kept + k]) for k, v in folder.items())
    if method == "jepa-ema":
        assert not all(torch.equal(v, weights[0]["encoder." + k]) for k, v in folder.items())


@pytest.mark.parametrize("method", ["simclr", "jepa-ema", "jepa-lejepa"])
def test_interrupted_pretraining_resumes_to_the_uninterrupted_weights(method, synthetic_cases, tmp_path, monkeypatch):
    """Ctrl-C in the middle of epoch 2, then resume=True: the weights of a run that was never stopped (the EMA
    target, views, masks and random negatives included); the resumed run reads its crops from the store."""
    from safetensors.torch import load_file

    import fmcib.training.crops as crops_module
    from fmcib.training import jepa, simclr

    torch.set_num_threads(2)
    task = {"simclr": simclr.SimCLRTask, "jepa-ema": jepa.MaskedJEPATask, "jepa-lejepa": jepa.LeJEPATask}[method]

    def run(out: Path, resume: bool = False) -> dict[str, torch.Tensor]:
        common = {"epochs": 2, "batch_size": 4, "warmup_epochs": 0, "monitor_samples": 4, "spacing_mm": 3.0,
                  "crop_store": tmp_path / f"crops-{out.name}", "resume": resume, "progress": False}
        if method == "simclr":
            simclr.pretrain_simclr(synthetic_cases, out, model="resnet10_3d.random", patch_size=12, optimizer="adamw",
                                   lr=1e-3, **common)
        else:
            jepa.pretrain_jepa(synthetic_cases, out, model="vit3d_tiny.random", mode=method[5:], patch_size=16,
                               views=2, **common)
        return load_file(str(out / "checkpoints" / "best.safetensors"))

    straight = run(tmp_path / "a")
    calls = {"n": 0}
    original = task.loss

    def interrupted(self, model, batch):
        calls["n"] += 1
        if calls["n"] == 5:  # 12 lesions in batches of 4: the second step of epoch 2
            raise KeyboardInterrupt
        return original(self, model, batch)

    with monkeypatch.context() as m:
        m.setattr(task, "loss", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path / "b")
    state = torch.load(tmp_path / "b" / "checkpoints" / "training_state.pt", weights_only=True)
    assert state["state"]["global_step"] == 4

    class Unreadable:
        def __init__(self, *args, **kwargs):
            raise AssertionError("a scan was read again")

    with monkeypatch.context() as m:
        m.setattr(crops_module, "ScanDataset", Unreadable)  # SimCLR's random patches too: their own store
        resumed = run(tmp_path / "b", resume=True)
    assert set(resumed) == set(straight) and any(k.startswith("target.") for k in straight) == (method == "jepa-ema")
    for key, value in straight.items():
        assert torch.equal(value, resumed[key]), key


def test_jepa_pretraining_under_torchrun_shares_the_lesions_between_two_processes(lesion_benchmark, tmp_path):
    """Two gloo processes: each trains on its half of the pool (the step count says so) and rank 0 writes a
    folder that loads strictly as an encoder."""
    from fmcib import create_model

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    env.pop("WORLD_SIZE", None)
    out = tmp_path / "jepa"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fmcib", "pretrain", "jepa", "--csv", str(lesion_benchmark["pool"]), "--out-dir",
                          str(out), "--model", "vit3d_tiny.random", "--epochs", "2", "--batch-size", "4",
                          "--warmup-epochs", "0", "--patch-size", "24", "--spacing", "2", "--device", "cpu",
                          "--monitor-samples", "8", "--data-description", "Synthetic lesions", "--no-progress",
                          "--crop-store", str(tmp_path / "crops")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    lesions = len(pd.read_csv(lesion_benchmark["pool"]))
    assert len(json.loads((tmp_path / "crops" / "crops.json").read_text())["rows"]) == lesions  # one shared store
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["step"].tolist() == [(lesions // 2) // 4 * e for e in (1, 2)]  # half the pool per process
    assert np.isfinite(metrics["train_loss"]).all()
    model = create_model("vit3d_tiny.random", weights=out)
    with torch.inference_mode():
        assert torch.isfinite(model(torch.rand(2, 1, 24, 24, 24))).all()
