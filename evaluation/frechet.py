"""The Fréchet distance between two feature sets, in float64.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium",
arXiv 1706.08500; computed as in EDM's reference implementation, NVlabs/edm, fid.py): the features f of each image
set are summarised by their mean mu and covariance Sigma (unbiased, N - 1), and

    FID = ||mu_1 - mu_2||^2 + tr(Sigma_1 + Sigma_2 - 2 (Sigma_1 Sigma_2)^(1/2)).

torch-fidelity computes it for image sets (tr of the square root via the eigenvalues of Sigma_1 Sigma_2);
``frechet_distance`` is our float64 implementation of the same formula, used with published reference statistics
(``evaluation/reference_stats.py``) and for features given directly (``fid_from_features``):
tr (Sigma_1 Sigma_2)^(1/2) = tr (S Sigma_2 S)^(1/2) with S = Sigma_1^(1/2) (AB and BA share their eigenvalues),
computed from two symmetric eigendecompositions.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

__all__ = ["feature_statistics", "frechet_distance", "fid_from_features"]


def feature_statistics(features: Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, Sigma) of features [N, F] in float64: the mean and the unbiased covariance (ffᵀ − N·mu·muᵀ)/(N − 1)."""
    f = features.detach().cpu().double().numpy() if isinstance(features, Tensor) else np.asarray(features, np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be [N >= 2, F], got shape {f.shape}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((sigma + sigma.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 − mu2||² + tr(Sigma1 + Sigma2 − 2 (Sigma1 Sigma2)^(1/2)) in float64 (module docstring)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or sigma1.shape != (f, f) or sigma2.shape != (f, f):
        raise ValueError(f"Fréchet distance needs mu [F] and sigma [F, F] of equal F, got {mu1.shape}, "
                         f"{sigma1.shape}, {mu2.shape}, {sigma2.shape}")
    root = _psd_sqrt(sigma1)
    inner = root @ sigma2 @ root
    eig = np.linalg.eigvalsh((inner + inner.T) / 2)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)


def fid_from_features(features1: Tensor | np.ndarray, features2: Tensor | np.ndarray) -> float:
    """FID between two feature sets [N1, F], [N2, F] (whatever network produced them)."""
    return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
