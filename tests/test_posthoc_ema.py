"""Power-function EMAs and their post-hoc reconstruction (EDM2): the update against float64, the
std <-> exponent map, reconstructions against EMAs known exactly, the job's files and errors,
and training -> snapshots -> --mode posthoc_ema -> load end to end."""

import dataclasses
import functools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from runs import small_config

import uvit_jax
from configs.fashion_mnist_uvit import get_config
from uvit_jax import checkpoints, jobs
from uvit_jax.checkpoints import CheckpointError
from uvit_jax.config_checks import MAX_EMA_STD
from uvit_jax.errors import ConfigError
from uvit_jax.jobs import train as train_job
from uvit_jax.jobs.posthoc_ema import posthoc_ema_job
from uvit_jax.models.uvit import abstract_uvit
from uvit_jax.parallel.mesh import make_mesh
from uvit_jax.train import power_ema

EPS32 = float(np.finfo(np.float32).eps)

# ---- the exponent of a relative std --------------------------------------------------------


def test_std_and_exponent_round_trip_and_match_edm2s_pairs():
    gammas = np.array([0.0, 0.5, 3.0, 6.94, 16.97, 100.0, 1e4])
    np.testing.assert_allclose(
        power_ema.gamma_of_std(power_ema.std_of_gamma(gammas)), gammas, rtol=1e-10, atol=1e-10
    )
    stds = np.geomspace(1e-3, MAX_EMA_STD, 50)
    np.testing.assert_allclose(
        power_ema.std_of_gamma(power_ema.gamma_of_std(stds)), stds, rtol=1e-12
    )
    # EDM2 (Karras et al. 2024, Sec. 3.1) quotes gamma 6.94 for sigma_rel 0.10 and 16.97 for
    # 0.05, to two decimals.
    np.testing.assert_allclose(power_ema.gamma_of_std([0.10, 0.05]), [6.94, 16.97], atol=5e-3)
    np.testing.assert_allclose(power_ema.std_of_gamma([6.94, 16.97]), [0.10, 0.05], atol=5e-5)
    assert power_ema.gamma_of_std(MAX_EMA_STD) == pytest.approx(0.0, abs=1e-9)  # the average
    for bad in (0.0, -0.1, 0.29):
        with pytest.raises(ValueError, match=r"outside \(0, 0.2887\]"):
            power_ema.gamma_of_std(bad)


# ---- the update ----------------------------------------------------------------------------


def _exact_ema(trajectory: np.ndarray, gamma: float, t: int) -> np.ndarray:
    """The power-function EMA after step t of weights trajectory[i - 1] at step i, float64, as
    the closed-form sum: step i's weight is (i^(g+1) - (i-1)^(g+1)) / t^(g+1), the profile's
    integral over (i-1, i] (written with ratios: t^(g+1) overflows for large exponents)."""
    i = np.arange(1, t + 1, dtype=np.float64)
    w = (i / t) ** (gamma + 1) - ((i - 1) / t) ** (gamma + 1)
    return np.tensordot(w, trajectory[:t].astype(np.float64), axes=1)


@functools.partial(jax.jit, static_argnums=2)
def _run_updates(trajectory: jax.Array, first: jax.Array, gammas: tuple) -> jax.Array:
    """[T, ...] weights -> [T, K, ...] the K power EMAs after each step (float32, as training)."""

    def body(emas, xs):
        t, w = xs
        emas = power_ema.update(emas, w, t, gammas)
        return emas, jnp.stack(emas)

    steps = jnp.arange(1, trajectory.shape[0] + 1, dtype=jnp.int32)
    _, out = jax.lax.scan(body, tuple(first for _ in gammas), (steps, trajectory))
    return out


def test_power_ema_update_matches_a_float64_reference_sequence():
    rng = np.random.default_rng(0)
    steps = 3000
    trajectory = np.cumsum(rng.normal(size=(steps, 64)), axis=0).astype(np.float32) * 0.01 + 1
    stds = (0.05, 0.1, 0.25)
    gammas = tuple(float(g) for g in power_ema.gamma_of_std(stds))
    got = np.asarray(_run_updates(jnp.asarray(trajectory), jnp.zeros(64), gammas))

    ref = np.zeros((len(gammas), 64))  # float64: e <- beta e + (1 - beta) w, beta in float64
    for t in range(1, steps + 1):
        for k, g in enumerate(gammas):
            beta = (1 - 1 / t) ** (g + 1)
            ref[k] = beta * ref[k] + (1 - beta) * trajectory[t - 1].astype(np.float64)
        if t in (1, 2, 10, 500, steps):
            # float32 rounding: ~eps32 per update, forgotten at the EMA's own rate, growing
            # like a random walk: 1.3e-7 at step 10, 2.3e-6 at step 3000 on these weights of ~1.
            np.testing.assert_allclose(got[t - 1], ref, rtol=0, atol=4e-6, err_msg=f"step {t}")
    np.testing.assert_array_equal(got[0], np.stack([trajectory[0]] * 3))  # step 1: the weights
    for k, g in enumerate(gammas):  # the recursion is the power-function profile's average
        np.testing.assert_allclose(ref[k], _exact_ema(trajectory, g, steps), rtol=1e-12)


def test_the_update_weight_keeps_its_digits_late_in_a_run():
    # At step 10^6, float32 1 - 1/t is off by 1.3% of 1/t; the update's expm1/log1p form is not.
    t, gamma = 1_000_000, float(power_ema.gamma_of_std(0.05))
    (w,) = power_ema.update((jnp.zeros(()),), jnp.ones(()), jnp.int32(t), (gamma,))
    exact = -math.expm1((gamma + 1) * math.log1p(-1 / t))
    assert float(w) == pytest.approx(exact, rel=1e-5)


# ---- reconstruction, on the profiles ---------------------------------------------------------


def test_inner_products_match_numerical_integrals():
    tau = np.linspace(0, 300, 3_000_001)[1:]

    def profile(t, g):
        return np.where(tau <= t, (g + 1) * tau**g / t ** (g + 1), 0.0)

    for (ta, ga), (tb, gb) in [((100, 3.0), (300, 7.0)), ((300, 16.97), (200, 0.0))]:
        numeric = np.trapezoid(profile(ta, ga) * profile(tb, gb), tau)
        assert power_ema.inner_products(ta, ga, tb, gb) == pytest.approx(numeric, rel=1e-4)


def test_residuals_grow_away_from_the_tracked_stds():
    steps = np.repeat(np.arange(10, 201, 10), 2)
    gammas = np.tile(power_ema.gamma_of_std([0.05, 0.1]), 20)
    residual = {
        s: power_ema.reconstruct(steps, gammas, s, 200).residual
        for s in (0.01, 0.05, 0.07, 0.1, 0.28)
    }
    assert residual[0.05] < 1e-6 and residual[0.1] < 1e-6  # its own profile: exact
    assert residual[0.07] < 0.01  # between the tracked ones
    assert residual[0.01] > 0.1 and residual[0.28] > 0.1  # far outside: the snapshots cannot
    lo, hi = power_ema.supported_stds(steps, gammas, 200, 0.05)
    assert 0.01 < lo < 0.05 and 0.1 < hi < 0.28


# ---- the job, on snapshots of a known trajectory ---------------------------------------------

STEPS, EVERY, TRACKED = 200, 10, (0.05, 0.1)


def _snapshot_config():
    c = get_config("runlocal")
    c.model.update(embed_dim=16, depth=1, num_heads=1)
    c.train.update(ema_stds=TRACKED, ema_snapshot_every=EVERY)
    return c


def _trajectory(config):
    """Weights of the model's shapes that move along smooth curves, different per element:
    step i's leaf = a + b (i / T)^2 + c sin(3 pi i / T + d); [T, ...] float32 per leaf."""
    _, abstract = nnx.split(abstract_uvit(config.model))
    rng = np.random.default_rng(1)
    i = np.arange(1, STEPS + 1, dtype=np.float64) / STEPS

    def leaf(x):
        a, b, c, d = rng.normal(size=(4, *x.shape))
        shape = (STEPS,) + (1,) * len(x.shape)
        i_ = i.reshape(shape)
        return (a + b * i_**2 + c * np.sin(3 * np.pi * i_ + d)).astype(np.float32)

    return jax.tree.map(leaf, abstract)


@pytest.fixture(scope="module")
def snapshot_run(tmp_path_factory):
    """A workdir with the snapshots of TRACKED every EVERY steps of `_trajectory`, written as
    training writes them (the update, `checkpoints.save` into `ema_snapshots`)."""
    workdir = tmp_path_factory.mktemp("snapshots")
    config = _snapshot_config()
    trajectory = _trajectory(config)
    gammas = tuple(float(g) for g in power_ema.gamma_of_std(TRACKED))
    update = jax.jit(lambda emas, w, t: power_ema.update(emas, w, t, gammas))
    emas = tuple(jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), trajectory) for _ in gammas)
    manager = checkpoints.open_manager(workdir, keep=None, folder=checkpoints.SNAPSHOTS)
    for t in range(1, STEPS + 1):
        emas = update(emas, jax.tree.map(lambda x, t=t: x[t - 1], trajectory), jnp.int32(t))
        if t % EVERY == 0:
            checkpoints.save(manager, t, ema=emas, config=config)
    manager.wait_until_finished()
    manager.close()
    return workdir, config, trajectory, emas


def _copy(run, tmp_path):
    workdir, config, *_ = run
    shutil.copytree(workdir / checkpoints.SNAPSHOTS, tmp_path / checkpoints.SNAPSHOTS)
    return tmp_path, config.copy_and_resolve_references()


def _exact_tree(trajectory, std, t):
    g = float(power_ema.gamma_of_std(std))
    return jax.tree.map(lambda x: _exact_ema(x, g, t), trajectory)


def test_a_tracked_profile_is_reconstructed_from_its_own_snapshots(snapshot_run, tmp_path):
    workdir, config = _copy(snapshot_run, tmp_path)
    *_, last = snapshot_run
    config.posthoc.stds = TRACKED
    posthoc_ema_job(config, str(workdir))
    for k, std in enumerate(TRACKED):
        loaded = uvit_jax.load(workdir, ema_std=std)
        assert (loaded.step, loaded.ema_std) == (STEPS, std)
        folder = checkpoints.posthoc_ema_dir(workdir, std)
        with checkpoints.open_manager(folder, read_only=True) as m:
            record = checkpoints.read_posthoc_ema(m, STEPS)
        # Least squares over 40 nearly dependent profiles need not pick the snapshot itself:
        # any weights with the same profile do (residual ~1e-8, the float64 cancellation floor
        # of its formula), and give the EMA up to the float32 rounding of the weighted sum,
        # a few eps32 x sum |weights| x |the values| (sum |weights| is ~1 here).
        assert record["residual"] < 1e-6 and record["gain"] < 2
        for got, want in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(last[k]), strict=True):
            tol = 4 * EPS32 * record["gain"] * float(np.abs(want).max())
            np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=tol)


def test_an_untracked_std_matches_its_exact_ema(snapshot_run, tmp_path):
    workdir, config = _copy(snapshot_run, tmp_path)
    _, _, trajectory, _ = snapshot_run
    config.posthoc.update(stds=(0.03, 0.07, 0.15), step=150)
    posthoc_ema_job(config, str(workdir))
    for std in config.posthoc.stds:
        loaded = uvit_jax.load(workdir, ema_std=std)
        assert loaded.step == 150
        exact = _exact_tree(trajectory, std, 150)
        r = power_ema.reconstruct(*_basis(150), std, 150)
        # Cauchy-Schwarz: |EMA error| <= ||profile residual|| x ||trajectory||, both in L2 over
        # the steps (per element), plus float32 rounding of the snapshots and their sum.
        own = math.sqrt(power_ema.inner_products(150, r.gamma, 150, r.gamma))
        assert r.residual < 0.05
        for got, want, path in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(exact),
                                   jax.tree.leaves(trajectory), strict=True):  # fmt: skip
            l2 = np.sqrt(np.sum(path[:150].astype(np.float64) ** 2, axis=0))
            bound = r.residual * own * l2 + 8 * EPS32 * r.gain * np.abs(path).max()
            err = np.abs(np.asarray(got, np.float64) - want)
            assert np.all(err <= bound), f"std {std}: error {err.max():.2e}"
            assert err.max() < 0.05 * np.abs(want).max()  # and small


def _basis(step):
    steps = np.arange(EVERY, step + 1, EVERY)
    return np.repeat(steps, 2), np.tile(power_ema.gamma_of_std(TRACKED), len(steps))


def test_sample_eval_and_sweep_name_the_post_hoc_weights(snapshot_run, tmp_path):
    from uvit_jax.jobs.sample import sample_settings, settings_digest
    from uvit_jax.jobs.sweep import sweep_cells

    workdir, config = _copy(snapshot_run, tmp_path)
    config.posthoc.stds = (0.07,)
    posthoc_ema_job(config, str(workdir))
    loaded = uvit_jax.load(workdir, ema_std=0.07)
    assert loaded.weights == "posthoc_ema std 0.07"
    assert "posthoc_ema std 0.07 weights" in repr(loaded)
    # The classic EMA's sample settings (and file names) are those before post-hoc EMAs.
    classic = sample_settings(config, dataclasses.replace(loaded, ema_std=0.0), 0)
    assert "ema_std" not in classic and "ema_std" not in classic["sample"]
    assert sample_settings(config, loaded, 0)["ema_std"] == 0.07
    assert settings_digest(sample_settings(config, loaded, 0)) != settings_digest(classic)
    config.sweep.update(ema_stds=(0.0, 0.07), cfg_scales=(0.0, 3.0))
    cells = sweep_cells(config)
    assert [(c.ema_std, c.cfg_scale) for c in cells] == [(0.0, 0.0), (0.0, 3.0), (0.07, 0.0),
                                                         (0.07, 3.0)]  # fmt: skip
    assert (
        cells[3].line.endswith(", EMA std 0.07") and cells[3].apply(config).sample.ema_std == 0.07
    )


# ---- errors: one line, naming the field or folder and the value ------------------------------


def test_a_gap_in_the_snapshots_is_refused(snapshot_run, tmp_path):
    workdir, config = _copy(snapshot_run, tmp_path)
    shutil.rmtree(workdir / checkpoints.SNAPSHOTS / "50")
    config.posthoc.stds = (0.07,)
    with pytest.raises(CheckpointError, match=r"ema_snapshots is missing step\(s\) 50 of the "
                       r"snapshot sequence every 10 steps from 10 to 200") as e:  # fmt: skip
        posthoc_ema_job(config, str(workdir))
    assert "\n" not in str(e.value)


def test_a_std_the_snapshots_cannot_make_is_refused_with_the_supported_range(
    snapshot_run, tmp_path
):
    workdir, config = _copy(snapshot_run, tmp_path)
    config.posthoc.stds = (0.07, 0.005)
    message = (
        r"^config.posthoc.stds: 0.005 is outside what 20 snapshots of stds 0.05, 0.1 every 10 "
        r"steps from 10 to 200 reconstruct at step 200: relative profile error 0.\d+ > "
        r"config.posthoc.max_residual=0.05; supported: about 0.0\d+ to 0.2\d+$"
    )
    with pytest.raises(ConfigError, match=message):
        posthoc_ema_job(config, str(workdir))
    assert not (workdir / "posthoc_ema").exists()  # refused before anything is written


@pytest.mark.parametrize(
    "setting,message",
    [
        (dict(stds=()), r"^config.posthoc.stds=\(\): expected the relative stds to reconstruct"),
        (dict(stds=(0.07,), step=205), r"^config.posthoc.step=205: expected a step from 10 to "
                                       r"200, the range of the snapshots in"),
    ],
)  # fmt: skip
def test_posthoc_settings_that_cannot_work_are_refused(snapshot_run, tmp_path, setting, message):
    workdir, config = _copy(snapshot_run, tmp_path)
    config.posthoc.update(setting)
    with pytest.raises(ConfigError, match=message):
        posthoc_ema_job(config, str(workdir))


def test_no_snapshots_at_all_is_refused(tmp_path):
    config = _snapshot_config()
    config.posthoc.stds = (0.07,)
    with pytest.raises(CheckpointError, match=r"no EMA snapshots in .*ema_snapshots does not "
                       r"exist \(train with config.train.ema_stds"):  # fmt: skip
        posthoc_ema_job(config, str(tmp_path))
    (tmp_path / checkpoints.SNAPSHOTS).mkdir()
    with pytest.raises(CheckpointError, match=r"no EMA snapshots in .*: the folder holds no "
                                              r"snapshot step"):  # fmt: skip
        posthoc_ema_job(config, str(tmp_path))


def test_loading_a_std_never_reconstructed_names_those_there(snapshot_run, tmp_path):
    workdir, config = _copy(snapshot_run, tmp_path)
    config.posthoc.stds = (0.07, 0.1)
    posthoc_ema_job(config, str(workdir))
    with pytest.raises(CheckpointError, match=r"no post-hoc EMA of std 0.03 in .*std_0.03 does "
                       r"not exist \(reconstructed there: 0.07, 0.1; make it with --mode "
                       r"posthoc_ema --config.posthoc.stds=0.03\)"):  # fmt: skip
        uvit_jax.load(workdir, ema_std=0.03)
    config.sample.ema_std = 0.1
    config.eval.ema = False
    from uvit_jax.jobs.evaluate import load_weights

    with pytest.raises(ConfigError, match=r"^config.sample.ema_std=0.1 with config.eval.ema=False"):
        load_weights(config, str(workdir), None)


@pytest.mark.parametrize(
    "train,message",
    [
        (dict(ema_stds=(0.05, 0.1), ema_snapshot_every=0),
         r"^config.train.ema_snapshot_every=0 with config.train.ema_stds=\(0.05, 0.1\): expected "
         r"an interval in steps >= 1"),
        (dict(ema_stds=(0.05, 0.05), ema_snapshot_every=5),
         r"^config.train.ema_stds=\(0.05, 0.05\): expected distinct stds$"),
        (dict(ema_stds=(0.05, 0.3), ema_snapshot_every=5),
         r"^config.train.ema_stds=\(0.05, 0.3\): expected a list of a finite number in "
         r"\(0, 0.288675\] \(element 0.3 is not\)$"),
        (dict(ema_snapshot_every=-1),
         r"^config.train.ema_snapshot_every=-1: expected an integer >= 0$"),
    ],
)  # fmt: skip
def test_training_settings_that_cannot_work_are_refused(train, message):
    config = get_config("runlocal")
    config.train.update(train)
    with pytest.raises(ConfigError, match=message):
        train_job.check_config(config, make_mesh(config.mesh))


def test_a_run_cannot_resume_with_other_power_emas():
    config = get_config("runlocal")
    config.train.update(ema_stds=(0.05, 0.1), ema_snapshot_every=10)
    saved = get_config("runlocal").to_dict()
    with pytest.raises(CheckpointError, match=r"^W was trained with config.train.ema_stds=\(\) "
                       r"ema_snapshot_every=0, the config has \(0.05, 0.1\) and 10: power-function "
                       r"EMAs start at step 1"):  # fmt: skip
        train_job.check_same_power_emas(saved, config, "W")
    saved["train"]["ema_stds"], saved["train"]["ema_snapshot_every"] = [0.05, 0.1], 10
    train_job.check_same_power_emas(saved, config, "W")  # the same: resumes


# ---- end to end ------------------------------------------------------------------------------


def _train_config(data_dir, **train):
    c = small_config()
    c.model.update(embed_dim=32)
    c.data.latent_dir = data_dir
    c.mesh.update(data=1, fsdp=1)
    c.train.update(dict(dict(num_steps=40, log_every=10, ckpt_every=10, keep_ckpts=10,
                             ema_stds=(0.05, 0.1), ema_snapshot_every=4), **train))  # fmt: skip
    return c


def _snapshot_leaves(workdir, step, config):
    with checkpoints.open_manager(workdir, read_only=True, folder=checkpoints.SNAPSHOTS) as m:
        _, abstract = nnx.split(abstract_uvit(config.model))
        return jax.device_get(
            jax.tree.leaves(checkpoints.restore(m, step, ema_target=(abstract,) * 2)["ema"])
        )


@pytest.mark.integration
def test_train_snapshot_resume_reconstruct_and_sample(fmnist_dir, tmp_path, one_device):
    config = _train_config(fmnist_dir)
    state = train_job.train_job(config, tmp_path)
    snapshots = tmp_path / checkpoints.SNAPSHOTS
    assert sorted(int(p.name) for p in snapshots.iterdir()) == list(range(4, 41, 4))
    first = {s: _snapshot_leaves(tmp_path, s, config) for s in (8, 24, 40)}
    # The last snapshot is the state's power EMAs (the checkpoint holds them too).
    for got, want in zip(first[40], jax.device_get(jax.tree.leaves(state.power_ema)),
                         strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)

    # A run whose newest checkpoints are lost resumes from step 20: the snapshots after it are
    # set aside and written again, the same (the same devices: bitwise).
    for step in (30, 40):
        shutil.rmtree(tmp_path / "checkpoints" / str(step))
    train_job.train_job(config, tmp_path)
    aside = sorted(int(p.name.split("-")[0]) for p in (snapshots / "rejected").iterdir())
    assert aside == list(range(24, 41, 4))
    for step, leaves in first.items():
        for a, b in zip(leaves, _snapshot_leaves(tmp_path, step, config), strict=True):
            np.testing.assert_array_equal(a, b)

    config.mesh.data = -1  # the job's mesh: every device
    config.posthoc.stds = (0.07,)
    jobs.run("posthoc_ema", config, str(tmp_path))
    m = uvit_jax.load(tmp_path, ema_std=0.07)
    assert (m.step, m.ema_std) == (40, 0.07)
    x = uvit_jax.sample(m, labels=range(4), steps=2)
    assert x.shape == (4, 28, 28, 1) and bool(jnp.all(jnp.isfinite(x)))
    # Autoguidance of a post-hoc EMA by "30": step 30 of the run, not of the post-hoc folder.
    guided = m.config.copy_and_resolve_references()
    guided.sample.update(guidance="autoguidance", guide_checkpoint="30", cfg_scale=1.0)
    guide = uvit_jax.load_guide(m, guided)
    assert (guide.path, guide.step) == (str(tmp_path / "checkpoints" / "30"), 30)

    # eval and sweep of the post-hoc EMA beside the classic one (random-weight Inception).
    from random_inception import use_random_inception

    from uvit_jax.jobs.sweep import sweep_job

    config.sample.steps = 2
    use_random_inception(config, tmp_path, ref_num_images=24)
    jobs.run("fid_stats", config, str(tmp_path))
    config.sample.ema_std = 0.07
    jobs.run("eval", config, str(tmp_path))
    result = json.loads((tmp_path / "eval" / "result_step_40_ema_std_0.07.json").read_text())
    assert result["protocol"]["weights"] == "posthoc_ema std 0.07"
    config.sample.ema_std = 0.0
    config.sweep.ema_stds = (0.0, 0.07)
    rows = sweep_job(config, str(tmp_path))
    assert [(r["ema_std"], r["step"], r["protocol"]["weights"]) for r in rows] == [
        (0.0, 40, "ema"), (0.07, 40, "posthoc_ema std 0.07")
    ]  # fmt: skip
    assert rows[1]["fid"] == result["fid"]  # the eval's cell, read back
    assert rows[0]["fid"] != rows[1]["fid"]  # other weights
    header = (tmp_path / "sweep" / "step_40.csv").read_text().splitlines()[0]
    assert header.endswith("seconds,ema_std,step,line")
