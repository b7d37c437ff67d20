"""The train state: a pytree created already sharded over the mesh."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import Mesh

from uvit_jax.models.uvit import build_uvit
from uvit_jax.parallel.mesh import replicated, state_shardings


@struct.dataclass
class TrainState:
    """Everything a training step reads and writes.

    step: int32 scalar, number of updates applied.
    params: nnx.State of float32 U-ViT parameters.
    opt_state: optax state of `params`.
    ema: nnx.State, EMA of `params` (the classic one, `config.train.ema_rate`).
    nonfinite_steps: int32 scalar, steps whose loss or gradient was not finite (not applied).
    first_nonfinite_step: int32 scalar, the first such step, -1 if none.
    power_ema: tuple of nnx.State, one power-function EMA of `params` per relative std of
        `config.train.ema_stds` in its order (`train.power_ema`); () when none is tracked.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    ema: Any
    nonfinite_steps: jax.Array
    first_nonfinite_step: jax.Array
    power_ema: tuple = ()

    def checkpoint_items(self) -> tuple[dict, Any]:
        """(the `state` item, the `ema` item) as saved by `uvit_jax.checkpoints`; the state item
        holds `power_ema` only where EMAs are tracked (a run without has the same items as
        before they existed)."""
        item = dict(
            step=self.step,
            params=self.params,
            opt_state=self.opt_state,
            nonfinite_steps=self.nonfinite_steps,
            first_nonfinite_step=self.first_nonfinite_step,
        )
        if self.power_ema:
            item["power_ema"] = self.power_ema
        return item, self.ema

    @classmethod
    def from_checkpoint_items(cls, item: Mapping, ema: Any) -> TrainState:
        item = dict(item)
        return cls(ema=ema, power_ema=tuple(item.pop("power_ema", ())), **item)


def model_graphdef(model_config) -> nnx.GraphDef:
    """The static structure of the model (no arrays are allocated)."""
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: build_uvit(model_config)))
    return graphdef


# (the checkpoint's parameters, the new model's own) -> the parameters to start from.
Adapt = Callable[[Any, nnx.State], nnx.State]


def init_train_state(
    model_config,
    tx: optax.GradientTransformation,
    seed: int,
    power_emas: int = 0,
    adapt: Adapt | None = None,
    source: Any = None,
) -> TrainState:
    """A fresh state at step 0 (call under `jax.jit` with `out_shardings` to create it sharded),
    with `power_emas` power-function EMAs (copies of the weights: step 1 replaces them wholly).

    adapt, source: fine-tuning: the parameters are `adapt(source, the fresh ones)`
    (`init_from.transfer`); the EMAs start from them too, the optimizer state fresh.
    """
    _, params = nnx.split(build_uvit(model_config, seed=seed))
    if adapt is not None:
        params = adapt(source, params)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema=jax.tree.map(jnp.copy, params),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
        power_ema=tuple(jax.tree.map(jnp.copy, params) for _ in range(power_emas)),
    )


def abstract_train_state(
    model_config, tx: optax.GradientTransformation, mesh: Mesh, power_emas: int = 0
) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings, the shardings themselves) for `mesh`.

    Parameters, EMAs and optimizer moments follow the FSDP rule; scalars are replicated.
    """
    shapes = jax.eval_shape(lambda: init_train_state(model_config, tx, 0, power_emas))
    shardings = state_shardings(shapes, mesh)
    rep = replicated(mesh)
    shardings = shardings.replace(step=rep, nonfinite_steps=rep, first_nonfinite_step=rep)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
    return abstract, shardings


def create_train_state(
    model_config,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    seed: int,
    power_emas: int = 0,
    adapt: Adapt | None = None,
    source: Any = None,
) -> TrainState:
    """A fresh state, each array created directly in its shards (never whole on one device).

    power_emas, adapt, source: as for `init_train_state`; `source` (a checkpoint's parameters)
    enters the compiled function as an argument, not as constants baked into it.
    """
    _, shardings = abstract_train_state(model_config, tx, mesh, power_emas)
    if adapt is None:
        return jax.jit(
            lambda: init_train_state(model_config, tx, seed, power_emas), out_shardings=shardings
        )()
    return jax.jit(
        lambda src: init_train_state(model_config, tx, seed, power_emas, adapt, src),
        out_shardings=shardings,
    )(source)
