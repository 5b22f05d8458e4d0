"""Registry, every checkpoint layout loaded strictly, offline Hub cache, mirrors, and refusals."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from conftest import put_in_hub_cache, random_trunk, tiny_config
from fmcib.exceptions import UnknownModelError, WeightsError
from fmcib.models import (
    DEFAULT_MODEL,
    ModelConfig,
    WeightsSource,
    convert_weights,
    create_model,
    get_model_config,
    list_models,
    register_model,
)


def _assert_same_params(model: torch.nn.Module, trunk: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(trunk)
    for k, v in trunk.items():
        assert torch.equal(state[k], v), k


@pytest.fixture()
def tiny():
    cfg = register_model(tiny_config("tiny_3d.layouts"), overwrite=True)
    return cfg, random_trunk(cfg, seed=7)


BUILT_IN = list_models()  # at collection: the package's own entries only


@pytest.mark.parametrize("name", BUILT_IN)
def test_every_registered_model_builds_and_gives_its_feature_width(name):
    cfg = get_model_config(name)
    model = create_model(name, pretrained=False, device="cpu")
    n = cfg.preprocess.patch_size
    with torch.inference_mode():
        out = model(torch.rand(2, 1, n, n, n))
    assert tuple(out.shape) == (2, cfg.num_features)
    assert model.fmcib_config == cfg


def test_a_new_family_is_one_module(synthetic_cases):
    """The toy family (tests/toy_family.py: a builder and a named model) works end to end, contract included."""
    import toy_family

    from fmcib import extract_features
    from fmcib.models.architectures import ARCHITECTURES

    cfg = toy_family.register()
    assert "toy_cnn" in ARCHITECTURES and "toy_3d.random" in list_models()
    out = extract_features(synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]].iloc[:3],
                           model="toy_3d.random", num_workers=0, progress=False)
    assert [c for c in out.columns if c.startswith("pred_")] == [f"pred_{i}" for i in range(12)]
    assert out.attrs["fmcib"]["preprocess"]["patch_size"] == 32 and out.attrs["fmcib"]["architecture"] == "toy_cnn"
    model = create_model("toy_3d.random", device="cpu")
    from fmcib import preprocess

    row = synthetic_cases.iloc[0]
    patch = preprocess(row.image_path, (row.coordX, row.coordY, row.coordZ), size=32, spacing=2.0)
    with torch.inference_mode():
        np.testing.assert_allclose(out.filter(like="pred_").iloc[0], model(patch[None])[0].numpy(), rtol=1e-4,
                                   atol=1e-6)
    assert cfg.preprocess.spacing_mm == 2.0


def test_registry_is_restored_between_tests():
    assert "toy_3d.random" not in list_models() and "tiny_3d.layouts" not in list_models()


def test_registry_default_entry_pins_the_paper_architecture():
    cfg = get_model_config(DEFAULT_MODEL)
    assert DEFAULT_MODEL in list_models(pretrained=True)
    assert cfg.num_features == 4096
    assert dict(cfg.model_args) == {"depth": 50, "n_input_channels": 1, "widen_factor": 2, "conv1_t_stride": 2,
                                    "feed_forward": False, "bias_downsample": True}
    assert cfg.weights.hf_hub_id == "surajpaib/FMCIB"
    assert cfg.weights.hf_filename.startswith("models/pretrained/fmcib/")
    assert any("zenodo.org/records/10528450" in u for u in cfg.weights.urls)
    with pytest.raises(UnknownModelError, match="Did you mean 'resnet50_3d.fmcib'"):
        get_model_config("resnet50_3d.fmcb")


def test_every_legacy_layout_loads_to_identical_parameters(tiny, tmp_path):
    cfg, trunk = tiny
    head = {"0.weight": torch.randn(8, 64), "0.bias": torch.randn(8)}
    layouts = {
        "trunk.torch": {"trunk_state_dict": trunk, "head_state_dict": head},
        "lightning.ckpt": {"state_dict": {**{f"model.trunk.{k}": v for k, v in trunk.items()},
                                          **{f"model.heads.{k}": v for k, v in head.items()}}, "epoch": 3},
        "lightning_ddp.ckpt": {"state_dict": {f"module.model.trunk.{k}": v for k, v in trunk.items()}},
        "plain.pt": {f"module.{k}": v for k, v in trunk.items()},
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
    save_file(trunk, str(tmp_path / "weights.safetensors"))
    for name in [*layouts, "weights.safetensors"]:
        model = create_model(cfg.name, weights=tmp_path / name, device="cpu")
        _assert_same_params(model, trunk)
        assert model.fmcib_weights["sha256"] and not model.training
        # built on the meta device, then given the checkpoint's tensors: nothing may stay without storage
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        assert all(p.requires_grad for p in model.parameters())  # fine-tuning still works


def test_strict_loading_names_the_bad_keys(tiny, tmp_path):
    cfg, trunk = tiny
    missing = {k: v for k, v in trunk.items() if k != "conv1.weight"}
    extra = {**trunk, "layer9.weight": torch.zeros(1)}
    wrong = {**trunk, "fc.weight": torch.zeros(3)} if "fc.weight" in trunk else {**trunk, "conv1.weight": torch.zeros(3)}
    for obj, pattern in [(missing, "missing keys: conv1.weight"), (extra, "unexpected keys: layer9.weight"),
                         (wrong, "mis-shaped keys: (fc|conv1).weight")]:
        torch.save({"trunk_state_dict": obj}, tmp_path / "bad.torch")
        with pytest.raises(WeightsError, match=pattern):
            create_model(cfg.name, weights=tmp_path / "bad.torch", device="cpu")
    torch.save({"state_dict": {"model.trunk.conv1.weight": trunk["conv1.weight"], "criterion.w": torch.ones(1)}},
               tmp_path / "odd.ckpt")
    with pytest.raises(WeightsError, match="criterion.w"):
        create_model(cfg.name, weights=tmp_path / "odd.ckpt", device="cpu")


class _Payload:
    """Unpickling this would run code; fmcib must refuse the file instead."""

    def __reduce__(self):
        return (Path("/tmp/fmcib-should-not-exist").touch, ())


def test_checkpoints_with_arbitrary_objects_are_refused_not_unpickled(tiny, tmp_path):
    cfg, trunk = tiny
    target = Path("/tmp/fmcib-should-not-exist")
    target.unlink(missing_ok=True)
    with open(tmp_path / "evil.torch", "wb") as f:
        pickle.dump({"trunk_state_dict": trunk, "x": _Payload()}, f)
    torch.save({"trunk_state_dict": trunk, "x": _Payload()}, tmp_path / "evil2.torch")
    for name in ("evil.torch", "evil2.torch"):
        with pytest.raises(WeightsError, match="weights_only"):
            create_model(cfg.name, weights=tmp_path / name, device="cpu")
    assert not target.exists()


def test_hub_layout_folder_convert_and_offline_hub_cache_agree(tiny, tmp_path):
    cfg, trunk = tiny
    torch.save({"trunk_state_dict": trunk}, tmp_path / "model_weights.torch")
    out = convert_weights(tmp_path / "model_weights.torch", tmp_path / "converted", name=cfg.name)
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors"}
    from_folder = create_model(weights=out, device="cpu")  # the folder's config.json defines the architecture
    assert from_folder.fmcib_config.name == cfg.name
    _assert_same_params(from_folder, trunk)
    put_in_hub_cache("fmcib-tests/tiny", {"config.json": out / "config.json",
                                          "model.safetensors": out / "model.safetensors"})
    from_hub = create_model("hf-hub:fmcib-tests/tiny", device="cpu")
    _assert_same_params(from_hub, trunk)
    assert from_hub.fmcib_weights["sha256"] == from_folder.fmcib_weights["sha256"]


def test_registry_weights_from_offline_hub_cache_with_folder_fallback(tiny, tmp_path):
    cfg, trunk = tiny
    torch.save({"trunk_state_dict": trunk}, tmp_path / "w.torch")
    src = WeightsSource(hf_hub_id="fmcib-tests/legacy", hf_filename="models/pretrained/fmcib/model_weights.torch")
    exact = register_model(dataclasses.replace(cfg, name="tiny_3d.hub_exact", weights=src), overwrite=True)
    put_in_hub_cache("fmcib-tests/legacy", {"models/pretrained/fmcib/model_weights.torch": tmp_path / "w.torch"})
    _assert_same_params(create_model(exact.name, device="cpu"), trunk)
    # Expected file name absent: the folder is listed (from the cache, offline) and its weights file used.
    src2 = dataclasses.replace(src, hf_hub_id="fmcib-tests/renamed")
    renamed = register_model(dataclasses.replace(cfg, name="tiny_3d.hub_renamed", weights=src2), overwrite=True)
    put_in_hub_cache("fmcib-tests/renamed", {"models/pretrained/fmcib/fmcib_final.pt": tmp_path / "w.torch",
                                             "models/baselines/task1/other.pt": b"not weights"})
    _assert_same_params(create_model(renamed.name, device="cpu"), trunk)


def test_mirror_fallback_with_checksum(tiny, tmp_path):
    from fmcib.models.checkpoints import sha256_file

    cfg, trunk = tiny
    torch.save({"trunk_state_dict": trunk}, tmp_path / "model_weights.torch")
    url = (tmp_path / "model_weights.torch").as_uri()  # a local URL: the download code runs, no network
    good = WeightsSource(hf_hub_id="fmcib-tests/absent", hf_filename="w.torch", urls=(url,),
                         sha256=sha256_file(tmp_path / "model_weights.torch"))
    register_model(dataclasses.replace(cfg, name="tiny_3d.mirror", weights=good), overwrite=True)
    model = create_model("tiny_3d.mirror", device="cpu")
    _assert_same_params(model, trunk)
    assert model.fmcib_weights["source"] == url
    bad = dataclasses.replace(good, urls=((tmp_path / "copy.torch").as_uri(),), sha256="0" * 64)
    (tmp_path / "copy.torch").write_bytes((tmp_path / "model_weights.torch").read_bytes())
    register_model(dataclasses.replace(cfg, name="tiny_3d.badsum", weights=bad), overwrite=True)
    with pytest.raises(WeightsError, match="checksum mismatch"):
        create_model("tiny_3d.badsum", device="cpu")


def test_missing_weights_offline_says_where_it_looked_and_what_to_do():
    with pytest.raises(WeightsError) as err:
        create_model(DEFAULT_MODEL, device="cpu")
    msg, cli = str(err.value), err.value.cli
    assert "surajpaib/FMCIB" in msg and "zenodo.org" in msg and "HF_HUB_OFFLINE" in msg
    # Python callers read keywords, command-line users flags: each names both ways on, in its own words
    assert "weights='model_weights.torch'" in msg and "model='resnet50_3d.random'" in msg and "--" not in msg
    assert "--weights model_weights.torch" in cli and "--model resnet50_3d.random" in cli and "weights=" not in cli


def test_without_network_the_first_run_decides_at_once(tmp_path):
    """No HF_HUB_OFFLINE, no network (a closed local port stands for it): one quick look, one message."""
    import os
    import subprocess
    import sys
    import time

    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_CACHE=str(tmp_path / "hub"), FMCIB_CACHE=str(tmp_path / "c"))
    code = """
import dataclasses
from fmcib.models import create_model, get_model_config, register_model
cfg = get_model_config("resnet50_3d.fmcib")
register_model(dataclasses.replace(cfg, name="resnet50_3d.offline",
               weights=dataclasses.replace(cfg.weights, urls=("http://127.0.0.1:9/model_weights.torch",))))
create_model("resnet50_3d.offline", device="cpu")
"""
    (tmp_path / "seeds.csv").write_text("image_path,coordX,coordY,coordZ\nct.nii.gz,0,0,0\n")
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert time.perf_counter() - t < 20 and done.returncode == 1
    assert "WeightsError" in done.stderr and "not reachable" in done.stderr
    assert done.stderr.count("weights of 'resnet50_3d.offline' not found") == 1


def test_random_init_encoders_are_seeded_and_say_so(caplog):
    import logging

    register_model(dataclasses.replace(tiny_config("tiny_3d.random"), weights=None), overwrite=True)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    with caplog.at_level(logging.WARNING, logger="fmcib.models"):
        a, b = (create_model("tiny_3d.random", device="cpu") for _ in range(2))
    assert torch.equal(torch.rand(1), expected)  # the caller's random stream is untouched
    _assert_same_params(a, b.state_dict())
    assert "random weights" in caplog.text and "no learned information" in caplog.text


@pytest.mark.slow
def test_full_size_default_encoder_from_hub_cache(tmp_path):
    """The real architecture (184.5 M parameters) served offline under the registry's Hub path."""
    cfg = get_model_config(DEFAULT_MODEL)
    trunk = random_trunk(cfg, seed=3)
    assert sum(v.numel() for k, v in trunk.items() if "running" not in k and "num_batches" not in k) == pytest.approx(184.5e6, rel=0.01)
    torch.save({"trunk_state_dict": trunk}, tmp_path / "model_weights.torch")
    put_in_hub_cache(cfg.weights.hf_hub_id, {cfg.weights.hf_filename: tmp_path / "model_weights.torch"})
    (tmp_path / "model_weights.torch").unlink()
    model = create_model(device="cpu")
    _assert_same_params(model, trunk)
    with torch.inference_mode():
        assert tuple(model(torch.zeros(2, 1, 50, 50, 50)).shape) == (2, 4096)


def test_model_cards_match_the_registry():
    folders = sorted((Path(__file__).resolve().parents[1] / "weights").iterdir())
    assert folders
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        assert ModelConfig.from_dict(config) == dataclasses.replace(get_model_config(folder.name), weights=None)
        assert config == get_model_config(folder.name).to_dict(), folder.name  # written with every key
        card = (folder / "README.md").read_text()
        assert card.startswith("---\nlicense:") and "## Input contract" in card


def test_tiny_test_encoder_gives_informative_features(synthetic_cases, tiny_model_dir):
    # Guard for the fixtures themselves: an encoder that outputs constants would make every
    # downstream comparison in the suite vacuous.
    import fmcib

    out = fmcib.extract_features(synthetic_cases[["image_path", "coordX", "coordY", "coordZ"]].iloc[:4],
                                 weights=tiny_model_dir, num_workers=0, progress=False)
    feats = out.filter(like="pred_").to_numpy()
    assert (feats.std(axis=0) > 0).mean() > 0.5


def _original_head(widths: list[int]) -> torch.nn.Sequential:
    """The head as fmcib 1.0.0 builds it: blocks of Linear (+ ReLU but for the last), nested in a Sequential."""
    blocks = []
    for i in range(len(widths) - 1):
        layers = [torch.nn.Linear(widths[i], widths[i + 1])]
        if i != len(widths) - 2:
            layers.append(torch.nn.ReLU(inplace=True))
        blocks.append(torch.nn.Sequential(*layers))
    return torch.nn.Sequential(*blocks).eval()


def test_fine_tuned_heads_load_from_every_layout_and_compute_as_the_original(tiny, tmp_path):
    from fmcib.models import load_head

    cfg, trunk = tiny
    torch.manual_seed(3)
    original = _original_head([64, 32, 3])
    head = original.state_dict()
    torch.save({"trunk_state_dict": trunk, "head_state_dict": head}, tmp_path / "task.torch")
    torch.save({"state_dict": {**{f"model.trunk.{k}": v for k, v in trunk.items()},
                               **{f"module.model.heads.{k}": v for k, v in head.items()}}}, tmp_path / "task.ckpt")
    converted = convert_weights(tmp_path / "task.torch", tmp_path / "converted", name=cfg.name)
    x = torch.randn(5, 64)
    with torch.no_grad():
        expected = original(x)
        for source in (tmp_path / "task.torch", tmp_path / "task.ckpt", converted, converted / "head.safetensors"):
            torch.testing.assert_close(load_head(source)(x), expected, rtol=0, atol=0)
            assert not load_head(source).training

    torch.save({"trunk_state_dict": trunk}, tmp_path / "encoder_only.torch")
    with pytest.raises(WeightsError, match="holds no head weights"):
        load_head(tmp_path / "encoder_only.torch")
    broken = {**head, "1.0.weight": torch.randn(3, 31)}
    torch.save({"trunk_state_dict": trunk, "head_state_dict": broken}, tmp_path / "broken.torch")
    with pytest.raises(WeightsError, match="block 0 gives 32 values but block 1 takes 31"):
        load_head(tmp_path / "broken.torch")
    torch.save({"trunk_state_dict": trunk, "head_state_dict": {**head, "2.weight": torch.randn(3, 3)}},
               tmp_path / "odd.torch")
    with pytest.raises(WeightsError, match="unexpected head key '2.weight'"):
        load_head(tmp_path / "odd.torch")
    no_bias = {k: v for k, v in head.items() if k != "1.0.bias"}
    torch.save({"trunk_state_dict": trunk, "head_state_dict": no_bias}, tmp_path / "no_bias.torch")
    with pytest.raises(WeightsError, match=r"missing keys: 1\.0\.bias"):
        load_head(tmp_path / "no_bias.torch")


def test_weights_digest_is_cached_per_file_identity(tmp_path):
    import hashlib
    import json
    import os

    from fmcib.models.checkpoints import fmcib_cache_dir, sha256_file

    f = tmp_path / "w.bin"
    f.write_bytes(os.urandom(1 << 20))
    real = hashlib.sha256(f.read_bytes()).hexdigest()
    assert sha256_file(f, cached=True) == real
    table_path = fmcib_cache_dir() / "sha256.json"
    table = json.loads(table_path.read_text())
    table[str(f.resolve())][3] = "0" * 64  # a cached value must be what is returned, without reading the file
    table_path.write_text(json.dumps(table))
    assert sha256_file(f, cached=True) == "0" * 64
    assert sha256_file(f) == real  # verification never trusts the cache
    f.write_bytes(os.urandom(1 << 20))  # new content: new size/mtime, so the digest is computed again
    os.utime(f, ns=(1, 1))
    assert sha256_file(f, cached=True) == hashlib.sha256(f.read_bytes()).hexdigest()


def test_contract_round_trips_per_axis_and_old_configs_load_unchanged():
    from fmcib.preprocessing import PreprocessConfig

    # A preprocess block as fmcib 0.x wrote it (no clip window, no channels): the published contract.
    old = {"patch_size": 50, "spacing_mm": 1.0, "hu_offset": 1024.0, "hu_scale": 3072.0, "pad_hu": -1024.0}
    assert PreprocessConfig.from_dict(old) == get_model_config("resnet50_3d.fmcib").preprocess
    assert PreprocessConfig.from_dict(old).input_shape == (1, 50, 50, 50)
    # Per-axis values are (x, y, z); the input shape is (channels, z, y, x).
    cfg = PreprocessConfig(patch_size=(64, 48, 32), spacing_mm=[0.8, 0.8, 2.0], clip_hu=(-1000, 1000), channels=3)
    assert cfg.input_shape == (3, 32, 48, 64)
    back = PreprocessConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg and back.spacing_xyz == (0.8, 0.8, 2.0) and back.clip_hu == (-1000.0, 1000.0)
    assert PreprocessConfig(patch_size=(50, 50, 50)) == PreprocessConfig(patch_size=50)  # one spelling
    for bad in ({"patch_size": (50, 50)}, {"spacing_mm": (1, 0, 1)}, {"clip_hu": (100, -100)}, {"channels": 0},
                {"patch_size": 50.5}):
        with pytest.raises(ValueError):
            PreprocessConfig(**bad)
