"""FID and Inception Score from Inception features: streaming float64 statistics, the distance.

Features arrive batch by batch (from devices, per process). `FeatureMoments` keeps the count, the
mean and the centred sum of outer products in float64 and merges batches and processes with
Chan et al.'s pairwise update, which avoids the cancellation of sum(x x^T) - n mu mu^T.
`frechet_distance` follows pytorch-fid's `calculate_frechet_distance` (offset retry, imaginary-part
check) but computes Tr sqrtm(S1 S2) from symmetric eigendecompositions instead of
`scipy.linalg.sqrtm`, which is wrong in scipy 1.11.2-1.12 and changed its signature in 1.18.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable

import numpy as np

FEATURE_DIM = 2048
# pytorch-fid fails when the diagonal of sqrtm(S1 S2) has an imaginary part above this.
IMAGINARY_ATOL = 1e-3


@dataclasses.dataclass(frozen=True)
class FeatureMoments:
    """Sufficient statistics of a set of feature vectors, float64.

    n: number of vectors; mean: [D]; m2: [D, D] sum over vectors of (x - mean)(x - mean)^T.
    """

    n: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def empty(cls, dim: int = FEATURE_DIM) -> FeatureMoments:
        return cls(0, np.zeros(dim, np.float64), np.zeros((dim, dim), np.float64))

    @classmethod
    def of(cls, features: np.ndarray) -> FeatureMoments:
        """Moments of one batch [b, D] (any float dtype; computed in float64)."""
        x = np.asarray(features, np.float64)
        if x.ndim != 2:
            raise ValueError(f"features must be [batch, dim]; got shape {x.shape}")
        if x.shape[0] == 0:
            return cls.empty(x.shape[1])
        mean = x.mean(axis=0)
        centred = x - mean
        return cls(x.shape[0], mean, centred.T @ centred)

    def merge(self, other: FeatureMoments) -> FeatureMoments:
        """Moments of the union of both sets (Chan, Golub & LeVeque's pairwise update)."""
        if self.mean.shape != other.mean.shape:
            raise ValueError(
                f"cannot merge moments of {self.mean.shape[0]}- and "
                f"{other.mean.shape[0]}-dimensional features"
            )
        if other.n == 0:
            return self
        if self.n == 0:
            return other
        n = self.n + other.n
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.n / n)
        m2 = self.m2 + other.m2 + np.outer(delta, delta) * (self.n * other.n / n)
        return FeatureMoments(n, mean, m2)

    def update(self, features: np.ndarray) -> FeatureMoments:
        """These moments with one more batch [b, D] of features."""
        return self.merge(FeatureMoments.of(features))

    def mean_cov(self, min_samples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(mu [D], unbiased covariance [D, D]) in float64, as `np.mean` / `np.cov(rowvar=False)`.

        Args:
          min_samples: refuse fewer vectors than this; default the feature dimension D. With
            n <= D the covariance has rank < D and FID is dominated by that rank deficiency
            rather than by the images (pytorch-fid gives the same warning).
        """
        dim = self.mean.shape[0]
        need = dim if min_samples is None else min_samples
        if self.n < max(need, 2):
            raise ValueError(
                f"FID statistics need at least {max(need, 2)} samples, got {self.n}: with fewer "
                f"samples than the {dim} feature dimensions the covariance is singular and the "
                "distance measures the sample count, not the images (use more samples)"
            )
        return self.mean.copy(), self.m2 / (self.n - 1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (for `.npz` files, e.g. resumable evaluation)."""
        return {"n": np.asarray(self.n, np.int64), "mean": self.mean, "m2": self.m2}

    @classmethod
    def from_arrays(cls, arrays) -> FeatureMoments:
        return cls(int(arrays["n"]), np.asarray(arrays["mean"]), np.asarray(arrays["m2"]))


def merge_all(moments: Iterable[FeatureMoments]) -> FeatureMoments:
    """Merges any number of moments (batches, devices or processes)."""
    moments = list(moments)
    if not moments:
        raise ValueError("no moments to merge")
    total = moments[0]
    for m in moments[1:]:
        total = total.merge(m)
    return total


def _as_bits(x: np.ndarray) -> np.ndarray:
    # jax downcasts float64 to float32 unless x64 is enabled: send the raw bits instead.
    return np.ascontiguousarray(x, np.float64).view(np.uint32)


def allgather_moments(
    moments: FeatureMoments, allgather: Callable[[np.ndarray], np.ndarray] | None = None
) -> FeatureMoments:
    """Merges every process's moments; each process gets the same total.

    Args:
      moments: this process's moments.
      allgather: array [...] -> [num_processes, ...] stacking every process's value; default
        `jax.experimental.multihost_utils.process_allgather`. float64 travels as uint32 bits, so
        the result is exact without `jax_enable_x64`.
    """
    if allgather is None:
        from jax.experimental import multihost_utils

        allgather = multihost_utils.process_allgather
    n = np.asarray([float(moments.n)], np.float64)
    gathered = [
        np.asarray(allgather(_as_bits(a))).view(np.float64) for a in (n, moments.mean, moments.m2)
    ]
    ns, means, m2s = gathered
    return merge_all(FeatureMoments(int(ns[i, 0]), means[i], m2s[i]) for i in range(ns.shape[0]))


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[float, float]:
    """Tr sqrtm(S1 S2) for symmetric S1, S2, and the largest imaginary part it would carry.

    S1 S2 is similar to A S2 A with A = S1^(1/2) (symmetric), so its eigenvalues are those of the
    symmetric matrix A S2 A and Tr sqrtm(S1 S2) = sum sqrt(eig). For covariances they are >= 0;
    a negative one (round-off, or a non-PSD input) gives sqrtm an imaginary part sqrt(-eig).
    """
    w, v = np.linalg.eigh(sigma1)
    root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    m = root1 @ sigma2 @ root1
    eig = np.linalg.eigvalsh((m + m.T) / 2.0)
    imaginary = float(np.sqrt(-eig.min())) if eig.min() < 0 else 0.0
    return float(np.sqrt(np.clip(eig, 0.0, None)).sum()), imaginary


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """|mu1 - mu2|^2 + Tr S1 + Tr S2 - 2 Tr sqrtm(S1 S2), float64, pytorch-fid's semantics.

    Args:
      mu1, mu2: [D] means; sigma1, sigma2: [D, D] covariances (symmetric PSD).
      eps: added to both diagonals (pytorch-fid: with a message) only when the first attempt
        is not finite.
    Raises:
      ValueError: mismatched shapes, asymmetric covariances, or an imaginary component above
        1e-3 (pytorch-fid's "Imaginary component" failure: the inputs are not covariances).
    """
    mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"covariances {sigma1.shape} and {sigma2.shape} do not match means {mu1.shape}"
        )
    for name, s in (("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name} has non-finite entries")
        scale = max(np.abs(s).max(), np.finfo(np.float64).tiny)
        if np.abs(s - s.T).max() > 1e-6 * scale:
            raise ValueError(f"{name} is not symmetric: not a covariance matrix")
    diff = mu1 - mu2
    try:
        tr_covmean, imaginary = _trace_sqrt_product(sigma1, sigma2)
        finite = np.isfinite(tr_covmean)
    except np.linalg.LinAlgError:
        finite = False
    if not finite:
        logging.warning(
            "fid calculation produces singular product; adding %s to diagonal of cov estimates",
            eps,
        )
        offset = np.eye(sigma1.shape[0]) * eps
        tr_covmean, imaginary = _trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    if imaginary > IMAGINARY_ATOL:
        raise ValueError(f"Imaginary component {imaginary}: the inputs are not covariances")
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def inception_score(logits: np.ndarray, splits: int = 10) -> tuple[float, float]:
    """Inception Score exp(E_x KL(p(y|x) || p(y))) over `splits` consecutive chunks.

    Args:
      logits: [N, 1008] Inception logits (softmax over all 1008 classes, float64).
      splits: number of chunks (rows i*N//splits to (i+1)*N//splits); 10 in the literature
        (ADM: 50k samples, 5000 per split).
    Returns:
      (mean, std) of the per-chunk scores.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] < splits:
        raise ValueError(
            f"Inception Score needs logits [N >= splits={splits}, classes]; got {logits.shape}"
        )
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    n = logits.shape[0]
    scores = []
    for i in range(splits):
        part = log_p[i * n // splits : (i + 1) * n // splits]
        # log of the split's marginal p(y), computed stably so that classes nobody predicts
        # (p underflowing to 0) contribute 0 instead of 0 * inf.
        top = part.max(axis=0)
        log_py = top + np.log(np.mean(np.exp(part - top), axis=0))
        p = np.exp(part)
        scores.append(np.exp(np.mean(np.sum(p * (part - log_py), axis=1))))
    return float(np.mean(scores)), float(np.std(scores))
