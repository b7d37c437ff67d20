"""Gaussian data for the sampler tests: its exact noise predictor, the exact solution of its
probability-flow ODE, and the convergence order measured from errors."""

import jax.numpy as jnp
import numpy as np

MU = np.array([0.5, -0.3, 0.0, 1.0])
SD = np.array([0.5, 0.8, 0.6, 1.0])  # unit-ish scale, like scaled latents


def gaussian_eps(ns):
    """E[eps | x_t] for data N(MU, SD^2): sigma (x - alpha mu) / (alpha^2 sd^2 + sigma^2)."""

    def noise_fn(x, t):
        a = ns.marginal_alpha(t)[:, None]
        s = ns.marginal_std(t)[:, None]
        mu, sd = jnp.asarray(MU, x.dtype), jnp.asarray(SD, x.dtype)
        return s * (x - a * mu) / (a**2 * sd**2 + s**2)

    return noise_fn


def exact_ode(ns, x_T, t_end, t_start=1.0):
    """The probability-flow ODE keeps (x - alpha mu) / sqrt(alpha^2 sd^2 + sigma^2) fixed."""

    def scale(t):
        a, s = ns.marginal_alpha(np.float64(t)), ns.marginal_std(np.float64(t))
        return a, np.sqrt(a**2 * SD**2 + s**2)

    (a0, s0), (a1, s1) = scale(t_end), scale(t_start)
    return a0 * MU + s0 * (x_T - a1 * MU) / s1


def observed_order(errors, sizes):
    """The order p of errors ~ size^-p from the last two (error, size) pairs."""
    return np.log(errors[-2] / errors[-1]) / np.log(sizes[-1] / sizes[-2])
