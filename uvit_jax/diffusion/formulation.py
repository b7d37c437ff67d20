"""A diffusion formulation: the noise path, what the network predicts, how training draws times.

    config.diffusion.formulation    the path (`PATHS`): its schedule, the network's time input,
                                    the samplers' default time grid
    config.diffusion.target         what the network predicts (`targets.TARGETS`)
    config.diffusion.time_sampling  how training draws t: "uniform" (the paper) or
                                    "logit_normal": t = sigmoid(time_mean + time_std z), z ~ N(0, 1)
                                    (Esser et al. 2024, SD3: m = 0, s = 1)
    config.diffusion.time_shift     s >= 1 moves the drawn times toward noise:
                                    t <- s t / (1 + (s - 1) t) (SD3's resolution shift); 1: none

The paper's two formulations are ("vp_continuous", "eps", "uniform") and ("sd_discrete", "eps",
"uniform"); flow matching as SiT trains it is ("flow", "velocity", "uniform"), and with SD3's
time sampling ("flow", "velocity", "logit_normal"). `Formulation` is the one place that knows
each path: the loss, the dashboards and the samplers ask it.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from uvit_jax.diffusion.schedules import (
    DiscreteSchedule,
    LinearFlowSchedule,
    LinearVPSchedule,
    Schedule,
)
from uvit_jax.diffusion.targets import TARGETS
from uvit_jax.errors import ConfigError

Array = jax.Array


class Path(NamedTuple):
    """A noise path: its schedule and the DPM-Solver/UniPC grid used unless a sampler sets one."""

    schedule: Schedule
    grid: str


PATHS: dict[str, Path] = {
    # U-ViT's continuous VP-SDE (pixel models). logSNR rather than U-ViT's time-uniform grid:
    # down to t = 1e-4 a time-uniform grid leaves one huge logSNR step at the end (visible bias
    # at 50 steps).
    "vp_continuous": Path(LinearVPSchedule(), "logSNR"),
    # Stable Diffusion's discrete schedule (U-ViT's latent models), U-ViT's time-uniform grid.
    "sd_discrete": Path(DiscreteSchedule(), "time_uniform"),
    # The same, rescaled to zero terminal SNR (Lin et al. 2024); sampled from t = T. Uniform in
    # sqrt(t): from pure noise, every solver here is 3-20x closer to the exact flow at 10-50
    # NFE than on the time-uniform grid (docs/samplers.md#accuracy).
    "sd_zero_snr": Path(DiscreteSchedule(zero_terminal_snr=True), "time_quadratic"),
    # The linear interpolant of flow matching / rectified flow (SiT).
    "flow": Path(LinearFlowSchedule(), "time_uniform"),
}

TIME_SAMPLINGS = ("uniform", "logit_normal")


class NoiseLevel(NamedTuple):
    """Where each training example is noised: [B] float32 arrays."""

    t: Array  # continuous time in [0, T] (n / N for discrete paths)
    t_net: Array  # the network's time input
    alpha: Array
    sigma: Array


@dataclasses.dataclass(frozen=True)
class Formulation:
    """One diffusion formulation (module docstring); frozen and hashable, so jit can close over
    it or take it as a static argument."""

    path: str = "vp_continuous"
    target: str = "eps"
    time_sampling: str = "uniform"
    time_mean: float = 0.0
    time_std: float = 1.0
    time_shift: float = 1.0

    def __post_init__(self):
        if self.path not in PATHS:
            raise ConfigError(
                f"config.diffusion.formulation={self.path!r}: expected one of {tuple(PATHS)}"
            )
        if self.target not in TARGETS:
            raise ConfigError(f"config.diffusion.target={self.target!r}: expected one of {TARGETS}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise ConfigError(
                f"config.diffusion.time_sampling={self.time_sampling!r}: expected one of "
                f"{TIME_SAMPLINGS}"
            )
        if self.target == "eps" and self.path == "sd_zero_snr":
            raise ConfigError(
                "config.diffusion.target='eps' with formulation 'sd_zero_snr': at zero SNR the "
                "noise is the input itself and says nothing of the image; use 'v' or 'velocity' "
                "(Lin et al. 2024)"
            )

    @classmethod
    def from_config(cls, config: Any) -> Formulation:
        """The formulation of a run config (`config.diffusion`; configs saved before the target
        and time-sampling fields existed get the paper's: noise target, uniform times)."""
        d = config.diffusion
        return cls(
            path=str(d.formulation),
            target=str(d.get("target", "eps")),
            time_sampling=str(d.get("time_sampling", "uniform")),
            time_mean=float(d.get("time_mean", 0.0)),
            time_std=float(d.get("time_std", 1.0)),
            time_shift=float(d.get("time_shift", 1.0)),
        )

    @property
    def schedule(self) -> Schedule:
        return PATHS[self.path].schedule

    @property
    def grid(self) -> str:
        """The samplers' default time grid (`dpm_solver.SKIP_TYPES`)."""
        return PATHS[self.path].grid

    @property
    def discrete(self) -> bool:
        return isinstance(self.schedule, DiscreteSchedule)

    def network_time(self, t: Any) -> Any:
        """The network's time input at continuous time t."""
        return self.schedule.network_time(t)

    def describe(self) -> dict[str, Any]:
        """The fields as a dict, for protocol fingerprints."""
        return dataclasses.asdict(self)

    @property
    def label(self) -> str:
        """A short name for plots and logs, e.g. "flow, velocity, logit-normal(0, 1)"."""
        parts = [self.path, self.target]
        if self.time_sampling == "logit_normal":
            parts.append(f"logit-normal({self.time_mean:g}, {self.time_std:g})")
        if self.time_shift != 1.0:
            parts.append(f"shift {self.time_shift:g}")
        return ", ".join(parts)

    # -- training --
    def _draw_unit_time(self, key: Array, b: int) -> Array:
        """[B] float32 times in [0, 1] by `time_sampling`, shifted by `time_shift`."""
        if self.time_sampling == "logit_normal":
            z = jax.random.normal(key, (b,), jnp.float32)
            t = jax.nn.sigmoid(self.time_mean + self.time_std * z)
        else:
            t = jax.random.uniform(key, (b,), jnp.float32)
        if self.time_shift != 1.0:
            t = self.time_shift * t / (1.0 + (self.time_shift - 1.0) * t)
        return t

    def draw(self, key: Array, b: int) -> NoiseLevel:
        """Draws a noise level for each of b training examples."""
        ns = self.schedule
        if isinstance(ns, DiscreteSchedule):
            if self.time_sampling == "uniform" and self.time_shift == 1.0:
                n = jax.random.randint(key, (b,), 1, ns.total_N + 1)
            else:  # step n covers t in ((n - 1) / N, n / N]
                t = self._draw_unit_time(key, b)
                n = jnp.clip(jnp.ceil(t * ns.total_N).astype(jnp.int32), 1, ns.total_N)
            abar = jnp.asarray(ns.alphas_cumprod, jnp.float32)[n - 1]
            t_net = n.astype(jnp.float32)
            return NoiseLevel(t_net / ns.total_N, t_net, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))
        # A path that reaches alpha = 0 at t = 1 stops at T (T = 1 for the others: t < 1 kept).
        t = jnp.minimum(self._draw_unit_time(key, b), ns.T)
        return NoiseLevel(t, ns.network_time(t), ns.marginal_alpha(t), ns.marginal_std(t))

    # -- the dashboards' loss by noise level --
    def bucket(self, t_net: Array, num_buckets: int) -> Array:
        """Which of `num_buckets` equal ranges of the schedule's time each network time falls in.

        t_net [B] float32 as `draw` gives it -> [B] int32 in [0, num_buckets), the ranges
        `bucket_names` names.
        """
        if self.discrete:
            # Integer arithmetic: n = 1..N splits exactly, n = 250 in the first quarter, 251 not.
            n = t_net.astype(jnp.int32)
            return (n - 1) * num_buckets // self.schedule.total_N
        bucket = jnp.floor(t_net / self.schedule.network_time_scale * num_buckets)
        # t < 1, but 999 t / 999 may round up to 1
        return jnp.minimum(bucket.astype(jnp.int32), num_buckets - 1)

    def bucket_names(self, num_buckets: int) -> tuple[str, ...]:
        """Names of the `bucket` ranges as TensorBoard tags show them: "n1-250", ... for
        discrete paths (steps n), "t0.00-0.25", ... for continuous ones (time t)."""
        if self.discrete:
            total = self.schedule.total_N
            edges = [i * total // num_buckets for i in range(num_buckets + 1)]
            return tuple(f"n{lo + 1}-{hi}" for lo, hi in itertools.pairwise(edges))
        return tuple(
            f"t{i / num_buckets:.2f}-{(i + 1) / num_buckets:.2f}" for i in range(num_buckets)
        )
