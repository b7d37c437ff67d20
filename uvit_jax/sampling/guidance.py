"""Wrappers turning a U-ViT apply function into the samplers' `noise_fn(x, t_continuous)`.

The model apply signature assumed throughout:

    model_fn(x [B, H, W, C] float32, t_net [B] float32, y [B] int32 | None,
             context [B, L, D] | None) -> out [B, H, W, C]

where `out` is the network's target (`diffusion.targets`: the noise for the paper's models) and
`t_net` its time input (999 t for continuous paths, 1000 t for discrete ones, via
`schedule.network_time`). Classifier-free guidance uses U-ViT's convention
out = out_c + s (out_c - out_u) (so s = 0 is unguided, and U-ViT's s is the usual scale minus 1)
on the network's own target, with the conditional and unconditional halves computed in one
batched forward pass. Every target is x_t-affine in the others with coefficients that depend on
t only, so guiding v or the velocity is the same as guiding the noise they imply.

Autoguidance (Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself")
guides with a weaker model instead of the unconditional branch: an earlier checkpoint of the
same run, or a smaller model, conditioned on the same class or context. In the same convention,
out = out_main + s (out_main - out_guide), so s = 0 is unguided and Karras' weight w is s + 1.
It needs no null class, so it also guides unconditional models. The two networks may differ in
width and depth, so a guided step makes two forward passes of B images (the main model, then
the guide) rather than one of 2B; one batched call would need identical shapes and stacked
weights, and costs the same FLOPs. Interval and schedule act on s as for CFG; outside the
interval, and everywhere at s = 0, the guide is not called.

Guidance can be limited to an interval of noise levels (Kynkaenniemi et al. 2024, "Applying
guidance in a limited interval improves sample and distribution quality in diffusion models"),
given as EDM's sigma = sigma_t / alpha_t, the same noise level under every schedule. Outside the
interval the noise function makes one conditional pass of B images instead of the guided 2B.

The scale can also follow a schedule of the time (Wang et al. 2024, "Analysis of
Classifier-Free Guidance Weight Schedulers"): "constant" (s everywhere) or "linear", their
increasing-linear scheduler, s(t) = cfg_scale * (1 - t) in the samplers' normalized time t:
0 at pure noise (t = 1), growing to cfg_scale at the end (t_end: 1e-4 VP, 1e-3 discrete, so
0.9999 and 0.999 of it): cfg_scale is the end value, and the mean over t is about half of it.
The time t, rather than the step index or sigma, because every sampler already passes it to the
noise function (no sampler changes, and the ramp is one function of the noise level whatever
the grid or step count), and it spans [t_end, 1] under every schedule, where sigma_t / alpha_t
spans 0.029-14.6 (discrete) or 0.0032-152 (VP): a ramp linear in sigma would sit near
cfg_scale on most steps of a log-spaced grid, where sigma is far below its maximum.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from uvit_jax.diffusion.schedules import Schedule
from uvit_jax.sampling.dpm_solver import NoiseFn

CFG_SCHEDULES = ("constant", "linear")
# What the guided pass subtracts: the unconditional branch ("cfg") or a weaker model's output.
GUIDANCES = ("cfg", "autoguidance")

ModelFn = Callable[[jax.Array, jax.Array, jax.Array | None, jax.Array | None], jax.Array]


def _is_zero(scale) -> bool:
    """True for a concrete scale of 0 (then no unconditional pass is traced at all)."""
    return isinstance(scale, (int, float)) and scale == 0


def linear_scale(cfg_scale: float | jax.Array, t: jax.Array, ndim: int) -> jax.Array:
    """The "linear" schedule's scale cfg_scale * (1 - t) for times t [B], as [B, 1, ...]
    (`ndim` dimensions in all) to broadcast over the output; dtype of t."""
    return (cfg_scale * (1.0 - t)).reshape(t.shape + (1,) * (ndim - 1))


def guided_noise_fn(
    model_fn: ModelFn,
    schedule: Schedule,
    *,
    y: jax.Array | None = None,
    context: jax.Array | None = None,
    cfg_scale: float | jax.Array = 0.0,
    null_class: int | None = None,
    null_context: jax.Array | None = None,
    cfg_interval: tuple[float, float] | None = None,
    cfg_schedule: str = "constant",
    guide_fn: ModelFn | None = None,
) -> NoiseFn:
    """The noise function of a (possibly guided) U-ViT for DPM-Solver / Euler-Maruyama.

    Args:
      model_fn: the U-ViT apply function (signature in the module docstring).
      schedule: maps continuous t to the network's time input (`schedule.network_time`).
      y: [B] int32 class labels (class-conditional models) or None.
      context: [B, L, D] text context (text-to-image models) or None.
      cfg_scale: U-ViT's guidance scale s; a Python 0 skips the unconditional (or guide) pass.
      null_class: the label of the unconditional class (U-ViT: the last one, e.g. 1000 of 1001).
      null_context: [L, D] (or [B, L, D]) encoding of the empty prompt.
      cfg_interval: (lo, hi): guide only where lo < sigma_t / alpha_t <= hi; None: everywhere.
      cfg_schedule: "constant" (scale cfg_scale) or "linear" (cfg_scale * (1 - t), module
          docstring); either way a guided step is one forward pass of 2B images.
      guide_fn: autoguidance: the guide model's apply function (same signature as model_fn),
          called with the same y and context; its output replaces the unconditional one, so a
          guided step is two passes of B images. None: classifier-free guidance.
    Returns:
      noise_fn(x [B, H, W, C], t_continuous [B]) -> the guided target [B, H, W, C].
    """
    if cfg_schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {CFG_SCHEDULES}, got {cfg_schedule!r}")
    guided = not _is_zero(cfg_scale)
    if guided and guide_fn is None:
        if y is None and context is None:
            raise ValueError(
                "classifier-free guidance (cfg_scale != 0) needs labels (y) or a context to guide"
            )
        if y is not None and null_class is None:
            raise ValueError("classifier-free guidance with labels needs null_class")
        if context is not None and null_context is None:
            raise ValueError("classifier-free guidance with a context needs null_context")

    def conditional(x: jax.Array, t_net: jax.Array) -> jax.Array:
        return model_fn(x, t_net, y, context)

    def cfg_pair(x: jax.Array, t_net: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(conditional, unconditional) outputs from one batched pass of 2B images."""
        b = x.shape[0]
        y2 = ctx2 = None
        if y is not None:
            y2 = jnp.concatenate([y, jnp.full_like(y, null_class)])
        if context is not None:
            null = jnp.broadcast_to(jnp.asarray(null_context, context.dtype), context.shape)
            ctx2 = jnp.concatenate([context, null])
        out = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t_net, t_net]), y2, ctx2)
        return out[:b], out[b:]

    def autoguidance_pair(x: jax.Array, t_net: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(main, guide) outputs: two passes of B images, both with the same condition."""
        return conditional(x, t_net), guide_fn(x, t_net, y, context)

    pair = cfg_pair if guide_fn is None else autoguidance_pair

    def guided_pass(x: jax.Array, t_net: jax.Array, scale: float | jax.Array) -> jax.Array:
        out_c, out_weak = pair(x, t_net)
        return out_c + scale * (out_c - out_weak)

    def noise_fn(x: jax.Array, t: jax.Array) -> jax.Array:
        t_net = schedule.network_time(t).astype(jnp.float32)
        if not guided:
            return conditional(x, t_net)
        # "constant" keeps the Python scale, so its program is the unscheduled one exactly.
        scale = cfg_scale if cfg_schedule == "constant" else linear_scale(cfg_scale, t, x.ndim)
        guide = functools.partial(guided_pass, scale=scale)
        if cfg_interval is None:
            return guide(x, t_net)
        # The samplers step every sample at one time: t[0] decides for the batch.
        sigma = jnp.exp(-schedule.marginal_lambda(t[0]))
        inside = (sigma > cfg_interval[0]) & (sigma <= cfg_interval[1])
        return jax.lax.cond(inside, guide, conditional, x, t_net)

    return noise_fn
