"""A toy encoder family, as a user would add one: one module with its builder and its named model."""

from __future__ import annotations

from torch import nn

from fmcib.models import ModelConfig, register_model
from fmcib.models.architectures import register_architecture
from fmcib.preprocessing import PreprocessConfig


@register_architecture("toy_cnn")
def toy_cnn(width: int = 8) -> nn.Module:
    """Two 3D convolutions and a global average pool: ``(N, 1, D, H, W) -> (N, width)``."""
    return nn.Sequential(nn.Conv3d(1, width, 3, stride=2), nn.ReLU(), nn.Conv3d(width, width, 3, stride=2),
                         nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten())


TOY = ModelConfig(name="toy_3d.random", architecture="toy_cnn", model_args={"width": 12}, num_features=12,
                  preprocess=PreprocessConfig(patch_size=32, spacing_mm=2.0), description="toy family for tests")


def register() -> ModelConfig:
    """Register the toy model (the tests restore the registry afterwards)."""
    return register_model(TOY, overwrite=True)
