"""Euler-Maruyama for the reverse VP-SDE, and Euler for the probability-flow ODE (U-ViT `sde.py`).

Forward SDE dx = f dt + g dw with f = -0.5 beta(t) x, g = sqrt(beta(t)); score = -eps / sigma_t.
Reverse SDE drift f - g^2 score; probability-flow ODE drift f - 0.5 g^2 score. The grid is
[0] + linspace(t_min, t_max, steps), walked downward: from t to s < t,
x <- x + drift(x, t) (s - t) + g(t) sqrt(t - s) z, with no noise on the last step (s = 0).
Each step is x <- A x + B eps + C z with A, B, C precomputed in float64; one `lax.scan`. A network
of another target (`diffusion.targets`) is converted to eps in the same coefficients:
eps = p x + q out gives x <- (A + B p) x + (B q) out + C z.

The SDE is written for variance-preserving paths (those with a `beta`): the linear flow path has
none, and its reverse SDE's diffusion g^2 = 2 t / (1 - t) is unbounded at the start of sampling.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.diffusion.schedules import Schedule
from uvit_jax.diffusion.targets import prediction_coefficients
from uvit_jax.sampling.dpm_solver import NoiseFn


def coefficients(
    schedule: Schedule,
    *,
    steps: int,
    probability_flow: bool,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    target: str = "eps",
) -> tuple[np.ndarray, ...]:
    """Per-step float64 (t, A, B, C), each [steps], in sampling order (t decreasing), for a
    network predicting `target`."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    grid = np.append(0.0, np.linspace(t_min, t_max, steps, dtype=np.float64))
    s, t = grid[:-1][::-1], grid[1:][::-1]
    beta = np.asarray(schedule.beta(t), np.float64)
    sigma = np.asarray(schedule.marginal_std(t), np.float64)
    dt = s - t  # negative
    a = 1.0 - 0.5 * beta * dt
    # -g^2 score = beta eps / sigma (reverse SDE); half of it for the probability-flow ODE.
    b = (0.5 if probability_flow else 1.0) * beta / sigma * dt
    c = np.zeros_like(t) if probability_flow else np.sqrt(beta * -dt) * (s != 0.0)
    pq = np.array([prediction_coefficients(target, "eps", schedule, v) for v in t])
    return t, a + b * pq[:, 0], b * pq[:, 1], c


def sample(
    noise_fn: NoiseFn,
    x_T: jax.Array,
    schedule: Schedule,
    *,
    steps: int,
    key: jax.Array | None = None,
    probability_flow: bool = False,
    t_min: float = 1e-3,
    t_max: float = 1.0,
    target: str = "eps",
) -> jax.Array:
    """Integrates the reverse SDE (or the probability-flow ODE) from t_max to 0. Jittable.

    Args:
      noise_fn: noise_fn(x [B, ...], t_continuous [B]) -> the network's `target` [B, ...].
      x_T: [B, ...] noise at t_max; its dtype is the state dtype.
      schedule: a `uvit_jax.diffusion.schedules` schedule (needs `beta` and `marginal_std`).
      steps: network evaluations (U-ViT: 1000 for the SDE, 50 for ODE previews).
      key: PRNG key for the SDE noise (step i uses fold_in(key, i)); unused for the ODE.
      probability_flow: integrate the probability-flow ODE instead of the SDE.
      t_min, t_max: the grid is [0] + linspace(t_min, t_max, steps).
      target: what the network predicts (`diffusion.targets`).
    Returns:
      x at t = 0, shape and dtype of x_T.
    """
    if not probability_flow and key is None:
        raise ValueError("the reverse SDE needs a PRNG key (key=...)")
    dtype = x_T.dtype
    t, a, b, c = coefficients(
        schedule,
        steps=steps,
        probability_flow=probability_flow,
        t_min=t_min,
        t_max=t_max,
        target=target,
    )
    xs = tuple(jnp.asarray(v, dtype) for v in (t, a, b, c)) + (jnp.arange(steps),)
    batch = x_T.shape[0]

    def body(x, row):
        t_i, a_i, b_i, c_i, i = row
        eps = noise_fn(x, jnp.full((batch,), t_i, dtype)).astype(dtype)
        x = a_i * x + b_i * eps
        if not probability_flow:
            x = x + c_i * jax.random.normal(jax.random.fold_in(key, i), x.shape, dtype)
        return x, None

    x, _ = jax.lax.scan(body, x_T, xs)
    return x


@dataclasses.dataclass(frozen=True)
class Variant:
    """The reverse SDE (or, probability_flow, the ODE) as a named sampler
    (`uvit_jax.sampling.samplers`), on the grid [0] + linspace(1e-3, 1, steps)."""

    probability_flow: bool
    predict_x0 = False  # noise prediction: there is no x0 to threshold

    @staticmethod
    def supports(formulation: Formulation) -> bool:
        """Whether the SDE is written for the formulation's path (module docstring)."""
        return hasattr(formulation.schedule, "beta")

    def __call__(
        self,
        noise_fn: NoiseFn,
        x_T: jax.Array,
        formulation: Formulation,
        *,
        steps: int,
        key: jax.Array,
    ) -> jax.Array:
        return sample(
            noise_fn,
            x_T,
            formulation.schedule,
            steps=steps,
            key=key,
            probability_flow=self.probability_flow,
            t_max=formulation.schedule.T,
            target=formulation.target,
        )
