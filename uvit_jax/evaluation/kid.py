"""Kernel Inception Distance (Binkowski et al., "Demystifying MMD GANs", ICLR 2018).

KID is the squared maximum mean discrepancy (MMD^2) between real and generated feature vectors
under the cubic polynomial kernel k(x, y) = (x.y / D + 1)^3, estimated without bias. Unlike FID
it has an unbiased estimator, so values from different sample counts are comparable; it can be
slightly negative when the two distributions are the same.

The semantics are torch-fidelity's (`torch_fidelity/metric_kid.py`): the estimate is averaged
over `subsets` random subsets of `subset_size` vectors drawn without replacement from each set,
and the mean and the population standard deviation (ddof = 0) of the subset estimates are
reported. The subsets come from the same `np.random.RandomState(seed)` calls in the same order
(first real, then fake, per subset), so with the same seed and torch-fidelity's
`input1` = real, `input2` = fake the results are equal. Computed in float64.
"""

from __future__ import annotations

import numpy as np

from uvit_jax.evaluation.manifold import feature_pair

DEFAULT_SUBSETS = 100
DEFAULT_SUBSET_SIZE = 1000
# torch-fidelity's default `rng_seed`.
DEFAULT_SEED = 2020


def polynomial_kernel(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """[n, D] x [m, D] float64 -> [n, m] float64 kernel matrix (x.y / D + 1)^3.

    Degree 3, gamma = 1 / D and coef0 = 1 are KID's (and torch-fidelity's) defaults.
    """
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def unbiased_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 estimate between two equally sized samples [m, D], [m, D] (m >= 2).

    mean of k(x_i, x_j) and of k(y_i, y_j) over i != j (the diagonal k(x_i, x_i) would bias the
    within-set terms upwards), minus twice the mean of k(x_i, y_j) over all pairs.
    """
    m = x.shape[0]
    k_xx = polynomial_kernel(x, x)
    k_yy = polynomial_kernel(y, y)
    within = k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)
    return float(within / (m * (m - 1)) - 2.0 * polynomial_kernel(x, y).sum() / (m * m))


def kernel_inception_distance(
    real: np.ndarray,
    fake: np.ndarray,
    *,
    subsets: int = DEFAULT_SUBSETS,
    subset_size: int = DEFAULT_SUBSET_SIZE,
    seed: int = DEFAULT_SEED,
) -> tuple[float, float]:
    """KID between real and generated feature vectors, as torch-fidelity computes it.

    Args:
      real: [N_real, D] reference feature vectors (e.g. Inception pool features, 2048-d).
      fake: [N_fake, D] feature vectors of generated samples; any real dtype, computed in
        float64. Both sets need at least `subset_size` vectors.
      subsets: number of random subset pairs whose MMD^2 estimates are averaged.
      subset_size: vectors per subset (>= 2; the unbiased estimate excludes i = j pairs).
      seed: seed of the `np.random.RandomState` that draws the subsets.
    Returns:
      (kid_mean, kid_std): mean and population standard deviation of the subset estimates.
    """
    real, fake = feature_pair(real, fake)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1; got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2 for the unbiased estimate; got {subset_size}")
    for name, x in (("real", real), ("fake", fake)):
        if x.shape[0] < subset_size:
            raise ValueError(
                f"KID draws subset_size = {subset_size} vectors from each set, but {name} has "
                f"only {x.shape[0]}: lower subset_size to at most {x.shape[0]} or add vectors"
            )
    rng = np.random.RandomState(seed)
    estimates = np.empty(subsets, np.float64)
    for i in range(subsets):
        # Draw order matters for reproducing torch-fidelity's subsets: real first, then fake.
        x = real[rng.choice(real.shape[0], subset_size, replace=False)]
        y = fake[rng.choice(fake.shape[0], subset_size, replace=False)]
        estimates[i] = unbiased_mmd2(x, y)
    return float(estimates.mean()), float(estimates.std())
