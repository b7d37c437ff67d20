"""Noise schedules: the SD discrete knots, the VP closed forms, inverses, time maps, jit use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.diffusion.schedules import DiscreteSchedule, LinearVPSchedule

SCHEDULES = [LinearVPSchedule(), DiscreteSchedule()]


def test_discrete_alphas_cumprod_is_stable_diffusions():
    ns = DiscreteSchedule()
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2
    np.testing.assert_array_equal(ns.betas, betas)
    assert ns.alphas_cumprod.dtype == np.float64 and ns.alphas_cumprod.shape == (1000,)
    np.testing.assert_allclose(ns.alphas_cumprod, np.cumprod(1.0 - betas), rtol=1e-15)
    assert ns.alphas_cumprod[0] == pytest.approx(1 - 0.00085, rel=1e-15)
    # Known value of Stable Diffusion's final abar (0.0046...).
    assert ns.alphas_cumprod[-1] == pytest.approx(0.004660, rel=1e-3)


def test_discrete_log_alpha_at_knots_is_half_log_abar():
    ns = DiscreteSchedule()
    n = np.arange(1, 1001)
    t_n = n / 1000.0
    expected = 0.5 * np.log(ns.alphas_cumprod[n - 1])
    np.testing.assert_allclose(ns.marginal_log_mean_coeff(t_n), expected, rtol=1e-13, atol=1e-15)
    # Piecewise linear in between: the midpoint of two knots is their average.
    mid = (t_n[:-1] + t_n[1:]) / 2
    np.testing.assert_allclose(
        ns.marginal_log_mean_coeff(mid), (expected[:-1] + expected[1:]) / 2, rtol=1e-12
    )
    # The jnp (float32) path agrees with the float64 one.
    got32 = np.asarray(ns.marginal_log_mean_coeff(jnp.asarray(t_n, jnp.float32)))
    np.testing.assert_allclose(got32, expected, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(
        ns.marginal_alpha(t_n) ** 2, ns.alphas_cumprod, rtol=1e-12
    )  # alpha(t_n)^2 = abar_n


def test_vp_closed_forms():
    ns = LinearVPSchedule()
    t = np.linspace(1e-4, 1.0, 101)
    np.testing.assert_allclose(
        ns.marginal_log_mean_coeff(t), -0.25 * t**2 * 19.9 - 0.5 * t * 0.1, rtol=1e-15
    )
    # U-ViT's VPSDE: alpha^2 = exp(-int_0^t beta), sigma^2 = 1 - alpha^2.
    integral = 0.1 * t + 19.9 * t**2 / 2
    np.testing.assert_allclose(ns.marginal_alpha(t) ** 2, np.exp(-integral), rtol=1e-14)
    np.testing.assert_allclose(ns.marginal_std(t) ** 2, -np.expm1(-integral), rtol=1e-14)
    np.testing.assert_allclose(ns.beta(t), 0.1 + 19.9 * t, rtol=1e-15)


@pytest.mark.parametrize("ns", SCHEDULES, ids=lambda s: type(s).__name__)
def test_inverse_lambda_inverts_marginal_lambda(ns):
    t = np.concatenate([np.linspace(1e-3, 1.0, 997), [1e-3, 0.5, 1.0]])
    lam = ns.marginal_lambda(t)
    assert np.all(np.diff(lam[:997]) < 0), "lambda must decrease in t"
    np.testing.assert_allclose(ns.inverse_lambda(lam), t, rtol=1e-10, atol=1e-12)
    lam_grid = np.linspace(lam.min(), lam.max(), 50)
    np.testing.assert_allclose(
        ns.marginal_lambda(ns.inverse_lambda(lam_grid)), lam_grid, atol=1e-10
    )
    # float32 jnp path, jitted.
    t32 = jax.jit(ns.inverse_lambda)(jnp.asarray(lam, jnp.float32))
    np.testing.assert_allclose(np.asarray(t32), t, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("ns", SCHEDULES, ids=lambda s: type(s).__name__)
def test_alpha_sigma_consistency_and_beta(ns):
    t = np.linspace(2e-3, 0.999, 200) + 1e-4  # off the discrete knots
    alpha, sigma = ns.marginal_alpha(t), ns.marginal_std(t)
    np.testing.assert_allclose(alpha**2 + sigma**2, 1.0, rtol=1e-14)
    np.testing.assert_allclose(ns.marginal_lambda(t), np.log(alpha) - np.log(sigma), rtol=1e-12)
    # beta(t) = -2 d log alpha / dt (piecewise constant for the discrete schedule).
    dt = 1e-7
    fd = -2 * (ns.marginal_log_mean_coeff(t + dt) - ns.marginal_log_mean_coeff(t - dt)) / (2 * dt)
    np.testing.assert_allclose(ns.beta(t), fd, rtol=1e-5)
    # sigma stays accurate near t = 0 in float32 (expm1, not 1 - exp).
    s32 = np.asarray(ns.marginal_std(jnp.asarray([1e-4], jnp.float32)))
    np.testing.assert_allclose(s32, ns.marginal_std(np.array([1e-4])), rtol=1e-5)


def test_network_time_and_the_paths():
    t = np.array([1e-3, 0.5, 1.0])
    vp, sd = Formulation("vp_continuous"), Formulation("sd_discrete")
    np.testing.assert_allclose(vp.network_time(t), 999 * t)
    np.testing.assert_allclose(sd.network_time(t), 1000 * t)
    assert isinstance(vp.schedule, LinearVPSchedule)
    assert isinstance(sd.schedule, DiscreteSchedule)
    assert sd.schedule.t_end == 1e-3 and vp.schedule.t_end == 1e-4
    with pytest.raises(ValueError, match=r"config.diffusion.formulation='vp_discrete'"):
        Formulation("vp_discrete")


def test_schedules_are_hashable_static_jit_arguments():
    assert hash(DiscreteSchedule()) == hash(DiscreteSchedule())
    assert DiscreteSchedule() == DiscreteSchedule() and LinearVPSchedule() != DiscreteSchedule()

    @jax.jit
    def f(t):
        return [ns.marginal_std(t) for ns in SCHEDULES]

    vp, disc = f(jnp.asarray([0.25, 0.75]))
    np.testing.assert_allclose(vp, SCHEDULES[0].marginal_std(np.array([0.25, 0.75])), rtol=1e-6)
    np.testing.assert_allclose(disc, SCHEDULES[1].marginal_std(np.array([0.25, 0.75])), rtol=1e-6)
    g = jax.jit(lambda ns, t: ns.marginal_lambda(t), static_argnums=0)
    np.testing.assert_allclose(g(DiscreteSchedule(), jnp.asarray(0.5)), -0.4780252, rtol=1e-5)
