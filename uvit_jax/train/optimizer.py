"""AdamW (optax) or Muon with the paper's schedule, and the EMA of the weights.

Official U-ViT: AdamW (decoupled weight decay on every parameter), learning rate
`lr * min(step / warmup, 1)`, no clipping, EMA `e <- r e + (1 - r) p` after every update from a
copy of the initial weights.

Muon (Jordan et al. 2024; Liu et al. 2025, "Muon is scalable for LLM training") updates each
hidden weight matrix by its orthogonalised momentum and everything else by AdamW.
"""

from __future__ import annotations

import math
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
        raise ConfigError(f"optim.schedule={kind!r}; expected {', '.join(map(repr, LR_DECAYS))}")
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


def muon_labels(params) -> object:
    """The label of each leaf of `params`: "muon" for the hidden weight matrices, else "adamw".

    Hidden matrices: the 2-D `kernel`s of the linear layers (attention, MLP, long-skip and
    context projections), but not the output projection `decoder_pred`. Embedding tables, biases,
    norms, the 4-D patch-embedding and output convolutions and `decoder_pred` stay on AdamW, as
    Muon's authors keep the input and output layers (Jordan et al. 2024).
    """

    def label(path, leaf) -> str:
        names = [str(getattr(k, "key", getattr(k, "name", ""))) for k in path]
        hidden = jnp.ndim(leaf) == 2 and "kernel" in names and "decoder_pred" not in names
        return "muon" if hidden else "adamw"

    return jax.tree_util.tree_map_with_path(label, params)


# Newton-Schulz coefficients of Jordan et al. 2024: five iterations take every singular value of
# a Frobenius-normalised matrix into about [0.7, 1.2] (not exactly 1: faster than the cubic).
_NEWTON_SCHULZ = (3.4445, -4.775, 2.0315)


def orthogonalise(m: jax.Array, steps: int = 5) -> jax.Array:
    """About U V^T of each m = U S V^T, m [..., rows, cols] float32 (a stack of matrices of one
    shape): `steps` Newton-Schulz iterations x <- a x + (b A + c A^2) x, A = x x^T, on the wide
    side (the smaller Gram matrix)."""
    a, b, c = _NEWTON_SCHULZ
    tall = m.shape[-2] > m.shape[-1]
    x = jnp.swapaxes(m, -1, -2) if tall else m
    x = x / (jnp.linalg.norm(x, axis=(-2, -1), keepdims=True) + 1e-7)
    for _ in range(steps):
        gram = x @ jnp.swapaxes(x, -1, -2)
        x = a * x + (b * gram + c * gram @ gram) @ x
    return jnp.swapaxes(x, -1, -2) if tall else x


def orthogonalise_all(ms: list[jax.Array], steps: int = 5) -> list[jax.Array]:
    """`orthogonalise` of each matrix in `ms`, those of one shape (up to a transpose) stacked into
    one batched iteration: a U-ViT's blocks repeat four or five shapes, and on a CPU a few
    batched matmuls run faster than many small ones."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, m in enumerate(ms):
        by_shape.setdefault(tuple(sorted(m.shape)), []).append(i)
    out: list[jax.Array] = [None] * len(ms)  # type: ignore[list-item]
    for indices in by_shape.values():
        tall = [ms[i].shape[0] > ms[i].shape[1] for i in indices]
        stack = jnp.stack([ms[i].T if t else ms[i] for i, t in zip(indices, tall, strict=True)])
        done = orthogonalise(stack, steps)
        for j, (i, t) in enumerate(zip(indices, tall, strict=True)):
            out[i] = done[j].T if t else done[j]
    return out


def scale_by_muon(momentum: float, rms: float) -> optax.GradientTransformation:
    """Muon's direction for [fan_in, fan_out] matrices: the orthogonalised Nesterov momentum
    (m <- momentum m + g; orthogonalise(momentum m + g)), scaled from RMS 1 / sqrt(max(fan_in,
    fan_out)) to `rms`: at AdamW's typical update RMS (0.2) AdamW's learning rate and weight
    decay carry over (Liu et al. 2025)."""

    def init(params):
        return jax.tree.map(jnp.zeros_like, params)

    def update(updates, mu, params=None):
        del params
        mu = jax.tree.map(lambda m, g: momentum * m + g, mu, updates)
        nesterov, treedef = jax.tree.flatten(
            jax.tree.map(lambda m, g: momentum * m + g, mu, updates)
        )
        direction = [d * (rms * math.sqrt(max(d.shape))) for d in orthogonalise_all(nesterov)]
        return jax.tree.unflatten(treedef, direction), mu

    return optax.GradientTransformation(init, update)


def _adamw(optim: Mapping, lr: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(
        learning_rate=lr,
        b1=float(optim["b1"]),
        b2=float(optim["b2"]),
        eps=float(optim["eps"]),
        weight_decay=float(optim["weight_decay"]),
        mask=_decay_mask(optim["decay_mask"]),
    )


def _muon(optim: Mapping, lr: optax.Schedule) -> optax.GradientTransformation:
    matrices = optax.chain(
        scale_by_muon(float(optim["muon_momentum"]), float(optim["muon_rms"])),
        optax.add_decayed_weights(float(optim["weight_decay"])),
        optax.scale_by_learning_rate(lr),
    )
    return optax.partition({"muon": matrices, "adamw": _adamw(optim, lr)}, muon_labels)


# name -> (config.optim, learning-rate schedule) -> the update rule.
OPTIMIZERS: dict[str, Callable[[Mapping, optax.Schedule], optax.GradientTransformation]] = {
    "adamw": _adamw,  # the paper
    "muon": _muon,
}


def make_optimizer(optim: Mapping, num_steps: int) -> optax.GradientTransformation:
    """`OPTIMIZERS[optim.name]` (+ optional global-norm clipping) from the `config.optim`
    section, at `learning_rate_schedule`."""
    name = optim["name"]
    if name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={name!r}; expected {', '.join(map(repr, OPTIMIZERS))}")
    tx = OPTIMIZERS[name](optim, learning_rate_schedule(optim, num_steps))
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
