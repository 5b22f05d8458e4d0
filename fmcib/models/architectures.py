"""Network builders, keyed by the ``architecture`` field of a model config.

A family module (e.g. :mod:`fmcib.models.resnet3d`) registers its builder with :func:`register_architecture`
and its named models with :func:`fmcib.models.register_model`; adding a family is one new module plus its
import in ``fmcib/models/__init__.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = ["build_architecture", "register_architecture", "ARCHITECTURES"]

Builder = Callable[..., nn.Module]
ARCHITECTURES: dict[str, Builder] = {}


def register_architecture(name: str) -> Callable[[Builder], Builder]:
    """Decorator: ``@register_architecture("monai_resnet")`` makes a builder available to model configs."""

    def add(builder: Builder) -> Builder:
        if name in ARCHITECTURES and ARCHITECTURES[name] is not builder:
            raise ValueError(f"architecture {name!r} is already registered")
        ARCHITECTURES[name] = builder
        return builder

    return add


def build_architecture(architecture: str, model_args: Mapping[str, Any]) -> nn.Module:
    """Build an untrained network; unknown architectures raise ``ValueError`` listing the known ones."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[architecture](**dict(model_args))
