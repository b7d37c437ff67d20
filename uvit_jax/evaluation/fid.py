"""From uint8 image batches to FID / IS: the glue the eval job and `--mode fid_stats` call.

Typical use (one call per process in a multi-process run)::

    model = load_inception(config.eval.inception_path)
    features = make_feature_fn(model, mesh)
    moments, logits = compute_activation_statistics(batches, features)  # all processes
    result = fid_and_inception_score(moments, logits, *load_stats(config.eval.ref_stats))
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import numpy as np

from uvit_jax.evaluation.statistics import (
    FeatureMoments,
    allgather_moments,
    frechet_distance,
    inception_score,
)
from uvit_jax.models.inception import NUM_CLASSES, FeatureFn


def _allgather_rows(x: np.ndarray) -> np.ndarray:
    """Concatenates every process's rows [n_i, ...] (counts may differ) in process order."""
    from jax.experimental import multihost_utils

    counts = np.asarray(multihost_utils.process_allgather(np.asarray([x.shape[0]], np.int32)))
    counts = counts.reshape(-1)
    padded = np.zeros((int(counts.max()), *x.shape[1:]), x.dtype)
    padded[: x.shape[0]] = x
    stacked = np.asarray(multihost_utils.process_allgather(padded))
    return np.concatenate([stacked[i, :c] for i, c in enumerate(counts)])


def compute_activation_statistics(
    image_batches: Iterable[np.ndarray],
    feature_fn: FeatureFn,
    *,
    pad_to: int | None = None,
    keep_logits: bool = True,
    moments: FeatureMoments | None = None,
    gather: bool = True,
) -> tuple[FeatureMoments, np.ndarray | None]:
    """Streams image batches through the Inception network and accumulates pool3 moments.

    Args:
      image_batches: this process's batches, uint8 [b, H, W, 3] (b may vary; the last batch
        may be short). In a multi-process run every process must yield the same number of
        batches (each batch is one collective program); pad with fewer real images if needed.
      feature_fn: `uvit_jax.models.inception.make_feature_fn(model, mesh)`.
      pad_to: local batch size every call is padded to (then up to a multiple of the local
        device count), so that one program is compiled; default the first batch's size.
      keep_logits: also return the 1008-class logits (for the Inception Score).
      moments: this process's moments to continue from (a resumed evaluation: pass what an
        earlier `gather=False` call returned, never gathered moments); default empty.
      gather: combine all processes' results (`gather_statistics`). With False, return this
        process's own moments and logits, e.g. to checkpoint them and gather at the end.

    Returns:
      (moments, logits [N, 1008] float32 or None): over all processes' images, in process order
      (gather=True), or over this process's images (gather=False).
    """
    total = moments
    logits_parts = []
    for images in image_batches:
        if pad_to is None:
            pad_to = len(images)
        pool3, logits = feature_fn(images, pad_to=pad_to)
        batch = FeatureMoments.of(pool3)
        total = batch if total is None else total.merge(batch)
        if keep_logits:
            logits_parts.append(logits)
    if total is None:
        total = FeatureMoments.empty()
    all_logits = None
    if keep_logits:
        all_logits = (
            np.concatenate(logits_parts) if logits_parts else np.zeros((0, NUM_CLASSES), np.float32)
        )
    return gather_statistics(total, all_logits) if gather else (total, all_logits)


def gather_statistics(
    moments: FeatureMoments, logits: np.ndarray | None
) -> tuple[FeatureMoments, np.ndarray | None]:
    """Every process's moments merged, and logits concatenated in process order (collective:
    all processes must call it; a no-op in a single process)."""
    if jax.process_count() == 1:
        return moments, logits
    return allgather_moments(moments), None if logits is None else _allgather_rows(logits)


def fid_and_inception_score(
    moments: FeatureMoments,
    logits: np.ndarray | None,
    ref_mu: np.ndarray,
    ref_sigma: np.ndarray,
    *,
    min_samples: int | None = None,
    splits: int = 10,
) -> dict[str, float]:
    """FID against reference statistics and, when logits are given, the Inception Score.

    Args:
      min_samples: refuse fewer samples (default the 2048 feature dimensions; lower it only
        for tests with tiny sample counts).
    Returns:
      {"fid", "num_samples"} plus {"inception_score", "inception_score_std"} with logits.
    """
    mu, sigma = moments.mean_cov(min_samples)
    result = {
        "fid": frechet_distance(mu, sigma, ref_mu, ref_sigma),
        "num_samples": float(moments.n),
    }
    if logits is not None:
        result["inception_score"], result["inception_score_std"] = inception_score(logits, splits)
    return result
