"""The training job: `python main.py --mode train --config ... --workdir W`.

Read top to bottom: `train_job` holds the workdir and runs four sections, each one function:
set-up (checks, evaluators, checkpoints, fine-tuning's source, data), restore or init (the
state: resumed, fresh, or from `config.train.init_from`'s weights), compile (the step, for the
first batch's shapes), the loop (steps; at their intervals: log, checkpoint, evaluators of
`config.train.evals`; saves on SIGTERM and at the end).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from clu import metric_writers
from etils import epath
from flax import nnx
from jax.sharding import Mesh

from input_pipeline import extract, latent_dataset
from uvit_jax import checkpoints, jobs, latent_scale, workdir_lock
from uvit_jax.api import load, saved_config
from uvit_jax.conditioning import Conditioning
from uvit_jax.config_defaults import ARCHITECTURE_FIELDS, UViTConfig
from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.errors import ConfigError, StoppedBeforeTraining, UserError
from uvit_jax.evals import Scheduled, TrainContext, make_evals
from uvit_jax.jobs.extract import extract_job
from uvit_jax.models.uvit import abstract_uvit, build_uvit
from uvit_jax.parallel.mesh import (
    batch_shard_count,
    batch_size_per_shard,
    global_batch,
    make_mesh,
    replicated,
)
from uvit_jax.train import dashboard, flops, init_from
from uvit_jax.train.state import TrainState, create_train_state
from uvit_jax.train.step import (
    NOISE_LEVEL_BUCKETS,
    TrainProgram,
    ema_stds,
    make_train_program,
    micro_batch_count,
)

# What a resumed run restores (with the config); each is checked against its checksums.
RESUMED_ITEMS = ("state", "ema", "data_iter")


class NonFiniteLossError(UserError, FloatingPointError):
    """Training produced a non-finite loss or gradient, or non-finite weights."""


# ---- checks before anything compiles ---------------------------------------------------------


def check_config(config, mesh) -> int:
    """Fails early, naming the fields, on configs that cannot work: every field's range and
    names (`jobs.check`, also when the job is called without `jobs.run`), then what depends on
    the mesh and the model. Returns the micro-batches per step (`micro_batch_count`)."""
    jobs.check("train", config)
    nnx.eval_shape(lambda: build_uvit(config.model))  # remat checks
    accum = micro_batch_count(config.train, config.train.batch_size, batch_shard_count(mesh))
    batch_size_per_shard(mesh, config.train.batch_size // accum, field="config.train.batch_size")
    stds, snapshot_every = ema_stds(config), int(config.train.ema_snapshot_every)
    if len(set(stds)) != len(stds):
        raise ConfigError(f"config.train.ema_stds={stds}: expected distinct stds")
    if stds and snapshot_every <= 0:
        raise ConfigError(
            f"config.train.ema_snapshot_every={snapshot_every} with config.train.ema_stds="
            f"{stds}: expected an interval in steps >= 1 (post-hoc reconstruction reads the "
            "snapshots)"
        )
    return accum


def check_same_model(saved: Mapping, config, workdir: str) -> None:
    """Refuses to resume a workdir whose checkpoint holds another model: one that differs in a
    field of `ARCHITECTURE_FIELDS` (all of `UViTConfig`'s but the compute options dtype,
    attention and remat, which may change between runs). A field the saved config lacks (it
    was written before the field existed) had its default."""
    saved_model = saved.get("model", {})
    if not saved_model:
        return
    defaults = UViTConfig.defaults()
    model = UViTConfig.from_config(config.model)
    diffs = [
        f"model.{k}: checkpoint {saved_model.get(k, defaults[k])!r}, config {getattr(model, k)!r}"
        for k in ARCHITECTURE_FIELDS
        if saved_model.get(k, defaults[k]) != getattr(model, k)
    ]
    if diffs:
        raise checkpoints.CheckpointError(
            f"{workdir} holds a checkpoint of another model; use a new --workdir or the "
            "matching config:\n  " + "\n  ".join(diffs)
        )


def power_ema_record(train: Mapping) -> tuple[tuple[float, ...], int]:
    """(ema_stds, ema_snapshot_every) of a `config.train` section, the interval 0 without stds
    (it is not used then); absent fields (older configs) are their defaults."""
    stds = tuple(float(s) for s in train.get("ema_stds", ()) or ())
    return stds, int(train.get("ema_snapshot_every", 0)) if stds else 0


def check_same_power_emas(saved: Mapping, config, workdir: str) -> None:
    """Refuses to resume with other power-function EMAs or another snapshot interval: the EMAs'
    profiles start at step 1 and their snapshots form one sequence, so neither can change in
    the middle of a run."""
    (was, was_every), (now, now_every) = (
        power_ema_record(saved.get("train", {})),
        power_ema_record(config.train),
    )
    if (was, was_every) != (now, now_every):
        raise checkpoints.CheckpointError(
            f"{workdir} was trained with config.train.ema_stds={was} ema_snapshot_every="
            f"{was_every}, the config has {now} and {now_every}: power-function EMAs start at "
            "step 1 and snapshot at one interval, so they cannot change within a run; use a "
            "new --workdir or the run's values"
        )


def check_labels(config, data_dir: str) -> None:
    """Refuses, before compiling, a class-conditional run whose dataset has labels outside the
    model's classes (the embedding lookup would read past its table and train into NaN) or
    equal to the null class (those examples would train as unconditional), from the label
    range the extraction recorded in the dataset's metadata. The input pipeline checks every
    batch as well (`label_limit`): datasets written before the range was recorded have only
    that."""
    cond = Conditioning.from_config(config)
    if cond.kind != "class":
        return
    recorded = _recorded_labels(data_dir, config.data.split)
    bad = [v for v in recorded if not 0 <= v < cond.num_classes]
    if not bad:
        return
    label = bad[0]
    if cond.has_null and label == cond.null_class:
        problem = (
            f"label {label}, the null class of config.model.num_classes="
            f"{config.model.num_classes} with diffusion.p_uncond > 0 (its examples would train "
            f"as unconditional)"
        )
    else:
        null = " plus the null class" if cond.has_null else ""
        problem = (
            f"label {label}, but config.model.num_classes={config.model.num_classes} gives "
            f"{cond.num_classes} classes{null}"
        )
    raise ConfigError(
        f"dataset {config.data.name!r} ({data_dir}) has {problem}: expected labels in "
        f"[0, {cond.num_classes})"
    )


def _recorded_labels(data_dir: str, split: str) -> list[int]:
    """[label_min, label_max] of the dataset's metadata; [] when it was written without them."""
    metadata = latent_dataset.open_dataset(data_dir, split).metadata
    if "label_min" not in metadata:
        return []
    return [int(metadata["label_min"]), int(metadata["label_max"])]


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
    if not bool(_all_finite((state.params, state.ema, state.power_ema))):
        raise NonFiniteLossError(
            f"non-finite weights (params or EMA) after step {int(state.step)}: not saved; {good}"
        )


# ---- preemption ------------------------------------------------------------------------------


class PreemptionFlag:
    """Set by SIGTERM; the loop saves a checkpoint and exits at the next step.

    Installed for the whole job: a SIGTERM during set-up, restore or compile, when there is
    nothing new to save, raises `StoppedBeforeTraining` as soon as Python runs again (a compile
    in progress finishes first); from `start_stepping` on it sets the flag.
    Multi-process, JAX's preemption sync manager (started by `jax.distributed.initialize`)
    receives the SIGTERM of any process and picks a step every process reaches; asking it is a
    host-side lookup, not a collective, so the loop keeps dispatching steps asynchronously.
    """

    def __init__(self, workdir: str):
        self._workdir = workdir
        self._event = threading.Event()
        self._stepping = False
        self._previous = None
        self._checked: tuple[int, bool] = (-1, False)

    def install(self) -> None:
        # Multi-process, JAX's notifier owns SIGTERM: a Python handler would replace it.
        if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, *_) -> None:
        self._event.set()
        if not self._stepping:
            raise StoppedBeforeTraining(
                f"SIGTERM before the first step (set-up, restore or compile): stopped with "
                f"nothing new to save; rerun to resume {self._workdir}"
            )

    def start_stepping(self) -> None:
        """From here a SIGTERM stops the loop after a save (a SIGTERM already received too)."""
        self._stepping = True

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


def _empty_context(config, data_dir: str, mesh: Mesh) -> jax.Array | None:
    """Text-to-image models: CLIP of "" [L, D] on every device, which replaces the dropped
    contexts in the step; None for other models."""
    if Conditioning.from_config(config).kind != "text":
        return None
    empty = latent_dataset.read_empty_context(
        latent_dataset.open_dataset(data_dir, config.data.split)
    )
    return jax.device_put(empty, replicated(mesh))


# ---- the job -----------------------------------------------------------------------------


def train_job(config, workdir: str) -> TrainState:
    """Trains `config` in `workdir` (resuming from its latest good checkpoint); returns the
    state. Holds the workdir's lock throughout: a second trainer there stops at once."""
    workdir = os.fspath(workdir)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    preempt = PreemptionFlag(workdir)
    preempt.install()
    try:
        with workdir_lock.hold(workdir):
            run = set_up(config, workdir)
            try:
                state = restore_or_init(run)
                step_fn, first_batch = compile_step(run, int(state.step))
                preempt.start_stepping()
                return train_loop(run, state, step_fn, first_batch, preempt)
            finally:
                if run.snapshots is not None:
                    run.snapshots.wait_until_finished()
                run.manager.wait_until_finished()
                run.writer.close()
    finally:
        preempt.uninstall()


@dataclasses.dataclass(frozen=True)
class TrainRun:
    """What the sections of one run share; built by `set_up`.

    latest: the checkpoint step resumed from (None: a new run). init: a new run's starting
    weights (`config.train.init_from`; None: a fresh initialisation, or a resumed run).
    restore_iter: whether `latest` holds this topology's data iterator position (else the
    stream was rebuilt at `latest`).
    empty_context: text-to-image models' replicated CLIP of "" (None otherwise).
    snapshots: the manager of `W/ema_snapshots` (None when `config.train.ema_stds` is empty).
    """

    config: Any
    workdir: str
    mesh: Mesh
    manager: ocp.CheckpointManager
    snapshots: ocp.CheckpointManager | None
    latest: int | None
    init: InitFrom | None
    restore_iter: bool
    data_dir: str
    data_iter: Any
    program: TrainProgram
    writer: metric_writers.MetricWriter
    evals: list[Scheduled]
    empty_context: jax.Array | None


# ---- set-up ------------------------------------------------------------------------------


def set_up(config, workdir: str) -> TrainRun:
    """Checks the config, builds the evaluators (their files must be there before anything
    compiles), picks the checkpoint to resume from, extracts the dataset if needed, checks its
    labels and opens its stream at the resumed step. A latent scale of "auto" is resolved to
    its number first (extracting the dataset first): the run's config holds the number."""
    from input_pipeline.train_input import make_train_iterator

    mesh = make_mesh(config.mesh)
    passes = check_config(config, mesh)
    shards, size = batch_shard_count(mesh), config.train.batch_size
    logging.info(
        "batch %d over %d devices: %d pass(es) of %d example(s) per device per step",
        size, shards, passes, size // shards // passes,
    )  # fmt: skip
    data_dir = extract.resolve_latent_dir(config, workdir)
    if latent_scale.is_auto(config):
        # 1 / the latents' std measured on the dataset: extracted first, as the evaluators
        # sample with the number, and saved with every checkpoint in the config.
        data_dir = ensure_dataset(config, workdir)
        config = latent_scale.resolve(config, data_dir)
    writer = dashboard.metric_writer(config, workdir)
    evals = make_evals(TrainContext(config, mesh, workdir, data_dir, writer))

    manager = checkpoints.open_manager(workdir, keep=config.train.keep_ckpts)
    latest = checkpoints.good_step(manager, None, RESUMED_ITEMS)
    if latest is not None:
        saved = checkpoints.read_config(manager, latest)
        check_same_model(saved, config, workdir)
        check_same_power_emas(saved, config, workdir)
    checkpoints.set_aside_newer(manager, latest)
    init = plan_init_from(config, workdir, latest)
    snapshots = None
    if ema_stds(config):
        snapshots = checkpoints.open_manager(
            workdir, keep=config.train.ema_snapshot_keep or None, folder=checkpoints.SNAPSHOTS
        )
        # Written after the checkpoint resumed from: the resumed run writes them again.
        checkpoints.set_aside_newer(snapshots, latest, "EMA snapshot (after the resumed step)")

    data_dir = ensure_dataset(config, workdir)
    # A saved iterator position is restored with the state; one written by another number of
    # processes cannot be, and the stream is rebuilt at the step instead (the same batches).
    restore_iter = latest is not None and checkpoints.has_data_iter_for_this_topology(
        manager, latest
    )
    start_step = latest if latest is not None and not restore_iter else 0
    check_labels(config, data_dir)  # the recorded range, before compiling; the pipeline
    cond = Conditioning.from_config(config)  # checks each batch against the same classes
    data_iter = make_train_iterator(
        config,
        seed=config.seed,
        data_dir=data_dir,
        start_step=start_step,
        label_limit=cond.num_classes if cond.kind == "class" else None,
    )
    return TrainRun(
        config=config,
        workdir=workdir,
        mesh=mesh,
        manager=manager,
        snapshots=snapshots,
        latest=latest,
        init=init,
        restore_iter=restore_iter,
        data_dir=data_dir,
        data_iter=data_iter,
        program=make_train_program(config, mesh),
        writer=writer,
        evals=evals,
        empty_context=_empty_context(config, data_dir, mesh),
    )


# ---- fine-tuning: the weights a new run starts from ----------------------------------------


@dataclasses.dataclass(frozen=True)
class InitFrom:
    """The checkpoint a new run starts from (`config.train.init_from`): its workdir (or step
    folder), its step, and what each parameter of this config's model takes from it."""

    path: str
    step: int
    plan: init_from.TransferPlan


def parse_init_from(value: str) -> tuple[str, int | None]:
    """`workdir` or `workdir:step` -> (path, step or None); a URL keeps its scheme's colon."""
    path, colon, step = value.rpartition(":")
    return (path, int(step)) if colon and path and step.isdigit() else (value, None)


def plan_init_from(config, workdir: str, latest: int | None) -> InitFrom | None:
    """Checks `config.train.init_from` before anything is extracted or compiled: the checkpoint
    is there (its EMA files sound) and its model can become this config's
    (`init_from.plan_transfer`). None without one, or when the workdir resumes: a run that has
    checkpoints never starts over from the init weights (logged)."""
    value = config.train.init_from
    if not value:
        return None
    if latest is not None:
        logging.info(
            "config.train.init_from=%r ignored: %s resumes from its checkpoint step %d",
            value, workdir, latest,
        )  # fmt: skip
        return None
    where = f"config.train.init_from={value!r}"
    path, step = parse_init_from(value)
    try:
        saved, step = saved_config(path, step)
    except checkpoints.CheckpointError as e:
        raise ConfigError(f"{where}: {e}") from e
    plan = init_from.plan_transfer(
        nnx.state(abstract_uvit(saved.model)),
        nnx.state(abstract_uvit(config.model)),
        source_model=saved.model,
        target_model=config.model,
        where=f"{where} (step {step})",
    )
    return InitFrom(path=path, step=step, plan=plan)


def init_from_checkpoint(run: TrainRun) -> TrainState:
    """A new state at step 0 whose parameters are `run.init`'s checkpoint's EMA weights,
    reshaped by its plan; the EMAs start from the same weights, the optimizer state is fresh.
    Logs one line: what was loaded, re-initialised and interpolated."""
    init, config = run.init, run.config
    source = load(init.path, init.step, mesh=run.mesh).params
    state = create_train_state(
        config.model,
        run.program.tx,
        run.mesh,
        config.seed,
        len(ema_stds(config)),
        adapt=functools.partial(init_from.transfer, init.plan),
        source=source,
    )
    logging.info(
        "init_from %s step %d (EMA weights): %s; the EMA starts from these weights, the "
        "optimizer fresh, at step 0", init.path, init.step, init.plan.summary(),
    )  # fmt: skip
    return state


# ---- restore or init ---------------------------------------------------------------------


def restore_or_init(run: TrainRun) -> TrainState:
    """The state of the resumed step (and the data iterator's position, in place), a new state
    from `config.train.init_from`'s weights, or a new state from `config.seed`."""
    if run.latest is None and run.init is not None:
        return init_from_checkpoint(run)
    if run.latest is None:
        return create_train_state(
            run.config.model, run.program.tx, run.mesh, run.config.seed, len(ema_stds(run.config))
        )
    item, ema_target = run.program.abstract_state.checkpoint_items()
    restored = checkpoints.restore(
        run.manager,
        run.latest,
        ema_target=ema_target,
        state_target=item,
        data_iter=run.data_iter if run.restore_iter else None,
    )
    state = TrainState.from_checkpoint_items(restored["state"], restored["ema"])
    logging.info("resumed from step %d in %s", int(state.step), run.workdir)
    return state


# ---- compile -----------------------------------------------------------------------------


def compile_step(run: TrainRun, start: int) -> tuple[Callable, dict[str, np.ndarray]]:
    """(the compiled step, the first batch): compiled for the first batch's global shapes; the
    dashboards get the flat hparams and the compile time."""
    config = run.config
    first = _model_inputs(next(run.data_iter))
    batch_spec = abstract_batch(config, first)
    if run.empty_context is not None:
        context = run.empty_context
        batch_spec["empty_context"] = jax.ShapeDtypeStruct(context.shape, context.dtype)
    step_fn, compile_s = run.program.compile(batch_spec)
    hparams = config.to_dict()
    hparams.pop("convert", None)  # the settings of another job
    run.writer.write_hparams(dashboard.flat_hparams(hparams))
    run.writer.write_scalars(start, {"compile_seconds": compile_s})
    return step_fn, first


# ---- the loop ----------------------------------------------------------------------------


def every(interval: int, step: int) -> bool:
    """Whether a periodic action of `interval` steps (0: never) falls after `step`."""
    return interval > 0 and step % interval == 0


class ProgressLog:
    """The log point: the interval's means, throughput and MFU to the dashboards, one line to
    the console (TensorBoard gets every scalar; the console only the progress line)."""

    def __init__(self, config, start: int):
        self._config = config
        self._step_flops = flops.train_step_flops(config.model, config.train.batch_size)
        self._peak = config.train.get("peak_tflops", 0.0) or flops.peak_tflops(
            jax.devices()[0].device_kind
        )
        self._levels = Formulation.from_config(config).bucket_names(NOISE_LEVEL_BUCKETS)
        self._since = (time.perf_counter(), start)
        self._estimated = False

    def write(self, step: int, sums, lr, nonfinite_steps, writer) -> None:
        """Logs the interval ending at `step` from its fetched `sums` (`dashboard` totals)."""
        now, (t_last, step_last) = time.perf_counter(), self._since
        self._since = (now, step)
        steps_per_s = (step - step_last) / max(now - t_last, 1e-9)
        scalars = dashboard.interval_scalars(sums, self._levels)
        scalars.update(
            lr=float(lr),
            steps_per_s=steps_per_s,
            images_per_s=steps_per_s * self._config.train.batch_size,
            tflops_per_device=steps_per_s * self._step_flops / jax.device_count() / 1e12,
            nonfinite_steps=int(nonfinite_steps),
        )
        if self._peak:
            scalars["mfu"] = scalars["tflops_per_device"] / self._peak
        writer.write_scalars(step, scalars)
        num_steps = int(self._config.train.num_steps)
        loss = scalars.get("loss", float("nan"))
        logging.info(dashboard.progress_line(step, num_steps, loss, steps_per_s))
        if not self._estimated:  # once, from the first interval: the run's wall time to come
            self._estimated = True
            logging.info(dashboard.expected_time_line(step_last, step, num_steps, steps_per_s))


def save(run: TrainRun, state: TrainState, step: int) -> None:
    """Starts the asynchronous save of `step` (state, EMA, config, data position); stops first
    (LockLostError) when another trainer took the workdir's lock over while this one stalled.

    The EMA snapshots started before it are committed first: a run resumed from this step
    finds every snapshot up to it (they cannot be made again)."""
    workdir_lock.check(run.workdir)
    if run.snapshots is not None:
        run.snapshots.wait_until_finished()
    item, ema = state.checkpoint_items()
    checkpoints.save(
        run.manager, step, ema=ema, config=run.config, state=item, data_iter=run.data_iter
    )


def save_snapshot(run: TrainRun, state: TrainState, step: int) -> None:
    """Starts the asynchronous save of the power-function EMAs at `step` into
    `W/ema_snapshots/<step>` (sealed and atomic like a checkpoint) and logs its size."""
    workdir_lock.check(run.workdir)
    checkpoints.save(run.snapshots, step, ema=state.power_ema, config=run.config)
    stds = ema_stds(run.config)
    params = sum(x.size for x in jax.tree.leaves(run.program.abstract_state.params))
    size = 4 * params * len(stds)  # float32
    every = int(run.config.train.ema_snapshot_every)
    logging.info(
        "EMA snapshot step %d: stds %s, %d x %d float32 parameters = %d bytes (%.0f per step) "
        "-> %s", step, stds, len(stds), params, size, size / every, run.snapshots.directory,
    )  # fmt: skip


def run_eval(run: TrainRun, scheduled: Scheduled, state: TrainState, step: int) -> None:
    """Runs one evaluator on the EMA weights; its scalars go out as `train_<name>/<key>`."""
    result = scheduled.evaluator.run(step, run.program.graphdef, state.ema)
    if result:
        run.writer.write_scalars(
            step, {f"train_{scheduled.name}/{k}": v for k, v in result.items()}
        )
        logging.info("step %d: %s %s", step, scheduled.name, dict(result))


def train_loop(
    run: TrainRun,
    state: TrainState,
    step_fn: Callable,
    batch: dict[str, np.ndarray],
    preempt: PreemptionFlag,
) -> TrainState:
    """Steps from `state.step` to `config.train.num_steps`; after each step, in this order:
    log, finiteness check, EMA snapshot, checkpoint, evaluators, preemption exit."""
    config = run.config
    num_steps = int(config.train.num_steps)
    key = jax.random.key_data(jax.random.key(config.seed))
    totals = run.program.zero_totals()
    log = ProgressLog(config, int(state.step))
    for step in range(int(state.step), num_steps):
        device_batch = global_batch(batch, run.mesh)
        if run.empty_context is not None:
            device_batch["empty_context"] = run.empty_context
        state, metrics, totals = step_fn(state, device_batch, key, totals)
        done, last = step + 1, step + 1 == num_steps
        # Asked once per step: a SIGTERM arriving later in the step must not stop the run
        # without the save that its stop promises.
        stop = preempt.is_set(done)
        log_now = every(config.train.log_every, done) or last
        save_now = every(config.train.ckpt_every, done) or last or stop
        snapshot_now = run.snapshots is not None and every(config.train.ema_snapshot_every, done)
        if log_now:
            sums, lr, bad = jax.device_get((totals, metrics["lr"], state.nonfinite_steps))
            totals = run.program.zero_totals()
            log.write(done, sums, lr, bad, run.writer)
        if log_now or save_now or snapshot_now:  # after the log line, before saves: once
            check_finite(state, config.train.on_nonfinite, run.manager.latest_step())
        if snapshot_now:  # before the checkpoint of its step, which waits for it
            save_snapshot(run, state, done)
        if save_now:
            save(run, state, done)
        for scheduled in run.evals:
            if scheduled.due(done):
                run_eval(run, scheduled, state, done)
        if stop:
            logging.warning("SIGTERM: saved step %d, exiting", done)
            break
        if not last:
            batch = _model_inputs(next(run.data_iter))
    return state
