"""The Fréchet distance between two feature sets, in float64, and its bootstrap interval: the arithmetic behind
every FID interval of this suite (`lit_mpdit.metrics.fid` computes the features and the point estimate).

    frechet_distance(real, fake)                   # ‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb)
    bootstrap_fid(real, fake, n_boot=200)          # a 95% interval over resamples of the generated set
    resampled_fids(real, fake, draws)              # the FID of each resample, the reference's work done once
"""
from __future__ import annotations

import numpy as np
import torch


def trace_sqrt_product(xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """tr √(Σa Σb) for covariances Σ = XᵀX, X the centred features divided by √(n − 1).

    Σa Σb = Xaᵀ (Xa Xbᵀ) Xb has the nonzero eigenvalues of M Mᵀ with M = Xa Xbᵀ (na × nb), so the trace of its
    square root is the sum of M's singular values: cheap while a set is smaller than the feature dimension.
    Otherwise it is the sum of √eigenvalues of the symmetric √Σa Σb √Σa, with √Σa from one eigendecomposition.
    """
    if min(len(xa), len(xb)) <= xa.shape[1]:
        return torch.linalg.svdvals(xa @ xb.T).sum()
    values, vectors = torch.linalg.eigh(xa.T @ xa)
    root_a = (vectors * values.clamp(min=0).sqrt()) @ vectors.T
    return torch.linalg.eigvalsh(root_a @ (xb.T @ xb) @ root_a).clamp(min=0).sqrt().sum()


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """FID between two feature sets, in float64: ‖μa − μb‖² + tr Σa + tr Σb − 2 tr √(Σa Σb)."""
    a, b = real.double(), fake.double()
    xa = (a - a.mean(dim=0)) / (len(a) - 1) ** 0.5  # Σa = Xaᵀ Xa
    xb = (b - b.mean(dim=0)) / (len(b) - 1) ** 0.5
    mean_gap = (a.mean(dim=0) - b.mean(dim=0)).square().sum()
    traces = xa.square().sum() + xb.square().sum()  # tr XᵀX = ‖X‖²_F
    return float(mean_gap + traces - 2 * trace_sqrt_product(xa, xb))


def resampled_fids(real: torch.Tensor, fake: torch.Tensor, draws: list[torch.Tensor]) -> list[float]:
    """FID of the reference against `fake[idx]` for each index tensor `idx` in `draws`, equal to
    `frechet_distance(real, fake[idx])` but with the reference's work done once.

    A draw with replacement holds u ≈ 0.63·m distinct images, image j c_j times; with p_j = c_j/m its mean is
    μ = Σ p_j f_j and its covariance Σb = G Gᵀ, G's columns √(c_j/(m − 1))·(f_j − μ). With Σa the reference
    covariance and K = F Σa Fᵀ, H = F Fᵀ over the generated features F, tr √(Σa Σb) is the sum of √eigenvalues
    of the u × u matrix Gᵀ Σa G = D (K − 1rᵀ − r1ᵀ + (pᵀr)11ᵀ) D (K on the distinct images, r = K p,
    D = diag √(c/(m − 1))), and tr Σb = Σ_j c_j (H_jj − 2(Hp)_j + pᵀHp)/(m − 1): one symmetric u × u
    eigendecomposition per draw, about a quarter of the work of the m × m one.
    """
    a, f = real.double(), fake.double()
    mean_a = a.mean(dim=0)
    xa = (a - mean_a) / (len(a) - 1) ** 0.5
    cov_a = xa.T @ xa
    k, h = f @ cov_a @ f.T, f @ f.T
    values = []
    for idx in draws:
        m = len(idx)
        distinct, counts = torch.unique(idx, return_counts=True)
        c = counts.double()
        p, d = c / m, (c / (m - 1)).sqrt()
        ku, hu = k[distinct][:, distinct], h[distinct][:, distinct]
        r, hp = ku @ p, hu @ p
        centred = ku - r[:, None] - r[None, :] + p @ r
        trace_b = (c * (hu.diagonal() - 2 * hp + p @ hp)).sum() / (m - 1)
        mean_gap = (mean_a - p @ f[distinct]).square().sum()
        root = torch.linalg.eigvalsh(d[:, None] * centred * d[None, :]).clamp(min=0).sqrt().sum()
        values.append(float(mean_gap + cov_a.trace() + trace_b - 2 * root))
    return values


def bootstrap_fid(
    real: torch.Tensor,  # (N, 2048) reference features
    fake: torch.Tensor,  # (M, 2048) generated features
    n_boot: int = 200,  # resamples
    seed: int = 0,  # seeds the resampling
    resample_reference: bool = False,  # also resample the reference set (False: it is the fixed yardstick)
    level: float = 0.95,  # coverage of the interval
) -> tuple[float, float]:
    """Bootstrap interval for FID: recompute it on sets resampled with replacement, take the percentiles.

    Resampling repeats about 37% of the images, which shrinks the sets' effective size and so raises FID by its
    small-sample bias; the percentiles are shifted down by that mean rise (bootstrap mean − point estimate), so
    the interval measures the spread of FID at this N around the point estimate, not the resampling bias.
    By default only the generated set is resampled: the reference statistics are the same fixed set for every
    model compared, so their sampling noise is not part of the difference between models.
    """
    generator = torch.Generator().manual_seed(seed)
    point = frechet_distance(real, fake)
    if resample_reference:
        values = []
        for _ in range(n_boot):
            fake_draw = fake[torch.randint(len(fake), (len(fake),), generator=generator)]
            real_draw = real[torch.randint(len(real), (len(real),), generator=generator)]
            values.append(frechet_distance(real_draw, fake_draw))
    else:
        values = resampled_fids(real, fake, [torch.randint(len(fake), (len(fake),), generator=generator) for _ in range(n_boot)])
    draws = np.asarray(values)
    shift = draws.mean() - point
    lo, hi = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return float(lo - shift), float(hi - shift)
