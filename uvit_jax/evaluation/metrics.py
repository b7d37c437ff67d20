"""From Inception outputs to the ADM evaluator's metrics: FID, sFID, IS, precision, recall, KID.

Typical use (every process calls each function the same number of times)::

    features = make_feature_fn(load_inception(path), mesh)           # evaluation/features.py
    samples = feature_set(batches, features).gather()                # all processes' images
    result = evaluation_metrics(samples, load_reference(ref_path))   # evaluation/reference.py

A `FeatureSet` keeps what each metric needs and nothing more: streaming float64 moments of the
pool3 (FID) and spatial (sFID) features, the logits (Inception Score) and, for the k-NN metrics
(precision/recall, KID), the pool3 vectors themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import jax
import numpy as np

from uvit_jax.evaluation import kid, manifold
from uvit_jax.evaluation.features import FeatureFn
from uvit_jax.evaluation.statistics import (
    FeatureMoments,
    allgather_moments,
    frechet_distance,
    inception_score,
)
from uvit_jax.models.inception import FEATURE_DIM, NUM_CLASSES, SPATIAL_DIM


def _allgather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenates every process's rows [n_i, ...] (counts may differ) in process order."""
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.asarray([x.shape[0]], np.int32)))
    counts = counts.reshape(-1)
    padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
    padded[: x.shape[0]] = x
    stacked = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([stacked[i, :c] for i, c in enumerate(counts)])


def _concat(parts: list[np.ndarray | None]) -> np.ndarray | None:
    if all(p is None for p in parts):
        return None
    if any(p is None for p in parts):
        raise ValueError("cannot merge feature sets that keep different outputs")
    return np.concatenate(parts)


@dataclasses.dataclass(frozen=True)
class FeatureSet:
    """What an evaluation keeps of a set of images' Inception outputs.

    pool: moments of pool3 [2048] (FID). spatial: moments of the spatial features [2023] (sFID).
    logits: [N, 1008] float32 for the Inception Score; None for a network without its head.
    pool_features: [N, 2048] float32 pool3 vectors for precision/recall and KID; None when not
    kept (they cost 8 KiB per image).
    """

    pool: FeatureMoments
    spatial: FeatureMoments
    logits: np.ndarray | None
    pool_features: np.ndarray | None

    @classmethod
    def empty(cls, *, logits: bool, keep_features: bool = True) -> FeatureSet:
        return cls(
            FeatureMoments.empty(FEATURE_DIM),
            FeatureMoments.empty(SPATIAL_DIM),
            np.zeros((0, NUM_CLASSES), np.float32) if logits else None,
            np.zeros((0, FEATURE_DIM), np.float32) if keep_features else None,
        )

    @classmethod
    def of(cls, outputs: Mapping[str, np.ndarray], *, keep_features: bool = True) -> FeatureSet:
        """From one batch of `FeatureFn` outputs ("pool3", "spatial", optionally "logits")."""
        pool3 = np.asarray(outputs["pool3"], np.float32)
        logits = outputs.get("logits")
        return cls(
            FeatureMoments.of(pool3),
            FeatureMoments.of(outputs["spatial"]),
            None if logits is None else np.asarray(logits, np.float32),
            pool3 if keep_features else None,
        )

    @property
    def n(self) -> int:
        return self.pool.n

    @classmethod
    def merge_all(cls, sets: Iterable[FeatureSet]) -> FeatureSet:
        """The sets' images together, rows in order (arrays concatenated once, not per set)."""
        sets = list(sets)
        if not sets:
            raise ValueError("no feature sets to merge")
        pool, spatial = sets[0].pool, sets[0].spatial
        for s in sets[1:]:
            pool, spatial = pool.merge(s.pool), spatial.merge(s.spatial)
        return cls(
            pool,
            spatial,
            _concat([s.logits for s in sets]),
            _concat([s.pool_features for s in sets]),
        )

    def gather(self) -> FeatureSet:
        """Every process's set merged (rows in process order). Collective: every process calls
        it; a no-op in a single process."""
        if jax.process_count() == 1:
            return self
        return FeatureSet(
            allgather_moments(self.pool),
            allgather_moments(self.spatial),
            None if self.logits is None else _allgather_rows(self.logits),
            None if self.pool_features is None else _allgather_rows(self.pool_features),
        )


def feature_set(
    image_batches: Iterable[np.ndarray],
    feature_fn: FeatureFn,
    *,
    pad_to: int | None = None,
    keep_features: bool = True,
    start: FeatureSet | None = None,
) -> FeatureSet:
    """Streams this process's uint8 image batches [b, H, W, 3] through the Inception network.

    Args:
      image_batches: b may vary (the last batch may be short). In a multi-process run every
        process must yield the same number of batches, each one collective program.
      feature_fn: `uvit_jax.evaluation.features.make_feature_fn(model, mesh)`.
      pad_to: local batch size every call is padded to, so that one program is compiled;
        default the first batch's size.
      keep_features: keep the pool3 vectors (precision/recall, KID).
      start: a set to continue (this process's, never a gathered one).
    Returns:
      This process's `FeatureSet` (call `.gather()` for all processes').
    """
    sets = [] if start is None else [start]
    for images in image_batches:
        if pad_to is None:
            pad_to = len(images)
        outputs = feature_fn(images, pad_to=pad_to)
        sets.append(FeatureSet.of(outputs, keep_features=keep_features))
    return FeatureSet.merge_all(sets)


def evaluation_metrics(
    samples: FeatureSet,
    reference,
    *,
    min_samples: int | None = None,
    nearest_k: int = 3,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    splits: int = 10,
) -> dict[str, float]:
    """The metrics `samples` and `reference` (a `uvit_jax.evaluation.reference.Reference`)
    support, against each other.

    Always FID (pool3 moments); sFID when the reference has spatial statistics; the Inception
    Score (`splits` chunks) when the samples have logits; improved precision and recall
    (`nearest_k` neighbours) and KID (`kid_subsets` subsets of min(`kid_subset_size`, both set
    sizes) vectors) when both keep pool3 vectors.

    Args:
      min_samples: refuse fewer samples (default the 2048 feature dimensions; lower it only for
        tests with tiny sample counts).
    Returns:
      {"fid", "num_samples"} plus any of "sfid", "inception_score", "inception_score_std",
      "precision", "recall", "kid", "kid_std", "kid_subset_size", all floats.
    """
    mu, sigma = samples.pool.mean_cov(min_samples)
    result = {
        "fid": frechet_distance(mu, sigma, reference.mu, reference.sigma),
        "num_samples": float(samples.n),
    }
    if reference.mu_s is not None:
        mu_s, sigma_s = samples.spatial.mean_cov(min_samples)
        result["sfid"] = frechet_distance(mu_s, sigma_s, reference.mu_s, reference.sigma_s)
    if samples.logits is not None:
        result["inception_score"], result["inception_score_std"] = inception_score(
            samples.logits, splits
        )
    if samples.pool_features is not None and reference.features is not None:
        real, fake = reference.features, samples.pool_features
        result["precision"], result["recall"] = manifold.precision_recall(real, fake, nearest_k)
        size = min(kid_subset_size, len(real), len(fake))
        result["kid"], result["kid_std"] = kid.kernel_inception_distance(
            real, fake, subsets=kid_subsets, subset_size=size
        )
        result["kid_subset_size"] = float(size)
    return result
