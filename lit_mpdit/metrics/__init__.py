"""Evaluation metrics: FID with the standard TF Inception, offline (`lit_mpdit.metrics.fid`), and the Fréchet
distance's float64 arithmetic and bootstrap (`lit_mpdit.metrics.frechet`)."""
from lit_mpdit.metrics.fid import (
    InceptionFeatures,
    fid_from_features,
    fid_metric,
    load_images,
    protocol,
    reference_features,
    reference_stats,
    to_uint8,
)
from lit_mpdit.metrics.frechet import bootstrap_fid, frechet_distance, resampled_fids

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
    "resampled_fids",
    "to_uint8",
]
