"""DPM-Solver (noise prediction) and DPM-Solver++ (data prediction), orders 1-3, as one `lax.scan`.

Semantics follow the official implementation (LuChengTHU/dpm-solver `dpm_solver_pytorch.py`, and
the versions U-ViT bundles): the same time grids, order schedules, intermediate points and update
formulas (`solver_type="dpmsolver"`), with every phi coefficient computed through expm1.

How it is jitted: every solver here is a sequence of network evaluations (NFEs) in which each new
point is a linear combination of the point where the current step started ("base") and the last
few model outputs. So the whole sampler is described by a per-NFE table, built in float64 numpy
from the schedule before tracing:

    eps    = noise_fn(x, t[i])
    m      = p[i] x + q[i] eps            # model output: eps (DPM-Solver) or x0 (DPM-Solver++)
    buf    = (m, buf[0], buf[1])          # model outputs by lag
    base   = ca[i] base + sum_j cc[i, j] buf[j]   # a corrector (UniPC's UniC); else ca=1, cc=0
    x      = a[i] base + sum_j c[i, j] buf[j]
    base   = x if end[i] else base        # end[i]: the NFE closes a (singlestep) step

and one `lax.scan` over the table runs it with a single traced network call. Compilation
therefore happens once per (NFE count, buffer depth, x shape/dtype); `jax.jit` the caller.
The other table-driven samplers (`unipc`, `heun`) build their tables with `ProgramBuilder` and
run them with `run_program`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.diffusion.schedules import Schedule
from uvit_jax.diffusion.targets import prediction_coefficients

NoiseFn = Callable[[jax.Array, jax.Array], jax.Array]
"""noise_fn(x [B, ...], t_continuous [B]) -> the network's prediction of its target (the noise
for the paper's models; `diffusion.targets`), same shape as x."""

METHODS = ("singlestep_fast", "singlestep", "singlestep_fixed", "multistep")
SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic", "karras")
KARRAS_RHO = 7.0  # EDM's exponent of the sigma spacing (Karras et al. 2022, eq. 5)


@dataclasses.dataclass(frozen=True)
class Program:
    """The per-NFE coefficient table of a solver run (all float64 numpy, length n = NFE).

    Attributes:
      t: [n] continuous time of each network evaluation.
      p, q: [n] model output m = p x + q out from the network's output `out`
          (`targets.prediction_coefficients`; p = 0, q = 1 for noise prediction by a noise
          network).
      a: [n] coefficient of the step's starting point.
      c: [n, K] coefficients of the last K model outputs, lag 0 first.
      end: [n] bool, whether the NFE's result starts the next step.
      ca, cc: [n] and [n, K] the corrector, base <- ca base + cc . buf before the update
          (ca = 1, cc = 0: none; UniPC's UniC corrects the step's start with the new output).
    """

    t: np.ndarray
    p: np.ndarray
    q: np.ndarray
    a: np.ndarray
    c: np.ndarray
    end: np.ndarray
    ca: np.ndarray
    cc: np.ndarray

    @property
    def nfe(self) -> int:
        return int(self.t.shape[0])


class ProgramBuilder:
    """Accumulates Program rows; coefficients are float64 and follow the official formulas.

    prediction: what the rows' model output m is: "x0" (data, DPM-Solver++), "eps" (noise,
    DPM-Solver) or "velocity" (dx_t / dt); target: what the network predicts
    (`targets.TARGETS`), converted to `prediction` in each row's p and q.
    """

    def __init__(self, ns: Schedule, prediction: str, depth: int, target: str = "eps"):
        self.ns, self.prediction, self.depth, self.target = ns, prediction, depth, target
        self.predict_x0 = prediction == "x0"
        self.rows: list[tuple[float, float, float, float, np.ndarray, bool, float, np.ndarray]] = []

    # -- schedule helpers (float64 scalars) --
    def lam(self, u: float) -> float:
        return float(self.ns.marginal_lambda(np.float64(u)))

    def log_alpha(self, u: float) -> float:
        return float(self.ns.marginal_log_mean_coeff(np.float64(u)))

    def sigma(self, u: float) -> float:
        return float(self.ns.marginal_std(np.float64(u)))

    def inv(self, lamb: float) -> float:
        return float(self.ns.inverse_lambda(np.float64(lamb)))

    def lag(self, *coeffs: float) -> np.ndarray:
        v = np.zeros(self.depth, np.float64)
        v[: len(coeffs)] = coeffs
        return v

    def add(
        self,
        t_eval: float,
        a: float,
        c: np.ndarray,
        end: bool,
        corrector: tuple[float, np.ndarray] | None = None,
        prediction: str | None = None,
    ) -> None:
        """One NFE at t_eval, then base <- ca base + cc . buf (corrector=(ca, cc), if given)
        and x <- a * base + c . buf. prediction: this row's model output, if not the builder's.

        For a noise network, data prediction is x0 = (x - sigma eps) / alpha (DPM-Solver++'s
        `data_prediction_fn`).
        """
        p, q = prediction_coefficients(self.target, prediction or self.prediction, self.ns, t_eval)
        ca, cc = (1.0, self.lag()) if corrector is None else corrector
        self.rows.append((t_eval, p, q, a, c, end, ca, cc))

    def heun_step(self, s: float, t: float, linear: float, step: float, euler: bool) -> None:
        """A step of Heun's method from s to t, x_t = linear x_s + step (m_s + m_E) / 2, with m_E
        the model output at the Euler point linear x_s + step m_s (2 NFE); euler: that Euler
        step alone (1 NFE)."""
        self.add(s, linear, self.lag(step), euler)
        if not euler:
            self.add(t, linear, self.lag(0.5 * step, 0.5 * step), True)

    def linear_part(self, s: float, u: float) -> float:
        """Coefficient of x_s in the exact linear part from s to u."""
        if self.predict_x0:
            return self.sigma(u) / self.sigma(s)
        return float(np.exp(self.log_alpha(u) - self.log_alpha(s)))

    def weight(self, u: float) -> float:
        """alpha_u (data prediction) or sigma_u (noise prediction): scales the phi terms."""
        return float(np.exp(self.log_alpha(u))) if self.predict_x0 else self.sigma(u)

    def phi1(self, h: float) -> float:
        # DPM-Solver++: x_t = sigma_t/sigma_s x - alpha_t expm1(-h) x0;
        # DPM-Solver:   x_t = alpha_t/alpha_s x - sigma_t expm1(h) eps.
        return float(np.expm1(-h)) if self.predict_x0 else float(np.expm1(h))

    def sign(self) -> float:
        """Sign of the higher-order corrections: + for data prediction, - for noise prediction."""
        return 1.0 if self.predict_x0 else -1.0

    # -- singlestep updates (official `singlestep_dpm_solver_*_update`) --
    def singlestep(self, s: float, t: float, order: int, r1: float | None, r2: float | None):
        lam_s, lam_t = self.lam(s), self.lam(t)
        h = lam_t - lam_s
        w_t, phi_1, sg = self.weight(t), self.phi1(h), self.sign()
        if order == 1:
            self.add(s, self.linear_part(s, t), self.lag(-w_t * phi_1), True)
        elif order == 2:
            r1 = 0.5 if r1 is None else r1
            s1 = self.inv(lam_s + r1 * h)
            self.add(
                s, self.linear_part(s, s1), self.lag(-self.weight(s1) * self.phi1(r1 * h)), False
            )
            # x_t = L x - w_t phi_1 m_s - (0.5 / r1) w_t phi_1 (m_s1 - m_s)
            k = 0.5 / r1 * w_t * phi_1
            self.add(s1, self.linear_part(s, t), self.lag(-k, -w_t * phi_1 + k), True)
        elif order == 3:
            r1 = 1.0 / 3.0 if r1 is None else r1
            r2 = 2.0 / 3.0 if r2 is None else r2
            s1, s2 = self.inv(lam_s + r1 * h), self.inv(lam_s + r2 * h)
            phi_11, phi_12 = self.phi1(r1 * h), self.phi1(r2 * h)
            # DPM-Solver++: expm1(-rh)/(rh) + 1 and phi_1/h + 1; DPM-Solver: expm1(rh)/(rh) - 1, ...
            phi_22 = phi_12 / (r2 * h) + sg
            phi_2 = phi_1 / h + sg
            w_s1, w_s2 = self.weight(s1), self.weight(s2)
            self.add(s, self.linear_part(s, s1), self.lag(-w_s1 * phi_11), False)
            # x_s2 = L x - w_s2 phi_12 m_s + sg (r2 / r1) w_s2 phi_22 (m_s1 - m_s)
            k = sg * r2 / r1 * w_s2 * phi_22
            self.add(s1, self.linear_part(s, s2), self.lag(k, -w_s2 * phi_12 - k), False)
            # x_t = L x - w_t phi_1 m_s + sg (1 / r2) w_t phi_2 (m_s2 - m_s)
            k = sg / r2 * w_t * phi_2
            self.add(s2, self.linear_part(s, t), self.lag(k, 0.0, -w_t * phi_1 - k), True)
        else:
            raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")

    # -- multistep updates (official `multistep_dpm_solver_*_update`) --
    def multistep(self, t_prev: list[float], t: float, order: int):
        """NFE at t_prev[-1], then the order-`order` step to t using model outputs at t_prev."""
        p0 = t_prev[-1]
        lam_0, lam_t = self.lam(p0), self.lam(t)
        h = lam_t - lam_0
        w_t, phi_1, sg = self.weight(t), self.phi1(h), self.sign()
        lin = self.linear_part(p0, t)
        if order == 1:
            c = self.lag(-w_t * phi_1)
        elif order == 2:
            r0 = (lam_0 - self.lam(t_prev[-2])) / h
            # - 0.5 w_t phi_1 D1_0 with D1_0 = (m_0 - m_1) / r0
            k = 0.5 * w_t * phi_1 / r0
            c = self.lag(-w_t * phi_1 - k, k)
        elif order == 3:
            lam_1, lam_2 = self.lam(t_prev[-2]), self.lam(t_prev[-3])
            r0, r1 = (lam_0 - lam_1) / h, (lam_1 - lam_2) / h
            d1_0 = self.lag(1.0 / r0, -1.0 / r0)
            d1_1 = self.lag(0.0, 1.0 / r1, -1.0 / r1)
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            phi_2 = phi_1 / h + sg
            phi_3 = phi_2 / h - 0.5
            # DPM-Solver++: - w phi_1 m_0 + w phi_2 D1 - w phi_3 D2;
            # DPM-Solver:   - w phi_1 m_0 - w phi_2 D1 - w phi_3 D2.
            c = self.lag(-w_t * phi_1) + sg * w_t * phi_2 * d1 - w_t * phi_3 * d2
        else:
            raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
        self.add(p0, lin, c, True)

    def denoise_to_zero(self, t0: float):
        """A last NFE giving x0 = (x - sigma eps) / alpha at t0 (official `denoise_to_zero_fn`)."""
        if self.prediction != "eps":
            self.add(t0, 0.0, self.lag(1.0), True, prediction="x0")
        else:
            alpha = float(np.exp(self.log_alpha(t0)))
            self.add(t0, 1.0 / alpha, self.lag(-self.sigma(t0) / alpha), True)

    def program(self) -> Program:
        t, p, q, a, c, end, ca, cc = zip(*self.rows, strict=True)
        f64 = lambda v: np.asarray(v, np.float64)
        return Program(
            f64(t),
            f64(p),
            f64(q),
            f64(a),
            np.stack(c),
            np.asarray(end, bool),
            f64(ca),
            np.stack(cc),
        )


def time_steps(ns: Schedule, skip_type: str, t_T: float, t_0: float, n: int) -> np.ndarray:
    """n + 1 float64 times from t_T down to t_0 (official `get_time_steps`, plus EDM's "karras")."""
    if skip_type == "logSNR":
        lam_T, lam_0 = ns.marginal_lambda(np.float64(t_T)), ns.marginal_lambda(np.float64(t_0))
        return np.asarray(ns.inverse_lambda(np.linspace(lam_T, lam_0, n + 1)), np.float64)
    if skip_type == "time_uniform":
        return np.linspace(t_T, t_0, n + 1, dtype=np.float64)
    if skip_type == "time_quadratic":
        return np.linspace(np.sqrt(t_T), np.sqrt(t_0), n + 1, dtype=np.float64) ** 2
    if skip_type == "karras":
        # EDM's noise levels sigma = sigma_t / alpha_t = exp(-lambda), uniform in sigma^(1/rho).
        lam_T, lam_0 = ns.marginal_lambda(np.float64(t_T)), ns.marginal_lambda(np.float64(t_0))
        root = np.linspace(np.exp(-lam_T / KARRAS_RHO), np.exp(-lam_0 / KARRAS_RHO), n + 1)
        return np.asarray(ns.inverse_lambda(-KARRAS_RHO * np.log(root)), np.float64)
    raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")


def singlestep_orders(steps: int, order: int) -> list[int]:
    """Orders of the singlestep solver spending exactly `steps` NFE ("DPM-Solver-fast" for 3).

    order 3: K = steps // 3 + 1 steps, [3]*(K-2)+[2,1] | [3]*(K-1)+[1] | [3]*(K-1)+[2] for
    steps % 3 == 0 | 1 | 2; order 2: [2]*(steps//2) (+[1] if odd); order 1: [1]*steps.
    """
    if order == 3:
        k = steps // 3 + 1
        tail = {0: [2, 1], 1: [1], 2: [2]}[steps % 3]
        return [3] * (k - 1 - (steps % 3 == 0)) + tail
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    if order == 1:
        return [1] * steps
    raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")


def build_program(
    ns: Schedule,
    *,
    steps: int,
    order: int = 3,
    method: str = "singlestep_fast",
    skip_type: str = "time_uniform",
    predict_x0: bool,
    t_start: float = 1.0,
    t_end: float | None = None,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    target: str = "eps",
) -> Program:
    """The per-NFE coefficient table of a DPM-Solver run.

    Args:
      ns: a `uvit_jax.diffusion.schedules` schedule.
      steps: number of network evaluations (NFE), not counting `denoise_to_zero`.
      order: highest solver order, 1-3.
      method: "singlestep_fast": the DPM-Solver paper's fast version: the singlestep order
          schedule over len(orders) steps spaced by `skip_type` (the paper: "logSNR"), inner
          points at lambda fractions 1/3, 2/3 (order 3) or 1/2 (order 2);
          "singlestep": the current official singlestep solver: for "logSNR" as above, otherwise
          the outer points are taken from a `steps`-interval grid (order-k steps span k intervals)
          and the inner points are the grid points in between;
          "singlestep_fixed": steps // order steps of one order;
          "multistep": multistep 1..3 (2M / 3M), lower orders to warm up.
      skip_type: time grid spacing: "time_uniform", "logSNR" or "time_quadratic".
      predict_x0: True: DPM-Solver++ (data prediction); False: DPM-Solver (noise prediction).
      t_start, t_end: time range; t_end=None uses `schedule.t_end` (U-ViT's: 1e-4 for the VP
          schedule, 1/N for the discrete one).
      lower_order_final: multistep only: lower orders for the final steps when steps < 10.
      denoise_to_zero: one more NFE returning the data prediction at t_end.
      target: what the network predicts (`diffusion.targets`).
    """
    if order not in (1, 2, 3):
        raise ValueError(f"DPM-Solver order must be 1, 2 or 3, got {order}")
    if skip_type not in SKIP_TYPES:
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    t_0 = ns.t_end if t_end is None else float(t_end)
    t_T = float(t_start)
    if not 0.0 < t_0 < t_T:
        raise ValueError(f"need 0 < t_end < t_start, got t_end={t_0}, t_start={t_T}")

    if method in ("singlestep_fast", "singlestep", "singlestep_fixed"):
        b = ProgramBuilder(ns, "x0" if predict_x0 else "eps", depth=order, target=target)
        if method == "singlestep_fixed":
            orders = [order] * (steps // order)
            if not orders:
                raise ValueError(f"singlestep_fixed needs steps >= order, got {steps} < {order}")
        else:
            orders = singlestep_orders(steps, order)
        if method == "singlestep" and skip_type != "logSNR":
            # One fine grid of `steps` intervals; an order-k step spans k of them.
            fine = time_steps(ns, skip_type, t_T, t_0, steps)
            outer = fine[np.cumsum([0, *orders])]
        else:
            outer = time_steps(ns, skip_type, t_T, t_0, len(orders))
        for i, k in enumerate(orders):
            s, t = float(outer[i]), float(outer[i + 1])
            if method == "singlestep_fast" or k == 1:
                # The paper's DPM-Solver-fast: intermediate points at fixed fractions of h.
                r1 = r2 = None
            else:
                inner = time_steps(ns, skip_type, s, t, k)
                lam_inner = np.asarray(ns.marginal_lambda(inner), np.float64)
                h = lam_inner[-1] - lam_inner[0]
                r1 = float((lam_inner[1] - lam_inner[0]) / h)
                r2 = float((lam_inner[2] - lam_inner[0]) / h) if k == 3 else None
            b.singlestep(s, t, k, r1, r2)
        if denoise_to_zero:
            b.denoise_to_zero(t_0)
        return b.program()
    if method == "multistep":
        if steps < order:
            raise ValueError(f"multistep needs steps >= order, got {steps} < {order}")
        return multistep_program(
            ns,
            time_steps(ns, skip_type, t_T, t_0, steps),
            order=order,
            predict_x0=predict_x0,
            lower_order_final=lower_order_final,
            denoise_to_zero=denoise_to_zero,
            target=target,
        )
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def multistep_program(
    ns: Schedule,
    times: np.ndarray,
    *,
    order: int,
    predict_x0: bool,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    target: str = "eps",
) -> Program:
    """The table of multistep DPM-Solver(++) (2M / 3M) on an explicit time grid.

    Args:
      ns: a `uvit_jax.diffusion.schedules` schedule.
      times: [steps + 1] float64 times, decreasing (`time_steps`, or another sampler's grid such
          as diffusers' integer timesteps in the parity tests); one NFE per interval.
      order: 1-3; the first steps warm up with orders 1, 2.
      predict_x0, denoise_to_zero, target: as for `build_program`.
      lower_order_final: the official rule: lower orders for the final steps when steps < 10.
    """
    steps = len(times) - 1
    b = ProgramBuilder(ns, "x0" if predict_x0 else "eps", depth=order, target=target)
    ts = [float(v) for v in times]
    for j in range(1, steps + 1):
        if j < order:  # warm-up with lower orders
            k = j
        elif lower_order_final and steps < 10:  # official: lower orders at the end, < 10 steps
            k = min(order, steps + 1 - j)
        else:
            k = order
        b.multistep(ts[max(0, j - k) : j], ts[j], k)
    if denoise_to_zero:
        b.denoise_to_zero(ts[-1])
    return b.program()


def dynamic_threshold(x0: jax.Array, ratio: float = 0.995, max_val: float = 1.0) -> jax.Array:
    """Imagen's dynamic thresholding (official `dynamic_thresholding_fn`), per sample."""
    flat = jnp.abs(x0.reshape(x0.shape[0], -1))
    s = jnp.maximum(jnp.quantile(flat, ratio, axis=1), max_val)
    s = s.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return jnp.clip(x0, -s, s) / s


def _combine(a: jax.Array, start: jax.Array, c: jax.Array, buf: tuple[jax.Array, ...]):
    """a start + sum_j c[j] buf[j]: a scalar, c [K], start and buf[j] like x."""
    out = a * start
    for j, m in enumerate(buf):
        out = out + c[j] * m
    return out


def run_program(
    noise_fn: NoiseFn, x_T: jax.Array, program: Program, *, thresholding: bool = False
) -> jax.Array:
    """Runs a Program with one `lax.scan` (one traced network call). Jittable.

    Args:
      noise_fn: noise_fn(x [B, ...], t [B]) -> eps, same shape as x.
      x_T: [B, ...] starting point at the program's first time; its dtype is the state dtype.
      program: from `build_program` (or another `ProgramBuilder`).
      thresholding: dynamic thresholding of the data prediction (data-prediction tables only).
    Returns:
      x at the program's final time, shape and dtype of x_T.
    """
    dtype = x_T.dtype
    depth = program.c.shape[1]
    # Decided on the host table, so samplers without these parts trace none of their work.
    needs_base = not bool(program.end.all())  # multistep: every NFE closes a step
    has_corrector = bool((program.ca != 1.0).any() or program.cc.any())
    xs = dict(
        t=jnp.asarray(program.t, dtype),
        p=jnp.asarray(program.p, dtype),
        q=jnp.asarray(program.q, dtype),
        a=jnp.asarray(program.a, dtype),
        c=jnp.asarray(program.c, dtype),
        end=jnp.asarray(program.end),
        ca=jnp.asarray(program.ca, dtype),
        cc=jnp.asarray(program.cc, dtype),
    )
    batch = x_T.shape[0]

    def body(carry, row):
        x, base, buf = carry
        eps = noise_fn(x, jnp.full((batch,), row["t"], dtype)).astype(dtype)
        m = row["p"] * x + row["q"] * eps
        if thresholding:
            m = dynamic_threshold(m)
        buf = (m,) + buf[:-1]
        if has_corrector:
            base = _combine(row["ca"], base, row["cc"], buf)
        x_new = _combine(row["a"], base if needs_base else x, row["c"], buf)
        if needs_base:
            base = jnp.where(row["end"], x_new, base)
        return (x_new, base, buf), None

    zeros = tuple(jnp.zeros_like(x_T) for _ in range(depth))
    (x, _, _), _ = jax.lax.scan(body, (x_T, x_T, zeros), xs)
    return x


def sample(
    noise_fn: NoiseFn,
    x_T: jax.Array,
    schedule: Schedule,
    *,
    thresholding: bool = False,
    **program: Any,
) -> jax.Array:
    """Solves the diffusion ODE from t_start to t_end with DPM-Solver(++). Jittable.

    Args:
      noise_fn: noise_fn(x [B, ...], t_continuous [B]) -> eps [B, ...].
      x_T: [B, ...] float32 (or float64 under x64) noise at t_start.
      schedule: a `uvit_jax.diffusion.schedules` schedule.
      thresholding: dynamic thresholding of the data prediction (needs predict_x0).
      **program: the solver, as `build_program` takes it: steps, predict_x0, order, method,
          skip_type, t_start, t_end, lower_order_final, denoise_to_zero, target.
    Returns:
      x at t_end, shape and dtype of x_T.
    """
    if thresholding and not program.get("predict_x0"):
        raise ValueError("thresholding needs predict_x0=True (DPM-Solver++)")
    table = build_program(schedule, **program)
    return run_program(noise_fn, x_T, table, thresholding=thresholding)


class TableSampler:
    """Base of the named table-driven samplers (`uvit_jax.sampling.samplers`).

    A subclass is a frozen dataclass with a `predict_x0` field (or attribute) and a `program`
    method building its table; calling it runs the table. `thresholding` (dynamic thresholding
    of the data prediction) is off unless a subclass declares it as a field.
    """

    thresholding: bool = False

    def program(self, formulation: Formulation, steps: int) -> Program:
        """The float64 table for the run's formulation and `steps` NFE."""
        raise NotImplementedError

    def __call__(
        self,
        noise_fn: NoiseFn,
        x_T: jax.Array,
        formulation: Formulation,
        *,
        steps: int,
        key: jax.Array,
    ) -> jax.Array:
        del key  # deterministic
        if self.thresholding and not self.predict_x0:
            raise ValueError("thresholding needs a data-prediction sampler (predict_x0=True)")
        table = self.program(formulation, steps)
        return run_program(noise_fn, x_T, table, thresholding=self.thresholding)


@dataclasses.dataclass(frozen=True)
class Variant(TableSampler):
    """A DPM-Solver configuration as a named sampler (`uvit_jax.sampling.samplers`).

    method, order, predict_x0, thresholding, denoise_to_zero: as for `sample`. skip_type: the
    time grid; None: the formulation's (`Formulation.grid`). Every variant ends at
    `schedule.t_end`, without a final denoising step unless `denoise_to_zero` (U-ViT samples
    without it).
    """

    method: str
    order: int
    predict_x0: bool
    skip_type: str | None = None
    thresholding: bool = False
    denoise_to_zero: bool = False

    def kwargs(self, formulation: Formulation) -> dict[str, Any]:
        """`sample`'s method, order, predict_x0, skip_type and target for the formulation."""
        return dict(
            method=self.method,
            order=self.order,
            predict_x0=self.predict_x0,
            skip_type=self.skip_type or formulation.grid,
            target=formulation.target,
        )

    def program(self, formulation: Formulation, steps: int) -> Program:
        return build_program(
            formulation.schedule,
            steps=steps,
            t_start=formulation.schedule.T,
            denoise_to_zero=self.denoise_to_zero,
            **self.kwargs(formulation),
        )
