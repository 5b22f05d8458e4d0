"""fmcib: quantitative imaging biomarkers from CT with 3D foundation models.

Importing the package is cheap: torch, MONAI and SimpleITK load only when a function that needs
them is first used, and nothing touches the network.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__

__all__ = [
    "__version__",
    "extract_features",
    "get_features",
    "FeatureExtractor",
    "preprocess",
    "PreprocessConfig",
    "read_image",
    "seeds_from_mask",
    "seeds_from_rtstruct",
    "seeds_from_seg",
    "create_model",
    "load_model",
    "list_models",
    "get_model_config",
    "convert_weights",
    "run_extraction",
    "FmcibError",
    "LogisticProbe",
    "bootstrap_ci",
    "permutation_test",
    "icc",
    "embed_patients",
]

_LAZY = {
    "extract_features": "fmcib.extract",
    "get_features": "fmcib.extract",
    "FeatureExtractor": "fmcib.extract",
    "preprocess": "fmcib.preprocessing",
    "PreprocessConfig": "fmcib.preprocessing",
    "read_image": "fmcib.io",
    "seeds_from_mask": "fmcib.seeds",
    "seeds_from_rtstruct": "fmcib.dicom",
    "seeds_from_seg": "fmcib.dicom",
    "create_model": "fmcib.models",
    "load_model": "fmcib.models",
    "list_models": "fmcib.models",
    "get_model_config": "fmcib.models",
    "convert_weights": "fmcib.models",
    "run_extraction": "fmcib.runs",
    "FmcibError": "fmcib.exceptions",
    "LogisticProbe": "fmcib.probes",
    "bootstrap_ci": "fmcib.evaluation",
    "permutation_test": "fmcib.evaluation",
    "icc": "fmcib.stability",
    "embed_patients": "fmcib.training.longitudinal",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fmcib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
