"""Reading checkpoints safely (safetensors, ``torch.load(weights_only=True)``), strict loading, Hub layout."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..exceptions import WeightsError
from ..files import atomic_path
from .registry import ModelConfig

__all__ = [
    "fmcib_cache_dir",
    "sha256_file",
    "read_checkpoint",
    "split_checkpoint",
    "load_state_dict_strict",
    "save_hub_layout",
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "HEAD_WEIGHTS_NAME",
]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
HEAD_WEIGHTS_NAME = "head.safetensors"
LEGACY_SUFFIXES = (".torch", ".pt", ".pth", ".ckpt", ".bin")
_MAX_KEYS_SHOWN = 8
logger = logging.getLogger(__name__)


def fmcib_cache_dir() -> Path:
    """fmcib's own cache (files fetched from mirrors, weights digests): ``$FMCIB_CACHE`` or ``~/.cache/fmcib``."""
    return Path(os.environ.get("FMCIB_CACHE") or Path.home() / ".cache" / "fmcib")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22, cached: bool = False) -> str:
    """SHA-256 hex digest of a file, read in 4 MiB chunks.

    ``cached=True`` reuses the digest computed for the same file before (same resolved path, size,
    modification time in ns and inode, kept in ``<fmcib cache>/sha256.json``): recording the provenance of
    a 0.74 GB weights file then costs nothing after the first run. Checksum verification never uses it.
    """
    p = Path(path)
    key, stat = str(p.resolve()), p.stat()
    identity = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    table_path = fmcib_cache_dir() / "sha256.json"
    table: dict[str, Any] = {}
    if cached:
        try:
            table = json.loads(table_path.read_text())
            entry = table.get(key)
            if entry and entry[:3] == identity:
                return str(entry[3])
        except (OSError, ValueError, TypeError):
            table = {}
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    digest = h.hexdigest()
    if cached:
        table[key] = [*identity, digest]
        try:
            with atomic_path(table_path) as tmp:
                tmp.write_text(json.dumps(table))
        except OSError:  # a read-only cache only costs the next run the hashing
            pass
    return digest


def _strip_module(key: str) -> str:
    """Drop ``module`` path components left by DataParallel/DDP wrappers (anywhere in the key)."""
    return ".".join(part for part in key.split(".") if part != "module")


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def split_checkpoint(obj: Any, source: str = "checkpoint") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Split a loaded checkpoint into (trunk, heads) state dicts, whatever its layout.

    Layouts: fmcib 1.0.0 ``{"trunk_state_dict": ..., "head_state_dict": ...}``; Lightning
    ``{"state_dict": {"model.trunk.*", "model.heads.*"}}`` (``module.`` components dropped); a plain
    trunk state dict (``trunk.`` prefix optional). Any other key in a Lightning state dict is an error.
    """
    if isinstance(obj, Mapping) and "trunk_state_dict" in obj:
        trunk = {_strip_module(k): v for k, v in dict(obj["trunk_state_dict"]).items()}
        heads = {_strip_module(k): v for k, v in dict(obj.get("head_state_dict") or {}).items()}
        return trunk, heads
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        trunk, heads, other = {}, {}, []
        for key, value in obj["state_dict"].items():
            k = _strip_module(key)
            if k.startswith("model.trunk."):
                trunk[k[len("model.trunk."):]] = value
            elif k.startswith("model.heads."):
                heads[k[len("model.heads."):]] = value
            else:
                other.append(key)
        if other:
            raise WeightsError(
                f"{source}: Lightning state_dict has {len(other)} key(s) outside model.trunk./model.heads.: "
                f"{other[:_MAX_KEYS_SHOWN]}"
            )
        if not trunk:
            raise WeightsError(f"{source}: Lightning state_dict holds no 'model.trunk.' weights")
        return trunk, heads
    if _is_tensor_dict(obj):
        keys = {_strip_module(k): v for k, v in obj.items()}
        trunk = {k[len("trunk."):] if k.startswith("trunk.") else k: v for k, v in keys.items()
                 if not k.startswith(("head.", "heads."))}
        heads = {k.split(".", 1)[1]: v for k, v in keys.items() if k.startswith(("head.", "heads."))}
        return trunk, heads
    top = list(obj)[:_MAX_KEYS_SHOWN] if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(
        f"{source}: unrecognised checkpoint layout (top level: {top}); expected 'trunk_state_dict', a "
        "Lightning 'state_dict' or a plain state dict"
    )


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read trunk and head weights from a file without executing pickled code.

    ``.safetensors`` files are read with safetensors; other files with ``torch.load(weights_only=True)``.
    A checkpoint holding arbitrary Python objects is refused, never unpickled.
    """
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file '{p}' not found")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return split_checkpoint(load_file(str(p)), str(p))
        except WeightsError:
            raise
        except Exception as exc:
            raise WeightsError(f"'{p}': not a readable safetensors file ({exc})") from exc
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for disallowed globals, others for corrupt files
        raise WeightsError(
            f"'{p}': cannot be read safely with torch.load(weights_only=True) ({str(exc).splitlines()[0]}). "
            "fmcib never unpickles arbitrary objects; re-save the tensors with torch.save(state_dict) or "
            "safetensors on a machine you trust."
        ) from exc
    return split_checkpoint(obj, str(p))


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str,
                           assign: bool = False) -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key raises, naming the keys.

    ``assign=True`` makes the (dtype-matched) checkpoint tensors the model's parameters and buffers
    instead of copying into them: use it for a model built on the ``meta`` device, which has no storage.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", mismatched)):
        if keys:
            shown = ", ".join(keys[:_MAX_KEYS_SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > _MAX_KEYS_SHOWN else "")
            problems.append(f"{label} keys: {shown}")
    if problems:
        raise WeightsError(
            f"{source}: weights do not fit the architecture; " + "; ".join(problems)
            + ". Check the model name (the architecture is pinned to the weights)."
        )
    wrong = [f"{k} ({v.dtype})" for k, v in state.items() if expected[k].is_floating_point() and not v.is_floating_point()]
    if wrong:
        raise WeightsError(f"{source}: weights must be floating point; {len(wrong)} tensor(s) are not: "
                           + ", ".join(wrong[:_MAX_KEYS_SHOWN]))
    low = [k for k, v in state.items() if v.is_floating_point() and v.dtype != expected[k].dtype]
    if low:
        logger.info("%s: %d tensor(s) stored as %s are loaded as %s", source, len(low), state[low[0]].dtype,
                    expected[low[0]].dtype)
    if assign:
        state = {k: v.to(expected[k].dtype) for k, v in state.items()}
    model.load_state_dict(dict(state), strict=True, assign=assign)


def save_hub_layout(
    config: ModelConfig,
    trunk: Mapping[str, torch.Tensor],
    out_dir: str | os.PathLike,
    heads: Mapping[str, torch.Tensor] | None = None,
    provenance: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (+ ``head.safetensors``) into ``out_dir``, atomically per file.

    ``provenance`` (a converted checkpoint's file and hash) goes to ``converted_from``; ``extra`` adds top-level
    keys to config.json (a fine-tune's ``head`` and ``training`` records).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / WEIGHTS_NAME) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trunk.items()}, str(tmp))
    if heads:
        with atomic_path(out / HEAD_WEIGHTS_NAME) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in heads.items()}, str(tmp))
    data = config.to_dict()
    if provenance:
        data["converted_from"] = dict(provenance)
    data.update(extra or {})
    with atomic_path(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return out
