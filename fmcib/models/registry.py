"""Model registry: one entry per published encoder, with its weights' locations and input contract."""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..exceptions import UnknownModelError
from ..preprocessing import PreprocessConfig

__all__ = ["WeightsSource", "ModelConfig", "register_model", "list_models", "get_model_config", "DEFAULT_MODEL"]

DEFAULT_MODEL = "resnet50_3d.fmcib"


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights live.

    Parameters
    ----------
    hf_hub_id : str, optional
        Hugging Face Hub repository, e.g. ``"surajpaib/FMCIB"``.
    hf_filename : str, optional
        Path of the weights file inside the repository.
    revision : str, optional
        Branch, tag or commit to pin (a commit hash makes downloads reproducible).
    sha256 : str, optional
        Expected SHA-256 of the weights file; checked when set.
    urls : tuple of str
        Mirrors tried in order when the Hub has no copy (e.g. Zenodo).
    """

    hf_hub_id: str | None = None
    hf_filename: str | None = None
    revision: str | None = None
    sha256: str | None = None
    urls: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build an encoder, fetch its weights and feed it correctly.

    Parameters
    ----------
    name : str
        Registry name, ``<architecture family>.<weights tag>``.
    architecture : str
        Builder key understood by :func:`fmcib.models.architectures.build_architecture`.
    model_args : mapping
        Keyword arguments of the builder; pinned so weights never load into the wrong network.
    num_features : int
        Length of the feature vector (the ``pred_*`` columns).
    preprocess : PreprocessConfig
        Input contract (patch size, spacing, intensity normalisation).
    weights : WeightsSource, optional
        Where pretrained weights live; ``None`` for random-init-only entries.
    description, license, paper : str
        Provenance shown by ``fmcib models``.
    """

    name: str
    architecture: str
    model_args: Mapping[str, Any]
    num_features: int
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    weights: WeightsSource | None = None
    description: str = ""
    license: str = ""
    paper: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` content of the Hub layout (weights locations excluded)."""
        return {
            "fmcib_format": 1,
            "name": self.name,
            "architecture": self.architecture,
            "model_args": dict(self.model_args),
            "num_features": int(self.num_features),
            "preprocess": self.preprocess.to_dict(),
            "description": self.description,
            "license": self.license,
            "paper": self.paper,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming missing keys."""
        missing = [k for k in ("name", "architecture", "model_args", "num_features") if k not in data]
        if missing:
            raise ValueError(f"model config lacks {missing}")
        from .architectures import ARCHITECTURES

        if data["architecture"] not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {data['architecture']!r} (this fmcib knows "
                             f"{sorted(ARCHITECTURES)}; a newer fmcib may be needed)")
        if not isinstance(data["num_features"], int) or isinstance(data["num_features"], bool) \
                or data["num_features"] < 1:
            raise ValueError(f"num_features must be a positive integer, got {data['num_features']!r}")
        if not isinstance(data["model_args"], Mapping):
            raise ValueError(f"model_args must be a mapping, got {type(data['model_args']).__name__}")
        return cls(
            name=str(data["name"]),
            architecture=str(data["architecture"]),
            model_args=dict(data["model_args"]),
            num_features=int(data["num_features"]),
            preprocess=PreprocessConfig.from_dict(data.get("preprocess", {})),
            description=str(data.get("description", "")),
            license=str(data.get("license", "")),
            paper=str(data.get("paper", "")),
        )


_REGISTRY: dict[str, ModelConfig] = {}


def register_model(config: ModelConfig, overwrite: bool = False) -> ModelConfig:
    """Add a model to the registry (``overwrite=True`` replaces an entry of the same name)."""
    if config.name in _REGISTRY and not overwrite:
        raise ValueError(f"model {config.name!r} is already registered")
    _REGISTRY[config.name] = config
    return config


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Registered model names matching a shell-style ``pattern``; only those with weights if ``pretrained``."""
    return sorted(n for n, c in _REGISTRY.items()
                  if fnmatch.fnmatch(n, pattern) and (not pretrained or c.weights is not None))


def get_model_config(name: str) -> ModelConfig:
    """The registry entry ``name``; an unknown name raises with close matches and the full list."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise UnknownModelError(
            f"Unknown model {name!r}.{hint} Known models: {', '.join(list_models())} (run `fmcib models`)."
        ) from None
