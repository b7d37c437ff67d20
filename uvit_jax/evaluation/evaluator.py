"""The metrics of a model's fresh samples: what `--mode eval` and FID during training share.

Samples go the same way as the paper's: the config's sampler and guidance on the EMA weights,
decode, quantise (U-ViT's clamp, x*255 + 0.5), Inception features, streaming float64 moments,
then the metrics against a reference file whose features were made the same way (the same
Inception weights and input protocol, checked when the reference records them).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from uvit_jax.conditioning import Conditioning
from uvit_jax.convert.inception import inception_info, load_inception, resolve_inception_path
from uvit_jax.errors import ConfigError
from uvit_jax.evaluation.features import FeatureFn, make_feature_fn
from uvit_jax.evaluation.metrics import FeatureSet, evaluation_metrics, feature_set
from uvit_jax.evaluation.reference import Reference, load_reference
from uvit_jax.images import to_rgb, to_uint8
from uvit_jax.latent_codec import autoencoder_from_config
from uvit_jax.parallel.mesh import batch_sharding, batch_size_per_shard
from uvit_jax.sampling.generate import sample_images
from uvit_jax.sampling.prompts import CaptionSampler

ImagesFn = Callable[[int], np.ndarray]  # batch index -> this process's uint8 images
LABEL_MODES = ("balanced", "random")


def _local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a global batch-sharded array (row order is irrelevant to moments)."""
    if jax.process_count() == 1:
        return np.asarray(jax.device_get(x))
    shards = sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0)
    seen, rows = set(), []
    for s in shards:
        start = s.index[0].start or 0
        if start not in seen:  # replicas over non-batch axes hold the same rows
            seen.add(start)
            rows.append(np.asarray(s.data))
    return np.concatenate(rows)


# ---- the Inception side: weights, protocol, reference ---------------------------------------


@dataclasses.dataclass(frozen=True)
class Evaluator:
    """The FID network ready to run, what identifies its features, and the reference.

    feature_fn: `make_feature_fn` over the job's mesh. features: the protocol record of the
    features (`features_protocol`). reference: the loaded reference, None for `--mode
    fid_stats` (which makes one).
    """

    feature_fn: FeatureFn
    inception: dict[str, Any]
    features: dict[str, Any]
    reference: Reference | None


def features_protocol(config, inception: dict[str, Any]) -> dict[str, Any]:
    """What the features depend on besides the images: the network and its input protocol."""
    return dict(
        inception_feature_sha256=inception["feature_sha256"],
        inception_source=inception["source"],
        input_protocol=config.eval.get("protocol", "pytorch_fid"),
    )


def check_reference_protocol(reference: Reference, ours: dict[str, Any]) -> None:
    """Refuses a reference whose features came from another network or input protocol.

    A reference made elsewhere (pytorch-fid, ADM) records no protocol: it is used with a
    warning, and the fingerprint says so.
    """
    theirs = reference.protocol
    if theirs is None:
        logging.warning(
            "%s records no protocol (made outside uvit_jax): assuming its features follow ours "
            "(%s input, Inception %s)",
            reference.path,
            ours["input_protocol"],
            ours["inception_source"],
        )
        return
    for key in ("input_protocol", "inception_feature_sha256"):
        if theirs.get(key) != ours[key]:
            raise ConfigError(
                f"{reference.path} was made with {key}={theirs.get(key)!r}, but this evaluation "
                f"uses {key}={ours[key]!r}: FIDs across the two are not comparable. Remake the "
                "reference with --mode fid_stats under this config, or set config.eval.protocol "
                "/ config.eval.inception_path to the reference's"
            )


def make_evaluator(config, mesh, *, with_reference: bool = True) -> Evaluator:
    """Loads (importing once if needed) the Inception weights of config.eval.inception_path
    and, with_reference, config.eval.ref_stats, checking that the two match."""
    reference = None
    if with_reference:
        if not config.eval.ref_stats:
            raise ConfigError(
                "evaluation needs a reference: --config.eval.ref_stats=<.npz> "
                "(make one with --mode fid_stats)"
            )
        reference = load_reference(config.eval.ref_stats)
    path = resolve_inception_path(config.eval.inception_path)
    inception = inception_info(path)
    features = features_protocol(config, inception)
    if reference is not None:
        check_reference_protocol(reference, features)
    feature_fn = make_feature_fn(load_inception(path), mesh, features["input_protocol"])
    return Evaluator(feature_fn, inception, features, reference)


# ---- samples -----------------------------------------------------------------------------


def label_mode(config) -> str:
    """How class labels of the evaluated samples are chosen ("balanced", "random"), or what
    conditions a model without labels ("captions", "unconditional")."""
    kind = Conditioning.from_config(config).kind
    if kind == "text":
        return "captions"
    if kind == "none":
        return "unconditional"
    mode = config.eval.get("labels", "balanced")
    if mode not in LABEL_MODES:
        raise ConfigError(f"config.eval.labels={mode!r}; expected one of {LABEL_MODES}")
    return mode


def make_sample_batches(
    config,
    graphdef,
    params,
    mesh,
    *,
    seed: int,
    captions: CaptionSampler | None = None,
    guide: tuple[Any, Any] | None = None,
) -> ImagesFn:
    """images(i) -> this process's uint8 samples of global batch i (config.eval.batch_size).

    Batch i uses the key fold_in(key(seed), i): the same images on any device count.
    Class models draw balanced labels (`config.eval.labels`, default) or random ones; text-to-
    image models take the contexts of samples i B, ..., (i + 1) B - 1 from `captions`.
    `guide`: autoguidance's guide model (graphdef, params), as `sample_images` takes it.
    """
    global_batch = int(config.eval.batch_size)
    batch_size_per_shard(mesh, global_batch, field="config.eval.batch_size")
    decode = None
    if config.autoencoder.kind != "identity":
        decode = autoencoder_from_config(config, mesh).decode
    sharding = batch_sharding(mesh)
    base = jax.random.key(seed)
    conditioning = Conditioning.from_config(config)
    if (conditioning.kind == "text") != (captions is not None):
        raise ValueError("text-to-image models (and only they) sample with captions")
    balanced = label_mode(config) == "balanced"

    def images(i: int) -> np.ndarray:
        conditions = {}
        if balanced:
            conditions["labels"] = conditioning.labels(global_batch, first=i * global_batch)
        if captions is not None:
            conditions = dict(
                contexts=captions.contexts(i * global_batch, global_batch),
                null_context=captions.null_context,
            )
        with jax.set_mesh(mesh):
            x = sample_images(
                graphdef,
                params,
                config,
                jax.random.fold_in(base, i),
                num=global_batch,
                sharding=sharding,
                decode=decode,
                guide=guide,
                **conditions,
            )
        return to_rgb(to_uint8(_local_rows(x)))

    return images


def caption_sampler(config, dataset_dir: str | None, seed: int) -> CaptionSampler | None:
    """Text-to-image models: the captions of `config.eval.context_dir` (MS-COCO val), else of
    `dataset_dir` (the training data); None for other models."""
    conditioning = Conditioning.from_config(config)
    if conditioning.kind != "text":
        return None
    directory = config.eval.get("context_dir", "") or dataset_dir
    if not directory:
        raise ConfigError(
            "FID of a text-to-image model needs captions: set config.eval.context_dir to an "
            "extracted dataset (e.g. MS-COCO val, --mode extract with data.split=val)"
        )
    return CaptionSampler(directory, seed, conditioning.context_shape)


def metrics_of_samples(
    config,
    graphdef,
    params,
    mesh,
    evaluator: Evaluator,
    num_samples: int,
    *,
    seed: int = 0,
    captions: CaptionSampler | None = None,
) -> dict[str, float]:
    """The metrics of `num_samples` fresh samples against the evaluator's reference (FID during
    training; no resume)."""
    images = make_sample_batches(config, graphdef, params, mesh, seed=seed, captions=captions)
    n_batches = -(-num_samples // int(config.eval.batch_size))
    samples = feature_set((images(i) for i in range(n_batches)), evaluator.feature_fn).gather()
    return metrics(config, samples, evaluator.reference)


def metrics(config, samples: FeatureSet, reference: Reference) -> dict[str, float]:
    """FID, sFID, IS, precision/recall and KID of `samples` against `reference`, with the
    config's neighbourhood and subset sizes."""
    return evaluation_metrics(
        samples,
        reference,
        min_samples=min_samples(config),
        nearest_k=int(config.eval.get("nearest_k", 3)),
        kid_subsets=int(config.eval.get("kid_subsets", 100)),
        kid_subset_size=int(config.eval.get("kid_subset_size", 1000)),
    )


def min_samples(config) -> int:
    """The fewest samples an FID may use (`config.eval.min_samples`)."""
    return int(config.eval.get("min_samples", 2048))


def check_sample_count(config, field: str) -> None:
    """Refuses, before any sampling, a count `config.eval.<field>` that FID cannot use: below
    `min_samples`, or not whole batches of `config.eval.batch_size` (samples come in whole
    batches, so the last one would add samples the result's fingerprint does not count)."""
    n, batch = int(config.eval[field]), int(config.eval.batch_size)
    if n < min_samples(config):
        raise ConfigError(
            f"config.eval.{field}={n} is below config.eval.min_samples={min_samples(config)}: "
            "FID needs at least as many samples as feature dimensions (2048)"
        )
    if n % batch:
        raise ConfigError(
            f"config.eval.{field}={n} is not a multiple of config.eval.batch_size={batch}: "
            f"use {n // batch * batch or batch} or {(n // batch + 1) * batch}, or another "
            "batch size"
        )
