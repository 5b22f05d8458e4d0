"""Classification heads of fine-tuned checkpoints: Linear layers with a ReLU between each two.

fmcib 1.0.0 builds a head from a list of widths (e.g. ``[4096, 2048, 8]``) as a ``Sequential`` of
blocks, block ``i`` = ``Sequential(Linear[, ReLU])`` with the ReLU in every block but the last, so its
state-dict keys are ``<i>.0.weight`` and ``<i>.0.bias``. The same keys are stored in
``head.safetensors`` by ``fmcib weights convert``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..exceptions import WeightsError
from .checkpoints import HEAD_WEIGHTS_NAME, load_state_dict_strict, read_checkpoint

__all__ = ["build_head", "load_head", "new_head"]

_HEAD_KEY = re.compile(r"(\d+)\.0\.(weight|bias)")


def new_head(num_features: int, num_classes: int, kind: str = "linear") -> nn.Sequential:
    """A freshly initialised head in the layout above: ``"linear"`` ``[D, classes]`` or ``"mlp"``
    ``[D, D // 2, classes]`` (fmcib 1.0.0's ``[4096, 2048, C]`` for the published encoder)."""
    if kind not in ("linear", "mlp"):
        raise ValueError(f"head must be 'linear' or 'mlp', got {kind!r}")
    widths = [int(num_features), *([int(num_features) // 2] if kind == "mlp" else []), int(num_classes)]
    blocks = []
    for i in range(len(widths) - 1):
        linear = nn.Linear(widths[i], widths[i + 1])
        blocks.append(nn.Sequential(linear, nn.ReLU()) if i < len(widths) - 2 else nn.Sequential(linear))
    return nn.Sequential(*blocks)


def build_head(state: Mapping[str, torch.Tensor], source: str = "head") -> nn.Sequential:
    """Rebuild a head from its state dict (layout above) and load it strictly, in eval mode.

    Raises
    ------
    WeightsError
        A key outside the layout, blocks not numbered 0..n-1, a block without a 2D weight, or
        consecutive layers whose widths do not chain; the message names the source and the keys.
    """
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _HEAD_KEY.fullmatch(key)
        if match is None:
            raise WeightsError(f"{source}: unexpected head key {key!r}; expected '<block>.0.weight' and "
                               "'<block>.0.bias' (fmcib 1.0.0 heads)")
        blocks.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise WeightsError(f"{source}: head blocks must be numbered 0..n-1, found {sorted(blocks)}")
    weights = [blocks[i].get("weight") for i in range(len(blocks))]
    for i, w in enumerate(weights):
        if w is None or w.ndim != 2:
            raise WeightsError(f"{source}: head block {i} has no 2D '{i}.0.weight'")
    for i in range(len(weights) - 1):
        if weights[i].shape[0] != weights[i + 1].shape[1]:
            raise WeightsError(f"{source}: head block {i} gives {weights[i].shape[0]} values but block {i + 1} "
                               f"takes {weights[i + 1].shape[1]}")
    layers = []
    for i, w in enumerate(weights):
        linear = nn.Linear(w.shape[1], w.shape[0], bias=True)
        layers.append(nn.Sequential(linear, nn.ReLU()) if i < len(weights) - 1 else nn.Sequential(linear))
    head = nn.Sequential(*layers)
    load_state_dict_strict(head, state, source)
    return head.eval()


def load_head(source: str | os.PathLike) -> nn.Sequential:
    """The head of a fine-tuned checkpoint, read without executing pickled code.

    ``source``: a legacy file (``head_state_dict``, or Lightning ``model.heads.*`` keys), a
    ``head.safetensors`` file, or a folder written by ``fmcib weights convert`` that holds one.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / HEAD_WEIGHTS_NAME
        if not path.is_file():
            raise WeightsError(f"'{source}' holds no {HEAD_WEIGHTS_NAME} (only fine-tuned checkpoints have a head)")
    if not path.is_file():
        raise WeightsError(f"head weights '{path}' not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"'{path}': not a readable safetensors file ({exc})") from exc
    else:
        _, state = read_checkpoint(path)
    if not state:
        raise WeightsError(f"'{path}' holds no head weights; a pretrained encoder has none (fit a probe on its "
                           "features instead: fmcib probe fit)")
    return build_head(state, str(path))
