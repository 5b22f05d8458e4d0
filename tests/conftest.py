"""Shared fixtures: an offline, private Hugging Face cache; tiny encoders; synthetic and real CT."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before anything imports huggingface_hub (it reads these once): no network, a private cache.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="fmcib-tests-"))
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = str(_SESSION_DIR / "hf-cache")
os.environ["FMCIB_CACHE"] = str(_SESSION_DIR / "fmcib-cache")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from typing import TYPE_CHECKING  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402

if TYPE_CHECKING:
    import torch

    from fmcib.models import ModelConfig

# torch is imported inside the fixtures that need it: the statistics tests also run on interpreters for
# which CI has no CPU build of torch (.ci/run).

# The real CT (43 lesions with masks, manifest.csv): FMCIB_TEST_DATA, default ../shared/data beside the repository.
SHARED_DATA = Path(os.environ.get("FMCIB_TEST_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
EXAMPLE_DATA = Path(__file__).resolve().parents[1] / "examples" / "data"

TINY_ARGS = {"depth": 10, "n_input_channels": 1, "widen_factor": 0.125, "conv1_t_stride": 2,
             "feed_forward": False, "bias_downsample": True}


def tiny_config(name: str = "tiny_3d.test") -> ModelConfig:
    """A small MONAI ResNet (64 features) with the fmcib input contract; builds in milliseconds."""
    from fmcib.models import ModelConfig

    return ModelConfig(name=name, architecture="monai_resnet", model_args=dict(TINY_ARGS), num_features=64)


def random_trunk(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random-init state dict of ``config``'s architecture (BatchNorm statistics randomised too)."""
    import torch

    from fmcib.models.architectures import build_architecture

    torch.manual_seed(seed)
    model = build_architecture(config.architecture, config.model_args)
    state = model.state_dict()
    for k, v in state.items():  # non-trivial statistics that still leave activations alive after ReLU
        if k.endswith("running_mean"):
            v.copy_(torch.randn_like(v) * 0.05)
        elif k.endswith("running_var"):
            v.copy_(torch.rand_like(v) + 0.5)
    return {k: v.clone() for k, v in state.items()}


def put_in_hub_cache(repo_id: str, files: dict[str, Path | bytes], revision: str = "main") -> Path:
    """Lay out files as huggingface_hub's cache does (refs/<revision> -> snapshots/<commit>/...)."""
    import hashlib

    from huggingface_hub import constants

    repo_dir = Path(constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(f"{repo_id}@{revision}".encode()).hexdigest()
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / revision).write_text(commit)
    snap = repo_dir / "snapshots" / commit
    for rel, content in files.items():
        dest = snap / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(content if isinstance(content, bytes) else Path(content).read_bytes())
    return snap


@pytest.fixture(autouse=True)
def _restore_model_registry():
    """Tests may register models; each test leaves the registry as it found it."""
    import sys

    registry = sys.modules.get("fmcib.models.registry")
    saved = dict(registry._REGISTRY) if registry is not None else None
    yield
    registry = sys.modules.get("fmcib.models.registry")
    if registry is not None and saved is not None:
        registry._REGISTRY.clear()
        registry._REGISTRY.update(saved)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny encoder in fmcib's Hub layout (config.json + model.safetensors); skips where torch is absent."""
    pytest.importorskip("torch")
    from fmcib.models.checkpoints import save_hub_layout

    cfg = tiny_config()
    out = tmp_path_factory.mktemp("tiny-model")
    save_hub_layout(cfg, random_trunk(cfg), out)
    return out


@pytest.fixture(scope="session")
def synthetic_cases(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """Three small synthetic scans on disk (different geometries), four lesions each; the seeds table."""
    from fmcib.datasets import make_synthetic_ct

    folder = tmp_path_factory.mktemp("synthetic")
    geometries = [
        {"spacing": (0.8, 0.8, 2.5)},
        {"spacing": (0.7, 0.9, 1.5), "origin": (30.0, -12.5, 400.0), "direction": (-1, 0, 0, 0, -1, 0, 0, 0, 1)},
        {"spacing": (1.1, 1.1, 3.0), "origin": (-5.0, 7.0, -90.0), "direction": (1, 0, 0, 0, 1, 0, 0, 0, -1)},
    ]
    frames = [make_synthetic_ct(size=(96, 96, 40), n_lesions=4, random_state=k, **g).save(folder, f"case{k}")
              for k, g in enumerate(geometries)]
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real CT of $FMCIB_TEST_DATA (default ../shared/data; skips when absent)."""
    if not (SHARED_DATA / "manifest.csv").is_file():
        pytest.skip(f"real CT not found at {SHARED_DATA} (set FMCIB_TEST_DATA)")
    return SHARED_DATA
