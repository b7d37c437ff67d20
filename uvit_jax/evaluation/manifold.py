"""Improved precision and recall of generated samples, from Inception feature vectors.

Kynkäänniemi et al., "Improved Precision and Recall Metric for Assessing Generative Models"
(NeurIPS 2019), with k = 3 nearest neighbours as ADM's evaluator (openai/guided-diffusion
`evaluations/evaluator.py`, `ManifoldEstimator`) uses. Each set of vectors approximates its
manifold by a union of balls, one around every vector, whose radius is the distance to that
vector's k-th nearest neighbour in the same set (itself not counted).

  precision: fraction of fake vectors inside the real manifold (do the samples look real?);
  recall:    fraction of real vectors inside the fake manifold (do the samples cover the data?).

A vector exactly on a ball's boundary counts as inside (<=), as in ADM's evaluator.

All distances come from |a|^2 + |b|^2 - 2 a.b in float64, one row block at a time, so memory is
O(block_size * N) instead of the O(N^2) of a full matrix (50,000 x 50,000 float64 is 20 GB), and
each block is a single matrix product. Comparisons are made between squared distances, which
orders them exactly as the distances themselves without a square root per pair.
"""

from __future__ import annotations

import numpy as np

DEFAULT_K = 3
# A block holds block_size x N float64 distances: 1024 x 50,000 is 410 MB.
DEFAULT_BLOCK_SIZE = 1024


def feature_matrix(features: np.ndarray, name: str) -> np.ndarray:
    """Checks one set of feature vectors and returns it as a float64 [N, D] array.

    Raises:
      ValueError: not 2-D, or containing NaN or inf (which would silently poison every
        distance or kernel value computed from the vector).
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2:
        raise ValueError(
            f"{name} features must be a 2-D array [num_vectors, feature_dim]; got shape {x.shape}"
        )
    if not np.isfinite(x).all():
        raise ValueError(f"{name} features contain non-finite values (NaN or inf)")
    return x


def feature_pair(real: np.ndarray, fake: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`feature_matrix` of both sets, also checking that they share the feature dimension D."""
    real = feature_matrix(real, "real")
    fake = feature_matrix(fake, "fake")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            "real and fake features must have the same feature dimension; got "
            f"{real.shape[1]} (real) and {fake.shape[1]} (fake)"
        )
    return real, fake


def _check_knn_args(x: np.ndarray, k: int, block_size: int, name: str) -> None:
    """Raises ValueError unless k and block_size are >= 1 and [N, D] x has N >= k + 1."""
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1; got {block_size}")
    if x.shape[0] < k + 1:
        raise ValueError(
            f"{name} features: need at least k + 1 = {k + 1} vectors (each vector's radius is "
            f"the distance to its k-th nearest other vector, k = {k}); got {x.shape[0]}"
        )


def _squared_norms(x: np.ndarray) -> np.ndarray:
    """[N, D] -> [N] float64 |x|^2 per row, without an [N, D] temporary."""
    return np.einsum("ij,ij->i", x, x)


def _squared_distances(a: np.ndarray, b: np.ndarray, b_sq_norms: np.ndarray) -> np.ndarray:
    """[B, D] x [M, D] -> [B, M] float64 squared Euclidean distances, clamped at 0.

    Built in place in the product's buffer, so a block costs one [B, M] array. The clamp removes
    the small negatives that cancellation in the expansion leaves for (near-)equal vectors.
    """
    d = a @ b.T
    d *= -2.0
    d += _squared_norms(a)[:, None]
    d += b_sq_norms[None, :]
    return np.maximum(d, 0.0, out=d)


def _knn_squared_radii(x: np.ndarray, k: int, block_size: int) -> np.ndarray:
    """[N, D] float64 -> [N] squared distance of each vector to its k-th nearest other vector."""
    n = x.shape[0]
    sq_norms = _squared_norms(x)
    radii = np.empty(n, np.float64)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        d = _squared_distances(x[start:stop], x, sq_norms)
        # A vector is not its own neighbour; an identical other vector still is (radius 0).
        rows = np.arange(stop - start)
        d[rows, rows + start] = np.inf
        d.partition(k - 1, axis=1)
        radii[start:stop] = d[:, k - 1]
    return radii


def knn_radii(
    features: np.ndarray, k: int = DEFAULT_K, *, block_size: int = DEFAULT_BLOCK_SIZE
) -> np.ndarray:
    """Distance from each vector to its k-th nearest neighbour in the same set, itself excluded.

    Args:
      features: [N, D] feature vectors (any real dtype; computed in float64), N >= k + 1.
      k: which neighbour sets the radius (1 = nearest).
      block_size: rows of the distance matrix computed at once (memory ~ 8 * block_size * N
        bytes); does not change the result.
    Returns:
      [N] float64 Euclidean radii.
    """
    x = feature_matrix(features, "input")
    _check_knn_args(x, k, block_size, "input")
    return np.sqrt(_knn_squared_radii(x, k, block_size))


def precision_recall(
    real: np.ndarray,
    fake: np.ndarray,
    k: int = DEFAULT_K,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) of `fake` against `real`.

    Args:
      real: [N_real, D] reference feature vectors (e.g. Inception pool features, 2048-d).
      fake: [N_fake, D] feature vectors of generated samples; both sets need >= k + 1 vectors.
      k: neighbour that sets each ball's radius; 3 as in ADM's evaluator.
      block_size: rows of each distance matrix computed at once (memory ~ 8 * block_size *
        max(N_real, N_fake) bytes); does not change the result.
    Returns:
      (precision, recall) as floats in [0, 1]: the fraction of fake vectors within (<=) the
      radius of some real vector, and of real vectors within the radius of some fake vector.
    """
    real, fake = feature_pair(real, fake)
    _check_knn_args(real, k, block_size, "real")
    _check_knn_args(fake, k, block_size, "fake")
    real_radii = _knn_squared_radii(real, k, block_size)
    fake_radii = _knn_squared_radii(fake, k, block_size)
    fake_sq_norms = _squared_norms(fake)
    # One pass over the real x fake distances serves both metrics: a block of real rows decides
    # recall for those rows and adds to which fake vectors some real ball has covered so far.
    fake_covered = np.zeros(fake.shape[0], bool)
    real_covered = np.empty(real.shape[0], bool)
    for start in range(0, real.shape[0], block_size):
        stop = min(start + block_size, real.shape[0])
        d = _squared_distances(real[start:stop], fake, fake_sq_norms)
        real_covered[start:stop] = (d <= fake_radii[None, :]).any(axis=1)
        fake_covered |= (d <= real_radii[start:stop, None]).any(axis=0)
    return float(fake_covered.mean()), float(real_covered.mean())
