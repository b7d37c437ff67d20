"""optax AdamW with the paper's schedule, and the EMA of the weights.

Official U-ViT: AdamW (decoupled weight decay on every parameter), learning rate
`lr * min(step / warmup, 1)`, no clipping, EMA `e <- r e + (1 - r) p` after every update from a
copy of the initial weights.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from uvit_jax.errors import ConfigError

# What follows the warmup: name -> (peak lr, steps after the warmup) -> schedule. Linear decay
# to zero: Bergsma et al. 2025 find it beats cosine at equal steps.
LR_DECAYS: dict[str, Callable[[float, int], optax.Schedule]] = {
    "constant": lambda lr, steps: optax.constant_schedule(lr),  # the paper
    "cosine": optax.cosine_decay_schedule,
    "linear": lambda lr, steps: optax.linear_schedule(lr, 0.0, steps),
}


def learning_rate_schedule(optim: Mapping, num_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to `optim.lr`, then `LR_DECAYS[optim.schedule]`: constant (paper),
    cosine to 0 or linear to 0 at `num_steps`."""
    lr, warmup = float(optim["lr"]), int(optim["warmup_steps"])
    kind = optim["schedule"]
    if kind not in LR_DECAYS:
        raise ConfigError(
            f"optim.schedule={kind!r}; expected {', '.join(repr(k) for k in LR_DECAYS)}"
        )
    after = LR_DECAYS[kind](lr, max(num_steps - warmup, 1))
    if warmup <= 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def _decay_mask(mask: str):
    if mask == "all":
        return None
    if mask == "no_bias_norm":
        # Matrices and conv kernels decay; biases, LayerNorm gains and pos_embed-like 1-D
        # vectors do not.
        return lambda params: jax.tree.map(lambda p: jnp.ndim(p) > 1, params)
    raise ConfigError(f"optim.decay_mask={mask!r}; expected 'all' or 'no_bias_norm'")


def make_optimizer(optim: Mapping, num_steps: int) -> optax.GradientTransformation:
    """AdamW (+ optional global-norm clipping) from the `config.optim` section."""
    tx = optax.adamw(
        learning_rate=learning_rate_schedule(optim, num_steps),
        b1=float(optim["b1"]),
        b2=float(optim["b2"]),
        eps=float(optim["eps"]),
        weight_decay=float(optim["weight_decay"]),
        mask=_decay_mask(optim["decay_mask"]),
    )
    if float(optim["grad_clip"]) > 0:
        tx = optax.chain(optax.clip_by_global_norm(float(optim["grad_clip"])), tx)
    return tx


def ema_decay(step: jax.Array, rate: float, warmup: bool) -> jax.Array | float:
    """The EMA decay after update `step` (0-based): `rate`, or with warmup
    min(rate, (1 + step) / (10 + step)), so that a short run's average forgets the random
    initial weights within tens of steps instead of 1 / (1 - rate)."""
    if not warmup:
        return rate
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(rate, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, rate: float | jax.Array):
    """e <- rate * e + (1 - rate) * p, leaf by leaf (float32)."""
    return jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, ema, params)
