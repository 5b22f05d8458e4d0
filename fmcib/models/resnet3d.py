"""The MONAI 3D ResNet family: its builder and its named models (the published fmcib encoder and random-init
entries), with every model's weights location and input contract in one place."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..preprocessing import PreprocessConfig
from .architectures import register_architecture
from .registry import ModelConfig, WeightsSource, register_model

__all__ = ["monai_resnet", "FMCIB_RESNET50_ARGS", "RESNET10_ARGS"]


@register_architecture("monai_resnet")
def monai_resnet(depth: int = 50, **kwargs: Any) -> nn.Module:
    """A MONAI 3D ResNet (``monai.networks.nets.resnet{depth}``) without pretrained weights; with
    ``feed_forward=False`` it returns the globally pooled features, ``(N, C)``."""
    from monai.networks import nets

    builder = getattr(nets, f"resnet{int(depth)}", None)
    if builder is None:
        raise ValueError(f"MONAI has no resnet{depth}")
    kwargs.setdefault("spatial_dims", 3)
    return builder(pretrained=False, **kwargs)


FMCIB_RESNET50_ARGS = {
    "depth": 50,
    "n_input_channels": 1,
    "widen_factor": 2,
    "conv1_t_stride": 2,
    "feed_forward": False,
    "bias_downsample": True,
}
FMCIB_CONTRACT = PreprocessConfig(patch_size=50, spacing_mm=1.0, hu_offset=1024.0, hu_scale=3072.0, pad_hu=-1024.0)

register_model(
    ModelConfig(
        name="resnet50_3d.fmcib",
        architecture="monai_resnet",
        model_args=FMCIB_RESNET50_ARGS,
        num_features=4096,
        preprocess=FMCIB_CONTRACT,
        weights=WeightsSource(
            hf_hub_id="surajpaib/FMCIB",
            # The one line to change if the file inside the repository is named differently; when it is
            # absent, the folder models/pretrained/fmcib/ is listed and its weights file used.
            hf_filename="models/pretrained/fmcib/model_weights.torch",
            revision=None,
            sha256=None,  # not published; the sha256 of the file used is recorded with every extraction
            urls=("https://zenodo.org/records/10528450/files/model_weights.torch?download=1",),
        ),
        description="SimCLR-pretrained 3D ResNet50 (widen x2) on 11,467 CT lesions (Pai et al., Nat Mach Intell 2024)",
        license="MIT (code and weights, AIM-Harvard/foundation-cancer-image-biomarker)",
        paper="https://doi.org/10.1038/s42256-024-00807-9",
    )
)


def _random_init(name: str, model_args: dict[str, Any], num_features: int, description: str) -> ModelConfig:
    """A family member without published weights: seeded random initialisation, the fmcib input contract."""
    return register_model(ModelConfig(name=name, architecture="monai_resnet", model_args=model_args,
                                      num_features=num_features, preprocess=FMCIB_CONTRACT, weights=None,
                                      description=description))


_random_init("resnet50_3d.random", FMCIB_RESNET50_ARGS, 4096,
             "The fmcib architecture (ResNet50, widen x2) with seeded random weights (benchmarks, baselines)")

# A small encoder for tests, examples and CPU demonstrations: MONAI ResNet10, basic blocks, widths
# 64-128-256-512, 14.4 M parameters, 512 features; the fmcib input contract.
RESNET10_ARGS = {
    "depth": 10,
    "n_input_channels": 1,
    "widen_factor": 1,
    "conv1_t_stride": 2,
    "feed_forward": False,
    "bias_downsample": True,
}

_random_init("resnet10_3d.random", RESNET10_ARGS, 512,
             "Small MONAI ResNet10 (widths 64-512), seeded random weights: tests, examples, CPU training demos")
