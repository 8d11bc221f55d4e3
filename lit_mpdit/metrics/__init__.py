"""Evaluation metrics: FID with the standard TF Inception, offline (see `lit_mpdit.metrics.fid`)."""
from lit_mpdit.metrics.fid import (
    InceptionFeatures,
    bootstrap_fid,
    fid_from_features,
    fid_metric,
    frechet_distance,
    load_images,
    protocol,
    reference_features,
    reference_stats,
    to_uint8,
)

__all__ = [
    "InceptionFeatures",
    "bootstrap_fid",
    "fid_from_features",
    "fid_metric",
    "frechet_distance",
    "load_images",
    "protocol",
    "reference_features",
    "reference_stats",
    "to_uint8",
]
