"""The evaluation jobs: `--mode eval` (FID / IS of a checkpoint), `--mode fid_stats` (reference
statistics of the config's dataset), `--mode convert_inception`, and FID during training.

Samples go the same way as the paper's: the config's sampler and guidance on the EMA weights,
decode, quantise (U-ViT's clamp, x*255 + 0.5), Inception pool3 features, streaming float64
moments. `--mode eval` keeps its per-process moments in `workdir/eval/` as it goes, so a
preempted evaluation continues where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from etils import epath

from uvit_jax.evaluation.fid import (
    compute_activation_statistics,
    fid_and_inception_score,
    gather_statistics,
)
from uvit_jax.evaluation.reference import load_stats, save_stats
from uvit_jax.evaluation.statistics import FeatureMoments
from uvit_jax.parallel.mesh import batch_sharding, batch_size_per_shard, make_mesh
from uvit_jax.sampling.prompts import CaptionSampler

ImagesFn = Callable[[int], np.ndarray]  # batch index -> this process's uint8 images


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


def make_sample_batches(
    config, graphdef, params, mesh, *, seed: int, captions: CaptionSampler | None = None
) -> ImagesFn:
    """images(i) -> this process's uint8 samples of global batch i (config.eval.batch_size).

    Batch i uses the key fold_in(key(seed), i): the same images on any device count.
    Text-to-image models take the contexts of samples i B, ..., (i + 1) B - 1 from `captions`.
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

    def images(i: int) -> np.ndarray:
        conditions = {}
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


def fid_of_samples(
    config,
    graphdef,
    params,
    mesh,
    feature_fn,
    ref,
    num_samples: int,
    *,
    seed: int = 0,
    captions: CaptionSampler | None = None,
) -> dict[str, float]:
    """FID / IS of `num_samples` fresh samples (FID during training; no resume)."""
    images = make_sample_batches(config, graphdef, params, mesh, seed=seed, captions=captions)
    n_batches = -(-num_samples // int(config.eval.batch_size))
    moments, logits = compute_activation_statistics(
        (images(i) for i in range(n_batches)), feature_fn
    )
    return fid_and_inception_score(moments, logits, *ref, min_samples=_min_samples(config))


def _min_samples(config) -> int:
    return int(config.eval.get("min_samples", 2048))


def inception_features(config, mesh):
    from uvit_jax.convert.inception import load_inception
    from uvit_jax.models.inception import make_feature_fn

    return make_feature_fn(load_inception(config.eval.inception_path), mesh)


# ---- --mode eval ---------------------------------------------------------------------------


def _progress(done: int, total: int, start: float, first: int) -> None:
    rate = (done - first) / max(time.perf_counter() - start, 1e-9)
    eta = (total - done) / rate if rate > 0 else float("inf")
    logging.info("eval: %d/%d batches, %.2f batches/s, ETA %.0f s", done, total, rate, eta)


def evaluate(config, workdir: str) -> dict[str, float]:
    """FID and IS of the latest checkpoint's EMA weights; writes `eval/result_<step>.json`."""
    from uvit_jax.api import load

    mesh = make_mesh(config.mesh)
    loaded = load(workdir, mesh=mesh)
    run_config = loaded.config
    run_config.unlock().update(eval=config.eval, sample=config.sample)
    if not config.eval.ref_stats:
        raise ValueError(
            "--mode eval needs reference statistics: --config.eval.ref_stats=<.npz> "
            "(make them with --mode fid_stats)"
        )
    ref = load_stats(config.eval.ref_stats)
    feature_fn = inception_features(config, mesh)
    from input_pipeline.extract import resolve_latent_dir

    captions = caption_sampler(run_config, resolve_latent_dir(config, workdir), config.seed)
    images = make_sample_batches(
        run_config, loaded.graphdef, loaded.params, mesh, seed=config.seed, captions=captions
    )

    n_batches = -(-int(config.eval.num_samples) // int(config.eval.batch_size))
    out = epath.Path(workdir) / "eval" / f"step_{loaded.step}"
    out.mkdir(parents=True, exist_ok=True)
    partial = out / f"moments_process{jax.process_index()}.npz"
    moments, logits, first = None, np.zeros((0, 1008), np.float32), 0
    if partial.exists():
        with np.load(os.fspath(partial)) as f:
            moments = FeatureMoments.from_arrays(f)
            logits, first = f["logits"], int(f["batches"])
        logging.info("eval: resuming after %d of %d batches", first, n_batches)
    start = time.perf_counter()
    for i in range(first, n_batches):
        moments, batch_logits = compute_activation_statistics(
            [images(i)], feature_fn, moments=moments, gather=False
        )
        logits = np.concatenate([logits, batch_logits])
        tmp = out / f"moments_process{jax.process_index()}.tmp.npz"
        np.savez(os.fspath(tmp), **moments.to_arrays(), logits=logits, batches=i + 1)
        os.replace(os.fspath(tmp), os.fspath(partial))
        _progress(i + 1, n_batches, start, first)
    moments, logits = gather_statistics(moments, logits)
    result = fid_and_inception_score(moments, logits, *ref, min_samples=_min_samples(config))
    result.update(
        step=loaded.step,
        sampler=run_config.sample.sampler,
        steps=run_config.sample.steps,
        cfg_scale=run_config.sample.cfg_scale,
    )
    if jax.process_index() == 0:
        (out.parent / f"result_step_{loaded.step}.json").write_text(json.dumps(result, indent=2))
        from clu import metric_writers

        writer = metric_writers.create_default_writer(workdir)
        writer.write_scalars(
            loaded.step, {f"eval/{k}": v for k, v in result.items() if isinstance(v, float)}
        )
        writer.flush()
    logging.info("eval at step %d: %s", loaded.step, result)
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
    """Reference statistics of the config's dataset -> config.eval.ref_stats (or workdir)."""
    mesh = make_mesh(config.mesh)
    per_process = int(config.eval.batch_size) // jax.process_count()
    limit = int(config.eval.get("ref_num_images", 0))
    batches, n = dataset_batches(config, per_process, limit)
    logging.info("fid_stats: %d images of %s", n, config.data.name or config.data.source)
    moments, _ = compute_activation_statistics(
        batches, inception_features(config, mesh), pad_to=per_process, keep_logits=False
    )
    mu, sigma = moments.mean_cov(_min_samples(config))
    path = config.eval.ref_stats or os.path.join(workdir, "fid_stats.npz")
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_stats(path, mu, sigma, num_samples=moments.n)
    logging.info("fid_stats: wrote %s (%d images)", path, moments.n)
    return path


def convert_inception(config, workdir: str) -> str:
    """pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` -> config.eval.inception_path."""
    from uvit_jax.convert.inception import convert_inception as convert

    if not config.convert.source or not config.eval.inception_path:
        raise ValueError(
            "--mode convert_inception needs --config.convert.source=<pt_inception-"
            "2015-12-05-6726825d.pth> and --config.eval.inception_path=<out.npz>"
        )
    del workdir
    return convert(config.convert.source, config.eval.inception_path)
