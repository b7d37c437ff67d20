"""The programs a config runs, lowered against abstract arrays over a mesh (nothing allocated).

    programs = lower_programs(config, mesh)   # {"train_step": Program, "sample_network": ...}

train_step      the step `--mode train` runs (`train.step.make_train_program`: shardings,
                donation, remat, dtypes and dashboard sums as training), global train batch;
sample_network  one guided network evaluation of the sampler (the conditional and unconditional
                halves in one batch of 2B), B = config.sample.batch_size; with autoguidance,
                the main model and a guide of its own shape (the guide's checkpoint is not
                read here; a guide is rarely larger), B each;
sampler         the whole jitted sampler (`sampling.generate.make_generate_fn`), same B;
decode          the autoencoder's decoder at config.eval.batch_size (latent models);
inception       the FID Inception forward (resize included) at config.eval.batch_size.

Batches that do not split over the mesh's batch shards are rounded up to the next multiple
(`Program.batch` says what was compiled). FLOPs are the model count
(`train.flops`), global per execution, for comparison with the compiler's.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from uvit_jax.conditioning import Conditioning
from uvit_jax.models.uvit import apply_fn
from uvit_jax.parallel.frozen import _apply as frozen_apply
from uvit_jax.parallel.mesh import batch_shard_count, batch_sharding, replicated
from uvit_jax.sampling.generate import SamplerSpec, make_generate_fn
from uvit_jax.sampling.guidance import guided_noise_fn
from uvit_jax.train import flops
from uvit_jax.train.step import TrainProgram, make_train_program

PROGRAMS = ("train_step", "sample_network", "sampler", "decode", "inception")


@dataclasses.dataclass(frozen=True)
class Program:
    """One program to compile: lower() -> jax.stages.Lowered (call under `jax.set_mesh`).

    batch: the global batch it is compiled for; model_flops: the model FLOPs (`train.flops`) of one
    execution over the whole mesh (None where the project has no count: decode, Inception).
    """

    name: str
    lower: Callable[[], jax.stages.Lowered]
    batch: int
    model_flops: float | None


def shardable_batch(batch: int, mesh: Mesh) -> int:
    """`batch` rounded up to a multiple of the mesh's batch shards."""
    n = batch_shard_count(mesh)
    return int(math.ceil(batch / n) * n)


def abstract_train_batch(config, batch: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the train step reads, as the input pipeline delivers it: x [B, h, w, C]
    float32 (pixels in [-1, 1], or autoencoder moments with 2C channels for latent models),
    label [B] int32 (class models), context [B, L, D] float32 and empty_context [L, D] (text)."""
    m = config.model
    channels = int(m.in_chans) * (1 if config.autoencoder.kind == "identity" else 2)
    out = {"x": jax.ShapeDtypeStruct((batch, m.img_size, m.img_size, channels), jnp.float32)}
    cond = Conditioning.from_config(config)
    if cond.kind == "class":
        out["label"] = jax.ShapeDtypeStruct((batch,), jnp.int32)
    elif cond.kind == "text":
        out["context"] = jax.ShapeDtypeStruct((batch, *cond.context_shape), jnp.float32)
        out["empty_context"] = jax.ShapeDtypeStruct(cond.context_shape, jnp.float32)
    return out


def _with_sharding(tree, sharding):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _conditions(config, batch: int, mesh: Mesh) -> dict:
    """Abstract labels / contexts / null context for `batch` samples, batch-sharded."""
    cond = Conditioning.from_config(config)
    bs, rep = batch_sharding(mesh), replicated(mesh)
    if cond.kind == "class":
        return dict(labels=jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=bs))
    if cond.kind == "text":
        ctx = jax.ShapeDtypeStruct((batch, *cond.context_shape), jnp.float32, sharding=bs)
        null = jax.ShapeDtypeStruct(cond.context_shape, jnp.float32, sharding=rep)
        return dict(contexts=ctx, null_context=null)
    return {}


def _train_step(config, mesh: Mesh, program: TrainProgram) -> Program:
    batch = shardable_batch(int(config.train.batch_size), mesh)
    spec = abstract_train_batch(config, batch)
    return Program(
        "train_step",
        lambda: program.lower(spec),  # the trainer's own jit, shardings and donation
        batch,
        flops.train_step_flops(config.model, batch),
    )


def _guided(config) -> bool:
    return float(config.sample.cfg_scale) != 0


def _guide_params(spec: SamplerSpec, params):
    """Autoguidance's guide weights: the main model's abstract ones, passed as an argument of
    their own (weights the two passes shared could be merged by the compiler); None without
    a guide."""
    if spec.guidance != "autoguidance" or spec.cfg_scale == 0:
        return None
    return params


def _sample_network(config, mesh: Mesh, train: TrainProgram) -> Program:
    batch = shardable_batch(int(config.sample.batch_size), mesh)
    spec = SamplerSpec.from_config(config)
    cond, graphdef = spec.conditioning, train.graphdef
    # The EMA weights as a checkpoint restores them: the train state's FSDP layout.
    params, bs = train.abstract_state.ema, batch_sharding(mesh)
    x = jax.ShapeDtypeStruct((batch, *spec.shape), jnp.float32, sharding=bs)
    t = jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=bs)
    conditions = _conditions(config, batch, mesh)

    def network(params, x, t, conditions, guide_params):
        guide_fn = None
        if guide_params is not None:
            guide_fn = functools.partial(apply_fn(graphdef), guide_params)
        noise_fn = guided_noise_fn(
            lambda *a: apply_fn(graphdef)(params, *a),
            spec.formulation.schedule,
            y=conditions.get("labels"),
            context=conditions.get("contexts"),
            cfg_scale=spec.cfg_scale,
            null_class=cond.null_class,
            null_context=conditions.get("null_context"),
            cfg_schedule=spec.cfg_schedule,
            guide_fn=guide_fn,
        )
        return noise_fn(x, t)

    passes = 2 if _guided(config) else 1
    return Program(
        "sample_network",
        lambda: jax.jit(network).lower(params, x, t, conditions, _guide_params(spec, params)),
        batch,
        passes * batch * flops.forward_flops(config.model),
    )


def _sampler(config, mesh: Mesh, train: TrainProgram) -> Program:
    batch = shardable_batch(int(config.sample.batch_size), mesh)
    spec = SamplerSpec.from_config(config)
    params = train.abstract_state.ema
    guide_params = _guide_params(spec, params)
    model_fn = apply_fn(train.graphdef)
    guide_fn = None if guide_params is None else model_fn
    fn = make_generate_fn(model_fn, spec, batch, True, batch_sharding(mesh), guide_fn)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=replicated(mesh))
    c = _conditions(config, batch, mesh)
    args = (params, key, c.get("labels"), c.get("contexts"), c.get("null_context"), guide_params)
    nfe = spec.steps + int(spec.denoise_to_zero)
    passes = 2 if _guided(config) else 1
    return Program(
        "sampler",
        lambda: fn.lower(*args),
        batch,
        nfe * passes * batch * flops.forward_flops(config.model),
    )


def _frozen(name: str, model: nnx.Module, forward: Callable, x, mesh: Mesh) -> Program:
    """A frozen network's forward as `FrozenNetwork` runs it (its own jitted `_apply`):
    weights replicated, batch sharded."""
    graphdef, state = nnx.split(model)
    state = _with_sharding(state, replicated(mesh))
    return Program(
        name,
        lambda: frozen_apply.lower(forward, graphdef, state, x, batch_sharding(mesh)),
        x.shape[0],
        None,
    )


def _decode(config, mesh: Mesh, train: TrainProgram) -> Program | None:
    if config.autoencoder.kind == "identity":
        return None
    from uvit_jax.latent_codec import make_autoencoder

    ae = dict(config.autoencoder.to_dict(), pretrained_path="")  # the architecture alone
    model = nnx.eval_shape(lambda: make_autoencoder(ae))
    batch = shardable_batch(int(config.eval.batch_size), mesh)
    side, c = int(config.model.img_size), int(config.model.in_chans)
    z = jax.ShapeDtypeStruct((batch, side, side, c), jnp.float32)
    return _frozen("decode", model, lambda m, z: m.decode(z), z, mesh)


def _inception(config, mesh: Mesh, train: TrainProgram) -> Program:
    from uvit_jax.evaluation.preprocess import inception_input
    from uvit_jax.models.inception import abstract_inception

    protocol = config.eval.protocol
    batch = shardable_batch(int(config.eval.batch_size), mesh)
    side = int(config.data.resolution)
    images = jax.ShapeDtypeStruct((batch, side, side, 3), jnp.uint8)
    return _frozen(
        "inception",
        abstract_inception(),
        lambda m, x: m(inception_input(x, protocol)),
        images,
        mesh,
    )


_BUILDERS = {
    "train_step": _train_step,
    "sample_network": _sample_network,
    "sampler": _sampler,
    "decode": _decode,
    "inception": _inception,
}


def make_programs(config, mesh: Mesh, names: tuple[str, ...] = PROGRAMS) -> list[Program]:
    """The config's programs among `names` (decode only for latent models)."""
    train = make_train_program(config, mesh)
    out = [_BUILDERS[n](config, mesh, train) for n in names]
    return [p for p in out if p is not None]
