"""The training job: `python main.py --mode train --config ... --workdir W`.

Extracts the dataset if it is not there yet; builds the mesh, data, state and step; resumes
from the latest checkpoint in W; trains with periodic metrics, sample grids, FID and
checkpoints; saves on SIGTERM (preemption) and at the end.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from input_pipeline import extract, latent_dataset
from uvit_jax import checkpoints, images, workdir_lock
from uvit_jax.conditioning import Conditioning
from uvit_jax.diffusion.objective import noise_level_names
from uvit_jax.errors import ConfigError, UserError
from uvit_jax.jobs.extract import extract as extract_job
from uvit_jax.models.uvit import build_uvit
from uvit_jax.parallel.mesh import batch_size_per_shard, global_batch, make_mesh, replicated
from uvit_jax.sampling.generate import sample_images
from uvit_jax.sampling.prompts import TextConditions, dataset_conditions
from uvit_jax.train import dashboard, flops
from uvit_jax.train.state import TrainState, create_train_state
from uvit_jax.train.step import NOISE_LEVEL_BUCKETS, make_train_program

# Model fields that change the parameters; the others (dtype, attention, remat) may change
# between runs of one workdir.
ARCHITECTURE_FIELDS = (
    "kind", "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "mlp_time_embed", "num_classes", "conv", "skip", "clip_dim",
    "num_clip_token",
)  # fmt: skip


# What a resumed run restores (with the config); each is checked against its checksums.
RESUMED_ITEMS = ("state", "ema", "data_iter")


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient, or non-finite weights."""


# ---- checks before anything compiles ---------------------------------------------------------


def check_config(config, mesh) -> None:
    """Fails early, naming the fields, on configs that cannot work."""
    nnx.eval_shape(lambda: build_uvit(config.model))  # patch size / heads / remat checks
    # Positive counts (they divide step numbers in the loop); sample/FID intervals may be 0: off.
    for field, least in (("batch_size", 1), ("num_steps", 1), ("log_every", 1),
                         ("ckpt_every", 1), ("sample_every", 0), ("fid_every", 0)):  # fmt: skip
        value = config.train.get(field, least)
        if not isinstance(value, int) or value < least:
            raise ConfigError(
                f"config.train.{field}={value!r}: expected an integer >= {least}"
                + (" (0: never)" if least == 0 else "")
            )
    accum = int(config.train.accum_steps)
    if accum < 1 or config.train.batch_size % accum:
        raise ConfigError(
            f"config.train.batch_size={config.train.batch_size} is not divisible by "
            f"config.train.accum_steps={accum}"
        )
    batch_size_per_shard(mesh, config.train.batch_size // accum, field="config.train.batch_size")
    if config.train.on_nonfinite not in ("stop", "skip"):
        raise ConfigError(
            f"config.train.on_nonfinite={config.train.on_nonfinite!r}; expected 'stop' or 'skip'"
        )


def check_same_model(saved: Mapping, config, workdir: str) -> None:
    """Refuses to resume a workdir whose checkpoint holds another model."""
    saved_model = saved.get("model", {})
    diffs = [
        f"model.{k}: checkpoint {saved_model.get(k)!r}, config {config.model[k]!r}"
        for k in ARCHITECTURE_FIELDS
        if k in saved_model and saved_model[k] != config.model[k]
    ]
    if diffs:
        raise checkpoints.CheckpointError(
            f"{workdir} holds a checkpoint of another model; use a new --workdir or the "
            "matching config:\n  " + "\n  ".join(diffs)
        )


def check_labels(batch: Mapping[str, np.ndarray], config, data_dir: str) -> None:
    """Refuses a class-conditional run whose dataset has labels outside the model's classes
    (the embedding lookup would read past its table and train into NaN); checks one batch."""
    cond = Conditioning.from_config(config)
    if cond.kind != "class":
        return
    labels = np.asarray(batch["label"])
    bad = labels[(labels < 0) | (labels >= cond.num_classes)]
    if bad.size:
        null = " plus the null class" if cond.has_null else ""
        raise ConfigError(
            f"dataset {config.data.name!r} ({data_dir}) has label {int(bad[0])}, but "
            f"config.model.num_classes={config.model.num_classes} gives {cond.num_classes} "
            f"classes{null}: expected labels in [0, {cond.num_classes})"
        )


# ---- non-finite values -----------------------------------------------------------------------


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every number of `tree` is finite: one reduction on the devices, one bool back."""
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


def check_finite(state: TrainState, on_nonfinite: str, last_good: int | None) -> None:
    """Raises NonFiniteLossError when `state` must not be saved or trained on: a non-finite step
    happened under on_nonfinite='stop', or the weights hold non-finite numbers (which a
    skipped step cannot cause). Called before every save, so `last_good` is truthful."""
    bad, first_bad = jax.device_get((state.nonfinite_steps, state.first_nonfinite_step))
    good = (
        "no checkpoint yet"
        if last_good is None
        else f"the last good checkpoint is step {last_good}"
    )
    if bad and on_nonfinite == "stop":
        raise NonFiniteLossError(
            f"non-finite loss or gradient at step {int(first_bad)} (not applied); {good}. "
            "Lower optim.lr or set train.on_nonfinite='skip' to skip such steps."
        )
    if not bool(_all_finite((state.params, state.ema))):
        raise NonFiniteLossError(
            f"non-finite weights (params or EMA) after step {int(state.step)}: not saved; {good}"
        )


# ---- preemption ------------------------------------------------------------------------------


class PreemptionFlag:
    """Set by SIGTERM; the loop saves a checkpoint and exits at the next step.

    Multi-process, JAX's preemption sync manager (started by `jax.distributed.initialize`)
    receives the SIGTERM of any process and picks a step every process reaches; asking it is a
    host-side lookup, not a collective, so the loop keeps dispatching steps asynchronously.
    """

    def __init__(self):
        self._event = threading.Event()
        self._previous = None
        self._checked: tuple[int, bool] = (-1, False)

    def install(self) -> None:
        # Multi-process, JAX's notifier owns SIGTERM: a Python handler would replace it.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._event.set())

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def is_set(self, step: int) -> bool:
        """Whether to save and stop after `step` (call it after every step)."""
        if jax.process_count() == 1:
            return self._event.is_set()
        if self._checked[0] != step:  # the sync manager expects one query per step
            from jax.experimental import multihost_utils

            self._checked = (step, multihost_utils.reached_preemption_sync_point(step))
        return self._checked[1]


# ---- data --------------------------------------------------------------------------------


def ensure_dataset(config, workdir: str) -> str:
    """The extracted dataset's directory, extracting it first if it is not complete."""
    directory = extract.resolve_latent_dir(config, workdir)
    if not latent_dataset.is_finalized(directory):
        logging.info("dataset %s is not extracted yet: extracting it now", directory)
        directory = extract_job(config, workdir)
    return directory


def abstract_batch(config, sample: Mapping[str, np.ndarray]) -> dict[str, jax.ShapeDtypeStruct]:
    """Global-batch shapes from one host batch."""
    scale = jax.process_count()
    return {
        k: jax.ShapeDtypeStruct((v.shape[0] * scale, *v.shape[1:]), v.dtype)
        for k, v in sample.items()
    }


def _model_inputs(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The keys the step reads (the pipeline may add bookkeeping keys)."""
    return {k: v for k, v in batch.items() if k in ("x", "label", "context")}


def _text_inputs(config, data_dir: str, mesh):
    """Text-to-image models: (the empty context on every device, the sample-grid captions).

    (None, None) for other models. The empty context [L, D] (CLIP of "") replaces dropped
    contexts in the step; the grid uses the dataset's first captions (no text encoder needed).
    """
    if Conditioning.from_config(config).kind != "text":
        return None, None
    empty = latent_dataset.read_empty_context(
        latent_dataset.open_dataset(data_dir, config.data.split)
    )
    text = None
    if config.train.sample_every:
        text = dataset_conditions(data_dir, config.data.split, int(config.sample.num_samples))
    return jax.device_put(empty, replicated(mesh)), text


# ---- sample grids ------------------------------------------------------------------------


def write_sample_grid(
    config, graphdef, ema, step: int, workdir: str, writer, text: TextConditions | None = None
) -> None:
    """Samples from the EMA weights with the config's sampler; PNG + TensorBoard image.

    text: the `TextConditions` of text-to-image models (the same captions every time).
    """
    n = int(config.sample.num_samples)
    labels = Conditioning.from_config(config).labels(n)
    conditions = {}
    if text is not None:
        conditions = dict(contexts=text.contexts, null_context=text.null_context)
    x = sample_images(
        graphdef, ema, config, jax.random.key(config.seed + 1), labels=labels, num=n, **conditions
    )
    x = np.asarray(jax.device_get(x))
    ncol = None if labels is None else int(labels.max()) + 1
    grid = images.make_grid(images.to_uint8(x), ncol=ncol)
    if jax.process_index() == 0:
        images.save_png(os.path.join(workdir, "samples", f"step_{step:08d}.png"), grid)
        writer.write_images(step, {"samples": grid[None]})


# ---- the loop ----------------------------------------------------------------------------


def train_and_evaluate(config, workdir: str) -> TrainState:
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns the state.
    Holds the workdir's lock throughout: a second trainer there stops at once."""
    workdir = os.fspath(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    with workdir_lock.hold(workdir):
        return _train(config, workdir)


def _train(config, workdir: str) -> TrainState:
    """`train_and_evaluate` once the workdir is held."""
    from clu import metric_writers

    from input_pipeline.train_input import make_train_iterator

    mesh = make_mesh(config.mesh)
    check_config(config, mesh)
    # FID during training: its weights and reference must be there before anything compiles.
    fid_every = int(config.train.fid_every)
    if fid_every:
        from uvit_jax.evaluation.evaluator import (
            caption_sampler,
            check_sample_count,
            make_evaluator,
            metrics_of_samples,
        )

        check_sample_count(config, "train_num_samples")
        evaluator = make_evaluator(config, mesh)

    manager = checkpoints.open_manager(workdir, keep=config.train.keep_ckpts)
    latest = checkpoints.newest_good_step(manager, RESUMED_ITEMS)
    if latest is not None:
        check_same_model(checkpoints.read_config(manager, latest), config, workdir)
    checkpoints.set_aside_newer(manager, latest)

    data_dir = ensure_dataset(config, workdir)
    empty_context, text = _text_inputs(config, data_dir, mesh)
    captions = caption_sampler(config, data_dir, seed=0) if fid_every else None
    # A saved iterator position is restored below; one written by another number of processes
    # cannot be, and the stream is rebuilt at the step instead (the same batches either way).
    restore_iter = latest is not None and checkpoints.has_data_iter_for_this_topology(
        manager, latest
    )
    start_step = latest if latest is not None and not restore_iter else 0
    data_iter = make_train_iterator(
        config, seed=config.seed, data_dir=data_dir, start_step=start_step
    )

    num_steps = int(config.train.num_steps)
    program = make_train_program(config, mesh)
    graphdef, abstract_state = program.graphdef, program.abstract_state

    if latest is not None:
        item, ema_target = abstract_state.checkpoint_items()
        restored = checkpoints.restore(
            manager,
            latest,
            ema_target=ema_target,
            state_target=item,
            data_iter=data_iter if restore_iter else None,
        )
        state = TrainState.from_checkpoint_items(restored["state"], restored["ema"])
        logging.info("resumed from step %d in %s", int(state.step), workdir)
    else:
        state = create_train_state(config.model, program.tx, mesh, config.seed)

    first = _model_inputs(next(data_iter))
    check_labels(first, config, data_dir)
    batch_spec = abstract_batch(config, first)
    if empty_context is not None:
        batch_spec["empty_context"] = jax.ShapeDtypeStruct(empty_context.shape, empty_context.dtype)
    compiled, compile_s = program.compile(batch_spec)
    zero_totals = program.zero_totals

    # TensorBoard only: the console gets one progress line per log point instead of every scalar.
    writer = (
        metric_writers.AsyncWriter(metric_writers.SummaryWriter(workdir))
        if jax.process_index() == 0
        else metric_writers.MultiWriter([])
    )
    start = int(state.step)
    hparams = config.to_dict()
    hparams.pop("convert", None)  # the settings of another job
    writer.write_hparams(dashboard.flat_hparams(hparams))
    writer.write_scalars(start, {"compile_seconds": compile_s})
    step_flops = flops.train_step_flops(config.model, config.train.batch_size)
    n_dev = jax.device_count()
    peak = config.train.get("peak_tflops", 0.0) or flops.peak_tflops(jax.devices()[0].device_kind)
    level_names = noise_level_names(config.diffusion.formulation, NOISE_LEVEL_BUCKETS)
    totals = zero_totals()

    key = jax.random.key_data(jax.random.key(config.seed))
    preempt = PreemptionFlag()
    preempt.install()
    t_last, step_last = time.perf_counter(), start
    batch = first
    try:
        for step in range(start, num_steps):
            gbatch = global_batch(batch, mesh)
            if empty_context is not None:
                gbatch["empty_context"] = empty_context
            state, metrics, totals = compiled(state, gbatch, key, totals)
            done = step + 1
            # Asked once per step: a SIGTERM arriving later in the step must not stop the run
            # without the save that its stop promises.
            stop = preempt.is_set(done)
            log_now = done % config.train.log_every == 0 or done == num_steps
            save_now = done % config.train.ckpt_every == 0 or done == num_steps or stop
            if log_now:
                sums, lr, bad = jax.device_get((totals, metrics["lr"], state.nonfinite_steps))
                totals = zero_totals()
                now = time.perf_counter()
                steps_per_s = (done - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                scalars = dashboard.interval_scalars(sums, level_names)
                scalars.update(
                    lr=float(lr),
                    steps_per_s=steps_per_s,
                    images_per_s=steps_per_s * config.train.batch_size,
                    tflops_per_device=steps_per_s * step_flops / n_dev / 1e12,
                    nonfinite_steps=int(bad),
                )
                if peak:
                    scalars["mfu"] = scalars["tflops_per_device"] / peak
                writer.write_scalars(done, scalars)
                logging.info(
                    dashboard.progress_line(
                        done, num_steps, scalars.get("loss", float("nan")), steps_per_s
                    )
                )
            if log_now or save_now:  # after the log line, before the save: once per step
                check_finite(state, config.train.on_nonfinite, manager.latest_step())
            if save_now:
                item, ema = state.checkpoint_items()
                checkpoints.save(
                    manager, done, ema=ema, config=config, state=item, data_iter=data_iter
                )
            if config.train.sample_every and done % config.train.sample_every == 0:
                write_sample_grid(config, graphdef, state.ema, done, workdir, writer, text)
            if fid_every and done % fid_every == 0:
                result = metrics_of_samples(
                    config,
                    graphdef,
                    state.ema,
                    mesh,
                    evaluator,
                    int(config.eval.train_num_samples),
                    captions=captions,
                )
                writer.write_scalars(done, {f"train_fid/{k}": v for k, v in result.items()})
                logging.info("step %d: train FID %s", done, result)
            if stop:
                logging.warning("SIGTERM: saved step %d, exiting", done)
                break
            if done < num_steps:
                batch = _model_inputs(next(data_iter))
    finally:
        preempt.uninstall()
        manager.wait_until_finished()
        writer.flush()
    return state
