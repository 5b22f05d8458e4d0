"""Encoders: registry, construction and weight loading (local file/folder, Hugging Face Hub, Zenodo)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..exceptions import WeightsError
from ..preprocessing import PreprocessConfig
from . import resnet3d  # noqa: F401  (the MONAI ResNet family: registers its builder and models)
from . import vit3d  # noqa: F401  (the 3D ViT family of the JEPA encoders)
from .architectures import build_architecture
from .checkpoints import (
    CONFIG_NAME,
    LEGACY_SUFFIXES,
    WEIGHTS_NAME,
    load_state_dict_strict,
    read_checkpoint,
    save_hub_layout,
    sha256_file,
)
from .heads import load_head
from .hub import download_hub_layout, parse_hub_name, resolve_registry_weights
from .registry import DEFAULT_MODEL, ModelConfig, WeightsSource, get_model_config, list_models, register_model

__all__ = [
    "DEFAULT_MODEL",
    "ModelConfig",
    "WeightsSource",
    "create_model",
    "load_model",
    "list_models",
    "get_model_config",
    "register_model",
    "convert_weights",
    "resolve_device",
    "resolve_weights",
    "build_model",
    "ResolvedWeights",
    "load_head",
    "model_contract",
]

logger = logging.getLogger(__name__)

RANDOM_INIT_SEED = 0  # random-init encoders (``*.random``) are seeded with this


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA if available, then Apple MPS, then CPU; otherwise the device named."""
    if device is None or str(device) == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def _weights_in_folder(folder: Path) -> tuple[Path, ModelConfig | None]:
    """A folder: fmcib Hub layout (config.json + model.safetensors) or a single checkpoint file."""
    if (folder / CONFIG_NAME).is_file():
        if not (folder / WEIGHTS_NAME).is_file():
            raise WeightsError(f"'{folder}': has {CONFIG_NAME} but no {WEIGHTS_NAME}")
        try:
            config = ModelConfig.from_dict(json.loads((folder / CONFIG_NAME).read_text()))
        except (ValueError, json.JSONDecodeError) as exc:
            raise WeightsError(f"'{folder / CONFIG_NAME}': invalid model config ({exc})") from exc
        return folder / WEIGHTS_NAME, config
    files = sorted(p for p in folder.iterdir() if p.suffix in (".safetensors",) + LEGACY_SUFFIXES)
    if len(files) != 1:
        raise WeightsError(
            f"'{folder}': expected {CONFIG_NAME} + {WEIGHTS_NAME}, or exactly one weights file "
            f"(*.safetensors, *{', *'.join(LEGACY_SUFFIXES)}); found {[p.name for p in files] or 'none'}"
        )
    return files[0], None


def _check_output_width(model: nn.Module, config: ModelConfig, source: str) -> None:
    """The encoder's real output width must be the config's ``num_features`` (run on the meta device: no compute)."""
    with torch.device("meta"), torch.no_grad():
        x = torch.empty(1, *config.preprocess.input_shape)
        shape = tuple(model.to("meta").eval()(x).shape) if _all_meta(model) else None
    if shape is not None and (len(shape) != 2 or shape[1] != config.num_features):
        raise WeightsError(f"{source}: the config says {config.num_features} features, but the encoder "
                           f"{config.architecture} {dict(config.model_args)} gives output of shape {shape}")


def _all_meta(model: nn.Module) -> bool:
    return all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def _build_with_weights(config: ModelConfig, trunk: dict[str, torch.Tensor], source: str,
                        memory_format: torch.memory_format | None = None) -> nn.Module:
    """The architecture of ``config`` holding ``trunk`` (strictly checked), without a wasted random init.

    ``memory_format`` (e.g. ``torch.channels_last_3d``) is applied to each 5-D tensor in turn before it is
    assigned, so the model never holds two copies of its weights.
    """
    with torch.device("meta"):  # no storage, no initialisation: the checkpoint's tensors become the weights
        model = build_architecture(config.architecture, config.model_args)
    _check_output_width(model, config, source)
    if memory_format is not None:
        for key in list(trunk):
            if trunk[key].dim() == 5:
                trunk[key] = trunk[key].contiguous(memory_format=memory_format)  # the old copy is freed here
    load_state_dict_strict(model, trunk, source, assign=True)
    return model


@dataclass
class ResolvedWeights:
    """Where an encoder comes from, known before it is built: its config, weights file and source.

    ``path`` is None for random initialisation. ``sha256`` is computed on first use and kept.
    """

    config: ModelConfig
    path: Path | None
    source: str
    _sha256: str | None = field(default=None, repr=False)

    @property
    def sha256(self) -> str | None:
        """SHA-256 of the weights file (None for random initialisation)."""
        if self.path is not None and self._sha256 is None:
            self._sha256 = sha256_file(self.path, cached=True)  # hashed once per file, not once per run
        return self._sha256

    def record(self) -> dict[str, str | None]:
        """Provenance of the weights: source, resolved file path and SHA-256."""
        return {"source": self.source, "path": str(self.path.resolve()) if self.path else None, "sha256": self.sha256}


def resolve_weights(
    name: str = DEFAULT_MODEL,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    revision: str | None = None,
) -> ResolvedWeights:
    """Find an encoder's config and weights file without building it (arguments as :func:`create_model`).

    Raises
    ------
    UnknownModelError, WeightsError
    """
    config: ModelConfig | None = None
    path: Path | None = None
    source = "random-init"
    if name.startswith("hf-hub:"):
        repo, rev = parse_hub_name(name)
        path, config = _weights_in_folder(download_hub_layout(repo, revision or rev))
        source = name
    elif weights is not None:
        wp = Path(weights).expanduser()
        if wp.is_dir():
            path, config = _weights_in_folder(wp)
        elif wp.is_file():
            path = wp
        else:
            raise WeightsError(f"weights '{wp}' not found (expected a file or folder)")
        source = str(wp)
    elif pretrained and get_model_config(name).weights is not None:
        config = get_model_config(name)
        path, source = resolve_registry_weights(config, revision)
    return ResolvedWeights(config=config or get_model_config(name), path=path, source=source)


def build_model(resolved: ResolvedWeights, device: str | torch.device | None = None,
                memory_format: torch.memory_format | None = None) -> nn.Module:
    """Build the encoder that :func:`resolve_weights` found, load its weights strictly, eval mode, on ``device``
    (its 5-D weights in ``memory_format`` when given, e.g. ``torch.channels_last_3d`` for CPU inference)."""
    config, path = resolved.config, resolved.path
    if path is None:
        with torch.device("meta"):
            _check_output_width(build_architecture(config.architecture, config.model_args), config, config.name)
        with torch.random.fork_rng(devices=[]):  # seeded: two runs give the same features; the caller's RNG
            torch.manual_seed(RANDOM_INIT_SEED)  # is left as it was
            model = build_architecture(config.architecture, config.model_args)
        logger.warning("%s: random weights (seed %d): its features are reproducible but carry no learned "
                       "information; for research use published or trained weights", config.name, RANDOM_INIT_SEED)
        if memory_format is not None:
            model = model.to(memory_format=memory_format)
    else:
        trunk, heads = read_checkpoint(path)
        model = _build_with_weights(config, trunk, str(path), memory_format)
        del trunk
        if heads:
            logger.info("'%s' also holds head weights (%d tensors); the encoder uses the trunk only", path, len(heads))
    model.fmcib_config = config
    model.fmcib_weights = resolved.record()
    return model.eval().to(resolve_device(device))


def create_model(
    name: str = DEFAULT_MODEL,
    pretrained: bool = True,
    weights: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
) -> nn.Module:
    """Build an encoder, load its weights strictly and put it in eval mode on ``device``.

    Parameters
    ----------
    name : str, default="resnet50_3d.fmcib"
        Registry name (see :func:`list_models`), or ``"hf-hub:org/repo[@revision]"`` for a Hub repository
        in fmcib's layout (``config.json`` + ``model.safetensors``).
    pretrained : bool, default=True
        Load the registry entry's published weights (Hub cache/download, then mirrors). Ignored when
        ``weights`` is given; ``False`` (or an entry without weights, such as ``*.random``) gives
        random initialisation.
    weights : path, optional
        Local weights: an fmcib Hub-layout folder (its ``config.json`` defines the architecture), a folder
        holding one checkpoint, or a file (``.safetensors``, or the original ``.torch``/Lightning ``.ckpt``).
    device : str or torch.device, optional
        Default: CUDA, then MPS, then CPU.
    revision : str, optional
        Hub branch, tag or commit overriding the registry's pinned revision.

    Returns
    -------
    torch.nn.Module
        The encoder, mapping ``(N, 1, D, H, W)`` patches to ``(N, num_features)``. Attributes
        ``fmcib_config`` (:class:`ModelConfig`) and ``fmcib_weights`` (source, path, sha256) describe it.

    Raises
    ------
    UnknownModelError, WeightsError
    """
    return build_model(resolve_weights(name, pretrained=pretrained, weights=weights, revision=revision), device)


def model_contract(name: str = DEFAULT_MODEL, weights: str | os.PathLike | None = None) -> PreprocessConfig:
    """The input contract of a model without loading (or downloading) its weights: from a local weights
    folder's ``config.json`` when ``weights`` is given, else from the registry (or a Hub repository's config)."""
    if weights is None and not name.startswith("hf-hub:"):
        return get_model_config(name).preprocess
    return resolve_weights(name, weights=weights).config.preprocess


def load_model(name: str = DEFAULT_MODEL, weights: str | os.PathLike | None = None,
               device: str | torch.device | None = None) -> nn.Module:
    """Pretrained encoder ``name`` (or ``weights``), strictly loaded, in eval mode; see :func:`create_model`."""
    return create_model(name, pretrained=True, weights=weights, device=device)


def convert_weights(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, name: str = DEFAULT_MODEL) -> Path:
    """Convert a legacy checkpoint into fmcib's Hub layout (config.json + model.safetensors [+ head]).

    The trunk is first loaded strictly into the architecture of ``name``, so a converted folder
    always holds weights that fit its config.
    """
    config = get_model_config(name)
    trunk, heads = read_checkpoint(checkpoint)
    model = _build_with_weights(config, trunk, str(checkpoint))
    provenance: dict[str, Any] = {"file": Path(checkpoint).name, "sha256": sha256_file(checkpoint)}
    return save_hub_layout(config, model.state_dict(), out_dir, heads=heads, provenance=provenance)
