"""Datasets: synthetic CT with known lesions (tests, examples, benchmarks, pretraining)."""

from .synthetic import SyntheticCT, make_demo_features, make_synthetic_ct, write_dicom_series

__all__ = ["SyntheticCT", "make_synthetic_ct", "write_dicom_series", "make_demo_features"]
