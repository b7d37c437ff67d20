"""What the network predicts, and the conversions between predictions, written once.

On a Gaussian path x_t = alpha_t x_0 + sigma_t eps, every target here is linear in (x_0, eps):

    out = c_x0 x_0 + c_eps eps

  "eps"       noise (DDPM, the paper):               c = (0, 1)
  "x0"        the clean data:                        c = (1, 0)
  "v"         alpha_t eps - sigma_t x_0 (Salimans & Ho, ICLR 2022; SD 2): c = (-sigma, alpha)
  "velocity"  dx_t / dt = alpha'_t x_0 + sigma'_t eps (flow matching, SiT; eps - x_0 on the
              linear interpolant):                   c = (alpha', sigma')

so, given x_t and the network's output, with det = alpha c_eps - sigma c_x0:

    x_0 = (c_eps x_t - sigma out) / det,    eps = (alpha out - c_x0 x_t) / det.

The loss, guidance and every sampler use these (`prediction_coefficients`), so a network of any
target samples with any sampler. A plain squared error of the target weighs the error of the
implied x_0 by (c_x0 - c_eps alpha / sigma)^2 (`x0_weight`): SNR for "eps", 1 for "x0",
1 / sigma^2 = SNR + 1 for "v" on a variance-preserving path.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TARGETS = ("eps", "x0", "v", "velocity")
PREDICTIONS = ("eps", "x0", "velocity")  # what a sampler asks for


def target_coefficients(target: str, schedule: Any, t: Any, alpha: Any, sigma: Any):
    """(c_x0, c_eps) of `target` at time t (numpy float64 or traced jax, like t).

    alpha, sigma: the schedule's alpha_t and sigma_t at t (passed in, as every caller has them).
    """
    if target == "eps":
        return 0.0, 1.0
    if target == "x0":
        return 1.0, 0.0
    if target == "v":
        return -sigma, alpha
    if target == "velocity":
        return schedule.marginal_derivatives(t)
    raise ValueError(f"target must be one of {TARGETS}, got {target!r}")


def target_value(target: str, schedule: Any, t: Any, alpha: Any, sigma: Any, x0: Any, eps: Any):
    """The training target c_x0 x_0 + c_eps eps; alpha, sigma, t broadcast against x0.

    The noise target is `eps` itself (no arithmetic), so its losses stay bit-identical.
    """
    if target == "eps":
        return eps
    if target == "x0":
        return x0
    c_x0, c_eps = target_coefficients(target, schedule, t, alpha, sigma)
    return c_x0 * x0 + c_eps * eps


def x0_weight(target: str, schedule: Any, t: Any, alpha: Any, sigma: Any):
    """The weight (c_x0 - c_eps alpha / sigma)^2 that a plain squared error of `target` puts on
    the error of the implied x_0 (the module docstring)."""
    c_x0, c_eps = target_coefficients(target, schedule, t, alpha, sigma)
    return (c_x0 - c_eps * alpha / sigma) ** 2


def prediction_coefficients(
    target: str, prediction: str, schedule: Any, t: float
) -> tuple[float, float]:
    """(p, q) with prediction = p x_t + q out, for a network predicting `target`: float64 host
    scalars at time t, for the samplers' tables.

    prediction: "x0" (data), "eps" (noise) or "velocity" (dx_t / dt of the path).
    """
    t64 = np.float64(t)
    alpha = float(np.exp(schedule.marginal_log_mean_coeff(t64)))
    sigma = float(schedule.marginal_std(t64))
    c_x0, c_eps = (float(c) for c in target_coefficients(target, schedule, t64, alpha, sigma))
    det = alpha * c_eps - sigma * c_x0
    # + 0.0 turns a -0.0 into 0.0, so the noise target's tables match the ones written before
    # targets existed, bit for bit.
    to_x0 = (c_eps / det + 0.0, -sigma / det + 0.0)
    to_eps = (-c_x0 / det + 0.0, alpha / det + 0.0)
    if prediction == "x0":
        return to_x0
    if prediction == "eps":
        return to_eps
    if prediction == "velocity":
        d_alpha, d_sigma = (float(v) for v in schedule.marginal_derivatives(t64))
        return (
            d_alpha * to_x0[0] + d_sigma * to_eps[0],
            d_alpha * to_x0[1] + d_sigma * to_eps[1],
        )
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")
