"""UniPC, DPM-Solver++ 3M and EDM's Heun: parity with independent references, accuracy on the
exact Gaussian probability-flow ODE, measured convergence orders, and the time grids.

References: diffusers' `UniPCMultistepScheduler` and `DPMSolverMultistepScheduler` (the same
exact Gaussian denoiser as model, float64) and, for Heun, a float64 numpy EDM sampler below.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import relative_error

from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.diffusion.schedules import DiscreteSchedule, LinearVPSchedule
from uvit_jax.sampling import dpm_solver, heun, unipc
from uvit_jax.sampling.gaussian_reference import MU, SD, exact_ode, gaussian_eps, observed_order
from uvit_jax.sampling.samplers import SAMPLERS

X_T = np.random.RandomState(3).randn(16, 4)


def run_f64(program: dpm_solver.Program, ns, x_T: np.ndarray = X_T) -> np.ndarray:
    """A table run jitted in float64 on the exact Gaussian noise predictor."""
    with jax.enable_x64(True):
        fn = jax.jit(lambda x: dpm_solver.run_program(gaussian_eps(ns), x, program))
        return np.asarray(fn(jnp.asarray(x_T, jnp.float64)))


# ------------------------------------------------------------------------------------------
# Parity with diffusers on the SD discrete schedule.
# ------------------------------------------------------------------------------------------


def diffusers_sample(scheduler, steps: int, ns: DiscreteSchedule):
    """Runs a diffusers multistep scheduler in float64 on the Gaussian denoiser.

    diffusers' discrete timestep k (0-based) is our knot t = (k + 1) / N, and
    final_sigmas_type="sigma_min" ends at k = 0, i.e. at our `t_end` = 1 / N. diffusers stores
    its sigmas in float32, so they are replaced by their float64 values (same formula).

    Returns:
      (x [16, 4] float64 at t_end, the time grid [steps + 1] in our continuous time).
    """
    import torch

    scheduler.set_timesteps(steps)
    ks = scheduler.timesteps.numpy()
    acp = ns.alphas_cumprod
    knots = np.append(ks, 0)
    scheduler.sigmas = torch.from_numpy(np.sqrt((1.0 - acp[knots]) / acp[knots]))
    x = torch.from_numpy(X_T.copy())
    for k in ks:
        a, s = np.sqrt(acp[k]), np.sqrt(1.0 - acp[k])
        xn = x.numpy()
        eps = s * (xn - a * MU) / (a**2 * SD**2 + s**2)
        x = scheduler.step(torch.from_numpy(eps), int(k), x).prev_sample
    return x.numpy(), (knots + 1.0) / ns.num_timesteps


# Common scheduler options: the SD schedule, the linspace timesteps (our time-uniform grid,
# rounded to integers) and the last step to t_end instead of sigma = 0.
DIFFUSERS_SD = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    timestep_spacing="linspace",
    final_sigmas_type="sigma_min",
)


@pytest.mark.parametrize("steps", [10, 20, 50])
@pytest.mark.parametrize("order", [2, 3])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_unipc_matches_diffusers(steps, order, variant, predict_x0):
    from diffusers import UniPCMultistepScheduler

    ns = DiscreteSchedule()
    sched = UniPCMultistepScheduler(
        solver_order=order, solver_type=variant, predict_x0=predict_x0, **DIFFUSERS_SD
    )
    ref, times = diffusers_sample(sched, steps, ns)
    # diffusers' defaults lower_order_final=True, no disabled corrector: UniPC's own rules.
    program = unipc.build_program(
        ns, times, order=order, variant=variant, predict_x0=predict_x0, lower_order_final=True
    )
    assert program.nfe == steps
    err = relative_error(run_f64(program, ns), ref)
    assert err < 1e-10, err


@pytest.mark.parametrize("steps", [10, 20, 50])
def test_dpm_solver_pp_3m_matches_diffusers(steps):
    from diffusers import DPMSolverMultistepScheduler

    ns = DiscreteSchedule()
    # diffusers lowers the last orders below 15 steps, the official solver (ours) below 10: at
    # 10-50 steps ours lowers none, so diffusers runs with lower_order_final=False.
    sched = DPMSolverMultistepScheduler(
        solver_order=3, algorithm_type="dpmsolver++", lower_order_final=False, **DIFFUSERS_SD
    )
    ref, times = diffusers_sample(sched, steps, ns)
    program = dpm_solver.multistep_program(ns, times, order=3, predict_x0=True)
    err = relative_error(run_f64(program, ns), ref)
    # diffusers' DPM-Solver `step` rounds the sample to float32 (2.8e-7 at 10 steps).
    assert err < 1e-6, err


# ------------------------------------------------------------------------------------------
# Heun against a float64 numpy EDM sampler (Karras et al. 2022, Algorithm 1, no churn).
# ------------------------------------------------------------------------------------------


def edm_heun_reference(x_T: np.ndarray, sigmas: np.ndarray, final_euler: bool) -> np.ndarray:
    """EDM's Heun in its own variables: x / alpha against sigma, with the Gaussian denoiser
    D(x; sigma) = MU + SD^2 / (SD^2 + sigma^2) (x - MU); alpha = 1 / sqrt(1 + sigma^2)."""

    def slope(x, sigma):  # (x - D(x; sigma)) / sigma
        return (x - MU - SD**2 / (SD**2 + sigma**2) * (x - MU)) / sigma

    x = x_T * np.sqrt(1.0 + sigmas[0] ** 2)
    for i, (s, t) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        d = slope(x, s)
        x_euler = x + (t - s) * d
        if final_euler and i == len(sigmas) - 2:
            x = x_euler
        else:
            x = x + (t - s) * 0.5 * (d + slope(x_euler, t))
    return x / np.sqrt(1.0 + sigmas[-1] ** 2)


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    """EDM's eq. 5 from sigma_max to sigma_min (n intervals, no final zero)."""
    ramp = np.linspace(0.0, 1.0, n + 1)
    return (
        sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho


def sd_sigma(ns: DiscreteSchedule, n: int) -> float:
    """sigma_t / alpha_t at the knot t = n / N, from the cumulative alphas."""
    acp = ns.alphas_cumprod[n - 1]
    return float(np.sqrt((1.0 - acp) / acp))


@pytest.mark.parametrize("nfe", [10, 11, 20])
def test_heun_matches_a_numpy_edm_sampler(nfe):
    ns = DiscreteSchedule()
    sampler = SAMPLERS["heun"]
    sigmas = karras_sigmas(sd_sigma(ns, 1000), sd_sigma(ns, 1), (nfe + 1) // 2)
    ref = edm_heun_reference(X_T, sigmas, final_euler=nfe % 2 == 1)
    program = sampler.program(Formulation("sd_discrete"), nfe)
    assert program.nfe == nfe
    err = relative_error(run_f64(program, ns), ref)
    assert err < 1e-10, err


def test_karras_grid_is_uniform_in_sigma_to_the_one_over_rho():
    ns = LinearVPSchedule()
    times = dpm_solver.time_steps(ns, "karras", 1.0, 1e-4, 12)
    np.testing.assert_allclose(times[[0, -1]], [1.0, 1e-4], rtol=1e-12)
    root = np.exp(-ns.marginal_lambda(times) / 7.0)  # (sigma_t / alpha_t)^(1/7)
    np.testing.assert_allclose(np.diff(root), np.diff(root)[0], rtol=1e-9)


# ------------------------------------------------------------------------------------------
# The exact Gaussian probability-flow ODE: accuracy per grid, convergence orders.
# ------------------------------------------------------------------------------------------


def ode_error(program: dpm_solver.Program, ns) -> float:
    """Relative error against the exact ODE map of X_T from t = 1 to `ns.t_end` (where every
    program here ends)."""
    return relative_error(run_f64(program, ns), exact_ode(ns, X_T, ns.t_end))


# Bounds on the 50-NFE relative error, float64, SD schedule, by grid (measured: UniPC and 3M
# 1.5e-4 ... 3.2e-4 on logSNR / karras, 1.9e-2 ... 2.1e-2 time-uniform, where the steps near
# t = 0 are the largest in logSNR; Heun, 25 steps, 3.8e-3 time-uniform ... 7.7e-3 logSNR).
EXPONENTIAL_BOUNDS = {"logSNR": 1e-3, "karras": 1e-3, "time_uniform": 4e-2}
GRID_BOUNDS = {
    "unipc_bh2": EXPONENTIAL_BOUNDS,
    "unipc_bh1": EXPONENTIAL_BOUNDS,
    "dpm_solver++_3m": EXPONENTIAL_BOUNDS,
    "heun": {"logSNR": 1.5e-2, "karras": 1.5e-2, "time_uniform": 1e-2},
}


@pytest.mark.parametrize("sampler", sorted(GRID_BOUNDS))
def test_new_samplers_solve_the_gaussian_ode_on_every_grid(sampler):
    for grid, bound in GRID_BOUNDS[sampler].items():
        variant = dataclasses.replace(SAMPLERS[sampler], skip_type=grid)
        error = ode_error(variant.program(Formulation("sd_discrete"), 50), DiscreteSchedule())
        assert error < bound, (grid, error)


# (name, table on a time grid, expected order). UniPC-p with UniC is of order p + 1, but the
# uncorrected Euler first step keeps order 3 at most (like 3M's warm-up, which keeps it at 2);
# lower_order_final is off: UniPC's lowered final steps would cap every order at 2.
def _unipc(order, variant, predict_x0=True):
    return functools.partial(
        unipc.build_program,
        order=order,
        variant=variant,
        predict_x0=predict_x0,
        lower_order_final=False,
    )


CONVERGENCE_CASES = [
    ("unipc_bh2_1", _unipc(1, "bh2"), 2.0),
    ("unipc_bh1_2", _unipc(2, "bh1"), 3.0),
    ("unipc_bh2_2", _unipc(2, "bh2"), 3.0),
    ("unipc_bh1_3", _unipc(3, "bh1"), 3.0),
    ("unipc_bh2_3_eps", _unipc(3, "bh2", predict_x0=False), 3.0),
    (
        "dpm_solver++_3m",
        functools.partial(dpm_solver.multistep_program, order=3, predict_x0=True),
        2.0,
    ),
    ("heun", heun.build_program, 2.0),
]


@pytest.mark.parametrize("case", CONVERGENCE_CASES, ids=lambda c: c[0])
def test_new_samplers_converge_at_their_order(case):
    """Errors at 20, 40, 80 NFE on the logSNR grid (SD schedule): doubling the NFE divides the
    error by ~2^order."""
    name, make_program, expected = case
    ns = DiscreteSchedule()
    nfe = np.array([20, 40, 80])
    per_nfe = 2 if name == "heun" else 1
    errors = np.array(
        [
            ode_error(
                make_program(ns, dpm_solver.time_steps(ns, "logSNR", 1.0, ns.t_end, n // per_nfe)),
                ns,
            )
            for n in nfe
        ]
    )
    assert np.all(np.diff(errors) < 0), errors
    assert expected - 0.3 < observed_order(errors, nfe) < expected + 1.2, errors


def test_unipc_argument_errors_and_compiles_once():
    ns = DiscreteSchedule()
    times = dpm_solver.time_steps(ns, "logSNR", 1.0, ns.t_end, 5)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        unipc.build_program(ns, times, order=4, variant="bh2", predict_x0=True)
    with pytest.raises(ValueError, match="variant"):
        unipc.build_program(ns, times, order=2, variant="bh3", predict_x0=True)
    traces = []

    def noise_fn(x, t):
        traces.append(1)
        return gaussian_eps(ns)(x, t)

    sd = Formulation("sd_discrete")
    fn = jax.jit(lambda x: SAMPLERS["unipc_bh1"](noise_fn, x, sd, steps=7, key=None))
    for seed in range(2):
        fn(jax.random.normal(jax.random.key(seed), (3, 4)))
    assert len(traces) == 1, "one traced network call inside lax.scan"
