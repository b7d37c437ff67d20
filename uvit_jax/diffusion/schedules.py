"""Gaussian noise paths with DPM-Solver's schedule interface.

q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I) over continuous time t in (0, T], and the half log-SNR
lambda_t = log alpha_t - log sigma_t (the noise schedule of DPM-Solver's `NoiseScheduleVP`):

- `LinearVPSchedule` (U-ViT's continuous models): log alpha_t = -0.25 t^2 (beta_1 - beta_0)
  - 0.5 t beta_0 with beta 0.1..20, sigma_t = sqrt(1 - alpha_t^2); the network sees 999 t.
- `DiscreteSchedule` (U-ViT's latent models): Stable Diffusion's betas; log alpha_t is the
  piecewise-linear interpolation of 0.5 log abar_n placed at t_n = n / N (n = 1..N), extrapolated
  linearly outside [1/N, 1] like DPM-Solver's `interpolate_fn`; the network sees N t. Optionally
  rescaled to zero terminal SNR (Lin et al. 2024).
- `LinearFlowSchedule` (flow matching, rectified flow, SiT): alpha_t = 1 - t, sigma_t = t, so
  x_t = (1 - t) x_0 + t eps and the path's velocity is eps - x_0; the network sees 999 t.

Which formulation uses which schedule, target and time sampling: `diffusion.formulation`.

Every method accepts numpy input (computed in float64: the samplers build their coefficients
this way, outside jit) or jax input (traceable, in the input's dtype). Schedules are frozen,
hashable dataclasses, so they can be closed over or passed as static arguments of `jax.jit`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ArrayLike = np.ndarray | jax.Array | float

# The network's time input of continuous-time models is 999 t (U-ViT's `ScoreModel.predict`), so
# t in [0, 1) spans the same range as the discrete models' steps.
CONTINUOUS_NETWORK_TIME_SCALE = 999.0

# Where a schedule that reaches alpha = 0 stops instead: alpha_T^2 = 2^-24 (diffusers' choice for
# zero-terminal-SNR sampling, the smallest positive float16 subnormal), so lambda stays finite
# (-8.3) for the log-SNR solvers while x_T keeps a 2^-12 = 0.00024 share of the image.
TERMINAL_ALPHA_SQUARED = 2.0**-24


def _xp(t: Any):
    """numpy for host values (float64 coefficient tables), jax.numpy for traced/device values."""
    return np if isinstance(t, (np.ndarray, np.generic, float, int)) else jnp


def _asarray(t: ArrayLike):
    return np.asarray(t, np.float64) if _xp(t) is np else t


def _std_from_log_alpha(xp, log_alpha):
    # sigma = sqrt(1 - alpha^2); expm1 keeps sigma accurate near t = 0 (float32: 1 - exp(-1e-5)
    # would lose ~1% of sigma at t = 1e-4).
    return xp.sqrt(-xp.expm1(2.0 * log_alpha))


def _lambda_from_log_alpha(xp, log_alpha):
    return log_alpha - 0.5 * xp.log(-xp.expm1(2.0 * log_alpha))


def _log_alpha_from_lambda(xp, lamb):
    # alpha^2 = sigmoid(2 lambda)  =>  log alpha = -0.5 log(1 + exp(-2 lambda)).
    return -0.5 * xp.logaddexp(0.0, -2.0 * lamb)


def _interp(xp, x, knots, values):
    """Piecewise-linear y(x) through (knots, values), knots increasing, linear extrapolation.

    The segment for x is [knots[i-1], knots[i]] with i = #knots < x, clipped to the first/last
    segment: DPM-Solver's `interpolate_fn` convention.
    """
    n = knots.shape[0]
    i = xp.clip(xp.searchsorted(knots, x, side="left"), 1, n - 1)
    x0, x1 = knots[i - 1], knots[i]
    y0, y1 = values[i - 1], values[i]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class _ScheduleMixin:
    """Quantities of a variance-preserving path (sigma_t^2 = 1 - alpha_t^2) derived from
    `marginal_log_mean_coeff` and `beta`."""

    def marginal_alpha(self, t: ArrayLike):
        """alpha_t (signal coefficient), same shape as t."""
        t = _asarray(t)
        return _xp(t).exp(self.marginal_log_mean_coeff(t))

    def marginal_std(self, t: ArrayLike):
        """sigma_t = sqrt(1 - alpha_t^2), same shape as t."""
        t = _asarray(t)
        return _std_from_log_alpha(_xp(t), self.marginal_log_mean_coeff(t))

    def marginal_lambda(self, t: ArrayLike):
        """lambda_t = log alpha_t - log sigma_t (half log-SNR), same shape as t."""
        t = _asarray(t)
        return _lambda_from_log_alpha(_xp(t), self.marginal_log_mean_coeff(t))

    def marginal_derivatives(self, t: ArrayLike):
        """(d alpha_t / dt, d sigma_t / dt): -beta alpha / 2 and beta alpha^2 / (2 sigma)."""
        t = _asarray(t)
        alpha, sigma, beta = self.marginal_alpha(t), self.marginal_std(t), self.beta(t)
        return -0.5 * beta * alpha, 0.5 * beta * alpha**2 / sigma


@dataclasses.dataclass(frozen=True)
class LinearVPSchedule(_ScheduleMixin):
    """The continuous linear VP-SDE (U-ViT `VPSDE`): beta(t) = beta_0 + t (beta_1 - beta_0).

    Attributes:
      beta_0, beta_1: beta(0) and beta(1) (1000x DDPM's per-step betas).
      T: the start time of sampling.
      total_N: number of discretisation points DPM-Solver associates with the schedule.
      t_end: where U-ViT's DPM-Solver stops for these models (`eps=1e-4`).
    """

    beta_0: float = 0.1
    beta_1: float = 20.0
    T: float = 1.0
    total_N: int = 1000
    t_end: float = 1e-4

    def marginal_log_mean_coeff(self, t: ArrayLike):
        """log alpha_t = -0.25 t^2 (beta_1 - beta_0) - 0.5 t beta_0."""
        t = _asarray(t)
        return -0.25 * t**2 * (self.beta_1 - self.beta_0) - 0.5 * t * self.beta_0

    def inverse_lambda(self, lamb: ArrayLike):
        """The t with marginal_lambda(t) = lamb (closed form of the quadratic in t)."""
        lamb = _asarray(lamb)
        xp = _xp(lamb)
        db = self.beta_1 - self.beta_0
        tmp = 2.0 * db * xp.logaddexp(-2.0 * lamb, 0.0)
        delta = self.beta_0**2 + tmp
        # Positive root of 0.25 db t^2 + 0.5 beta_0 t = -log alpha, rationalised (no cancellation).
        return tmp / (xp.sqrt(delta) + self.beta_0) / db

    def beta(self, t: ArrayLike):
        """beta(t) = -2 d log alpha_t / dt (the SDE's g(t)^2)."""
        t = _asarray(t)
        return self.beta_0 + t * (self.beta_1 - self.beta_0)

    @property
    def network_time_scale(self) -> float:
        return CONTINUOUS_NETWORK_TIME_SCALE

    def network_time(self, t: ArrayLike):
        """U-ViT's time input for continuous models: 999 t (`ScoreModel.predict`)."""
        return CONTINUOUS_NETWORK_TIME_SCALE * t


@dataclasses.dataclass(frozen=True)
class DiscreteSchedule(_ScheduleMixin):
    """DDPM-style discrete schedule, by default Stable Diffusion's ("scaled linear") betas.

    betas = linspace(beta_start^0.5, beta_end^0.5, N)^2 in float64, abar_n = prod_{i<=n} (1 -
    beta_i), n = 1..N. Continuous time: log alpha(t_n) = 0.5 log abar_n at t_n = n / N,
    piecewise linear in between (DPM-Solver's `NoiseScheduleVP('discrete')`).

    With `zero_terminal_snr`, sqrt(abar_n) is shifted and scaled so that it keeps its first value
    and reaches 0 at n = N (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps
    are Flawed", Algorithm 1); abar_N is then set to `TERMINAL_ALPHA_SQUARED` to keep lambda
    finite. Stable Diffusion's own schedule ends at abar_N = 0.0047: x_T keeps 6.8% of the image,
    whose mean then leaks into samples started from pure noise.

    Attributes:
      beta_start, beta_end: first and last beta.
      num_timesteps: N.
      zero_terminal_snr: rescale to (nearly) zero SNR at n = N.
    """

    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_timesteps: int = 1000
    T: float = 1.0
    zero_terminal_snr: bool = False

    @property
    def total_N(self) -> int:
        return self.num_timesteps

    @property
    def t_end(self) -> float:
        """Where U-ViT's DPM-Solver++ stops for these models (`eps=1/N`)."""
        return 1.0 / self.num_timesteps

    @functools.cached_property
    def betas(self) -> np.ndarray:
        """[N] float64 betas, index n-1 for step n."""
        return (
            np.linspace(
                self.beta_start**0.5, self.beta_end**0.5, self.num_timesteps, dtype=np.float64
            )
            ** 2
        )

    @functools.cached_property
    def alphas_cumprod(self) -> np.ndarray:
        """[N] float64 abar_n = prod_{i<=n} (1 - beta_i), index n-1 for step n (training)."""
        abar = np.cumprod(1.0 - self.betas)
        if not self.zero_terminal_snr:
            return abar
        root = np.sqrt(abar)
        first, last = root[0], root[-1]
        root = (root - last) * first / (first - last)
        abar = root**2
        abar[-1] = TERMINAL_ALPHA_SQUARED
        return abar

    @functools.cached_property
    def t_array(self) -> np.ndarray:
        """[N] float64 knot times t_n = n / N, n = 1..N."""
        return np.arange(1, self.num_timesteps + 1, dtype=np.float64) / self.num_timesteps

    @functools.cached_property
    def log_alpha_array(self) -> np.ndarray:
        """[N] float64 log alpha at the knots: 0.5 log abar_n (decreasing in n)."""
        return 0.5 * np.log(self.alphas_cumprod)

    def _knots(self, xp, dtype):
        if xp is np:
            return self.t_array, self.log_alpha_array
        return jnp.asarray(self.t_array, dtype), jnp.asarray(self.log_alpha_array, dtype)

    def marginal_log_mean_coeff(self, t: ArrayLike):
        """log alpha_t by piecewise-linear interpolation of 0.5 log abar_n at t_n = n / N."""
        t = _asarray(t)
        xp = _xp(t)
        ts, log_alphas = self._knots(xp, t.dtype)
        return _interp(xp, t, ts, log_alphas)

    def inverse_lambda(self, lamb: ArrayLike):
        """The t with marginal_lambda(t) = lamb (interpolation of the inverse piecewise map)."""
        lamb = _asarray(lamb)
        xp = _xp(lamb)
        ts, log_alphas = self._knots(xp, lamb.dtype)
        log_alpha = _log_alpha_from_lambda(xp, lamb)
        return _interp(xp, log_alpha, log_alphas[::-1], ts[::-1])

    def beta(self, t: ArrayLike):
        """beta(t) = -2 d log alpha_t / dt: N (log abar_{n-1} - log abar_n) on segment n."""
        t = _asarray(t)
        xp = _xp(t)
        ts, log_alphas = self._knots(xp, t.dtype)
        i = xp.clip(xp.searchsorted(ts, t, side="left"), 1, ts.shape[0] - 1)
        return -2.0 * (log_alphas[i] - log_alphas[i - 1]) / (ts[i] - ts[i - 1])

    @property
    def network_time_scale(self) -> float:
        return float(self.num_timesteps)

    def network_time(self, t: ArrayLike):
        """U-ViT's time input for discrete models: N t (the discrete step n at t = n / N)."""
        return float(self.num_timesteps) * t


@dataclasses.dataclass(frozen=True)
class LinearFlowSchedule:
    """The linear interpolant x_t = (1 - t) x_0 + t eps of flow matching (Lipman et al. 2023,
    Liu et al. 2023's rectified flow, SiT): alpha_t = 1 - t, sigma_t = t, not variance-preserving.

    Attributes:
      T: the start time of sampling, 1 - 2^-12: alpha_T^2 = `TERMINAL_ALPHA_SQUARED`, so lambda_T
          is finite for the log-SNR solvers; training draws t in [0, T] too.
      t_end: where the samplers stop (sigma = 0.001).
      total_N: the discretisation DPM-Solver associates with the schedule.
    """

    T: float = 1.0 - TERMINAL_ALPHA_SQUARED**0.5
    t_end: float = 1e-3
    total_N: int = 1000

    def marginal_log_mean_coeff(self, t: ArrayLike):
        """log alpha_t = log(1 - t)."""
        t = _asarray(t)
        return _xp(t).log1p(-t)

    def marginal_alpha(self, t: ArrayLike):
        """alpha_t = 1 - t."""
        return 1.0 - _asarray(t)

    def marginal_std(self, t: ArrayLike):
        """sigma_t = t."""
        return _asarray(t)

    def marginal_lambda(self, t: ArrayLike):
        """lambda_t = log(1 - t) - log t."""
        t = _asarray(t)
        xp = _xp(t)
        return xp.log1p(-t) - xp.log(t)

    def inverse_lambda(self, lamb: ArrayLike):
        """t = 1 / (1 + exp(lambda)), the t with marginal_lambda(t) = lamb."""
        lamb = _asarray(lamb)
        return 0.5 * (1.0 - _xp(lamb).tanh(0.5 * lamb))

    def marginal_derivatives(self, t: ArrayLike):
        """(d alpha_t / dt, d sigma_t / dt) = (-1, 1)."""
        t = _asarray(t)
        one = _xp(t).ones_like(t)
        return -one, one

    @property
    def network_time_scale(self) -> float:
        return CONTINUOUS_NETWORK_TIME_SCALE

    def network_time(self, t: ArrayLike):
        """999 t, as for the VP schedule."""
        return CONTINUOUS_NETWORK_TIME_SCALE * t


Schedule = LinearVPSchedule | DiscreteSchedule | LinearFlowSchedule
