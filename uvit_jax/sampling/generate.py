"""`generate`: a config's sampler, guidance and time map around a U-ViT apply function.

    samples = generate(model_fn, config, key, labels=...)   # [B, H, W, C] float32

reads `config.diffusion` (`Formulation.from_config`), `config.sample.{sampler, steps, cfg_scale,
cfg_interval, cfg_schedule, guidance, guide_checkpoint, grid, thresholding, denoise_to_zero}`,
`config.model.{img_size, in_chans}` and what conditions the model (`Conditioning`), draws
x_T (and random labels) for the whole global batch from `key` inside one jitted program, so a
seed gives the same samples on any number of devices. Outputs are in the model's space (latents
for latent models); `sample_images` adds the autoencoder's decoder.

The samplers, by `config.sample.sampler` name, are those of `uvit_jax.sampling.samplers`.
Autoguidance (`config.sample.guidance = "autoguidance"`, `uvit_jax.sampling.guidance`) takes the
guide model's apply function and weights beside the main model's; loading it from
`config.sample.guide_checkpoint` is the caller's (`uvit_jax.api.load_guide`), `check_guide`
says whether its config can guide the main one.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from uvit_jax.conditioning import Conditioning
from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.errors import ConfigError
from uvit_jax.sampling.dpm_solver import SKIP_TYPES, NoiseFn
from uvit_jax.sampling.guidance import CFG_SCHEDULES, GUIDANCES, guided_noise_fn
from uvit_jax.sampling.samplers import SAMPLERS, runs_on


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """The hashable part of a config that fixes the sampling program."""

    formulation: Formulation
    sampler: str
    steps: int
    cfg_scale: float
    shape: tuple[int, int, int]  # (H, W, C)
    conditioning: Conditioning
    thresholding: bool = False  # DPM-Solver++ only: dynamic thresholding of x0 (pixel models)
    denoise_to_zero: bool = False  # DPM-Solver only: a last NFE returning x0 at t_end
    cfg_interval: tuple[float, float] | None = None  # guided sigma range (lo, hi]; None: all
    grid: str = ""  # the time grid (`dpm_solver.SKIP_TYPES`); "": the sampler's own
    cfg_schedule: str = "constant"  # the guidance scale over time (`guidance.CFG_SCHEDULES`)
    guidance: str = "cfg"  # what the scale guides away from (`guidance.GUIDANCES`)

    @classmethod
    def from_config(cls, config: Any) -> SamplerSpec:
        formulation = Formulation.from_config(config)
        sampler = config.sample.sampler
        if sampler not in SAMPLERS:
            raise ConfigError(
                f"config.sample.sampler: unknown sampler {sampler!r}; expected one of "
                f"{tuple(SAMPLERS)}"
            )
        if not runs_on(SAMPLERS[sampler], formulation):
            raise ConfigError(
                f"config.sample.sampler={sampler!r} is not defined on formulation "
                f"{formulation.path!r}; expected one of "
                f"{tuple(n for n, s in SAMPLERS.items() if runs_on(s, formulation))}"
            )
        steps = int(config.sample.steps)
        if steps < 1:
            raise ConfigError(f"config.sample.steps must be >= 1, got {steps}")
        cfg_scale = float(config.sample.cfg_scale)
        m = config.model
        shape = (int(m.img_size), int(m.img_size), int(m.in_chans))
        conditioning = Conditioning.from_config(config)
        guidance = guidance_from_config(config)
        cfg = cfg_scale != 0 and guidance == "cfg"  # autoguidance needs no null condition
        if cfg and conditioning.kind == "none":
            raise ConfigError(
                "config.sample.cfg_scale != 0 needs a conditional model (num_classes > 0, uvit_t2i)"
            )
        if cfg and not conditioning.has_null:
            raise ConfigError(
                "config.sample.cfg_scale != 0 needs a model trained for guidance "
                "(config.diffusion.p_uncond > 0: null class / empty context)"
            )
        thresholding = bool(config.sample.get("thresholding", False))
        if thresholding and not SAMPLERS[sampler].predict_x0:
            raise ConfigError(
                "config.sample.thresholding needs a data-prediction sampler "
                f"({', '.join(n for n, s in SAMPLERS.items() if s.predict_x0)}), not {sampler!r}"
            )
        denoise_to_zero = bool(config.sample.get("denoise_to_zero", False))
        if denoise_to_zero and not hasattr(SAMPLERS[sampler], "denoise_to_zero"):
            raise ConfigError(
                "config.sample.denoise_to_zero needs a DPM-Solver sampler or another with the "
                f"option ({_samplers_with('denoise_to_zero')}), not {sampler!r}"
            )
        grid = str(config.sample.get("grid", "") or "")
        if grid and grid not in SKIP_TYPES:
            raise ConfigError(
                f'config.sample.grid={grid!r}: expected "" (the sampler\'s own) or one of '
                f"{SKIP_TYPES}"
            )
        if grid and not hasattr(SAMPLERS[sampler], "skip_type"):
            raise ConfigError(
                "config.sample.grid needs a sampler with a time grid "
                f"({_samplers_with('skip_type')}), not {sampler!r}"
            )
        return cls(
            formulation,
            sampler,
            steps,
            cfg_scale,
            shape,
            conditioning,
            thresholding,
            denoise_to_zero,
            cfg_interval_from_config(config),
            grid,
            cfg_schedule_from_config(config),
            guidance,
        )


def _samplers_with(option: str) -> str:
    """The registered samplers that have field `option`, for error messages."""
    return ", ".join(name for name, s in SAMPLERS.items() if hasattr(s, option))


def cfg_interval_from_config(config: Any) -> tuple[float, float] | None:
    """`config.sample.cfg_interval` checked: () -> None (guidance at every step), else (lo, hi)
    with 0 <= lo < hi in EDM's noise level sigma_t / alpha_t."""
    interval = tuple(config.sample.get("cfg_interval", ()) or ())
    if not interval:
        return None
    if len(interval) != 2 or not 0 <= float(interval[0]) < float(interval[1]):
        raise ConfigError(
            f"config.sample.cfg_interval={interval}: expected () or (lo, hi) noise levels "
            "sigma_t / alpha_t with 0 <= lo < hi, e.g. (0.28, 5.42)"
        )
    if float(config.sample.cfg_scale) == 0:
        raise ConfigError("config.sample.cfg_interval is set but cfg_scale is 0 (no guidance)")
    return float(interval[0]), float(interval[1])


def cfg_schedule_from_config(config: Any) -> str:
    """`config.sample.cfg_schedule` checked: one of `guidance.CFG_SCHEDULES` ("constant" when
    the field is missing, as in configs saved before it existed)."""
    schedule = config.sample.get("cfg_schedule", "constant")
    if schedule not in CFG_SCHEDULES:
        raise ConfigError(
            f"config.sample.cfg_schedule={schedule!r}: expected one of {CFG_SCHEDULES}"
        )
    if schedule != "constant" and float(config.sample.cfg_scale) == 0:
        raise ConfigError(
            f"config.sample.cfg_schedule is {schedule!r} but cfg_scale is 0 (no guidance)"
        )
    return str(schedule)


def guide_checkpoint_of(config: Any) -> str:
    """`config.sample.guide_checkpoint` as a string ("" when unset or missing)."""
    return str(config.sample.get("guide_checkpoint", "") or "")


def guidance_from_config(config: Any) -> str:
    """`config.sample.guidance` checked: one of `guidance.GUIDANCES` ("cfg" when the field is
    missing, as in configs saved before it existed). Autoguidance with a scale needs
    `guide_checkpoint`; classifier-free guidance refuses one (it would be ignored)."""
    guidance = config.sample.get("guidance", "cfg")
    if guidance not in GUIDANCES:
        raise ConfigError(f"config.sample.guidance={guidance!r}: expected one of {GUIDANCES}")
    checkpoint = guide_checkpoint_of(config)
    if guidance == "cfg" and checkpoint:
        raise ConfigError(
            f"config.sample.guide_checkpoint={checkpoint!r} is set but config.sample.guidance "
            "is 'cfg' (the guide model is autoguidance's)"
        )
    if guidance == "autoguidance" and float(config.sample.cfg_scale) != 0 and not checkpoint:
        raise ConfigError(
            "config.sample.guidance='autoguidance' needs config.sample.guide_checkpoint: a step "
            "of this run (e.g. 2000), a workdir, or workdir:step"
        )
    return str(guidance)


def _guide_fields(config: Any) -> dict[str, Any]:
    """What a guide must share with the main model: the space it works in (image size,
    channels, latent space), its condition, and what its output means (path, target)."""
    m, formulation = config.model, Formulation.from_config(config)
    fields: dict[str, Any] = {
        "model.img_size": int(m.img_size),
        "model.in_chans": int(m.in_chans),
        "model.kind": str(m.kind),
    }
    if m.kind == "uvit_t2i":
        fields.update(
            {"model.num_clip_token": int(m.num_clip_token), "model.clip_dim": int(m.clip_dim)}
        )
    else:
        fields["model.num_classes"] = int(m.num_classes)
    fields.update({
        "diffusion.formulation": formulation.path,
        "diffusion.target": formulation.target,
        "autoencoder.kind": str(config.autoencoder.kind),
        "autoencoder.scale_factor": config.autoencoder.scale_factor,
    })  # fmt: skip
    return fields


def check_guide(config: Any, guide_config: Any) -> None:
    """Raises ConfigError (one line: `config.sample.guide_checkpoint`, the field, both values)
    when the guide's config (`guide_config`) differs from the main model's (`config`) where
    autoguidance needs them equal (`_guide_fields`); width, depth, heads, patch size and the
    training recipe may differ."""
    main, guide = _guide_fields(config), _guide_fields(guide_config)
    for field, value in main.items():
        if guide.get(field) != value:
            raise ConfigError(
                f"config.sample.guide_checkpoint={guide_checkpoint_of(config)!r}: the guide's "
                f"config.{field}={guide.get(field)!r} differs from the main model's {value!r}"
            )


def configured_sampler(spec: SamplerSpec) -> Callable[..., jax.Array]:
    """The spec's registered sampler with its options (thresholding, denoise_to_zero, grid)."""
    sampler = SAMPLERS[spec.sampler]
    options: dict[str, Any] = {
        f: True for f in ("thresholding", "denoise_to_zero") if getattr(spec, f)
    }
    if spec.grid:
        options["skip_type"] = spec.grid
    if options:  # validated by from_config: the sampler has these fields
        sampler = dataclasses.replace(sampler, **options)
    return sampler


def sample_noise(spec: SamplerSpec, noise_fn: NoiseFn, x_T: jax.Array, key: jax.Array) -> jax.Array:
    """Runs the spec's sampler from x_T [B, H, W, C] (key: SDE noise only). Jittable."""
    sampler = configured_sampler(spec)
    return sampler(noise_fn, x_T, spec.formulation, steps=spec.steps, key=key)


def make_generate_fn(
    model_fn: Callable,
    spec: SamplerSpec,
    num: int,
    with_params: bool = False,
    sharding: jax.sharding.Sharding | None = None,
    guide_fn: Callable | None = None,
) -> Callable:
    """The jitted fn(params, key, labels, contexts, null_context, guide_params=None) -> samples
    [num, H, W, C].

    Cached on its arguments (however they are passed), so repeated batches reuse one compiled
    program. `model_fn` is
    model_fn(x, t_net, y, context) or, with_params, model_fn(params, x, t_net, y, context):
    passing the weights as `params` keeps them out of the compiled program's constants.
    `sharding` (e.g. NamedSharding(mesh, P(("data", "fsdp")))) shards every batch-leading array.
    `guide_fn`: autoguidance's guide model, called like model_fn (with `guide_params` first when
    with_params).
    """
    return _generate_fn(model_fn, spec, num, with_params, sharding, guide_fn)


@functools.lru_cache(maxsize=32)
def _generate_fn(
    model_fn: Callable,
    spec: SamplerSpec,
    num: int,
    with_params: bool,
    sharding: jax.sharding.Sharding | None,
    guide_fn: Callable | None,
) -> Callable:
    """`make_generate_fn`'s program, cached on positional arguments alone."""
    schedule = spec.formulation.schedule
    cond = spec.conditioning

    def constrain(v):
        return (
            v if (v is None or sharding is None) else jax.lax.with_sharding_constraint(v, sharding)
        )

    def run(params, key, labels, contexts, null_context, guide_params=None):
        k_x, k_y, k_sde = jax.random.split(key, 3)
        x_T = constrain(jax.random.normal(k_x, (num, *spec.shape), jnp.float32))
        if cond.kind == "class" and labels is None:
            labels = jax.random.randint(k_y, (num,), 0, cond.num_classes, jnp.int32)
        labels, contexts = constrain(labels), constrain(contexts)
        apply = functools.partial(model_fn, params) if with_params else model_fn
        guide = guide_fn
        if guide_fn is not None and with_params:
            guide = functools.partial(guide_fn, guide_params)
        noise_fn = guided_noise_fn(
            apply,
            schedule,
            y=labels,
            context=contexts,
            cfg_scale=spec.cfg_scale,
            null_class=cond.null_class,
            null_context=null_context,
            cfg_interval=spec.cfg_interval,
            cfg_schedule=spec.cfg_schedule,
            guide_fn=guide,
        )
        return constrain(sample_noise(spec, noise_fn, x_T, k_sde))

    return jax.jit(run)


def generate(
    model_fn: Callable,
    config: Any,
    key: jax.Array,
    *,
    labels: jax.Array | None = None,
    contexts: jax.Array | None = None,
    null_context: jax.Array | None = None,
    num: int | None = None,
    params: Any = None,
    sharding: jax.sharding.Sharding | None = None,
    guide_fn: Callable | None = None,
    guide_params: Any = None,
) -> jax.Array:
    """Samples a batch with the config's sampler (see the module docstring).

    Args:
      model_fn: model_fn(x [B,H,W,C], t_net [B], y [B] | None, context [B,L,D] | None) -> eps,
          or model_fn(params, x, t_net, y, context) when `params` is given. Reuse the same
          callable across calls: compiled programs are cached on it.
      config: the run config (fields listed in the module docstring).
      key: PRNG key; x_T, random labels and SDE noise are all derived from it.
      labels: [B] int32 class labels (class models); drawn uniformly from the real classes if None.
      contexts: [B, L, D] text contexts (text-to-image models; required there).
      null_context: [L, D] empty-prompt context, required for guided text-to-image sampling.
      num: batch size B when neither labels nor contexts give it (default
          config.sample.batch_size).
      params: model weights passed to model_fn as its first argument.
      sharding: sharding of batch-leading arrays (B must divide over it).
      guide_fn, guide_params: autoguidance (config.sample.guidance): the guide model, called
          like model_fn (guide_params first when `params` is given); required when the scale
          is not 0, unused (not even passed to the program) when it is.
    Returns:
      [B, H, W, C] float32 samples in the model's space.
    """
    spec = SamplerSpec.from_config(config)
    kind = spec.conditioning.kind
    if kind == "text" and contexts is None:
        raise ValueError(
            "text-to-image sampling (config.model.kind='uvit_t2i') needs contexts [B, L, D]"
        )
    if kind != "text" and contexts is not None:
        raise ValueError(f"contexts given, but config.model.kind={config.model.kind!r} takes none")
    if kind != "class" and labels is not None:
        raise ValueError(
            "labels given, but the config's model is not class-conditional (num_classes <= 0)"
        )
    if spec.guidance == "cfg" and guide_fn is not None:
        raise ValueError("a guide model was given, but config.sample.guidance is 'cfg'")
    if spec.guidance == "autoguidance" and spec.cfg_scale != 0 and guide_fn is None:
        raise ValueError(
            "autoguidance (config.sample.guidance) with cfg_scale != 0 needs the guide model "
            "(guide_fn; uvit_jax.api.load_guide loads config.sample.guide_checkpoint)"
        )
    if spec.cfg_scale == 0:  # unguided: the guide is never called
        guide_fn = guide_params = None
    if kind == "text" and spec.guidance == "cfg" and spec.cfg_scale != 0 and null_context is None:
        raise ValueError(
            "guided text-to-image sampling (config.sample.cfg_scale != 0) needs null_context [L, D]"
        )
    sizes = {int(v.shape[0]) for v in (labels, contexts) if v is not None}
    if num is not None:
        sizes.add(int(num))
    if len(sizes) > 1:
        raise ValueError(f"inconsistent batch sizes from labels/contexts/num: {sorted(sizes)}")
    n = sizes.pop() if sizes else int(config.sample.batch_size)
    if labels is not None:
        labels = jnp.asarray(labels, jnp.int32)
        if labels.is_fully_addressable:  # a multi-host global array cannot be inspected here
            bad = (labels < 0) | (labels >= int(config.model.num_classes))
            if bool(jnp.any(bad)):
                raise ValueError(
                    f"labels must lie in [0, config.model.num_classes={config.model.num_classes})"
                )
    fn = make_generate_fn(model_fn, spec, n, params is not None, sharding, guide_fn)
    return fn(params, key, labels, contexts, null_context, guide_params)


def sample_images(
    graphdef: Any,
    params: Any,
    config: Any,
    key: jax.Array,
    *,
    decode: Callable[[jax.Array], jax.Array] | None = None,
    guide: tuple[Any, Any] | None = None,
    **conditions: Any,
) -> jax.Array:
    """Samples images in [-1, 1] from U-ViT weights: `generate`, then the autoencoder's decoder.

    Args:
      graphdef, params: the U-ViT's `nnx.split` structure and weights (e.g. the EMA state).
      config: the run config.
      key: as for `generate`.
      decode: scaled latents -> images; default: identity for pixel models
          (config.autoencoder.kind == "identity"), else the config's autoencoder
          (`autoencoder_from_config`, on one device).
      guide: autoguidance: the guide model's (graphdef, params) (`uvit_jax.api.load_guide`).
      **conditions: `generate`'s labels, contexts, null_context, num and sharding; `num`
          defaults to config.sample.num_samples when neither labels nor contexts give it.
    Returns:
      [B, H, W, C] float32 images (nominally in [-1, 1]; not clipped).
    """
    from uvit_jax.models.uvit import apply_fn

    if all(conditions.get(k) is None for k in ("num", "labels", "contexts")):
        conditions["num"] = int(config.sample.num_samples)
    if guide is not None:
        conditions.update(guide_fn=apply_fn(guide[0]), guide_params=guide[1])
    z = generate(apply_fn(graphdef), config, key, params=params, **conditions)
    if decode is None:
        if config.autoencoder.kind == "identity":
            return z
        from uvit_jax.latent_codec import autoencoder_from_config

        decode = autoencoder_from_config(config).decode
    return decode(z)
