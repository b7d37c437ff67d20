"""One training update as a pure function, and its ahead-of-time compilation over a mesh.

The step draws every random number from `fold_in(key, state.step)`, so a run resumed from a
checkpoint continues bit for bit, and its data order depends only on the step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, get_abstract_mesh

from uvit_jax.conditioning import Conditioning
from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.diffusion.objective import (
    NoisedExamples,
    drop_contexts,
    drop_labels,
    noised_examples,
    prediction_losses,
)
from uvit_jax.errors import ConfigError
from uvit_jax.latent_scale import number
from uvit_jax.models.autoencoder import sample_latent
from uvit_jax.parallel.activations import constrain_batch
from uvit_jax.parallel.batch_sums import batch_shards, sum_over_batch_shards
from uvit_jax.parallel.mesh import batch_sharding, replicated
from uvit_jax.train import dashboard, power_ema
from uvit_jax.train.optimizer import (
    ema_decay,
    ema_update,
    learning_rate_schedule,
    make_optimizer,
)
from uvit_jax.train.state import TrainState, abstract_train_state, model_graphdef

Array = jax.Array
Batch = Mapping[str, Array]

# The dashboards' loss by noise level: quarters of the schedule's time.
NOISE_LEVEL_BUCKETS = 4


def loss_weighting(config) -> dict[str, str | float]:
    """`example_losses`' weighting keywords from `config.diffusion` (configs saved before the
    fields existed: unweighted)."""
    return dict(
        weighting=config.diffusion.get("loss_weighting", "none"),
        gamma=float(config.diffusion.get("min_snr_gamma", 5.0)),
    )


Conditions = dict[str, Array]


def make_example_draw_fn(config) -> Callable[[Batch, Array], tuple[NoisedExamples, Conditions]]:
    """draw(batch, key) -> (the batch noised for the config's objective (`noised_examples`),
    the network's condition keywords): every random choice of a training example, none of
    which depends on the network's parameters.

    batch["x"]: [B, h, w, C] pixels in [-1, 1], or [B, h, w, 2C] autoencoder moments for latent
    models; batch["label"]: [B] int32 (class models); batch["context"]: [B, L, D] (text models)
    and batch["empty_context"]: [L, D] (CLIP of ""). The conditions: {"y": [B] int32} or
    {"context": [B, L, D]} with the dropped ones replaced for guidance, or {}.
    """
    formulation = Formulation.from_config(config)
    p_uncond = float(config.diffusion.p_uncond)
    conditioning = Conditioning.from_config(config)
    latent = config.autoencoder.kind != "identity"
    scale = number(config.autoencoder.scale_factor)
    weighting = loss_weighting(config)

    def draw(batch: Batch, key: Array) -> tuple[NoisedExamples, Conditions]:
        k_z, k_drop, k_noise = jax.random.split(key, 3)
        x0 = sample_latent(batch["x"], k_z, scale) if latent else batch["x"]
        cond = {}
        if conditioning.kind == "text":
            ctx = batch["context"]
            if conditioning.has_null:
                ctx = drop_contexts(k_drop, ctx, p_uncond, batch["empty_context"])
            cond["context"] = ctx
        elif conditioning.kind == "class":
            y = batch["label"]
            if conditioning.has_null:
                y = drop_labels(k_drop, y, p_uncond, conditioning.null_class)
            cond["y"] = y
        return noised_examples(k_noise, x0, formulation, **weighting), cond

    return draw


def make_prediction_loss_fn(
    graphdef: nnx.GraphDef,
) -> Callable[[nnx.State, NoisedExamples, Conditions], Array]:
    """losses(params, examples, conditions) -> [B] float32: each example's loss for the
    network's prediction (`prediction_losses`); the only part of the loss the gradients pass."""

    def losses(params: nnx.State, examples: NoisedExamples, cond: Conditions) -> Array:
        model = nnx.merge(graphdef, params)
        return prediction_losses(model(examples.x_t, examples.t_net, **cond), examples)

    return losses


def make_example_loss_fn(
    graphdef: nnx.GraphDef, config
) -> Callable[[nnx.State, Batch, Array], tuple[Array, Array]]:
    """losses(params, batch, key) -> (loss [B] float32 per example, network time [B] float32)
    for the config's objective: `make_example_draw_fn`, then `make_prediction_loss_fn`."""
    draw = make_example_draw_fn(config)
    prediction_loss = make_prediction_loss_fn(graphdef)

    def losses_fn(params: nnx.State, batch: Batch, key: Array) -> tuple[Array, Array]:
        examples, cond = draw(batch, key)
        return prediction_loss(params, examples, cond), examples.t_net

    return losses_fn


def make_loss_fn(graphdef: nnx.GraphDef, config) -> Callable[[nnx.State, Batch, Array], Array]:
    """loss(params, batch, key) -> scalar float32: the batch mean of `make_example_loss_fn`."""
    losses_fn = make_example_loss_fn(graphdef, config)
    return lambda params, batch, key: jnp.mean(losses_fn(params, batch, key)[0])


def make_loss_sums_fn(
    graphdef: nnx.GraphDef, config, batch_size: int
) -> Callable[[nnx.State, NoisedExamples, Conditions], tuple[Array, tuple[Array, Array, Array]]]:
    """sums(params, examples, conditions) -> (loss sum / batch_size, (loss sum, loss sums,
    example counts)) over the examples given: float32 scalars, then the sums and counts
    [NOISE_LEVEL_BUCKETS] float32 per `Formulation.bucket`.

    The first output, differentiated, gives these examples' share of the gradient of the batch
    mean; sums rather than means add up over micro-batches, devices and logged intervals.
    """
    prediction_loss = make_prediction_loss_fn(graphdef)
    formulation = Formulation.from_config(config)

    def sums(params: nnx.State, examples: NoisedExamples, cond: Conditions):
        losses = prediction_loss(params, examples, cond)
        bucket = formulation.bucket(examples.t_net, NOISE_LEVEL_BUCKETS)
        member = jax.nn.one_hot(bucket, NOISE_LEVEL_BUCKETS, dtype=jnp.float32)  # [B, buckets]
        # Elementwise, not a matmul: matmuls may run at reduced precision on accelerators.
        level_sums = jnp.sum(losses[:, None] * member, axis=0)
        total = jnp.sum(losses)
        return total / batch_size, (total, level_sums, jnp.sum(member, axis=0))

    return sums


def micro_batch_count(train_config, batch_size: int, batch_shards: int) -> int:
    """How many micro-batches a step splits its batch into: `train.accum_steps`, or, where
    `train.micro_batch_per_device` is set (> 0), the fewest that divide each device's share
    evenly into micro-batches of at most that size (8 per device at most 4: 2 of 4; 6: 2 of
    3; 5: 5 of 1).

    Raises:
      ConfigError: naming the fields, when both are set or the batch does not split evenly.
    """
    accum = int(train_config.accum_steps)
    micro = int(train_config.get("micro_batch_per_device", 0))
    if micro <= 0:
        if batch_size % accum:
            raise ConfigError(
                f"config.train.batch_size={batch_size} is not divisible by "
                f"config.train.accum_steps={accum}"
            )
        return accum
    if accum != 1:
        raise ConfigError(
            f"config.train.micro_batch_per_device={micro} and config.train.accum_steps={accum}: "
            "set one of them (the other to its default, 0 or 1)"
        )
    per_device = batch_size // batch_shards
    fewest = -(-per_device // micro)
    return next(n for n in range(fewest, per_device + 1) if per_device % n == 0)


def _microbatches(tree, n: int):
    """Arrays [B, ...] -> [n, B/n, ...], micro-batch i = rows i, i+n, ... (even over the batch
    shards: each device's rows of a micro-batch are rows it holds)."""

    def split(x: Array) -> Array:
        return jnp.swapaxes(x.reshape(x.shape[0] // n, n, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, tree)


def ema_stds(config) -> tuple[float, ...]:
    """The relative stds of the power-function EMAs `config.train.ema_stds` tracks."""
    return tuple(float(s) for s in config.train.get("ema_stds", ()) or ())


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    config,
    schedule: optax.Schedule,
) -> Callable[[TrainState, Batch, Array], tuple[TrainState, dict[str, Array]]]:
    """step(state, batch, key) -> (state, metrics) of one step: loss, grad_norm, lr (float32
    scalars), loss_by_t_sum and loss_by_t_count ([NOISE_LEVEL_BUCKETS] float32: the batch's
    loss sums and example counts per noise level, `make_loss_sums_fn`).

    The power-function EMAs of `config.train.ema_stds` (`state.power_ema`) move after every
    step, a rejected (non-finite) one included, with the weights as they then are: step t's
    weights always enter with the profile's weight for step t, so a snapshot's profile is the
    power function that post-hoc reconstruction assumes."""
    draw = make_example_draw_fn(config)
    ema_rate = float(config.train.ema_rate)
    ema_warmup = bool(config.train.get("ema_warmup", False))
    gammas = tuple(float(g) for g in power_ema.gamma_of_std(ema_stds(config)))

    def gradients(params, batch, key):
        """((loss, (level sums, level counts)), gradients) of the batch mean.

        Every example's noise, time and dropped label are drawn for the whole batch from `key`,
        whatever `micro_batch_count` is: micro-batches (rows i, i+n, ...) change only the order
        of the sums, so the gradients equal one pass's to float32 rounding."""
        size = batch["x"].shape[0]
        accum = micro_batch_count(config.train, size, batch_shards(get_abstract_mesh()))
        grad_sums = jax.value_and_grad(make_loss_sums_fn(graphdef, config, size), has_aux=True)
        drawn = draw(batch, key)
        if accum == 1:
            # One pass, partitioned by the compiler as before micro-batches existed (its one
            # all-reduce per step takes the gradient arrays as they are): the same program.
            (_, (total, level_sums, level_counts)), grads = grad_sums(params, *drawn)
        else:

            def summed(p, micro):
                def add(carry, xs):
                    xs = jax.tree.map(constrain_batch, xs)
                    return jax.tree.map(jnp.add, carry, grad_sums(p, *xs)), None

                one = jax.eval_shape(grad_sums, p, *jax.tree.map(lambda v: v[0], micro))
                zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), one)
                return jax.lax.scan(add, zeros, micro)[0]

            (_, (total, level_sums, level_counts)), grads = sum_over_batch_shards(
                summed, batch_axis=1
            )(params, _microbatches(drawn, accum))
        return (total / size, (level_sums, level_counts)), grads

    def step(state: TrainState, batch: Batch, key: Array):
        key = jax.random.fold_in(key, state.step)
        (loss, (level_sums, level_counts)), grads = gradients(state.params, batch, key)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def apply(s: TrainState) -> TrainState:
            updates, opt_state = tx.update(grads, s.opt_state, s.params)
            params = optax.apply_updates(s.params, updates)
            return s.replace(
                step=s.step + 1,
                params=params,
                opt_state=opt_state,
                ema=ema_update(s.ema, params, ema_decay(s.step, ema_rate, ema_warmup)),
            )

        def reject(s: TrainState) -> TrainState:
            # The update is not applied; the step counter moves on so the next step sees new
            # data and noise instead of repeating the failing ones.
            return s.replace(
                step=s.step + 1,
                nonfinite_steps=s.nonfinite_steps + 1,
                first_nonfinite_step=jnp.where(
                    s.first_nonfinite_step < 0, s.step, s.first_nonfinite_step
                ),
            )

        new_state = jax.lax.cond(finite, apply, reject, state)
        if gammas:
            new_state = new_state.replace(
                power_ema=power_ema.update(
                    new_state.power_ema, new_state.params, new_state.step, gammas
                )
            )
        metrics = dict(
            loss=loss,
            grad_norm=grad_norm,
            lr=schedule(state.step),
            loss_by_t_sum=level_sums,
            loss_by_t_count=level_counts,
        )
        return new_state, metrics

    return step


def lower_train_step(
    step_fn: Callable,
    abstract_state: TrainState,
    state_shardings: TrainState,
    abstract_batch: Mapping[str, jax.ShapeDtypeStruct],
    mesh: Mesh,
    abstract_totals: Mapping[str, jax.ShapeDtypeStruct] | None = None,
) -> jax.stages.Lowered:
    """The step jitted with its shardings and donation over `mesh`, lowered for the abstract
    arguments (`jax.stages.Lowered`: compile it, or read its cost, for any devices).

    abstract_totals: for a step that also takes and returns the dashboard's running sums
    (`dashboard.accumulating`), their shapes; replicated and donated like the state.
    """
    bs = batch_sharding(mesh)
    batch_shardings = {
        k: (replicated(mesh) if k == "empty_context" else bs) for k in abstract_batch
    }
    key = jax.ShapeDtypeStruct((2,), jnp.uint32)
    args = (abstract_state, dict(abstract_batch), key)
    in_shardings = (state_shardings, batch_shardings, replicated(mesh))
    out_shardings = (state_shardings, replicated(mesh))
    donate = (0,)
    if abstract_totals is not None:
        args += (dict(abstract_totals),)
        in_shardings += (replicated(mesh),)
        out_shardings += (replicated(mesh),)
        donate += (3,)
    jitted = jax.jit(
        step_fn, in_shardings=in_shardings, out_shardings=out_shardings, donate_argnums=donate
    )
    with jax.set_mesh(mesh):
        return jitted.lower(*args)


def compile_train_step(
    step_fn: Callable,
    abstract_state: TrainState,
    state_shardings: TrainState,
    abstract_batch: Mapping[str, jax.ShapeDtypeStruct],
    mesh: Mesh,
    abstract_totals: Mapping[str, jax.ShapeDtypeStruct] | None = None,
) -> tuple[Callable, float]:
    """AOT-compiles the step with donation over `mesh` (`lower_train_step`); returns
    (compiled, seconds)."""
    t0 = time.perf_counter()
    lowered = lower_train_step(
        step_fn, abstract_state, state_shardings, abstract_batch, mesh, abstract_totals
    )
    with jax.set_mesh(mesh):
        compiled = lowered.compile()
    seconds = time.perf_counter() - t0
    logging.info("compiled the train step in %.1f s", seconds)
    return compiled, seconds


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    """Everything `--mode train` compiles, for a config and a mesh (no arrays allocated).

    step_fn(state, batch, key, totals) -> (state, metrics, totals): the train step with the
    dashboard's running sums (`dashboard.accumulating`); zero_totals() makes those sums,
    replicated; abstract_state / shardings: the state's shapes and FSDP layout.
    """

    tx: optax.GradientTransformation
    schedule: optax.Schedule
    graphdef: nnx.GraphDef
    abstract_state: TrainState
    shardings: TrainState
    step_fn: Callable
    zero_totals: Callable[[], Any]
    mesh: Mesh

    def lower(self, abstract_batch: Mapping[str, jax.ShapeDtypeStruct]) -> jax.stages.Lowered:
        """`lower_train_step` of this program for a global batch's shapes."""
        return lower_train_step(*self._arguments(abstract_batch))

    def compile(self, abstract_batch: Mapping[str, jax.ShapeDtypeStruct]) -> tuple[Callable, float]:
        """`compile_train_step` of this program for a global batch's shapes."""
        return compile_train_step(*self._arguments(abstract_batch))

    def _arguments(self, abstract_batch) -> tuple:
        totals = jax.eval_shape(self.zero_totals)
        return (
            self.step_fn,
            self.abstract_state,
            self.shardings,
            abstract_batch,
            self.mesh,
            totals,
        )


def make_train_program(config, mesh: Mesh) -> TrainProgram:
    """The optimizer, state layout and step of `config` over `mesh`, as training runs them."""
    num_steps = int(config.train.num_steps)
    tx = make_optimizer(config.optim, num_steps)
    abstract_state, shardings = abstract_train_state(config.model, tx, mesh, len(ema_stds(config)))
    schedule = learning_rate_schedule(config.optim, num_steps)
    graphdef = model_graphdef(config.model)
    zero_totals = jax.jit(
        functools.partial(dashboard.zero_totals, NOISE_LEVEL_BUCKETS),
        out_shardings=replicated(mesh),
    )
    step_fn = dashboard.accumulating(make_train_step(graphdef, tx, config, schedule))
    return TrainProgram(
        tx, schedule, graphdef, abstract_state, shardings, step_fn, zero_totals, mesh
    )
