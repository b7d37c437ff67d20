"""Gaussian data, where every sampler's exact answer is known: the reference of the sampler tests
and of `launch/sampler_accuracy.py`.

For data x_0 ~ N(MU, diag(SD^2)) on any Gaussian path x_t = alpha_t x_0 + sigma_t eps, the
posterior means are closed-form,

    E[eps | x_t] = sigma (x - alpha mu) / (alpha^2 sd^2 + sigma^2),
    E[x_0 | x_t] = mu + alpha sd^2 (x - alpha mu) / (alpha^2 sd^2 + sigma^2),

and the probability-flow ODE keeps (x - alpha mu) / sqrt(alpha^2 sd^2 + sigma^2) fixed, so its
exact solution from any time to any other is one affine map.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.diffusion.schedules import Schedule
from uvit_jax.diffusion.targets import target_coefficients
from uvit_jax.sampling import euler_maruyama
from uvit_jax.sampling.samplers import SAMPLERS

MU = np.array([0.5, -0.3, 0.0, 1.0])
SD = np.array([0.5, 0.8, 0.6, 1.0])  # unit-ish scale, like scaled latents


def _posterior(ns: Schedule, x: jax.Array, t: jax.Array):
    """(alpha, sigma, E[x_0 | x_t], E[eps | x_t]) for x [B, 4] at times t [B]."""
    a = ns.marginal_alpha(t)[:, None]
    s = ns.marginal_std(t)[:, None]
    mu, sd = jnp.asarray(MU, x.dtype), jnp.asarray(SD, x.dtype)
    shrink = (x - a * mu) / (a**2 * sd**2 + s**2)
    return a, s, mu + a * sd**2 * shrink, s * shrink


def gaussian_eps(ns: Schedule) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The exact noise predictor E[eps | x_t]: noise_fn(x [B, 4], t [B]) -> [B, 4]."""
    return lambda x, t: _posterior(ns, x, t)[3]


def gaussian_prediction(formulation: Formulation) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """The exact network of the formulation's target: c_x0 E[x_0 | x_t] + c_eps E[eps | x_t]."""
    ns, target = formulation.schedule, formulation.target

    def predict(x: jax.Array, t: jax.Array) -> jax.Array:
        a, s, x0, eps = _posterior(ns, x, t)
        c_x0, c_eps = target_coefficients(target, ns, t[:, None], a, s)
        return c_x0 * x0 + c_eps * eps

    return predict


def exact_ode(ns: Schedule, x_T: np.ndarray, t_end: float, t_start: float = 1.0) -> np.ndarray:
    """The exact probability-flow solution at t_end of x_T [B, 4] at t_start, float64.

    t_end = 0 is the data itself (alpha 1, sigma 0), whatever the schedule's formula gives
    there (a discrete schedule's extrapolation below t = 1 / N does not reach it exactly).
    """

    def scale(t):
        if t == 0:
            return 1.0, SD
        a, s = ns.marginal_alpha(np.float64(t)), ns.marginal_std(np.float64(t))
        return a, np.sqrt(a**2 * SD**2 + s**2)

    (a0, s0), (a1, s1) = scale(t_end), scale(t_start)
    return a0 * MU + s0 * (x_T - a1 * MU) / s1


def observed_order(errors: np.ndarray, sizes: np.ndarray) -> float:
    """The order p of errors ~ size^-p from the last two (error, size) pairs."""
    return float(np.log(errors[-2] / errors[-1]) / np.log(sizes[-1] / sizes[-2]))


def sampler_error(name: str, formulation: Formulation, nfe: int, x_T: np.ndarray) -> float:
    """The largest |x - exact| of registered sampler `name` after `nfe` network evaluations
    from x_T [B, 4] at t = T, run in float64 on the exact network of the formulation's target,
    where the sampler stops (t_end; t = 0 for U-ViT's SDE/ODE Euler)."""
    sampler, ns = SAMPLERS[name], formulation.schedule
    end = 0.0 if isinstance(sampler, euler_maruyama.Variant) else ns.t_end
    predict = gaussian_prediction(formulation)
    with jax.enable_x64(True):
        run = jax.jit(lambda x: sampler(predict, x, formulation, steps=nfe, key=jax.random.key(0)))
        x = np.asarray(run(jnp.asarray(x_T, jnp.float64)))
    return float(np.abs(x - exact_ode(ns, x_T, end, t_start=ns.T)).max())
