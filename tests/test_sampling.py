"""Samplers: parity with the official DPM-Solver algorithm, Gaussian-data accuracy and
convergence order, compile-once behaviour, classifier-free guidance and `generate`.

The parity reference (`reference_dpm_solver.py`) is a float64 numpy rewrite of the official
DPM-Solver, sharing no code with the jitted implementation.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numerics import relative_error
from reference_dpm_solver import RefDiscrete, RefDPMSolver, RefVP

from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.diffusion.schedules import DiscreteSchedule, LinearVPSchedule
from uvit_jax.errors import ConfigError
from uvit_jax.sampling import dpm_solver, euler_maruyama
from uvit_jax.sampling.gaussian_reference import MU, SD, exact_ode, gaussian_eps, observed_order
from uvit_jax.sampling.generate import SamplerSpec, generate, make_generate_fn, sample_images
from uvit_jax.sampling.guidance import guided_noise_fn
from uvit_jax.sampling.samplers import SAMPLERS

# A nonlinear noise function, as numpy (reference) and jax (solver) twins.
_rng = np.random.RandomState(0)
_W = _rng.randn(6, 6) / np.sqrt(6)
_C = _rng.randn(6)


def eps_np(x, t):
    return 1.5 * np.tanh(x @ _W + np.outer(t, _C)) + 0.1 * x


def eps_jax(x, t):
    return 1.5 * jnp.tanh(x @ jnp.asarray(_W, x.dtype) + t[:, None] * jnp.asarray(_C, x.dtype)) + (
        0.1 * x
    )


X_T = np.random.RandomState(1).randn(5, 6)


def run_jitted_f64(schedule, **kwargs):
    with jax.enable_x64(True):
        fn = jax.jit(lambda x: dpm_solver.sample(eps_jax, x, schedule, **kwargs))
        return np.asarray(fn(jnp.asarray(X_T, jnp.float64)))


@pytest.mark.parametrize("steps", [50, 20, 10])
def test_uvit_continuous_path_matches_official_dpm_solver_fast(steps):
    ref = RefDPMSolver(eps_np, RefVP(), predict_x0=False).sample_fast_uvit(X_T, steps, 1.0, 1e-4)
    got = run_jitted_f64(
        LinearVPSchedule(),
        steps=steps,
        order=3,
        method="singlestep_fast",
        skip_type="logSNR",
        predict_x0=False,
        t_end=1e-4,
    )
    assert relative_error(got, ref) < 1e-9


@pytest.mark.parametrize("steps", [50, 20, 10])
def test_uvit_discrete_path_matches_official_dpm_solver_pp_3s(steps):
    ref = RefDPMSolver(eps_np, RefDiscrete(), predict_x0=True).sample_singlestep(
        X_T, steps, 3, "time_uniform", 1.0, 1e-3
    )
    got = run_jitted_f64(
        DiscreteSchedule(),
        steps=steps,
        order=3,
        method="singlestep",
        skip_type="time_uniform",
        predict_x0=True,
    )
    assert relative_error(got, ref) < 1e-9


# Other official variants: (schedule, method, order, skip_type, predict_x0, steps).
OTHER_CASES = [
    ("discrete", "multistep", 2, "time_uniform", True, 20),
    ("discrete", "multistep", 2, "time_uniform", True, 7),
    ("vp", "multistep", 3, "logSNR", False, 12),
    ("vp", "multistep", 3, "time_quadratic", True, 6),
    ("vp", "singlestep", 2, "logSNR", False, 11),
    ("discrete", "singlestep", 3, "time_quadratic", True, 20),
    ("discrete", "singlestep", 3, "logSNR", False, 13),
    ("vp", "singlestep", 1, "time_uniform", True, 8),
]


@pytest.mark.parametrize("case", OTHER_CASES, ids=lambda c: "-".join(map(str, c)))
def test_other_variants_match_official(case):
    kind, method, order, skip, px0, steps = case
    ref_ns, ns = (
        (RefVP(), LinearVPSchedule()) if kind == "vp" else (RefDiscrete(), DiscreteSchedule())
    )
    t_end = 1e-3
    ref_solver = RefDPMSolver(eps_np, ref_ns, predict_x0=px0)
    if method == "multistep":
        ref = ref_solver.sample_multistep(X_T, steps, order, skip, 1.0, t_end)
    else:
        ref = ref_solver.sample_singlestep(X_T, steps, order, skip, 1.0, t_end)
    got = run_jitted_f64(
        ns, steps=steps, order=order, method=method, skip_type=skip, predict_x0=px0, t_end=t_end
    )
    assert relative_error(got, ref) < 1e-9


def test_thresholding_and_denoise_to_zero_match_official():
    ref_solver = RefDPMSolver(eps_np, RefDiscrete(), predict_x0=True, thresholding=True)
    x = ref_solver.sample_multistep(X_T, 9, 2, "time_uniform", 1.0, 1e-3)
    ref = ref_solver.model(x, 1e-3)  # denoise_to_zero: the data prediction at t_end
    got = run_jitted_f64(
        DiscreteSchedule(),
        steps=9,
        order=2,
        method="multistep",
        predict_x0=True,
        thresholding=True,
        denoise_to_zero=True,
    )
    assert np.abs(ref).max() <= 1.0 + 1e-12  # thresholding was active and clipped
    assert relative_error(got, ref) < 1e-9


def test_program_sizes_and_argument_errors():
    ns = LinearVPSchedule()
    for method in ("singlestep_fast", "singlestep", "multistep"):
        for steps in (10, 20, 50):
            p = dpm_solver.build_program(ns, steps=steps, method=method, predict_x0=False)
            assert p.nfe == steps and p.end[-1]
    p = dpm_solver.build_program(ns, steps=10, predict_x0=True, denoise_to_zero=True)
    assert p.nfe == 11
    with pytest.raises(ValueError, match="method must be one of"):
        dpm_solver.build_program(ns, steps=10, method="adaptive", predict_x0=False)
    with pytest.raises(ValueError, match="skip_type"):
        dpm_solver.build_program(ns, steps=10, skip_type="uniform", predict_x0=False)
    with pytest.raises(ValueError, match="order must be 1, 2 or 3"):
        dpm_solver.build_program(ns, steps=10, order=4, predict_x0=False)
    with pytest.raises(ValueError, match="t_end"):
        dpm_solver.build_program(ns, steps=10, predict_x0=False, t_end=2.0)
    with pytest.raises(ValueError, match="thresholding needs predict_x0"):
        dpm_solver.sample(
            eps_jax, jnp.zeros((1, 6)), ns, steps=3, predict_x0=False, thresholding=True
        )


def test_sampler_compiles_once_across_batches():
    ns = DiscreteSchedule()
    traces = []

    def noise_fn(x, t):
        traces.append(x.shape)
        return eps_jax(x, t)

    fn = jax.jit(
        lambda x: dpm_solver.sample(noise_fn, x, ns, steps=50, method="singlestep", predict_x0=True)
    )
    for seed in range(3):
        fn(jax.random.normal(jax.random.key(seed), (4, 6)))
    assert fn._cache_size() == 1
    assert len(traces) == 1, "the network must be traced once (one call inside lax.scan)"


# ------------------------------------------------------------------------------------------
# Gaussian data: exact noise predictor, analytic ODE solution.
# ------------------------------------------------------------------------------------------

N_GAUSS = 8192


def marginal(ns, t):
    """Mean and std of x_t for data N(MU, SD^2)."""
    a, s = ns.marginal_alpha(np.float64(t)), ns.marginal_std(np.float64(t))
    return a * MU, np.sqrt(a**2 * SD**2 + s**2)


def gaussian_noise(ns):
    """x_T drawn from the data's exact marginal at t = 1 (SD's schedule keeps alpha_1 = 0.068,
    so N(0, I) would shift every mean by 0.068 mu: the prior mismatch, not the solver's error)."""
    mean, std = marginal(ns, 1.0)
    z = jax.random.normal(jax.random.key(0), (N_GAUSS, 4), jnp.float32)
    return z * jnp.asarray(std, jnp.float32) + jnp.asarray(mean, jnp.float32)


def assert_gaussian_moments(x, ns, t_end, extra_tol=0.0):
    """Mean and std per dim within 5 standard errors of the marginal at t_end (the data's moments
    up to sigma(t_end) <= 0.03), plus an allowance for a solver's bias."""
    mean, std = marginal(ns, t_end)
    x = np.asarray(x, np.float64)
    se_mean = std / np.sqrt(N_GAUSS)
    se_std = std / np.sqrt(2 * N_GAUSS)
    np.testing.assert_array_less(np.abs(x.mean(0) - mean), 5 * se_mean + extra_tol)
    np.testing.assert_array_less(np.abs(x.std(0) - std), 5 * se_std + extra_tol)


@pytest.mark.parametrize("sampler", ["dpm_solver_fast", "dpm_solver++_3s", "dpm_solver++_2m"])
@pytest.mark.parametrize("formulation", ["vp_continuous", "sd_discrete"])
def test_dpm_solvers_sample_gaussian_data(sampler, formulation):
    """The samplers as `generate` configures them, 50 steps, float32."""
    kwargs = SAMPLERS[sampler].kwargs(Formulation(formulation))
    ns = Formulation(formulation).schedule
    x_T = gaussian_noise(ns)
    fn = jax.jit(lambda x: dpm_solver.sample(gaussian_eps(ns), x, ns, steps=50, **kwargs))
    x = fn(x_T)
    assert x.dtype == jnp.float32
    # 2M on the time-uniform grid keeps a ~0.02 std bias at 50 steps (second order, see
    # test_multistep_converges); the others are within sampling error.
    slow = sampler == "dpm_solver++_2m" and formulation == "sd_discrete"
    assert_gaussian_moments(x, ns, ns.t_end, extra_tol=0.01 if slow else 0.0)
    # The 50-step solution is close to the exact ODE map of the same noise (max over 32k values;
    # the time-uniform grid of the discrete models is the coarsest near t = 0).
    exact = exact_ode(ns, np.asarray(x_T, np.float64), ns.t_end)
    tol = {"dpm_solver++_3s": 0.05, "dpm_solver++_2m": 0.12} if formulation == "sd_discrete" else {}
    assert np.abs(np.asarray(x) - exact).max() < tol.get(sampler, 0.02)


@pytest.mark.parametrize("probability_flow,steps", [(False, 1000), (True, 500)])
def test_euler_maruyama_samples_gaussian_data(probability_flow, steps):
    ns = LinearVPSchedule()
    fn = jax.jit(
        lambda x, k: euler_maruyama.sample(
            gaussian_eps(ns), x, ns, steps=steps, key=k, probability_flow=probability_flow
        )
    )
    x = fn(gaussian_noise(ns), jax.random.key(7))
    # Euler's O(1/steps) bias on top of the sampling error.
    assert_gaussian_moments(x, ns, 0.0, extra_tol=0.01)


def dpm_errors(ns, step_list, **kwargs):
    x_T = np.random.RandomState(3).randn(16, 4)
    errs = []
    with jax.enable_x64(True):
        for steps in step_list:
            fn = jax.jit(
                lambda x, steps=steps: dpm_solver.sample(
                    gaussian_eps(ns), x, ns, steps=steps, **kwargs
                )
            )
            got = np.asarray(fn(jnp.asarray(x_T)))
            errs.append(np.abs(got - exact_ode(ns, x_T, ns.t_end)).max())
    return np.array(errs)


@pytest.mark.parametrize("predict_x0", [False, True])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_converges_at_its_order(order, predict_x0):
    ns = LinearVPSchedule()
    k = np.array([24, 48, 96])  # solver steps
    errs = dpm_errors(
        ns,
        list(k * order),
        order=order,
        method="singlestep_fixed",
        skip_type="logSNR",
        predict_x0=predict_x0,
    )
    assert np.all(np.diff(errs) < 0)
    assert order - 0.3 < observed_order(errs, k) < order + 0.7, errs


def test_dpm_solver_fast_converges_at_third_order():
    ns = LinearVPSchedule()
    steps = [26, 50, 98]  # steps % 3 == 2: orders [3, ..., 3, 2], K = 9, 17, 33 steps
    errs = dpm_errors(ns, steps, method="singlestep_fast", skip_type="logSNR", predict_x0=False)
    assert np.all(np.diff(errs) < 0)
    assert 2.7 < observed_order(errs, np.array([9, 17, 33])) < 3.7, errs


@pytest.mark.parametrize("order,expected", [(2, 2.0), (3, 2.0)])
def test_multistep_converges(order, expected):
    # 3M's first-order warm-up step (as in the official solver) limits its global order to 2.
    ns = LinearVPSchedule()
    k = np.array([25, 50, 100])
    errs = dpm_errors(
        ns, list(k), order=order, method="multistep", skip_type="logSNR", predict_x0=True
    )
    assert np.all(np.diff(errs) < 0)
    assert expected - 0.3 < observed_order(errs, k) < expected + 0.7, errs


def test_probability_flow_converges_at_first_order():
    ns = LinearVPSchedule()
    x_T = np.random.RandomState(3).randn(16, 4)
    k = np.array([100, 200, 400])
    errs = []
    with jax.enable_x64(True):
        for steps in k:
            fn = jax.jit(
                lambda x, steps=steps: euler_maruyama.sample(
                    gaussian_eps(ns), x, ns, steps=steps, probability_flow=True
                )
            )
            got = np.asarray(fn(jnp.asarray(x_T)))
            # The grid ends at t = 0 exactly.
            errs.append(np.abs(got - exact_ode(ns, x_T, 1e-12)).max())
    errs = np.array(errs)
    assert 0.8 < observed_order(errs, k) < 1.3, errs


def test_euler_maruyama_needs_a_key():
    with pytest.raises(ValueError, match="PRNG key"):
        euler_maruyama.sample(eps_jax, jnp.zeros((1, 6)), LinearVPSchedule(), steps=3)


# ------------------------------------------------------------------------------------------
# Guidance wrappers.
# ------------------------------------------------------------------------------------------


class RecordingModel:
    """A stand-in U-ViT: eps depends on x, t_net, y and context; records each traced call."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t_net, y, context):
        self.calls.append((x.shape[0], y is not None, context is not None))
        out = jnp.tanh(x) * (1.0 + t_net[:, None, None, None] / 1000.0)
        if y is not None:
            out = out + 0.1 * y[:, None, None, None].astype(x.dtype)
        if context is not None:
            out = out + context.mean(axis=(1, 2))[:, None, None, None]
        return out


@pytest.mark.parametrize("formulation,scale", [("vp_continuous", 999.0), ("sd_discrete", 1000.0)])
def test_cfg_is_one_batched_forward_with_uvit_convention(formulation, scale):
    ns = Formulation(formulation).schedule
    model = RecordingModel()
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    t = jnp.asarray([0.1, 0.5, 0.9])
    y = jnp.asarray([1, 2, 3], jnp.int32)
    fn = guided_noise_fn(model, ns, y=y, cfg_scale=0.7, null_class=9)
    got = jax.jit(fn)(x, t)
    assert model.calls == [(6, True, False)], "guidance must be one forward pass of 2B"
    t_net = scale * t
    eps_c, eps_u = jax.jit(
        lambda: (model(x, t_net, y, None), model(x, t_net, jnp.full_like(y, 9), None))
    )()
    np.testing.assert_allclose(got, eps_c + 0.7 * (eps_c - eps_u), rtol=1e-6, atol=1e-6)
    # Unguided: the plain conditional model at the network time.
    model.calls.clear()
    plain = jax.jit(guided_noise_fn(model, ns, y=y))(x, t)
    assert model.calls == [(3, True, False)]
    np.testing.assert_allclose(plain, eps_c, rtol=1e-6)


def test_cfg_text_to_image_uses_the_empty_context():
    ns = DiscreteSchedule()
    model = RecordingModel()
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 1))
    t = jnp.asarray([0.3, 0.6])
    ctx = jax.random.normal(jax.random.key(1), (2, 5, 8))
    null = jax.random.normal(jax.random.key(2), (5, 8))
    fn = guided_noise_fn(model, ns, context=ctx, cfg_scale=1.0, null_context=null)
    got = jax.jit(fn)(x, t)
    assert model.calls == [(4, False, True)]
    eps_c, eps_u = jax.jit(
        lambda: (model(x, 1000 * t, None, ctx), model(x, 1000 * t, None, jnp.stack([null] * 2)))
    )()
    np.testing.assert_allclose(got, 2 * eps_c - eps_u, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="null_context"):
        guided_noise_fn(model, ns, context=ctx, cfg_scale=1.0)
    with pytest.raises(ValueError, match="null_class"):
        guided_noise_fn(model, ns, y=jnp.zeros(2, jnp.int32), cfg_scale=1.0)


# ------------------------------------------------------------------------------------------
# generate: config -> samples.
# ------------------------------------------------------------------------------------------


def small_config(**sample):
    from configs.fashion_mnist_uvit import get_config

    c = get_config("runlocal")
    # The comparisons below run LinearVPSchedule with a noise-predicting model.
    c.diffusion.update(formulation="vp_continuous", target="eps")
    # The default's final step (DPM-Solver only) and guidance schedule, off.
    c.sample.update(steps=6, denoise_to_zero=False, cfg_schedule="constant")
    c.sample.update(**sample)
    return c


def params_model(params, x, t_net, y, context):
    """A stand-in model taking its weights as an argument (like `apply_fn(graphdef)`)."""
    h = jnp.tanh(x * params["w"] + t_net[:, None, None, None] / 1000.0)
    return h + params["emb"][y][:, None, None, None]


PARAMS = {"w": jnp.float32(0.8), "emb": jnp.linspace(-0.5, 0.5, 11)}


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_generate_every_sampler(sampler):
    c = small_config(sampler=sampler)
    x = generate(params_model, c, jax.random.key(0), num=8, params=PARAMS)
    assert x.shape == (8, 28, 28, 1) and x.dtype == jnp.float32
    assert np.isfinite(np.asarray(x)).all()


def test_generate_matches_the_direct_sampler_and_draws_real_labels():
    c = small_config(sampler="dpm_solver_fast", cfg_scale=1.5)
    key = jax.random.key(3)
    labels = jnp.asarray([0, 3, 9, 5], jnp.int32)
    got = generate(params_model, c, key, labels=labels, params=PARAMS)
    k_x, _, _ = jax.random.split(key, 3)
    x_T = jax.random.normal(k_x, (4, 28, 28, 1), jnp.float32)
    ns = LinearVPSchedule()
    noise_fn = guided_noise_fn(
        functools.partial(params_model, PARAMS), ns, y=labels, cfg_scale=1.5, null_class=10
    )
    want = jax.jit(
        lambda x: dpm_solver.sample(
            noise_fn,
            x,
            ns,
            steps=6,
            method="singlestep_fast",
            skip_type="logSNR",
            predict_x0=False,
        )
    )(x_T)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    spec = SamplerSpec.from_config(c)
    cond = spec.conditioning
    assert cond.null_class == 10 and cond.num_classes == 10  # null class never drawn


def test_generate_text_to_image_guides_with_the_empty_context():
    c = small_config(sampler="dpm_solver++_2m", cfg_scale=2.0)
    c.model.kind = "uvit_t2i"
    c.diffusion.formulation = "sd_discrete"

    def t2i_model(params, x, t_net, y, context):
        assert y is None
        return jnp.tanh(x * params["w"]) + context.mean(axis=(1, 2))[:, None, None, None]

    ctx = jax.random.normal(jax.random.key(1), (3, 5, 8))
    null = jax.random.normal(jax.random.key(2), (5, 8))
    key = jax.random.key(5)
    got = generate(t2i_model, c, key, contexts=ctx, null_context=null, params=PARAMS)
    x_T = jax.random.normal(jax.random.split(key, 3)[0], (3, 28, 28, 1), jnp.float32)
    ns = DiscreteSchedule()
    noise_fn = guided_noise_fn(
        functools.partial(t2i_model, PARAMS), ns, context=ctx, cfg_scale=2.0, null_context=null
    )
    kwargs = SAMPLERS["dpm_solver++_2m"].kwargs(Formulation("sd_discrete"))
    want = jax.jit(lambda x: dpm_solver.sample(noise_fn, x, ns, steps=6, **kwargs))(x_T)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs null_context"):
        generate(t2i_model, c, key, contexts=ctx, params=PARAMS)


def test_generate_same_seed_same_images_on_any_device_count():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    c = small_config(sampler="euler_maruyama", cfg_scale=1.0)
    key = jax.random.key(11)
    one = generate(params_model, c, key, num=16, params=PARAMS)
    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    eight = generate(params_model, c, key, num=16, params=PARAMS, sharding=sharding)
    assert len(eight.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(eight), np.asarray(one), rtol=1e-6, atol=1e-6)
    again = generate(params_model, c, key, num=16, params=PARAMS)
    np.testing.assert_array_equal(np.asarray(again), np.asarray(one))


def test_generate_compiles_once_across_batches():
    c = small_config(sampler="dpm_solver++_2m", cfg_scale=1.0)
    spec = SamplerSpec.from_config(c)
    fn = make_generate_fn(params_model, spec, 4, True, None)
    for seed in range(3):
        labels = jax.random.randint(jax.random.key(seed), (4,), 0, 10)
        generate(params_model, c, jax.random.key(seed), labels=labels, params=PARAMS)
    assert fn._cache_size() == 1


def test_generate_config_errors():
    with pytest.raises(ValueError, match="config.sample.sampler"):
        SamplerSpec.from_config(small_config(sampler="ddim"))
    c = small_config(cfg_scale=1.0)
    c.model.num_classes = -1
    with pytest.raises(ValueError, match="cfg_scale != 0 needs a conditional model"):
        SamplerSpec.from_config(c)
    c = small_config(cfg_scale=1.0)
    c.diffusion.p_uncond = 0.0
    with pytest.raises(ValueError, match="p_uncond > 0"):
        SamplerSpec.from_config(c)
    c = small_config()
    c.diffusion.formulation = "edm"
    with pytest.raises(ValueError, match="config.diffusion.formulation"):
        SamplerSpec.from_config(c)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, config.model.num_classes=11\)"):
        generate(
            params_model, small_config(), jax.random.key(0), labels=jnp.asarray([11]), params=PARAMS
        )
    t2i = small_config()
    t2i.model.kind = "uvit_t2i"
    with pytest.raises(ValueError, match="needs contexts"):
        generate(params_model, t2i, jax.random.key(0), num=2, params=PARAMS)


def test_sample_images_with_the_default_uvit():
    uvit = pytest.importorskip("uvit_jax.models.uvit", reason="the U-ViT model is not there yet")
    from flax import nnx

    c = small_config(sampler="dpm_solver_fast", cfg_scale=1.0)
    graphdef, params = nnx.split(uvit.build_uvit(c.model))
    labels = np.arange(4) % 10
    x = sample_images(graphdef, params, c, jax.random.key(0), labels=labels)
    assert x.shape == (4, 28, 28, 1) and np.isfinite(np.asarray(x)).all()


@pytest.mark.parametrize(
    "option",
    [
        dict(thresholding=True),
        dict(denoise_to_zero=True),
        dict(thresholding=True, denoise_to_zero=True),
    ],
)
def test_generate_options_are_dpm_solver_plus_plus_with_them(option):
    c = small_config(sampler="dpm_solver++_2m", **option)
    key = jax.random.key(5)
    labels = jnp.asarray([1, 2, 3, 4], jnp.int32)
    got = generate(params_model, c, key, labels=labels, params=PARAMS)
    x_T = jax.random.normal(jax.random.split(key, 3)[0], (4, 28, 28, 1), jnp.float32)
    ns = LinearVPSchedule()
    noise_fn = guided_noise_fn(
        functools.partial(params_model, PARAMS),
        ns,
        y=labels,
        cfg_scale=c.sample.cfg_scale,
        null_class=10,
    )
    kwargs = dict(method="multistep", order=2, skip_type="logSNR", predict_x0=True)
    want = jax.jit(lambda x: dpm_solver.sample(noise_fn, x, ns, steps=6, **option, **kwargs))(x_T)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    plain = generate(
        params_model, small_config(sampler="dpm_solver++_2m"), key, labels=labels, params=PARAMS
    )
    assert np.abs(np.asarray(plain) - np.asarray(got)).max() > 1e-3  # the option changed samples


def test_generate_options_need_samplers_that_have_them():
    key = jax.random.key(5)
    with pytest.raises(ValueError, match=r"config.sample.thresholding needs a data-prediction"):
        c = small_config(sampler="dpm_solver_fast", thresholding=True)
        generate(params_model, c, key, num=4, params=PARAMS)
    with pytest.raises(ValueError, match=r"config.sample.denoise_to_zero needs a DPM-Solver"):
        c = small_config(sampler="euler_maruyama", denoise_to_zero=True)
        generate(params_model, c, key, num=4, params=PARAMS)


def test_generate_grid_option_is_the_sampler_on_that_grid():
    key = jax.random.key(5)
    labels = jnp.asarray([1, 2, 3, 4], jnp.int32)
    c = small_config(sampler="dpm_solver++_2m", grid="karras")
    got = generate(params_model, c, key, labels=labels, params=PARAMS)
    x_T = jax.random.normal(jax.random.split(key, 3)[0], (4, 28, 28, 1), jnp.float32)
    ns = LinearVPSchedule()
    noise_fn = guided_noise_fn(
        functools.partial(params_model, PARAMS), ns, y=labels, cfg_scale=c.sample.cfg_scale,
        null_class=10,
    )  # fmt: skip
    kwargs = dict(method="multistep", order=2, skip_type="karras", predict_x0=True)
    want = jax.jit(lambda x: dpm_solver.sample(noise_fn, x, ns, steps=6, **kwargs))(x_T)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"config.sample.grid='cosine': expected .* 'karras'"):
        SamplerSpec.from_config(small_config(grid="cosine"))
    with pytest.raises(ValueError, match=r"config.sample.grid needs a sampler with a time grid"):
        SamplerSpec.from_config(small_config(sampler="euler_maruyama", grid="logSNR"))


def test_guidance_interval_guides_only_inside_its_noise_levels():
    """cfg_interval (lo, hi]: guided eps where lo < sigma_t / alpha_t <= hi, conditional eps
    elsewhere; checked against a noise function that computes both and selects per step."""
    key = jax.random.key(7)
    labels = jnp.asarray([1, 2, 3, 4], jnp.int32)
    interval = (0.5, 5.0)
    run = lambda **s: np.asarray(
        generate(params_model, small_config(sampler="dpm_solver++_2m", **s), key, labels=labels,
                 params=PARAMS)
    )  # fmt: skip
    got = run(cfg_scale=1.5, cfg_interval=interval)

    ns = LinearVPSchedule()
    model = functools.partial(params_model, PARAMS)

    def selecting_noise_fn(x, t):
        t_net = 999.0 * t
        eps_c = model(x, t_net, labels, None)
        eps_u = model(x, t_net, jnp.full_like(labels, 10), None)
        sigma = ns.marginal_std(t) / ns.marginal_alpha(t)
        inside = ((sigma > interval[0]) & (sigma <= interval[1]))[:, None, None, None]
        return jnp.where(inside, eps_c + 1.5 * (eps_c - eps_u), eps_c)

    x_T = jax.random.normal(jax.random.split(key, 3)[0], (4, 28, 28, 1), jnp.float32)
    kwargs = dict(method="multistep", order=2, skip_type="logSNR", predict_x0=True)
    want = jax.jit(lambda x: dpm_solver.sample(selecting_noise_fn, x, ns, steps=6, **kwargs))(x_T)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    # The interval holds some of the 6 steps, not all: the samples differ from both ends.
    assert np.abs(got - run(cfg_scale=1.5)).max() > 1e-3
    assert np.abs(got - run(cfg_scale=0.0)).max() > 1e-3
    # An interval holding every noise level is plain guidance; one holding none, no guidance.
    np.testing.assert_allclose(run(cfg_scale=1.5, cfg_interval=(0.0, 1e9)), run(cfg_scale=1.5))
    np.testing.assert_allclose(run(cfg_scale=1.5, cfg_interval=(1e8, 1e9)), run(cfg_scale=0.0))


@pytest.mark.parametrize(
    "sample, message",
    [
        (dict(cfg_scale=1.0, cfg_interval=(5.0, 0.5)), r"cfg_interval=\(5.0, 0.5\): expected"),
        (dict(cfg_scale=1.0, cfg_interval=(1.0,)), r"cfg_interval=\(1.0,\): expected"),
        (dict(cfg_scale=0.0, cfg_interval=(0.5, 5.0)), r"cfg_interval is set but cfg_scale is 0"),
    ],
)
def test_guidance_interval_errors_name_the_field(sample, message):
    with pytest.raises(ValueError, match=message):
        generate(params_model, small_config(**sample), jax.random.key(0), num=4, params=PARAMS)


# ------------------------------------------------------------------------------------------
# Guidance schedules.
# ------------------------------------------------------------------------------------------


def test_constant_cfg_schedule_is_the_unscheduled_program():
    """ "constant" traces exactly the one-pass guidance of before schedules existed: the same
    jaxpr as that computation written out, hence the same bits."""
    ns = LinearVPSchedule()
    model = RecordingModel()
    x = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
    t = jnp.asarray([0.1, 0.5, 0.9])
    y = jnp.asarray([1, 2, 3], jnp.int32)

    def unscheduled(x, t):
        t_net = ns.network_time(t).astype(jnp.float32)
        y2 = jnp.concatenate([y, jnp.full_like(y, 9)])
        out = model(jnp.concatenate([x, x]), jnp.concatenate([t_net, t_net]), y2, None)
        eps_c, eps_u = out[:3], out[3:]
        return eps_c + 0.7 * (eps_c - eps_u)

    fn = guided_noise_fn(model, ns, y=y, cfg_scale=0.7, null_class=9, cfg_schedule="constant")
    assert str(jax.make_jaxpr(fn)(x, t)) == str(jax.make_jaxpr(unscheduled)(x, t))
    np.testing.assert_array_equal(jax.jit(fn)(x, t), jax.jit(unscheduled)(x, t))


@pytest.mark.parametrize("formulation,scale", [("vp_continuous", 999.0), ("sd_discrete", 1000.0)])
def test_linear_cfg_schedule_is_eps_c_plus_s_t_times_the_difference(formulation, scale):
    """ "linear": eps_c + s(t) (eps_c - eps_u) with s(t) = 0.7 (1 - t), in one pass of 2B."""
    ns = Formulation(formulation).schedule
    model = RecordingModel()
    x = jax.random.normal(jax.random.key(0), (4, 4, 4, 2))
    t = jnp.asarray([1.0, 0.75, 0.5, 1e-3])
    y = jnp.asarray([1, 2, 3, 4], jnp.int32)
    fn = guided_noise_fn(model, ns, y=y, cfg_scale=0.7, null_class=9, cfg_schedule="linear")
    got = np.asarray(jax.jit(fn)(x, t))
    assert model.calls == [(8, True, False)], "a scheduled step is still one pass of 2B"
    eps_c, eps_u = (
        np.asarray(model(x, scale * t, labels, None)) for labels in (y, jnp.full_like(y, 9))
    )
    s = np.asarray([0.0, 0.175, 0.35, 0.6993])[:, None, None, None]  # 0.7 (1 - t), by hand
    np.testing.assert_allclose(got, eps_c + s * (eps_c - eps_u), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[0], eps_c[0], rtol=1e-6)  # pure noise: no guidance yet


def test_linear_cfg_schedule_composes_with_the_interval():
    """Inside the interval the linear scale (one pass of 2B), outside one conditional pass of B."""
    ns = LinearVPSchedule()
    model = RecordingModel()
    x = jax.random.normal(jax.random.key(0), (2, 4, 4, 2))
    y = jnp.asarray([1, 2], jnp.int32)
    fn = jax.jit(
        guided_noise_fn(
            model, ns, y=y, cfg_scale=2.0, null_class=9, cfg_interval=(0.5, 5.0),
            cfg_schedule="linear",
        )
    )  # fmt: skip
    fn.lower(x, jnp.ones((2,)))
    assert model.calls == [(4, True, False), (2, True, False)]  # the two branches of one cond
    inside = []
    for t_i in (0.95, 0.5, 0.1):
        t = jnp.full((2,), t_i)
        sigma = float(ns.marginal_std(t[0]) / ns.marginal_alpha(t[0]))
        inside.append(0.5 < sigma <= 5.0)
        eps_c, eps_u = (
            np.asarray(model(x, 999.0 * t, labels, None)) for labels in (y, jnp.full_like(y, 9))
        )
        s = 2.0 * (1.0 - t_i) if inside[-1] else 0.0
        np.testing.assert_allclose(fn(x, t), eps_c + s * (eps_c - eps_u), rtol=1e-6, atol=1e-6)
    assert inside == [False, True, False]  # above, in and below the interval


def test_generate_linear_cfg_schedule_is_the_sampler_on_the_scheduled_noise_fn():
    key = jax.random.key(7)
    labels = jnp.asarray([1, 2, 3, 4], jnp.int32)
    run = lambda **s: np.asarray(
        generate(params_model, small_config(sampler="dpm_solver++_2m", **s), key, labels=labels,
                 params=PARAMS)
    )  # fmt: skip
    got = run(cfg_scale=1.5, cfg_schedule="linear")
    model = functools.partial(params_model, PARAMS)

    def linear_noise_fn(x, t):
        t_net = 999.0 * t
        eps_c = model(x, t_net, labels, None)
        eps_u = model(x, t_net, jnp.full_like(labels, 10), None)
        return eps_c + (1.5 * (1.0 - t))[:, None, None, None] * (eps_c - eps_u)

    x_T = jax.random.normal(jax.random.split(key, 3)[0], (4, 28, 28, 1), jnp.float32)
    kwargs = dict(method="multistep", order=2, skip_type="logSNR", predict_x0=True)
    want = jax.jit(
        lambda x: dpm_solver.sample(linear_noise_fn, x, LinearVPSchedule(), steps=6, **kwargs)
    )(x_T)
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    assert np.abs(got - run(cfg_scale=1.5)).max() > 1e-3  # not the constant scale
    np.testing.assert_array_equal(run(cfg_scale=1.5, cfg_schedule="constant"), run(cfg_scale=1.5))
    # An empty interval leaves the conditional model, whatever the schedule.
    empty = run(cfg_scale=1.5, cfg_schedule="linear", cfg_interval=(1e8, 1e9))
    np.testing.assert_allclose(empty, run(cfg_scale=0.0), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "sample, message",
    [
        (
            dict(cfg_scale=1.0, cfg_schedule="cosine"),
            r"config.sample.cfg_schedule='cosine': expected one of \('constant', 'linear'\)",
        ),
        (
            dict(cfg_scale=0.0, cfg_schedule="linear"),
            r"config.sample.cfg_schedule is 'linear' but cfg_scale is 0",
        ),
    ],
)
def test_cfg_schedule_errors_name_the_field(sample, message):
    with pytest.raises(ConfigError, match=message):
        generate(params_model, small_config(**sample), jax.random.key(0), num=4, params=PARAMS)
