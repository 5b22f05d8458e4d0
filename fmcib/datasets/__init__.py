"""Datasets: synthetic CT with known lesions (tests, examples, benchmarks, pretraining)."""

from .cohort import COHORT_LATENTS, make_cohort_benchmark, make_longitudinal_ct
from .synthetic import (
    LATENTS,
    SyntheticCT,
    make_demo_features,
    make_latent_ct,
    make_lesion_benchmark,
    make_longitudinal_table,
    make_synthetic_ct,
    write_dicom_series,
)

__all__ = ["SyntheticCT", "make_synthetic_ct", "make_latent_ct", "make_lesion_benchmark", "LATENTS",
           "make_longitudinal_table", "make_longitudinal_ct", "make_cohort_benchmark", "COHORT_LATENTS",
           "write_dicom_series", "make_demo_features"]
