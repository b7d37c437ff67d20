"""EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1 without churn), 2nd order.

EDM solves the probability-flow ODE in the scaled state x / alpha_t against the noise level
sigma = sigma_t / alpha_t = exp(-lambda_t), where it reads d(x / alpha) / d sigma = eps. A step
from sigma_i to sigma_{i+1} is an Euler step, then the trapezoidal rule with the noise
predicted at the Euler point; back in the model's x_t = alpha_t (x / alpha_t) this is linear in
the step's start and the two noise predictions:

    x_E     = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} (sigma_{i+1} - sigma_i) eps_i
    x_{i+1} = (alpha_{i+1} / alpha_i) x_i + alpha_{i+1} (sigma_{i+1} - sigma_i) (eps_i + eps_E) / 2

so it is a two-row-per-step `dpm_solver.Program` (noise prediction). Each step costs 2 NFE; an
odd NFE count ends with one Euler step (as EDM's last step to sigma = 0 does). The grid is a
sampler option; EDM's own is "karras" (uniform in sigma^(1/7)).
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
    final_euler: bool = False,
    denoise_to_zero: bool = False,
    target: str = "eps",
) -> Program:
    """The per-NFE table of Heun's method on an explicit time grid.

    Args:
      ns: a `uvit_jax.diffusion.schedules` schedule.
      times: [K + 1] float64 times, decreasing; K steps, 2 NFE each.
      final_euler: the last step as a single Euler step (1 NFE).
      denoise_to_zero: one more NFE returning the data prediction at the last time.
      target: what the network predicts (`diffusion.targets`).
    """
    if len(times) < 2:
        raise ValueError(f"need at least 2 times, got {len(times)}")
    b = ProgramBuilder(ns, "eps", depth=2, target=target)
    ts = [float(v) for v in times]
    last = len(ts) - 2
    for i, (s, t) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        # alpha_t (sigma_t/alpha_t - sigma_s/alpha_s), with sigma/alpha = exp(-lambda).
        step = float(np.exp(b.log_alpha(t)) * (np.exp(-b.lam(t)) - np.exp(-b.lam(s))))
        b.heun_step(s, t, b.linear_part(s, t), step, euler=final_euler and i == last)
    if denoise_to_zero:
        b.denoise_to_zero(ts[-1])
    return b.program()


@dataclasses.dataclass(frozen=True)
class Variant(TableSampler):
    """Heun as a named sampler (`uvit_jax.sampling.samplers`), from `schedule.T` to
    `schedule.t_end`.

    `steps` NFE make (steps + 1) // 2 steps, the last an Euler step when steps is odd.
    skip_type: the time grid (`dpm_solver.time_steps`), EDM's "karras" by default.
    denoise_to_zero: as for `build_program`.
    """

    skip_type: str = "karras"
    denoise_to_zero: bool = False
    predict_x0 = False  # noise prediction: no thresholding

    def program(self, formulation: Formulation, steps: int) -> Program:
        ns = formulation.schedule
        num_steps = (steps + 1) // 2
        return build_program(
            ns,
            time_steps(ns, self.skip_type, ns.T, ns.t_end, num_steps),
            final_euler=steps % 2 == 1,
            denoise_to_zero=self.denoise_to_zero,
            target=formulation.target,
        )
