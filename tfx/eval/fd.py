"""Frechet distance between two sets of feature vectors (FID's formula).

FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64. The
metric is named after the network that made the features (`fd_shapesnet`,
`fd_inception`); only the inception one is comparable with published FIDs.
"""
import numpy as np


def statistics(features_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] of N feature vectors."""
  x = np.asarray(features_ND, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"frechet distance needs at least 2 feature vectors [N, D], got shape {x.shape}")
  return x.mean(0), np.cov(x, rowvar=False)


def _sqrt_psd(s_DD: np.ndarray) -> np.ndarray:
  w, v = np.linalg.eigh((s_DD + s_DD.T) / 2)
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu_a, cov_a, mu_b, cov_b) -> float:
  """FD of two Gaussians; Tr((S_a S_b)^1/2) via the symmetric sqrt(S_a) S_b sqrt(S_a)."""
  root_a = _sqrt_psd(cov_a)
  middle = root_a @ cov_b @ root_a
  eig = np.linalg.eigvalsh((middle + middle.T) / 2)
  trace_sqrt = np.sqrt(np.clip(eig, 0.0, None)).sum()
  diff = np.asarray(mu_a, np.float64) - np.asarray(mu_b, np.float64)
  fd = diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt
  return float(max(fd, 0.0))


def frechet_distance_of_features(features_a_ND, features_b_MD) -> float:
  """FD between the Gaussians fitted to two feature sets."""
  return frechet_distance(*statistics(features_a_ND), *statistics(features_b_MD))
