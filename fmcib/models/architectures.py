"""Network builders, keyed by the ``architecture`` field of a model config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

__all__ = ["build_architecture", "ARCHITECTURES"]


def _monai_resnet(depth: int = 50, **kwargs: Any) -> nn.Module:
    """A MONAI 3D ResNet (``monai.networks.nets.resnet{depth}``) without pretrained weights."""
    from monai.networks import nets

    builder = getattr(nets, f"resnet{int(depth)}", None)
    if builder is None:
        raise ValueError(f"MONAI has no resnet{depth}")
    kwargs.setdefault("spatial_dims", 3)
    return builder(pretrained=False, **kwargs)


ARCHITECTURES = {"monai_resnet": _monai_resnet}


def build_architecture(architecture: str, model_args: Mapping[str, Any]) -> nn.Module:
    """Build an untrained network; unknown architectures raise ``ValueError`` listing the known ones."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](**dict(model_args))
