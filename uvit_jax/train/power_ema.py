"""Power-function EMAs of the weights and their post-hoc reconstruction (Karras et al. 2024,
"Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2, Sec. 3).

A power-function EMA of exponent gamma >= 0 averages the weights of steps 1..t with weights
proportional to tau^gamma over the training time tau in [0, t]: its profile is
p_t(tau) = (gamma + 1) tau^gamma / t^(gamma + 1), which integrates to 1, and its width relative to
t (the profile's standard deviation over t) is

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))),

from 1/sqrt(12) = 0.2887 at gamma = 0 (the plain average) down to 0 as gamma grows (0.10 at
gamma 6.94, 0.05 at 16.97). The update after step t (t = 1, 2, ...) is
e <- beta_t e + (1 - beta_t) w with beta_t = (1 - 1/t)^(gamma + 1): then step i's weights enter
e_t with the weight (i^(gamma+1) - (i-1)^(gamma+1)) / t^(gamma+1), the profile's integral over
(i-1, i], so the EMA is exactly the profile's average of the weights held constant over each step.

Post-hoc: snapshots of a few such EMAs taken every few steps span a space of profiles; any other
profile (another sigma_rel, at the last snapshot or an earlier step) is approximated in it by
least squares in L2 over [0, inf), whose inner products have the closed form
<p_a, p_b> = (g_a + 1)(g_b + 1) min(t_a, t_b)^(g_a + g_b + 1) / ((g_a + g_b + 1) t_a^(g_a+1)
t_b^(g_b+1)). The weights solving it combine the snapshots into the EMA of that profile, off by
at most (the residual's L2 norm) x (the weights' trajectory's L2 norm) by Cauchy-Schwarz.

Everything here but `update` is float64 numpy, outside jit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uvit_jax.config_checks import MAX_EMA_STD


def std_of_gamma(gamma: float | np.ndarray) -> np.ndarray:
    """sigma_rel (float64) of the power-function profile of exponent `gamma` (>= 0)."""
    g = np.asarray(gamma, np.float64)
    return np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))


def gamma_of_std(std: float | np.ndarray) -> np.ndarray:
    """The exponent gamma >= 0 (float64) whose profile has relative std `std` in (0, 0.2887].

    sigma_rel^-2 = (g + 2)^2 (g + 3) / (g + 1) is the cubic
    g^3 + 7 g^2 + (16 - s) g + (12 - s) = 0 with s = sigma_rel^-2; its largest root is the
    exponent. Newton's method from g = 1/sigma_rel (where the cubic is 6/s + 16/sqrt(s) + 12 > 0,
    right of the largest root and of the inflection point at -7/3, so every iterate stays right
    of the root and descends to it) converges monotonically.
    """
    sigma = np.asarray(std, np.float64)
    if np.any(~(sigma > 0)) or np.any(sigma > MAX_EMA_STD * (1 + 1e-12)):
        raise ValueError(f"relative std {std} outside (0, {MAX_EMA_STD:.4f}]")
    s = sigma**-2.0
    g = 1.0 / sigma
    for _ in range(200):
        f = ((g + 7) * g + 16 - s) * g + 12 - s
        step = f / ((3 * g + 14) * g + 16 - s)
        g = g - step
        if np.all(np.abs(step) <= 1e-14 * np.maximum(1.0, np.abs(g))):
            break
    return np.maximum(g, 0.0)  # sigma = 0.2887 exactly: 0 up to rounding


def update(emas: Sequence[Any], params: Any, t: jax.Array, gammas: Sequence[float]) -> tuple:
    """Each power-function EMA of `emas` (pytrees like `params`, float32) after step `t` (int32
    scalar, counted from 1), exponent `gammas[k]` for `emas[k]`.

    Computed as e + (1 - beta_t)(w - e) with 1 - beta_t = -expm1((gamma + 1) log1p(-1/t)):
    float32 `1 - 1/t` would lose 1/t's digits (1.3% of it at t = 10^6, 19% at 10^7), and the
    lerp keeps a constant trajectory exactly constant. At t = 1 the weight is exactly 1 (the EMA
    is the weights of step 1).
    """
    log_base = jnp.log1p(-1.0 / jnp.asarray(t, jnp.float32))
    out = []
    for ema, gamma in zip(emas, gammas, strict=True):
        w = -jnp.expm1((float(gamma) + 1.0) * log_base)
        out.append(jax.tree.map(lambda e, p, w=w: e + w * (p - e), ema, params))
    return tuple(out)


def inner_products(
    t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray
) -> np.ndarray:
    """<p_a, p_b> in L2 (float64, broadcast) of the profiles ending at steps `t_a`, `t_b` with
    exponents `g_a`, `g_b`; written with the ratio min/max of the steps, whose powers stay in
    range where t^(g + 1) would overflow (t = 10^6, gamma = 100)."""
    t_a, g_a, t_b, g_b = (np.asarray(v, np.float64) for v in (t_a, g_a, t_b, g_b))
    ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    exponent = np.where(t_a <= t_b, g_b, g_a)  # the later profile's exponent
    return (g_a + 1) * (g_b + 1) * ratio**exponent / ((g_a + g_b + 1) * np.maximum(t_a, t_b))


@dataclasses.dataclass(frozen=True)
class Reconstruction:
    """How to combine snapshots into the EMA of one profile.

    weights: [N] float64, snapshot k's factor (its order: the `steps`, `gammas` given).
    residual: the relative L2 error of the combined profile, ||sum_k w_k p_k - p|| / ||p||.
    """

    std: float
    gamma: float
    step: int
    weights: np.ndarray
    residual: float

    @property
    def gain(self) -> float:
        """sum_k |w_k|: how much the combination amplifies the snapshots' float32 rounding."""
        return float(np.abs(self.weights).sum())


def reconstruct(steps: np.ndarray, gammas: np.ndarray, std: float, step: int) -> Reconstruction:
    """The least-squares weights of the snapshots (profiles ending at `steps` [N] with exponents
    `gammas` [N]) for the profile of relative std `std` ending at `step`."""
    steps, gammas = np.asarray(steps, np.float64), np.asarray(gammas, np.float64)
    gamma = float(gamma_of_std(std))
    gram = inner_products(steps[:, None], gammas[:, None], steps[None, :], gammas[None, :])
    target = inner_products(steps, gammas, float(step), gamma)
    weights = np.linalg.lstsq(gram, target, rcond=None)[0]
    own = float(inner_products(step, gamma, step, gamma))
    # ||sum w p - p||^2 = w'Gw - 2 w'b + <p, p>, cancelling to ~1e-16 of <p, p> when it fits.
    error = max(float(weights @ gram @ weights - 2 * weights @ target + own), 0.0)
    return Reconstruction(float(std), gamma, int(step), weights, float(np.sqrt(error / own)))


def supported_stds(
    steps: np.ndarray, gammas: np.ndarray, step: int, max_residual: float
) -> tuple[float, float] | None:
    """(lowest, highest) relative std, on a grid of 200 from 0.001 to 0.2887, that the snapshots
    reconstruct at `step` within `max_residual`: the range around the tracked ones where the
    residual stays below it; None where no grid std does."""
    grid = np.geomspace(1e-3, MAX_EMA_STD, 200)
    ok = [s for s in grid if reconstruct(steps, gammas, s, step).residual <= max_residual]
    return (float(min(ok)), float(max(ok))) if ok else None
