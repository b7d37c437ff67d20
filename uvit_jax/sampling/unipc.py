"""UniPC (Zhao et al. 2023): the multistep predictor UniP-p with the corrector UniC, as one table.

The exact solution of the diffusion ODE from s to t, with h = lambda_t - lambda_s and the model
output m (data prediction x0, or noise prediction eps) expanded in lambda around s, is

    x_t = L x_s - w_t sum_{k>=0} h^k g_{k+1}(hh) m^(k)(lambda_s)

with L = sigma_t / sigma_s, w_t = alpha_t, hh = -h (data prediction), or L = alpha_t / alpha_s,
w_t = sigma_t, hh = h (noise prediction), and g_1 = e^hh - 1, g_{k+1} = g_k / hh - 1 / k!.
UniPC replaces the derivatives by differences D_m = m(lambda_s + r_m h) - m(lambda_s) of earlier
outputs (r_m < 0) and, in the corrector, of the new output at t (r = 1):

    x_t = L x_s - w_t g_1 m_s - w_t B(h) sum_m rho_m D_m / r_m,
    sum_m rho_m r_m^(k-1) = k! g_{k+1} / B(h),   k = 1..M (M differences),

with B(h) = hh ("bh1") or e^hh - 1 ("bh2"), and rho = 1/2 when M = 1 (the paper's choice for
UniP-2 and UniC-1, where the 1x1 system would make B(h) cancel). UniP-p uses the p - 1 previous
outputs; UniC, after the NFE at the predicted x_t, recomputes x_t from the same start with the
predictor's p - 1 earlier outputs plus the new one (order p + 1 at no extra NFE), and the next
step starts from the corrected x_t while reusing the model output at the predicted one.

As a `dpm_solver.Program`: row i evaluates the model at the predicted x_i, corrects the step's
start (base: x_{i-1} corrected) into the corrected x_i with the row's corrector coefficients,
then predicts x_{i+1} from it. The last step is not corrected (that would cost one more NFE).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.diffusion.schedules import Schedule
from uvit_jax.sampling.dpm_solver import (
    Program,
    ProgramBuilder,
    TableSampler,
    time_steps,
)

VARIANTS = ("bh1", "bh2")


def phi_terms(hh: float, n: int) -> np.ndarray:
    """[g_1, ..., g_n] (float64) with g_1 = expm1(hh), g_{k+1} = g_k / hh - 1 / k!.

    g_k = (e^hh - sum_{j<k} hh^j / j!) / hh^(k-1): the weight of the (k-1)-th derivative.
    """
    g = [float(np.expm1(hh))]
    for k in range(1, n):
        g.append(g[-1] / hh - 1.0 / math.factorial(k))
    return np.asarray(g, np.float64)


def unified_update(
    b: ProgramBuilder,
    s: float,
    t: float,
    lag_s: int,
    points: list[tuple[float, int]],
    variant: str,
) -> tuple[float, np.ndarray]:
    """The UniP / UniC step from s to t as x_t = L x_s + c . buf.

    Args:
      b: the builder (schedule, prediction type, buffer depth).
      s, t: start and end times.
      lag_s: the buffer lag holding the model output at s.
      points: (time, lag) of the other model outputs entering the differences D_m.
      variant: "bh1" or "bh2", the B(h) of the rho system.
    Returns:
      L (the start's coefficient) and c [depth] float64 (the outputs' coefficients by lag).
    """
    lam_s = b.lam(s)
    h = b.lam(t) - lam_s
    hh = -h if b.predict_x0 else h
    g = phi_terms(hh, len(points) + 1)
    w_t = b.weight(t)
    c = b.lag()
    c[lag_s] = -w_t * g[0]
    if points:
        r = np.asarray([(b.lam(u) - lam_s) / h for u, _ in points], np.float64)
        big_b = hh if variant == "bh1" else float(np.expm1(hh))
        if len(points) == 1:
            rho = np.asarray([0.5])
        else:
            ks = np.arange(1, len(points) + 1)
            vander = r[None, :] ** (ks[:, None] - 1)
            rhs = np.asarray([math.factorial(k) * g[k] for k in ks]) / big_b
            rho = np.linalg.solve(vander, rhs)
        for (_, lag), r_m, rho_m in zip(points, r, rho, strict=True):
            k = w_t * big_b * rho_m / r_m
            c[lag] -= k
            c[lag_s] += k
    return b.linear_part(s, t), c


def step_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The predictor order of each step: warm-up 1, 2, ... and, with lower_order_final, lower
    orders for the last steps (UniPC's rule, at every step count: the last step is order 1)."""
    orders = []
    for i in range(steps):
        k = min(order, steps - i) if lower_order_final else order
        orders.append(min(k, i + 1))
    return orders


def build_program(
    ns: Schedule,
    times: np.ndarray,
    *,
    order: int,
    variant: str,
    predict_x0: bool,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    target: str = "eps",
) -> Program:
    """The per-NFE table of UniPC on an explicit time grid.

    Args:
      ns: a `uvit_jax.diffusion.schedules` schedule.
      times: [steps + 1] float64 times, decreasing (`dpm_solver.time_steps`, or diffusers'
          integer timesteps in the parity tests); one NFE per interval.
      order: the predictor order p, 1-3 (UniPC-p: order p + 1 with the corrector).
      variant: "bh1" (B(h) = hh) or "bh2" (B(h) = e^hh - 1).
      predict_x0: True: data prediction (UniPC's default); False: noise prediction.
      lower_order_final: lower predictor orders for the last steps (`step_orders`).
      denoise_to_zero: one more NFE returning the data prediction at the last time.
      target: what the network predicts (`diffusion.targets`).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order must be 1, 2 or 3, got {order}")
    if variant not in VARIANTS:
        raise ValueError(f"UniPC variant must be one of {VARIANTS}, got {variant!r}")
    steps = len(times) - 1
    if steps < 1:
        raise ValueError(f"need at least 2 times, got {len(times)}")
    ts = [float(v) for v in times]
    orders = step_orders(steps, order, lower_order_final)
    # Lags 0..order: the corrector of an order-p step uses the outputs at t_i .. t_{i-p}.
    b = ProgramBuilder(ns, "x0" if predict_x0 else "eps", depth=order + 1, target=target)
    for i in range(steps):
        corrector = None
        if i > 0:
            k = orders[i - 1]
            earlier = [(ts[i - 1 - j], j + 1) for j in range(1, k)]
            corrector = unified_update(b, ts[i - 1], ts[i], 1, [*earlier, (ts[i], 0)], variant)
        history = [(ts[i - j], j) for j in range(1, orders[i])]
        a, c = unified_update(b, ts[i], ts[i + 1], 0, history, variant)
        # The last row closes the run, so a denoising row starts from its (uncorrected) result.
        b.add(ts[i], a, c, end=i == steps - 1, corrector=corrector)
    if denoise_to_zero:
        b.denoise_to_zero(ts[-1])
    return b.program()


@dataclasses.dataclass(frozen=True)
class Variant(TableSampler):
    """UniPC as a named sampler (`uvit_jax.sampling.samplers`), from `schedule.T` to
    `schedule.t_end`.

    variant, order, predict_x0, lower_order_final, denoise_to_zero: as for `build_program`.
    skip_type: the time grid (`dpm_solver.time_steps`); None: the formulation's
    (`Formulation.grid`). thresholding: of the data prediction.
    """

    variant: str
    order: int
    predict_x0: bool = True
    skip_type: str | None = None
    lower_order_final: bool = True
    thresholding: bool = False
    denoise_to_zero: bool = False

    def program(self, formulation: Formulation, steps: int) -> Program:
        ns = formulation.schedule
        grid = self.skip_type or formulation.grid
        return build_program(
            ns,
            time_steps(ns, grid, ns.T, ns.t_end, steps),
            order=self.order,
            variant=self.variant,
            predict_x0=self.predict_x0,
            lower_order_final=self.lower_order_final,
            denoise_to_zero=self.denoise_to_zero,
            target=formulation.target,
        )
