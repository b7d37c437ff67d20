"""The training objective of U-ViT: noise the data, predict the noise, mean squared error.

Both formulations in one place so the train step only asks "which one":
  vp_continuous: t ~ U[0, 1), x_t = a(t) x0 + s(t) eps, network time 999 t;
  sd_discrete:   n ~ U{1..1000}, x_n = sqrt(abar_n) x0 + sqrt(1 - abar_n) eps, network time n.

The dashboards split the loss by noise level: `noise_level_bucket` sorts examples into equal
ranges of t (or of n), named by `noise_level_names`.

Optionally each example's error is weighted by its noise level (`LOSS_WEIGHTINGS`). With
SNR = alpha^2 / sigma^2, the noise error equals SNR times the error of the implied clean image
x0 = (x_t - sigma eps_hat) / alpha, so plain noise prediction weighs x0 errors by SNR: almost
nothing at the high noise levels where the image's layout is decided (SNR 0.005 at the end of
Stable Diffusion's schedule). The weightings, as weights w on the noise error (x0 weight SNR w):
  "none"          w = 1 (the paper, and every paper config);
  "min_snr"       w = min(SNR, gamma) / SNR: Min-SNR-gamma (Hang et al., ICCV 2023) caps the
                  weight of nearly clean steps;
  "snr_plus_one"  w = 1 + 1 / SNR, x0 weight SNR + 1: the loss of v-prediction (Salimans & Ho,
                  ICLR 2022) on the same noise-predicting network, which keeps x0 errors at high
                  noise from vanishing.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from uvit_jax.diffusion.schedules import FORMULATIONS, schedule_for
from uvit_jax.errors import ConfigError

Array = jax.Array


LOSS_WEIGHTINGS = ("none", "min_snr", "snr_plus_one")

# vp_continuous: the network sees time 999 t for t in [0, 1).
VP_NETWORK_TIME_SCALE = 999.0


def noised_input(key: Array, x0: Array, formulation: str) -> tuple[Array, Array, Array, Array]:
    """Draws a time and noise for every example.

    Args:
      key: PRNG key.
      x0: [B, H, W, C] float32 clean data (scaled latents or pixels in [-1, 1]).
      formulation: "vp_continuous" or "sd_discrete".
    Returns:
      (x_t [B, H, W, C] float32, network time [B] float32, eps [B, H, W, C] float32,
      SNR alpha^2 / sigma^2 [B] float32).
    """
    if formulation not in FORMULATIONS:
        raise ValueError(f"diffusion.formulation={formulation!r}; expected one of {FORMULATIONS}")
    k_t, k_eps = jax.random.split(key)
    b = x0.shape[0]
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    schedule = schedule_for(formulation)
    if formulation == "vp_continuous":
        t = jax.random.uniform(k_t, (b,), jnp.float32)
        alpha = schedule.marginal_alpha(t)
        std = schedule.marginal_std(t)
        t_net = VP_NETWORK_TIME_SCALE * t
    else:
        n = jax.random.randint(k_t, (b,), 1, schedule.total_N + 1)
        abar = jnp.asarray(schedule.alphas_cumprod, jnp.float32)[n - 1]
        alpha, std = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
        t_net = n.astype(jnp.float32)
    x_t = alpha[:, None, None, None] * x0 + std[:, None, None, None] * eps
    return x_t, t_net, eps, (alpha / std) ** 2


def loss_weights(snr: Array, weighting: str = "none", gamma: float = 5.0) -> Array:
    """Per-example weights [B] of the noise-prediction error for SNRs `snr` [B]."""
    if weighting == "none":
        return jnp.ones_like(snr)
    if weighting == "min_snr":
        return jnp.minimum(snr, gamma) / snr
    if weighting == "snr_plus_one":
        return 1.0 + 1.0 / snr
    raise ConfigError(
        f"config.diffusion.loss_weighting={weighting!r}; expected one of {LOSS_WEIGHTINGS}"
    )


def example_losses(
    predict: Callable[[Array, Array], Array],
    key: Array,
    x0: Array,
    formulation: str,
    *,
    weighting: str = "none",
    gamma: float = 5.0,
) -> tuple[Array, Array]:
    """Each example's loss and the network time it was drawn at.

    `predict(x_t, t_net) -> eps_hat` closes over the condition (labels or contexts).
    Returns (loss [B] float32: mean over H, W, C of (eps - eps_hat)^2 times the example's
    `loss_weights`; t_net [B] float32 as `noised_input` gives it).
    """
    x_t, t_net, eps, snr = noised_input(key, x0, formulation)
    err = (eps - predict(x_t, t_net).astype(jnp.float32)) ** 2
    return loss_weights(snr, weighting, gamma) * jnp.mean(err, axis=(1, 2, 3)), t_net


def noise_level_bucket(t_net: Array, formulation: str, num_buckets: int) -> Array:
    """Which of `num_buckets` equal ranges of the schedule's time each network time falls in.

    t_net [B] float32 as `noised_input` draws it -> [B] int32 in [0, num_buckets), the ranges
    `noise_level_names` names. The batch loss mixes noise levels whose errors differ severalfold;
    the loss of each range shows where training still gains and where it has stalled.
    """
    if formulation == "sd_discrete":
        # Integer arithmetic: n = 1..N splits exactly, n = 250 in the first quarter, 251 not.
        n = t_net.astype(jnp.int32)
        return (n - 1) * num_buckets // schedule_for(formulation).total_N
    bucket = jnp.floor(t_net / VP_NETWORK_TIME_SCALE * num_buckets).astype(jnp.int32)
    return jnp.minimum(bucket, num_buckets - 1)  # t < 1, but 999 t / 999 may round up to 1


def noise_level_names(formulation: str, num_buckets: int) -> tuple[str, ...]:
    """Names of the `noise_level_bucket` ranges, as TensorBoard tags show them:
    "n1-250", ... for sd_discrete (steps n), "t0.00-0.25", ... for vp_continuous (time t)."""
    if formulation == "sd_discrete":
        total = schedule_for(formulation).total_N
        edges = [i * total // num_buckets for i in range(num_buckets + 1)]
        return tuple(f"n{lo + 1}-{hi}" for lo, hi in itertools.pairwise(edges))
    return tuple(f"t{i / num_buckets:.2f}-{(i + 1) / num_buckets:.2f}" for i in range(num_buckets))


def drop_labels(key: Array, labels: Array, p_uncond: float, null_class: int) -> Array:
    """Classifier-free guidance training: each label becomes `null_class` with prob. p_uncond."""
    drop = jax.random.uniform(key, labels.shape) < p_uncond
    return jnp.where(drop, null_class, labels)


def drop_contexts(key: Array, contexts: Array, p_uncond: float, empty_context: Array) -> Array:
    """contexts [B, L, D]; each becomes `empty_context` [L, D] (CLIP of "") with prob. p_uncond."""
    drop = jax.random.uniform(key, contexts.shape[:1]) < p_uncond
    return jnp.where(drop[:, None, None], empty_context[None].astype(contexts.dtype), contexts)
