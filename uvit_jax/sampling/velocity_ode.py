"""Euler and Heun on the velocity ODE dx/dt = alpha'_t x0 + sigma'_t eps, in the path's own time.

This is how flow-matching models sample (rectified flow's Euler, SiT's Heun): on the linear
interpolant the velocity is eps - x0, and the exact ODE's trajectories are straight where the
data is a point. Every network target converts to the velocity (`targets.prediction_coefficients`),
so these run on any Gaussian path; on the VP paths the ODE is stiff near t = 0 and the log-SNR
solvers (DPM-Solver, UniPC) need far fewer steps.

A step from s to t (dt = t - s < 0), with u the velocity:

    Euler:  x_t = x_s + dt u(x_s, s)
    Heun:   x_E = x_s + dt u(x_s, s);  x_t = x_s + dt (u(x_s, s) + u(x_E, t)) / 2

each a `dpm_solver.Program` row (Heun: two rows per step, 2 NFE; an odd NFE count ends with an
Euler step).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.diffusion.schedules import Schedule
from uvit_jax.sampling.dpm_solver import Program, ProgramBuilder, TableSampler, time_steps


def build_program(
    ns: Schedule,
    times: np.ndarray,
    *,
    order: int,
    target: str = "eps",
    final_euler: bool = False,
    denoise_to_zero: bool = False,
) -> Program:
    """The per-NFE table of Euler (order 1) or Heun (order 2) on an explicit time grid.

    Args:
      ns: a `uvit_jax.diffusion.schedules` schedule.
      times: [K + 1] float64 times, decreasing; K steps.
      order: 1 (Euler, 1 NFE per step) or 2 (Heun, 2 NFE per step).
      target: what the network predicts (`diffusion.targets`).
      final_euler: Heun only: the last step as a single Euler step (1 NFE).
      denoise_to_zero: one more NFE returning the data prediction at the last time.
    """
    if order not in (1, 2):
        raise ValueError(f"the velocity ODE's order must be 1 (Euler) or 2 (Heun), got {order}")
    if len(times) < 2:
        raise ValueError(f"need at least 2 times, got {len(times)}")
    b = ProgramBuilder(ns, "velocity", depth=2, target=target)
    ts = [float(v) for v in times]
    last = len(ts) - 2
    for i, (s, t) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        b.heun_step(s, t, 1.0, t - s, euler=order == 1 or (final_euler and i == last))
    if denoise_to_zero:
        b.denoise_to_zero(ts[-1])
    return b.program()


@dataclasses.dataclass(frozen=True)
class Variant(TableSampler):
    """Euler (order 1) or Heun (order 2) on the velocity ODE as a named sampler
    (`uvit_jax.sampling.samplers`), from `schedule.T` to `schedule.t_end`.

    `steps` NFE make `steps` Euler steps, or (steps + 1) // 2 Heun steps, the last an Euler step
    when steps is odd. skip_type: the time grid (`dpm_solver.time_steps`), uniform in t by
    default. denoise_to_zero: as for `build_program`.
    """

    order: int
    skip_type: str = "time_uniform"
    denoise_to_zero: bool = False
    predict_x0 = False  # velocity: no data prediction to threshold

    def program(self, formulation: Formulation, steps: int) -> Program:
        ns = formulation.schedule
        num_steps = steps if self.order == 1 else (steps + 1) // 2
        return build_program(
            ns,
            time_steps(ns, self.skip_type, ns.T, ns.t_end, num_steps),
            order=self.order,
            target=formulation.target,
            final_euler=self.order == 2 and steps % 2 == 1,
            denoise_to_zero=self.denoise_to_zero,
        )
