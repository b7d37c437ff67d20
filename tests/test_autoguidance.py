"""Autoguidance (Karras et al. 2024): out_main + s (out_main - out_guide), the guide a weaker
model given the same condition; in every sampler, the jobs and the API; its error messages."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from runs import small_config

import uvit_jax
from configs.fashion_mnist_uvit import get_config
from uvit_jax import checkpoints, images, jobs
from uvit_jax.diffusion.formulation import Formulation
from uvit_jax.errors import ConfigError
from uvit_jax.jobs.sample import sample_job
from uvit_jax.models.uvit import apply_fn, build_uvit
from uvit_jax.parallel.mesh import make_mesh
from uvit_jax.sampling.generate import SamplerSpec, check_guide, generate
from uvit_jax.sampling.guidance import guided_noise_fn
from uvit_jax.sampling.samplers import SAMPLERS, runs_on
from uvit_jax.train.optimizer import make_optimizer
from uvit_jax.train.state import create_train_state

# ---- the noise function ------------------------------------------------------------------


def tiny_uvit(seed: int, **model):
    """(apply(params, x, t_net, y, context), params) of a runlocal-sized U-ViT."""
    c = get_config("runlocal")
    c.model.update(**model)
    graphdef, params = nnx.split(build_uvit(c.model, seed=seed))
    return apply_fn(graphdef), params


def inputs():
    x = jax.random.normal(jax.random.key(0), (4, 28, 28, 1))
    t = jnp.full((4,), 0.4)  # the samplers step every sample at one time
    return x, t, jnp.asarray([0, 3, 7, 9], jnp.int32)


FLOW = Formulation("flow", "velocity").schedule


@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_a_guide_with_the_main_weights_leaves_the_conditional_output_unchanged(schedule):
    apply, params = tiny_uvit(0)
    x, t, y = inputs()

    def guided(params, guide_params, scale):
        fn = guided_noise_fn(
            lambda *a: apply(params, *a), FLOW, y=y, cfg_scale=scale, cfg_schedule=schedule,
            guide_fn=lambda *a: apply(guide_params, *a),
        )  # fmt: skip
        return fn(x, t)

    plain = jax.jit(lambda p: guided_noise_fn(lambda *a: apply(p, *a), FLOW, y=y)(x, t))(params)
    # A copy of the weights, passed as their own argument: two forward passes, as a guide
    # loaded from the same checkpoint gives. out + s (out - out) is out, bit for bit.
    copy = jax.tree.map(jnp.copy, params)
    fn = jax.jit(guided)  # the scale traced: one program for all
    for scale in (0.5, 1.0, 3.0, 10.0):
        got = fn(params, copy, jnp.float32(scale))
        np.testing.assert_array_equal(got, plain, err_msg=f"scale {scale}")


def test_autoguidance_is_the_main_output_pushed_away_from_a_smaller_guide():
    main, main_params = tiny_uvit(0)
    guide, guide_params = tiny_uvit(1, embed_dim=16, depth=1, num_heads=1)
    x, t, y = inputs()
    t_net = FLOW.network_time(t)
    # Eager, one network call each, combined in float64.
    out_m = np.asarray(main(main_params, x, t_net, y, None), np.float64)
    out_g = np.asarray(guide(guide_params, x, t_net, y, None), np.float64)
    assert np.abs(out_m - out_g).max() > 0.1  # two different networks

    def noise(schedule="constant", interval=None):
        fn = guided_noise_fn(
            lambda *a: main(main_params, *a), FLOW, y=y, cfg_scale=2.0, cfg_schedule=schedule,
            cfg_interval=interval, guide_fn=lambda *a: guide(guide_params, *a),
        )  # fmt: skip
        return fn(x, t)

    # One program for the four settings (sigma = t / (1 - t) = 0.67 at t = 0.4).
    constant, linear, outside, inside = jax.jit(
        lambda: (noise(), noise("linear"), noise(interval=(1.0, 5.0)), noise(interval=(0.5, 5.0)))
    )()
    # Tolerance: float32 outputs of the jitted and the eager forward passes (relative ~1e-6
    # each), scaled by up to 1 + 2 s = 5.
    tol = dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(constant, out_m + 2.0 * (out_m - out_g), **tol)
    np.testing.assert_allclose(linear, out_m + 2.0 * (1 - 0.4) * (out_m - out_g), **tol)  # s(1-t)
    np.testing.assert_allclose(outside, out_m, **tol)  # outside the interval: the main alone
    np.testing.assert_allclose(inside, constant, **tol)


def test_scale_zero_never_calls_the_guide():
    main, params = tiny_uvit(0)
    x, t, y = inputs()

    def guide(*args):
        raise AssertionError("the guide was called at scale 0")

    plain = guided_noise_fn(lambda *a: main(params, *a), FLOW, y=y)
    fn = guided_noise_fn(lambda *a: main(params, *a), FLOW, y=y, cfg_scale=0.0, guide_fn=guide)
    np.testing.assert_array_equal(jax.jit(fn)(x, t), jax.jit(plain)(x, t))


def test_autoguidance_needs_no_null_condition():
    """An unconditional model (no labels, no null class) can be autoguided; not by CFG."""
    main, params = tiny_uvit(0, num_classes=-1)
    x, t, _ = inputs()
    fn = guided_noise_fn(
        lambda *a: main(params, *a), FLOW, cfg_scale=1.0, guide_fn=lambda *a: 0.5 * a[0]
    )
    out = np.asarray(main(params, x, FLOW.network_time(t), None, None))
    np.testing.assert_allclose(jax.jit(fn)(x, t), 2 * out - 0.5 * x, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs labels"):
        guided_noise_fn(lambda *a: main(params, *a), FLOW, cfg_scale=1.0)

    c = get_config("runlocal")
    c.model.num_classes = -1
    c.diffusion.p_uncond = 0.0
    c.sample.update(guidance="autoguidance", guide_checkpoint="10")
    assert SamplerSpec.from_config(c).guidance == "autoguidance"
    c.sample.update(guidance="cfg", guide_checkpoint="")
    with pytest.raises(ConfigError, match="needs a conditional model"):
        SamplerSpec.from_config(c)


# ---- every sampler -------------------------------------------------------------------------


def params_model(params, x, t_net, y, context):
    """A stand-in network taking its weights as an argument (like `apply_fn(graphdef)`)."""
    h = jnp.tanh(x * params["w"] + t_net[:, None, None, None] / 1000.0)
    return h + params["emb"][y][:, None, None, None]


MAIN = {"w": jnp.float32(0.8), "emb": jnp.linspace(-0.5, 0.5, 11)}
GUIDE = {"w": jnp.float32(0.5), "emb": jnp.linspace(-0.2, 0.3, 11)}


def sampler_config(sampler: str, **sample):
    c = get_config("runlocal")
    c.sample.update(sampler=sampler, steps=3, denoise_to_zero=False, cfg_scale=0.0)
    c.sample.cfg_schedule = "constant"
    if not runs_on(SAMPLERS[sampler], Formulation.from_config(c)):  # the SDE samplers
        c.diffusion.update(formulation="vp_continuous", target="eps")
    c.sample.update(**sample)
    return c


@pytest.mark.parametrize("sampler", sorted(SAMPLERS))
def test_every_sampler_steps_on_the_autoguided_output(sampler):
    labels = jnp.asarray([1, 4, 8], jnp.int32)
    key = jax.random.key(5)
    ag = sampler_config(sampler, cfg_scale=1.5, guidance="autoguidance", guide_checkpoint="1")
    got = generate(
        params_model, ag, key, labels=labels, params=MAIN, guide_fn=params_model, guide_params=GUIDE
    )

    # The same sampler, unguided, on a network that is the hand-made combination.
    def combined(params, x, t_net, y, context):
        out_m = params_model(params, x, t_net, y, context)
        return out_m + 1.5 * (out_m - params_model(GUIDE, x, t_net, y, context))

    want = generate(combined, sampler_config(sampler), key, labels=labels, params=MAIN)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    unguided = generate(params_model, sampler_config(sampler), key, labels=labels, params=MAIN)
    assert np.abs(np.asarray(got) - np.asarray(unguided)).max() > 1e-3
    # The guide with the main weights: the unguided samples (float32 tolerance: the programs
    # differ, the noise function's outputs do not).
    same = generate(
        params_model, ag, key, labels=labels, params=MAIN, guide_fn=params_model, guide_params=MAIN
    )
    np.testing.assert_allclose(same, unguided, rtol=1e-6, atol=1e-6)


# ---- config errors ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sample,message",
    [
        (dict(guidance="bogus"),
         r"^config.sample.guidance='bogus': expected one of \('cfg', 'autoguidance'\)$"),
        (dict(guidance="autoguidance"),
         r"^config.sample.guidance='autoguidance' needs config.sample.guide_checkpoint: a step "
         r"of this run \(e.g. 2000\), a workdir, or workdir:step$"),
        (dict(guide_checkpoint="2000"),
         r"^config.sample.guide_checkpoint='2000' is set but config.sample.guidance is 'cfg' "
         r"\(the guide model is autoguidance's\)$"),
    ],
)  # fmt: skip
def test_guidance_fields_are_checked(sample, message):
    c = get_config("runlocal")
    c.sample.update(**sample)
    with pytest.raises(ConfigError, match=message):
        SamplerSpec.from_config(c)


def test_the_config_check_knows_the_guidance_kinds():
    c = get_config("runlocal")
    c.sample.guidance = "autoguide"
    message = r"^config.sample.guidance='autoguide': expected one of 'cfg', 'autoguidance'$"
    with pytest.raises(ConfigError, match=message):
        jobs.check("sample", c)
    c.sample.guidance = "cfg"
    c.sweep.guidances = ("cfg", "ag")
    message = (
        r"^config.sweep.guidances=\('cfg', 'ag'\): expected a list of one of 'cfg', "
        r"'autoguidance' \(element 'ag' is not\)$"
    )
    with pytest.raises(ConfigError, match=message):
        jobs.check("sweep", c)


@pytest.mark.parametrize(
    "field,value,shown",
    [
        ("model.img_size", 32, "32"),
        ("model.in_chans", 3, "3"),
        ("model.num_classes", 6, "6"),
        ("diffusion.target", "eps", "'eps'"),
        ("diffusion.formulation", "sd_discrete", "'sd_discrete'"),
    ],
)
def test_a_guide_of_another_kind_is_refused_naming_the_field_and_both_values(field, value, shown):
    c = get_config("runlocal")
    c.sample.update(guidance="autoguidance", guide_checkpoint="other:10", cfg_scale=1.0)
    guide = c.copy_and_resolve_references()
    guide.model.update(embed_dim=16, depth=1)  # width and depth may differ
    check_guide(c, guide)
    section, name = field.split(".")
    guide[section][name] = value
    with pytest.raises(ConfigError) as e:
        check_guide(c, guide)
    assert str(e.value) == (
        f"config.sample.guide_checkpoint='other:10': the guide's config.{field}={shown} "
        f"differs from the main model's {c[section][name]!r}"
    )


def test_training_evaluators_refuse_autoguidance():
    c = get_config("runlocal")  # sample_grid every 20 steps
    c.sample.update(guidance="autoguidance", guide_checkpoint="10")
    message = (
        r"^config.sample.guidance='autoguidance': the training evaluators "
        r"\(config.train.evals.sample_grid\) guide by CFG only; train with guidance='cfg' \(or "
        r"their every=0\) and use autoguidance in --mode sample, eval or sweep$"
    )
    with pytest.raises(ConfigError, match=message):
        jobs.check("train", c)
    c.train.evals.sample_grid.every = 0  # nothing samples while training: a config for later
    jobs.check("train", c)
    jobs.check("sample", c)


# ---- guide checkpoints -----------------------------------------------------------------------


def save_run(workdir, config, steps, seed=0):
    """Checkpoints of fresh weights (one seed per step) at `steps`, on one device."""
    mesh = make_mesh(dict(data=1, fsdp=1), jax.devices()[:1])
    manager = checkpoints.open_manager(workdir)
    for i, step in enumerate(steps):
        state = create_train_state(config.model, make_optimizer(config.optim, 10), mesh, seed + i)
        item, ema = state.checkpoint_items()
        checkpoints.save(manager, step, ema=ema, config=config, state=item)
        manager.wait_until_finished()
    manager.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("guides")
    c = small_config()
    c.model.update(embed_dim=32)
    save_run(root / "main", c, (10, 20))
    small = c.copy_and_resolve_references()
    small.model.update(embed_dim=16, depth=1, num_heads=1)
    save_run(root / "small", small, (5,), seed=7)
    other = c.copy_and_resolve_references()
    other.model.num_classes = 6
    save_run(root / "six_classes", other, (3,))
    return root


def test_load_guide_resolves_a_step_a_workdir_and_workdir_step(runs):
    m = uvit_jax.load(runs / "main")
    assert m.step == 20

    def guide(value, **sample):
        c = m.config.copy_and_resolve_references()
        c.sample.update(guidance="autoguidance", guide_checkpoint=value, **sample)
        return uvit_jax.load_guide(m, c)

    g = guide("10")
    assert (g.step, g.path) == (10, str(runs / "main" / "checkpoints" / "10"))
    assert g.ema and g.config.model.embed_dim == 32
    assert guide(str(runs / "small")).step == 5  # its newest step
    assert guide(f"{runs / 'main'}:10").path == g.path
    assert guide(f"{runs / 'main' / 'checkpoints' / '20'}").step == 20  # a step folder
    assert guide("10", cfg_scale=0.0) is None  # unguided: nothing to read
    assert uvit_jax.load_guide(m) is None  # the saved config guides by CFG


def test_a_missing_or_mismatched_guide_is_named(runs):
    m = uvit_jax.load(runs / "main")
    c = m.config.copy_and_resolve_references()
    c.sample.update(guidance="autoguidance")

    def error(value):
        c.sample.guide_checkpoint = value
        with pytest.raises(ConfigError) as e:
            uvit_jax.load_guide(m, c)
        return str(e.value)

    assert error("15") == (
        f"config.sample.guide_checkpoint='15': {runs / 'main' / 'checkpoints'} has no "
        "checkpoint at step 15; it has steps [10, 20]"
    )
    assert error(str(runs / "nowhere")) == (
        f"config.sample.guide_checkpoint='{runs / 'nowhere'}': {runs / 'nowhere'} does not exist"
    )
    assert error(str(runs / "six_classes")) == (
        f"config.sample.guide_checkpoint='{runs / 'six_classes'}': the guide's "
        "config.model.num_classes=6 differs from the main model's 11"
    )
    # A guide handed to the API is checked alike.
    with pytest.raises(ConfigError, match=r"config.model.num_classes=6 differs"):
        uvit_jax.sample(m, guide=uvit_jax.load(runs / "six_classes"), cfg_scale=1.0, steps=1)
    with pytest.raises(ValueError, match=r"^a guide model is autoguidance's, but guidance='cfg'$"):
        uvit_jax.sample(m, guide=uvit_jax.load(runs / "small"), guidance="cfg", steps=1)


def test_api_sample_with_a_smaller_guide(runs):
    m = uvit_jax.load(runs / "main")
    small = uvit_jax.load(runs / "small")
    kw = dict(labels=range(4), steps=1, seed=3, cfg_scale=2.0, cfg_schedule="constant")
    by_path = uvit_jax.sample(
        m, guidance="autoguidance", guide_checkpoint=str(runs / "small"), **kw
    )
    loaded = uvit_jax.sample(m, guide=small, **kw)
    np.testing.assert_array_equal(by_path, loaded)
    cfg = uvit_jax.sample(m, **kw)
    assert by_path.shape == (4, 28, 28, 1) and np.abs(by_path - cfg).max() > 1e-2
    # guidance="cfg" drops a saved guide; scale 0 is unguided whatever the guide.
    m.config.sample.update(guidance="autoguidance", guide_checkpoint="10")
    np.testing.assert_array_equal(uvit_jax.sample(m, guidance="cfg", **kw), cfg)
    unguided = uvit_jax.sample(m, **dict(kw, cfg_scale=0.0), guidance="cfg")
    np.testing.assert_array_equal(uvit_jax.sample(m, **dict(kw, cfg_scale=0.0)), unguided)


# ---- the jobs, on a trained run -----------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(fmnist_dir, tmp_path_factory):
    """The runlocal default trained 20 steps, checkpoints at 10 and 20, and a random-weight
    Inception with reference statistics for --mode eval."""
    from random_inception import use_random_inception

    from uvit_jax.jobs import train as train_job

    root = tmp_path_factory.mktemp("trained")
    config = small_config()
    config.model.update(embed_dim=32)
    config.data.latent_dir = fmnist_dir
    config.train.update(num_steps=20, ckpt_every=10, log_every=10)
    config.sample.update(steps=3, num_samples=12, batch_size=8)
    use_random_inception(config, root, ref_num_images=16)
    train_job.train_job(config, str(root / "w"))
    jobs.run("fid_stats", config, str(root / "w"))
    return config, root / "w"


@pytest.mark.integration
def test_sample_and_eval_jobs_autoguide_with_an_earlier_step(trained):
    config, workdir = trained
    c = config.copy_and_resolve_references()
    c.sample.update(guidance="autoguidance", guide_checkpoint="10", cfg_scale=2.0)
    jobs.check("sample", c)
    saved = np.load(sample_job(c, str(workdir)))
    assert saved["arr_0"].shape == (12, 28, 28, 1)
    settings = json.loads(str(saved["settings"]))
    assert settings["sample"]["guidance"] == "autoguidance"
    assert settings["sample"]["guide_checkpoint"] == "10"
    assert settings["guide"] == dict(path=str(workdir / "checkpoints" / "10"), step=10)
    assert settings["step"] == 20
    # Batch 0 is what the API draws with that guide and seed.
    m = uvit_jax.load(workdir)
    x = uvit_jax.sample(m, labels=np.arange(8) % 10, seed=0, steps=3, cfg_scale=2.0,
                        guidance="autoguidance", guide_checkpoint=10)  # fmt: skip
    np.testing.assert_array_equal(images.to_uint8(np.asarray(x)), saved["arr_0"][:8])

    jobs.run("eval", c, str(workdir))
    result = json.loads((workdir / "eval" / "result_step_20.json").read_text())
    fp = result["protocol"]
    assert (fp["guidance"], fp["cfg_scale"]) == ("autoguidance", 2.0)
    assert fp["guide"]["checkpoint"] == "10" and fp["guide"]["step"] == 10
    assert fp["guide"]["config_sha256"] == fp["config_sha256"]  # the same run
    assert np.isfinite(result["fid"])


# ---- the sweep -------------------------------------------------------------------------------


def test_sweep_cells_take_the_guidance_kind_and_the_guide():
    from uvit_jax.jobs.sweep import sweep_cells

    c = get_config("runlocal")  # cfg_scale 2.5, linear schedule
    c.sweep.update(
        cfg_scales=(0.0, 3.0), guidances=("cfg", "autoguidance"), guide_checkpoints=("10", "W:5")
    )
    cells = sweep_cells(c)
    assert [(x.cfg_scale, x.guidance, x.guide_checkpoint) for x in cells] == [
        (0.0, "cfg", ""),  # unguided once, whatever the kind and guide
        (3.0, "cfg", ""),  # CFG once, whatever the guides
        (3.0, "autoguidance", "10"),
        (3.0, "autoguidance", "W:5"),
    ]
    assert cells[2].line == "dpm_solver++_3s, autoguidance 3 by 10, linear schedule"
    sample = cells[3].apply(c).sample
    assert (sample.guidance, sample.guide_checkpoint) == ("autoguidance", "W:5")
    assert SamplerSpec.from_config(cells[1].apply(c)).guidance == "cfg"
    # Left empty, the fields keep config.sample's values.
    c.sweep.update(guidances=(), guide_checkpoints=(), cfg_scales=())
    c.sample.update(guidance="autoguidance", guide_checkpoint="20")
    (cell,) = sweep_cells(c)
    assert (cell.guidance, cell.guide_checkpoint) == ("autoguidance", "20")


def test_sweep_checks_every_guide_before_sampling(runs, monkeypatch):
    from uvit_jax.jobs import sweep

    m = uvit_jax.load(runs / "main")
    c = m.config.copy_and_resolve_references()
    c.eval.update(num_samples=16, batch_size=8, min_samples=8)
    c.sweep.update(guidances=("cfg", "autoguidance"), guide_checkpoints=("10", "15"))
    monkeypatch.setattr(sweep, "make_evaluator", lambda *a: pytest.fail("went on to evaluate"))
    with pytest.raises(ConfigError) as e:
        sweep.sweep_job(c, str(runs / "main"))
    assert str(e.value) == (
        "config.sweep: the cell (dpm_solver++_3s, autoguidance 2.5 by 15, linear schedule, 5 "
        f"steps): config.sample.guide_checkpoint='15': {runs / 'main' / 'checkpoints'} has no "
        "checkpoint at step 15; it has steps [10, 20]"
    )


def test_compile_mode_counts_a_guide_of_the_main_models_shape():
    """`--mode compile` cannot read the guide: it compiles one of the main model's shape, as
    weights of their own (the same weights would let XLA merge the two passes)."""
    from uvit_jax.aot.programs import make_programs

    def network(guidance: str, checkpoint: str):
        c = get_config("runlocal")
        c.sample.update(guidance=guidance, guide_checkpoint=checkpoint)
        mesh = make_mesh(c.mesh, jax.devices()[:1])
        (program,) = make_programs(c, mesh, ("sample_network",))
        with jax.set_mesh(mesh):
            lowered = program.lower()
        return len(jax.tree.leaves(lowered.args_info)), lowered.compile().cost_analysis()["flops"]

    (cfg_args, cfg_flops), (ag_args, ag_flops) = network("cfg", ""), network("autoguidance", "1")
    weights = cfg_args - 3  # x, t, labels
    assert ag_args == cfg_args + weights
    # One pass of 2B (CFG) or two of B: the same FLOPs but for the concatenations.
    assert ag_flops == pytest.approx(cfg_flops, rel=1e-3)
