"""The evaluation jobs: `--mode eval` (FID, sFID, IS, precision/recall, KID of a checkpoint)
and `--mode fid_stats` (a reference file of the config's dataset).

Every number is written with a protocol fingerprint (sample count, reference file and digest,
Inception weights, input protocol, quantisation, sampler, guidance and its kind, autoguidance's
guide checkpoint, weights, seed, labels, config digest), and `--mode eval` refuses a reference
whose features were made another way.
`--mode eval` keeps each batch's features in `workdir/eval/step_<N>/<settings digest>/`, so a
preempted evaluation continues where it stopped, and one with other settings starts afresh.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
import numpy as np
from etils import epath

from input_pipeline.extract import resolve_latent_dir
from input_pipeline.preprocess import make_preprocessor
from input_pipeline.sources import load_image, make_source
from uvit_jax.api import load, load_guide
from uvit_jax.convert.inception import sha256_of
from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.errors import ConfigError
from uvit_jax.evaluation.evaluator import (
    Evaluator,
    caption_sampler,
    check_sample_count,
    label_mode,
    make_evaluator,
    make_sample_batches,
    metrics,
)
from uvit_jax.evaluation.metrics import FeatureSet, feature_set
from uvit_jax.evaluation.reference import save_reference
from uvit_jax.images import QUANTISATION, to_rgb
from uvit_jax.parallel.mesh import make_mesh
from uvit_jax.sampling.generate import (
    cfg_interval_from_config,
    cfg_schedule_from_config,
    guidance_from_config,
    guide_checkpoint_of,
)


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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


def _trained_sha256(config) -> str:
    """The digest of what a checkpoint's config says about its training (not eval, sample)."""
    trained = {k: v for k, v in config.to_dict().items() if k not in ("eval", "sample")}
    return _sha256_text(json.dumps(trained, sort_keys=True, default=str))


def _guide_record(run_config, guide) -> dict[str, Any] | None:
    """Autoguidance's guide in a fingerprint: the checkpoint as given, the step it resolved to
    (a workdir alone names its newest), the digest of its training config; None without one."""
    if guide is None:
        return None
    return dict(
        checkpoint=guide_checkpoint_of(run_config),
        step=int(guide.step),
        config_sha256=_trained_sha256(guide.config),
    )


def fingerprint(config, run_config, evaluator: Evaluator, loaded, guide=None) -> dict[str, Any]:
    """Everything a reader needs to know what an eval number measures (and to compare two).

    `config` is the job's (eval/sample settings), `run_config` the checkpoint's own config
    with those settings applied, `loaded` the restored checkpoint, `guide` autoguidance's
    restored guide (None without one): its checkpoint as given, its step and config digest.
    """
    ref = evaluator.reference
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
        # What the model was trained to predict, on which path: a reference made for another
        # objective still compares (FID compares images), and this shows the difference.
        objective=Formulation.from_config(run_config).describe(),
        sampler=run_config.sample.sampler,
        steps=int(run_config.sample.steps),
        cfg_scale=float(run_config.sample.cfg_scale),
        cfg_interval=list(cfg_interval_from_config(run_config) or ()),
        cfg_schedule=cfg_schedule_from_config(run_config),
        guidance=guidance_from_config(run_config),
        guide=_guide_record(run_config, guide),
        grid=str(run_config.sample.get("grid", "") or "sampler's own"),
        thresholding=bool(run_config.sample.get("thresholding", False)),
        denoise_to_zero=bool(run_config.sample.get("denoise_to_zero", False)),
        weights=loaded.weights,
        step=int(loaded.step),
        seed=int(config.seed),
        labels=label_mode(run_config),
        batch_size=int(config.eval.batch_size),
        config_sha256=_trained_sha256(loaded.config),
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


def evaluate_loaded(
    config, workdir: str, loaded, evaluator: Evaluator, mesh, guide=None
) -> dict[str, Any]:
    """The metrics of `loaded`'s weights sampled with `config.sample` (and `config.eval`'s
    count, labels and seed), as a dict with "step", "seconds" and the "protocol" fingerprint.
    `guide`: autoguidance's guide when the caller has read it (a sweep reads each once);
    None: `load_guide` reads the one `config.sample` names, if it names one.

    Features are kept per batch in `workdir/eval/step_<N>/<settings digest>/`, so an interrupted
    evaluation resumes there, and a finished one with the same fingerprint is read back from its
    `result.json` without sampling.
    """
    start = time.perf_counter()
    run_config = loaded.config.copy_and_resolve_references()
    run_config.update(eval=config.eval, sample=config.sample)
    if guide is None:
        guide = load_guide(loaded, run_config)
    fp = fingerprint(config, run_config, evaluator, loaded, guide)
    folder = epath.Path(workdir) / "eval" / f"step_{loaded.step}" / _settings_digest(fp)
    if (folder / "result.json").exists():
        done = json.loads((folder / "result.json").read_text())
        if done.get("protocol") == fp:
            logging.info("eval: %s holds this evaluation's result", folder)
            return done
    captions = caption_sampler(run_config, resolve_latent_dir(config, workdir), config.seed)
    images = make_sample_batches(
        run_config,
        loaded.graphdef,
        loaded.params,
        mesh,
        seed=config.seed,
        captions=captions,
        guide=None if guide is None else (guide.graphdef, guide.params),
    )
    n_batches = -(-int(config.eval.num_samples) // int(config.eval.batch_size))
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
    result: dict[str, Any] = metrics(config, samples, evaluator.reference)
    # Wall time of the run that finished it (sampling, features, metrics; after a resume, the
    # resumed part only).
    result.update(step=loaded.step, seconds=round(time.perf_counter() - start, 1), protocol=fp)
    if jax.process_index() == 0:
        (folder / "result.json").write_text(json.dumps(result, indent=2))
    return result


def weights_choice(config) -> tuple[bool, float]:
    """(ema, ema_std) of the weights eval and sweep measure: the latest checkpoint's EMA, its
    raw weights (config.eval.ema=False) or the post-hoc EMA of config.sample.ema_std."""
    ema, std = bool(config.eval.get("ema", True)), float(config.sample.get("ema_std", 0.0))
    if std and not ema:
        raise ConfigError(
            f"config.sample.ema_std={std:g} with config.eval.ema=False: a post-hoc EMA is EMA "
            "weights (set one of them)"
        )
    return ema, std


def load_weights(config, workdir: str, mesh) -> Any:
    """The weights of `weights_choice(config)`, loaded onto `mesh`."""
    ema, std = weights_choice(config)
    return load(workdir, mesh=mesh, ema=ema, ema_std=std)


def eval_job(config, workdir: str) -> dict[str, Any]:
    """The metrics of the latest checkpoint's EMA (or raw: config.eval.ema=False; or the
    post-hoc EMA of config.sample.ema_std) weights; writes `eval/result_step_<N>.json`
    (`result_step_<N>_ema_std_<std>.json`: metrics + "protocol" fingerprint) and TensorBoard
    (`eval/<metric>`, `eval_ema_std_<std>/<metric>`)."""
    check_sample_count(config, "num_samples")
    mesh = make_mesh(config.mesh)
    evaluator = make_evaluator(config, mesh)
    loaded = load_weights(config, workdir, mesh)
    result = evaluate_loaded(config, workdir, loaded, evaluator, mesh)
    suffix = f"_ema_std_{loaded.ema_std:g}" if loaded.ema_std else ""
    if jax.process_index() == 0:
        path = epath.Path(workdir) / "eval" / f"result_step_{loaded.step}{suffix}.json"
        path.write_text(json.dumps(result, indent=2))
        from uvit_jax.train import dashboard

        # TensorBoard (+ the log) and, where config.logging.wandb is on, W&B (job "eval").
        writer = dashboard.metric_writer(config, workdir, console=True, job_type="eval")
        tag = f"eval{suffix}"
        writer.write_scalars(
            loaded.step, {f"{tag}/{k}": v for k, v in result.items() if isinstance(v, float)}
        )
        writer.write_texts(
            loaded.step, {f"{tag}/protocol": json.dumps(result["protocol"], indent=2)}
        )
        writer.close()
    logging.info(
        "eval at step %d (%s weights): %s",
        loaded.step,
        loaded.weights,
        {k: v for k, v in result.items() if isinstance(v, float)},
    )
    return result


# ---- --mode fid_stats ------------------------------------------------------------------------


def dataset_batches(config, batch_size: int, limit: int) -> tuple[Iterator[np.ndarray], int]:
    """This process's uint8 RGB batches of the config's (preprocessed) dataset images."""
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
            yield to_rgb(
                np.stack(images) if images else np.zeros((0, res, res, channels), np.uint8)
            )

    return batches(), n


def fid_stats_job(config, workdir: str) -> str:
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
