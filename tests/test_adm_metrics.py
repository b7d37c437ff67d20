"""Improved precision/recall vs prdc, and KID vs torch-fidelity, on the same feature arrays."""

import numpy as np
import pytest

from uvit_jax.evaluation.kid import kernel_inception_distance
from uvit_jax.evaluation.manifold import knn_radii, precision_recall

ATOL = 1e-6


@pytest.fixture(scope="module")
def prdc():
    return pytest.importorskip("prdc", reason="the precision/recall reference is prdc")


@pytest.fixture(scope="module")
def kid_features_to_metric():
    module = pytest.importorskip(
        "torch_fidelity.metric_kid", reason="the KID reference is torch-fidelity"
    )
    return module.kid_features_to_metric


def _gaussians(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """400 real N(0, I) and 300 fake N(0.3, 1.44 I) vectors of dim 64."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(400, 64)), rng.normal(0.3, 1.2, size=(300, 64))


def _overlapping_clusters() -> tuple[np.ndarray, np.ndarray]:
    """Real from clusters {0, 1, 2, 3}, fake from {0, 1, 4}: the fake set misses half the real
    clusters (recall well below 1) and puts a third of its mass off the data (precision too)."""
    rng = np.random.default_rng(1)
    centres = rng.normal(scale=6.0, size=(5, 16))

    def mixture(clusters: list[int], n: int) -> np.ndarray:
        return centres[rng.choice(clusters, n)] + rng.normal(size=(n, 16))

    return mixture([0, 1, 2, 3], 400), mixture([0, 1, 4], 300)


# ---- precision and recall ------------------------------------------------------------------


@pytest.mark.parametrize("case", [_gaussians, _overlapping_clusters])
def test_precision_recall_match_prdc(case, prdc):
    real, fake = case()
    ours = precision_recall(real, fake)
    ref = prdc.compute_prdc(real, fake, nearest_k=3)
    assert abs(ours[0] - ref["precision"]) <= ATOL
    assert abs(ours[1] - ref["recall"]) <= ATOL
    if case is _overlapping_clusters:
        assert 0.2 < ours[0] < 0.8 and 0.2 < ours[1] < 0.8, ours


def test_radii_match_prdc(prdc):
    real, _ = _gaussians()
    ref = prdc.prdc.compute_nearest_neighbour_distances(real, nearest_k=3)
    np.testing.assert_allclose(knn_radii(real), ref, rtol=0, atol=ATOL)


def test_tiny_case_by_hand(prdc):
    # 1-D, k = 1, integer coordinates: every squared distance below is exact in float64.
    # real 0, 1, 2, 10, 11: each nearest other vector is 1 away -> radii 1, 1, 1, 1, 1;
    #   real manifold [-1, 3] u [9, 12].
    # fake 3, 5, 9, 20: nearest others 5, 3, 5, 9 -> radii 2, 2, 4, 11;
    #   fake manifold [1, 5] u [3, 7] u [5, 13] u [9, 31] = [1, 31].
    # precision: 3 (on 2's boundary) and 9 (on 10's boundary) are inside, 5 and 20 are not
    #   -> 2/4 = 0.5. recall: 1 (on 3's boundary), 2, 10, 11 are inside, 0 is not -> 4/5 = 0.8.
    real = np.array([[0.0], [1.0], [2.0], [10.0], [11.0]])
    fake = np.array([[3.0], [5.0], [9.0], [20.0]])
    np.testing.assert_array_equal(knn_radii(real, k=1), [1, 1, 1, 1, 1])
    np.testing.assert_array_equal(knn_radii(fake, k=1), [2, 2, 4, 11])
    assert precision_recall(real, fake, k=1) == (0.5, 0.8)
    # prdc's strict < leaves every boundary point out: 0/4 fake, 3/5 real (2, 10, 11) inside.
    # Continuous features never land exactly on a boundary, so the two agree on real data.
    ref = prdc.compute_prdc(real, fake, nearest_k=1)
    assert (ref["precision"], ref["recall"]) == (0.0, 0.6)


def test_duplicate_vectors_have_zero_radius():
    # Only the vector itself is excluded: an identical copy is a neighbour at distance 0.
    x = np.array([[0.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
    np.testing.assert_array_equal(knn_radii(x, k=1), [0.0, 0.0, 5.0])


def test_block_size_does_not_change_result():
    real, fake = _overlapping_clusters()
    np.testing.assert_allclose(
        knn_radii(real, block_size=7), knn_radii(real, block_size=10_000), rtol=1e-12
    )
    assert precision_recall(real, fake, block_size=7) == precision_recall(
        real, fake, block_size=10_000
    )


def test_precision_recall_errors():
    real, fake = _gaussians()
    with pytest.raises(ValueError, match=r"fake features: need at least k \+ 1 = 4 vectors"):
        precision_recall(real, fake[:3])
    with pytest.raises(ValueError, match=r"real features: need at least k \+ 1 = 6 vectors"):
        precision_recall(real[:5], fake, k=5)
    with pytest.raises(ValueError, match="same feature dimension; got 64 \\(real\\) and 32"):
        precision_recall(real, fake[:, :32])
    with pytest.raises(ValueError, match=r"must be a 2-D array .* got shape \(64,\)"):
        precision_recall(real[0], fake)
    bad = fake.copy()
    bad[5, 7] = np.nan
    with pytest.raises(ValueError, match="fake features contain non-finite values"):
        precision_recall(real, bad)


# ---- KID -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("subsets", "subset_size"), [(10, 50), (1, 300)])
def test_kid_matches_torch_fidelity(subsets, subset_size, kid_features_to_metric):
    import torch  # torch-fidelity's own dependency (the fixture skips without it)

    # Unequal set sizes, so that drawing real before fake (the subset order) matters.
    real, fake = _gaussians()
    ours = kernel_inception_distance(real, fake, subsets=subsets, subset_size=subset_size, seed=7)
    # float64 tensors, so that torch-fidelity's numpy arithmetic runs in float64 as ours does.
    ref = kid_features_to_metric(
        torch.from_numpy(real),
        torch.from_numpy(fake),
        kid_subsets=subsets,
        kid_subset_size=subset_size,
        rng_seed=7,
        verbose=False,
    )
    assert abs(ours[0] - ref["kernel_inception_distance_mean"]) <= ATOL
    assert abs(ours[1] - ref["kernel_inception_distance_std"]) <= ATOL
    assert ours[0] > 0.1  # the sets differ: a value to compare, not a 0 = 0


def test_kid_near_zero_for_same_distribution_and_positive_for_shift():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(500, 64)), rng.normal(size=(500, 64))
    same, _ = kernel_inception_distance(a, b, subsets=10, subset_size=200)
    shifted, _ = kernel_inception_distance(a, b + 0.5, subsets=10, subset_size=200)
    # Mean shift 0.5 per dimension: |mu_a - mu_b|^2 / D = 0.25, so MMD^2 is of order 1.
    assert shifted > 0.5
    assert abs(same) < 0.02 * shifted


def test_kid_errors():
    real, fake = _gaussians()
    with pytest.raises(ValueError, match="fake has only 300: lower subset_size to at most 300"):
        kernel_inception_distance(real, fake, subset_size=301)
    with pytest.raises(ValueError, match="same feature dimension"):
        kernel_inception_distance(real, fake[:, :10], subset_size=50)
