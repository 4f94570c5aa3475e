"""Fréchet distance between Gaussians fitted to two feature sets (FID, FAD, ...).

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

computed as in the reference FID code: ``scipy.linalg.sqrtm`` of the covariance product, with a
small diagonal offset when the product is singular (fewer items than feature dimensions), and the
imaginary residue of the square root dropped only when it is numerically negligible.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from nextgpt.metrics import Unavailable


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and (unbiased) covariance of ``(N, D)`` features."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D); got shape {x.shape}")
    if x.shape[0] < 2:
        raise Unavailable(f"a Fréchet distance needs at least 2 items per set; got {x.shape[0]}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrtm(m: np.ndarray) -> np.ndarray:
    """Square root of a covariance product; a singular product (fewer items than dimensions) is
    handled by the caller's diagonal offset, so scipy's warning about it is not repeated."""
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        return linalg.sqrtm(m)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"feature sizes differ: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(
                f"the covariance square root has an imaginary part of {np.max(np.abs(covmean.imag)):.3g}"
            )
        covmean = covmean.real
    d = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
    return max(d, 0.0)  # rounding can take identical sets a hair below zero


def frechet_distance_of(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between the Gaussians of two ``(N, D)`` feature sets."""
    return frechet_distance(*gaussian_stats(features_a), *gaussian_stats(features_b))
