"""The published encoders: every model's weights location and input contract, in one place."""

from __future__ import annotations

from ..preprocessing import PreprocessConfig
from .registry import ModelConfig, WeightsSource, register_model

FMCIB_RESNET50_ARGS = {
    "depth": 50,
    "n_input_channels": 1,
    "widen_factor": 2,
    "conv1_t_stride": 2,
    "feed_forward": False,
    "bias_downsample": True,
}

register_model(
    ModelConfig(
        name="resnet50_3d.fmcib",
        architecture="monai_resnet",
        model_args=FMCIB_RESNET50_ARGS,
        num_features=4096,
        preprocess=PreprocessConfig(patch_size=50, spacing_mm=1.0, hu_offset=1024.0, hu_scale=3072.0, pad_hu=-1024.0),
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

register_model(
    ModelConfig(
        name="resnet50_3d.random",
        architecture="monai_resnet",
        model_args=FMCIB_RESNET50_ARGS,
        num_features=4096,
        weights=None,
        description="The fmcib architecture with random weights (benchmarks, baselines, pretraining start)",
    )
)
