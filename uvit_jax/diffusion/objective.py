"""The training objective of U-ViT: noise the data, predict the formulation's target, mean
squared error.

`Formulation.draw` gives each example a noise level (the paper: t ~ U[0, 1) on the VP path, or
n ~ U{1..1000} on Stable Diffusion's); x_t = alpha x0 + sigma eps; the network predicts its
target (`diffusion.targets`: eps in the paper, v, x0 or the flow velocity) from x_t and its time
input.

Optionally each example's error is weighted by its noise level (`LOSS_WEIGHTINGS`). With
SNR = alpha^2 / sigma^2, the noise error equals SNR times the error of the implied clean image
x0, so plain noise prediction weighs x0 errors by SNR: almost nothing at the high noise levels
where the image's layout is decided (SNR 0.005 at the end of Stable Diffusion's schedule). Each
weighting fixes the weight on x0 errors, whatever the target (the target's own weight on them,
`targets.x0_weight`, is divided out):
  "none"          no weight: the target's plain squared error (the paper, every paper config);
  "min_snr"       x0 weight min(SNR, gamma): Min-SNR-gamma (Hang et al., ICCV 2023) caps the
                  weight of nearly clean steps (noise target: min(SNR, gamma) / SNR; v target:
                  min(SNR, gamma) / (SNR + 1), the paper's two forms);
  "snr_plus_one"  x0 weight SNR + 1: the loss of v-prediction (Salimans & Ho, ICLR 2022), which
                  keeps x0 errors at high noise from vanishing (noise target: 1 + 1 / SNR).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from uvit_jax.diffusion.formulation import Formulation, NoiseLevel
from uvit_jax.diffusion.targets import target_value, x0_weight
from uvit_jax.errors import ConfigError

Array = jax.Array


LOSS_WEIGHTINGS = ("none", "min_snr", "snr_plus_one")


def noised_input(
    key: Array, x0: Array, formulation: Formulation
) -> tuple[Array, Array, NoiseLevel]:
    """Draws a noise level and noise for every example.

    Args:
      key: PRNG key.
      x0: [B, H, W, C] float32 clean data (scaled latents or pixels in [-1, 1]).
      formulation: the run's `Formulation`.
    Returns:
      (x_t [B, H, W, C] float32, eps [B, H, W, C] float32, the `NoiseLevel` of each example).
    """
    k_t, k_eps = jax.random.split(key)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    level = formulation.draw(k_t, x0.shape[0])
    x_t = level.alpha[:, None, None, None] * x0 + level.sigma[:, None, None, None] * eps
    return x_t, eps, level


def loss_weights(
    snr: Array, weighting: str = "none", gamma: float = 5.0, target_x0_weight: Array | None = None
) -> Array:
    """Per-example weights [B] of the target's squared error for SNRs `snr` [B].

    target_x0_weight: [B] the target's own weight on x0 errors (`targets.x0_weight`); None for
    the noise target, whose weight is SNR (the weights are then computed as they always were).
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ConfigError(
            f"config.diffusion.loss_weighting={weighting!r}; expected one of {LOSS_WEIGHTINGS}"
        )
    if weighting == "none":
        return jnp.ones_like(snr)
    if weighting == "min_snr":
        return jnp.minimum(snr, gamma) / (snr if target_x0_weight is None else target_x0_weight)
    if target_x0_weight is None:
        return 1.0 + 1.0 / snr
    return (snr + 1.0) / target_x0_weight


class NoisedExamples(NamedTuple):
    """A batch of training examples, noised: what the network sees and what it should output.

    x_t: [B, H, W, C] float32 noised data; t_net: [B] float32 the network's time input (as
    `Formulation.draw` gives it); goal: [B, H, W, C] float32 the target's value; weight: [B]
    float32 each example's `loss_weights`. Nothing here depends on the network's parameters,
    so a train step can draw them once for the whole batch and differentiate only the
    network's losses (`prediction_losses`).
    """

    x_t: Array
    t_net: Array
    goal: Array
    weight: Array


def noised_examples(
    key: Array, x0: Array, formulation: Formulation, *, weighting: str = "none", gamma: float = 5.0
) -> NoisedExamples:
    """Noises x0 [B, H, W, C] float32 (`noised_input`) and computes the target and weight of
    every example for the formulation's target and the loss weighting."""
    x_t, eps, level = noised_input(key, x0, formulation)
    ns, target = formulation.schedule, formulation.target
    t, alpha, sigma = (v[:, None, None, None] for v in (level.t, level.alpha, level.sigma))
    goal = target_value(target, ns, t, alpha, sigma, x0, eps)
    weight = level_weights(formulation, level, weighting, gamma)
    return NoisedExamples(x_t, level.t_net, goal, weight)


def prediction_losses(prediction: Array, examples: NoisedExamples) -> Array:
    """Each example's loss [B] float32: the mean over H, W, C of (goal - prediction)^2, times
    its weight. prediction: [B, H, W, C], the network's output for `examples.x_t`."""
    err = (examples.goal - prediction.astype(jnp.float32)) ** 2
    return examples.weight * jnp.mean(err, axis=(1, 2, 3))


def example_losses(
    predict: Callable[[Array, Array], Array],
    key: Array,
    x0: Array,
    formulation: Formulation,
    *,
    weighting: str = "none",
    gamma: float = 5.0,
) -> tuple[Array, Array]:
    """Each example's loss and the network time it was drawn at.

    `predict(x_t, t_net) -> the target's prediction` closes over the condition (labels or
    contexts). Returns (loss [B] float32: mean over H, W, C of (target - prediction)^2 times the
    example's `loss_weights`; t_net [B] float32 as `Formulation.draw` gives it).
    """
    examples = noised_examples(key, x0, formulation, weighting=weighting, gamma=gamma)
    return prediction_losses(predict(examples.x_t, examples.t_net), examples), examples.t_net


def level_weights(
    formulation: Formulation, level: NoiseLevel, weighting: str = "none", gamma: float = 5.0
) -> Array:
    """The `loss_weights` [B] of the formulation's target at the drawn noise levels."""
    ns, target = formulation.schedule, formulation.target
    snr = (level.alpha / level.sigma) ** 2
    own = None if target == "eps" else x0_weight(target, ns, level.t, level.alpha, level.sigma)
    return loss_weights(snr, weighting, gamma, own)


def drop_labels(key: Array, labels: Array, p_uncond: float, null_class: int) -> Array:
    """Classifier-free guidance training: each label becomes `null_class` with prob. p_uncond."""
    drop = jax.random.uniform(key, labels.shape) < p_uncond
    return jnp.where(drop, null_class, labels)


def drop_contexts(key: Array, contexts: Array, p_uncond: float, empty_context: Array) -> Array:
    """contexts [B, L, D]; each becomes `empty_context` [L, D] (CLIP of "") with prob. p_uncond."""
    drop = jax.random.uniform(key, contexts.shape[:1]) < p_uncond
    return jnp.where(drop[:, None, None], empty_context[None].astype(contexts.dtype), contexts)
