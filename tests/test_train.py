"""Training: sharded = unsharded, the CPU device split, topology-changing restores, exact resume
after kill -9, non-finite losses, configs that cannot work, and kills during asynchronous saves."""

import functools
import pathlib
import re
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from etils import epath
from flax import nnx
from runs import poison_step, small_config, subprocess_env, train_cmd

from configs.fashion_mnist_uvit import get_config
from uvit_jax import checkpoints
from uvit_jax.errors import ConfigError
from uvit_jax.jobs import train as train_job
from uvit_jax.parallel.mesh import batch_size_per_shard, global_batch, make_mesh
from uvit_jax.parallel.xla_flags import add_cpu_flags, cpu_devices
from uvit_jax.train.optimizer import learning_rate_schedule, make_optimizer, muon_labels
from uvit_jax.train.state import (
    TrainState,
    abstract_train_state,
    create_train_state,
    model_graphdef,
)
from uvit_jax.train.step import (
    TrainProgram,
    compile_train_step,
    make_train_step,
    micro_batch_count,
)

# ---- sharding ----------------------------------------------------------------------------------


def run_steps(config, data: int, fsdp: int, n: int = 4):
    mesh = make_mesh(dict(data=data, fsdp=fsdp), jax.devices()[: data * fsdp])
    tx = make_optimizer(config.optim, config.train.num_steps)
    abstract, shardings = abstract_train_state(config.model, tx, mesh)
    state = create_train_state(config.model, tx, mesh, config.seed)
    step = make_train_step(
        model_graphdef(config.model), tx, config, learning_rate_schedule(config.optim, 10)
    )
    rng = np.random.default_rng(0)
    batches = [
        dict(
            x=rng.uniform(-1, 1, (16, 28, 28, 1)).astype(np.float32),
            label=rng.integers(0, 10, 16).astype(np.int32),
        )
        for _ in range(n)
    ]
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batches[0].items()}
    compiled, _ = compile_train_step(step, abstract, shardings, spec, mesh)
    key = jax.random.key_data(jax.random.key(0))
    losses = []
    for b in batches:
        state, m = compiled(state, global_batch(b, mesh), key)
        losses.append(float(m["loss"]))
    return state, np.array(losses), mesh


@pytest.mark.integration
def test_sharded_training_matches_one_device():
    config = small_config()
    state8, losses8, mesh = run_steps(config, data=2, fsdp=4)
    state1, losses1, _ = run_steps(config, data=1, fsdp=1)
    fc1 = state8.params["in_blocks"][0]["mlp"]["fc1"]["kernel"][...]
    assert "fsdp" in str(fc1.sharding.spec), "FSDP should split the [64, 256] fc1 kernel"
    np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
    assert losses1[-1] < losses1[0]


def test_cpu_hosts_train_on_two_devices_unless_the_user_sets_the_count():
    ynn = "--xla_cpu_experimental_ynn_fusion_type=dot"
    env = {}
    add_cpu_flags(env, cores=2)
    assert env["XLA_FLAGS"] == f"{ynn} --xla_force_host_platform_device_count=2"
    env = {}
    add_cpu_flags(env, cores=1)  # nothing to run the second half on
    assert env["XLA_FLAGS"] == ynn
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}  # the user's count wins
    add_cpu_flags(env, cores=16)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {ynn}"
    # The default's batches split evenly over the two devices; a batch that does not names the
    # flag that sets their number.
    config = get_config()
    for field in ("train.batch_size", "sample.batch_size", "eval.batch_size"):
        section, name = field.split(".")
        assert config[section][name] % cpu_devices(2) == 0, field
    mesh = make_mesh(dict(data=2, fsdp=1), jax.devices()[:2])
    with pytest.raises(ConfigError, match=r"batch_size=3 .*device_count=N sets the CPU devices"):
        batch_size_per_shard(mesh, 3, field="config.train.batch_size")


@pytest.mark.integration
def test_checkpoint_restores_on_other_meshes(tmp_path):
    config = small_config()
    state, _, mesh = run_steps(config, data=2, fsdp=4, n=2)
    manager = checkpoints.open_manager(tmp_path)
    item, ema = state.checkpoint_items()
    checkpoints.save(manager, 2, ema=ema, config=config, state=item)
    manager.wait_until_finished()
    want = jax.device_get(item)
    tx = make_optimizer(config.optim, config.train.num_steps)
    for data, fsdp in [(8, 1), (1, 1)]:
        other = make_mesh(dict(data=data, fsdp=fsdp), jax.devices()[: data * fsdp])
        abstract, _ = abstract_train_state(config.model, tx, other)
        item_t, ema_t = abstract.checkpoint_items()
        got = checkpoints.restore(manager, 2, ema_target=ema_t, state_target=item_t)
        leaves = jax.tree.leaves(got["state"])
        assert {d for x in leaves for d in x.sharding.device_set} == set(other.devices.flat)
        for a, b in zip(
            jax.tree.leaves(want), jax.tree.leaves(jax.device_get(got["state"])), strict=True
        ):
            np.testing.assert_array_equal(a, b)


# ---- the loop in a subprocess ------------------------------------------------------------------


def restored_params(workdir, step):
    config = get_config("runlocal")
    graph_state = nnx.state(nnx.eval_shape(lambda: train_job.build_uvit(config.model)), nnx.Param)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), graph_state)
    manager = checkpoints.open_manager(workdir, read_only=True)
    tx = make_optimizer(config.optim, config.train.num_steps)
    mesh = make_mesh(dict(data=1, fsdp=1), jax.devices()[:1])
    abstract, _ = abstract_train_state(config.model, tx, mesh)
    item_t, _ = abstract.checkpoint_items()
    got = checkpoints.restore(manager, step, ema_target=target, state_target=item_t)
    return jax.device_get(got["state"]["params"]), jax.device_get(got["ema"])


@pytest.mark.integration
def test_resume_after_kill_is_bitwise_exact(fmnist_dir, tmp_path):
    common = ["--config.train.num_steps=16", "--config.train.ckpt_every=4",
              "--config.train.keep_ckpts=10"]  # fmt: skip
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(straight, fmnist_dir, *common), env=subprocess_env(), check=True,
                   capture_output=True)  # fmt: skip

    killed = tmp_path / "killed"
    proc = subprocess.Popen(train_cmd(killed, fmnist_dir, *common), env=subprocess_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    while not (killed / "checkpoints" / "4").exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 4 <= latest_committed(killed) < 16, "the kill came after the run had finished"

    subprocess.run(train_cmd(killed, fmnist_dir, *common), env=subprocess_env(), check=True,
                   capture_output=True)  # fmt: skip
    for a, b in zip(jax.tree.leaves(restored_params(straight, 16)),
                    jax.tree.leaves(restored_params(killed, 16)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def latest_committed(workdir) -> int:
    """The newest step folder orbax has committed (renamed from its temporary name), or 0."""
    folder = pathlib.Path(workdir) / "checkpoints"
    steps = [int(p.name) for p in folder.glob("*") if p.name.isdigit()] if folder.exists() else []
    return max(steps, default=0)


@pytest.mark.integration
def test_kill_during_async_saves_never_leaves_a_broken_checkpoint(fmnist_dir, tmp_path):
    workdir = tmp_path / "w"
    args = ["--config.train.num_steps=100000", "--config.train.ckpt_every=1",
            "--config.train.keep_ckpts=2", "--config.train.log_every=1000"]  # fmt: skip
    for delay in (0.3, 0.7):
        proc = subprocess.Popen(train_cmd(workdir, fmnist_dir, *args), env=subprocess_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        start = latest_committed(workdir)
        while latest_committed(workdir) < start + 3:
            assert proc.poll() is None
            time.sleep(0.01)
        time.sleep(delay)  # somewhere inside the next saves and deletions
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        manager = checkpoints.open_manager(workdir)  # cleans temporary folders and the trash
        steps = manager.all_steps()
        assert steps
        for step in steps:
            params, ema = restored_params(workdir, step)
            assert all(np.isfinite(x).all() for x in jax.tree.leaves((params, ema)))


# ---- failures inside the loop ------------------------------------------------------------------


def loop_config(data_dir, **train):
    c = small_config()
    c.model.update(embed_dim=32)
    c.data.latent_dir = data_dir
    c.mesh.update(data=1, fsdp=1)
    c.train.update(dict(dict(num_steps=15, log_every=5, ckpt_every=5), **train))
    return c


@pytest.mark.integration
def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(fmnist_dir, tmp_path, monkeypatch,
                                                             one_device):  # fmt: skip
    poison_step(monkeypatch, at=7)
    with pytest.raises(
        train_job.NonFiniteLossError, match=r"at step 7 .*last good checkpoint is step 5"
    ):
        train_job.train_job(loop_config(fmnist_dir), tmp_path)
    assert checkpoints.open_manager(tmp_path, read_only=True).all_steps() == [5]


@pytest.mark.integration
def test_nonfinite_loss_can_be_skipped(fmnist_dir, tmp_path, monkeypatch, one_device):
    poison_step(monkeypatch, at=7)
    state = train_job.train_job(loop_config(fmnist_dir, on_nonfinite="skip"), tmp_path)
    assert int(state.step) == 15 and int(state.nonfinite_steps) == 1
    assert int(state.first_nonfinite_step) == 7
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))
    # The interval of the skipped step logs the mean of its other steps.
    assert np.isfinite(logged(tmp_path, "loss")[10])


# ---- dashboards --------------------------------------------------------------------------------


def event_file(workdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(workdir), size_guidance={"tensors": 0})
    events.Reload()
    return events


def logged(workdir, tag: str) -> dict[int, float]:
    """{step: value} of a scalar the loop wrote (clu writes scalars as tensor events)."""
    from tensorboard.util import tensor_util

    return {
        e.step: float(tensor_util.make_ndarray(e.tensor_proto))
        for e in event_file(workdir).Tensors(tag)
    }


@pytest.mark.integration
def test_dashboards_show_interval_means(fmnist_dir, tmp_path, one_device, caplog):
    from tensorboard.plugins.hparams import plugin_data_pb2

    every, pairs = tmp_path / "every", tmp_path / "pairs"
    train_job.train_job(loop_config(fmnist_dir, num_steps=4, log_every=1), every)
    with caplog.at_level("INFO"):
        train_job.train_job(loop_config(fmnist_dir, num_steps=4, log_every=2), pairs)
    # The same seed trains the same steps: a 2-step interval logs the mean of its 2 steps.
    for tag in ("loss", "grad_norm"):
        one, two = logged(every, tag), logged(pairs, tag)
        assert sorted(two) == [2, 4]
        for step in (2, 4):
            assert two[step] == pytest.approx((one[step - 1] + one[step]) / 2, rel=1e-6)
    tags = event_file(pairs).Tags()["tensors"]
    levels = [t for t in tags if t.startswith("loss_by_t/")]
    assert levels == ["loss_by_t/t0.00-0.25", "loss_by_t/t0.25-0.50", "loss_by_t/t0.50-0.75",
                      "loss_by_t/t0.75-1.00"]  # fmt: skip
    assert "steps_per_s" in tags and "steps_per_sec" not in tags
    (content,) = event_file(pairs).PluginTagToContent("hparams").values()
    hparams = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert hparams["model.embed_dim"].number_value == 32
    assert hparams["diffusion.formulation"].string_value == "flow"
    assert re.search(r"step 4/4  loss [0-9.]+  [0-9.]+ steps/s  ETA 0:00:00", caplog.text)


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("model.patch_size", 3, r"model.patch_size=3 does not divide img_size=28"),
        ("model.num_heads", 3, r"model.num_heads=3 does not divide embed_dim=32"),
        ("model.skp", True, r"config.model: unknown field\(s\) skp; the model's fields: kind, "),
        ("train.batch_size", 12, r"config.train.batch_size=12 is not divisible by the "
                                 r"data-parallel size 8"),
        ("mesh.fsdp", 3, r"config.mesh: 8 devices are not divisible by the fixed axis size 3"),
        ("train.batch_size", 0, r"config.train.batch_size=0: expected an integer >= 1"),
        ("train.ckpt_every", 0, r"config.train.ckpt_every=0: expected an integer >= 1"),
        ("train.log_every", 0, r"config.train.log_every=0: expected an integer >= 1"),
        ("train.evals.sample_grid.every", -1, r"config.train.evals.sample_grid.every=-1: "
                                              r"expected an integer >= 0 \(0: never\)"),
        ("train.evals.fid.type", "fdi", r"config.train.evals.fid.type='fdi': expected one of "
                                        r"fid, sample_grid"),
    ],
)  # fmt: skip
def test_configs_that_cannot_work_fail_before_compiling(tmp_path, monkeypatch, field, value,
                                                        message):  # fmt: skip
    c = get_config("runlocal")
    *sections, name = field.split(".")
    functools.reduce(lambda d, k: d[k], sections, c)[name] = value
    monkeypatch.setattr(TrainProgram, "compile", lambda *a: pytest.fail("compiled"))
    with pytest.raises(ValueError, match=message):
        train_job.train_job(c, tmp_path)


@pytest.mark.integration
def test_workdir_of_another_model_is_refused(fmnist_dir, tmp_path, monkeypatch, one_device):
    train_job.train_job(loop_config(fmnist_dir, num_steps=5), tmp_path)
    other = loop_config(fmnist_dir)
    other.model.update(embed_dim=64, depth=4, skip_fusion="add")
    monkeypatch.setattr(TrainProgram, "compile", lambda *a: pytest.fail("compiled"))
    with pytest.raises(checkpoints.CheckpointError,
                       match=r"another model(.|\n)*model.embed_dim: checkpoint 32, config 64"
                             r"(.|\n)*model.depth: checkpoint 2, config 4"
                             r"(.|\n)*model.skip_fusion: checkpoint 'concat_linear', "
                             r"config 'add'"):  # fmt: skip
        train_job.train_job(other, tmp_path)


def test_learning_rate_schedules_warm_up_then_hold_or_decay_to_zero():
    optim = dict(lr=2e-3, warmup_steps=200, schedule="cosine")
    cosine = learning_rate_schedule(optim, 9000)
    # Linear warmup, then half a cosine over the remaining 8,800 steps: half-way at 4,600.
    steps = jnp.array([0, 100, 200, 4600, 9000])
    np.testing.assert_allclose(cosine(steps), [0.0, 1e-3, 2e-3, 1e-3, 0.0], atol=1e-9)
    constant = learning_rate_schedule({**optim, "schedule": "constant"}, 9000)
    np.testing.assert_allclose(constant(steps), [0.0, 1e-3, 2e-3, 2e-3, 2e-3], atol=1e-9)
    linear = learning_rate_schedule({**optim, "schedule": "linear"}, 9000)
    np.testing.assert_allclose(linear(steps), [0.0, 1e-3, 2e-3, 1e-3, 0.0], atol=1e-9)
    np.testing.assert_allclose(linear(jnp.array([2400, 6800])), [1.5e-3, 5e-4], atol=1e-9)
    with pytest.raises(ValueError, match=r"optim.schedule='step'; expected 'constant', 'cosine'"):
        learning_rate_schedule({**optim, "schedule": "step"}, 9000)


def test_muon_orthogonalises_the_hidden_matrices_and_leaves_the_rest_to_adamw():
    config = get_config("runlocal")
    _, params = nnx.split(train_job.build_uvit(config.model))
    labels = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(
        muon_labels(params))}  # fmt: skip
    muon = {k for k, v in labels.items() if v == "muon"}
    assert "['in_blocks'][0]['mlp']['fc1']['kernel'].value" in muon
    assert "['out_blocks'][0]['skip_linear']['kernel'].value" in muon
    others = ("['decoder_pred']['kernel'].value", "['label_emb']['embedding'].value",
              "['patch_embed']['proj']['kernel'].value", "['norm']['scale'].value")  # fmt: skip
    assert all(labels[k] == "adamw" for k in others)
    optim = {**config.optim, "name": "muon", "lr": 1e-2, "warmup_steps": 0}
    optim["schedule"] = "constant"
    # Gradients whose singular values span 30x: the first update of a hidden matrix is
    # -lr * (muon_rms * sqrt(max(fan_in, fan_out)) * their orthogonal factor + weight decay), its
    # singular values within Newton-Schulz's band around 1 once those factors are taken out.

    def spread(p):
        if p.ndim != 2:
            return jax.random.normal(jax.random.key(1), p.shape)
        k = min(p.shape)
        u = np.linalg.qr(np.random.default_rng(0).normal(size=(p.shape[0], k)))[0]
        v = np.linalg.qr(np.random.default_rng(1).normal(size=(p.shape[1], k)))[0]
        return jnp.asarray((u * np.linspace(0.1, 3, k)) @ v.T, jnp.float32)

    grads = jax.tree.map(spread, params)
    tx = make_optimizer(optim, 100)
    updates, _ = tx.update(grads, tx.init(params), params)
    adamw_tx = make_optimizer({**optim, "name": "adamw"}, 100)
    adamw, _ = adamw_tx.update(grads, adamw_tx.init(params), params)
    leaves = jax.tree_util.tree_leaves_with_path(updates)
    for (path, u), a, p in zip(
        leaves, jax.tree.leaves(adamw), jax.tree.leaves(params), strict=True
    ):
        key = jax.tree_util.keystr(path)
        if key in muon:
            orth = -(u / optim["lr"] + optim["weight_decay"] * p) / (
                optim["muon_rms"] * np.sqrt(max(u.shape))
            )
            s = np.linalg.svd(np.asarray(orth), compute_uv=False)
            assert 0.6 < s.min() and s.max() < 1.25, (key, s.min(), s.max())
        else:
            np.testing.assert_allclose(u, a, rtol=1e-6, err_msg=key)
    # Three updates of the hidden matrices equal optax's own Muon (its per-leaf iteration).
    reference = optax.contrib.muon(
        learning_rate=optim["lr"], beta=optim["muon_momentum"], nesterov=True,
        weight_decay=optim["weight_decay"], consistent_rms=optim["muon_rms"],
        muon_weight_dimension_numbers=lambda tree: jax.tree.map(
            lambda label: optax.contrib.MuonDimensionNumbers(0, 1) if label == "muon" else None,
            muon_labels(tree)),
    )  # fmt: skip
    ours, theirs = tx.init(params), reference.init(params)
    for _ in range(3):
        mine, ours = tx.update(grads, ours, params)
        ref, theirs = reference.update(grads, theirs, params)
    mine_leaves = jax.tree_util.tree_leaves_with_path(mine)
    for (path, u), r in zip(mine_leaves, jax.tree.leaves(ref), strict=True):
        if jax.tree_util.keystr(path) in muon:
            np.testing.assert_allclose(u, r, rtol=1e-4, atol=1e-7)  # float32 rounding


def test_state_items_round_trip():
    config = small_config()
    mesh = make_mesh(dict(data=1, fsdp=1), jax.devices()[:1])
    tx = make_optimizer(config.optim, 10)
    state = create_train_state(config.model, tx, mesh, 0)
    item, ema = state.checkpoint_items()
    again = TrainState.from_checkpoint_items(item, ema)
    assert jax.tree.structure(again) == jax.tree.structure(state)
    assert jnp.array_equal(again.first_nonfinite_step, -1)


def one_step(config, devices: int, accum: int = 1, micro: int = 0):
    """(state, metrics, compiled HLO text) of one train step of `config`, batch 16 over a mesh
    of `devices` CPU devices, split into `accum` micro-batches or `micro` per device."""
    config.train.update(accum_steps=accum, micro_batch_per_device=micro)
    tx = make_optimizer(config.optim, 10)
    graphdef = model_graphdef(config.model)
    mesh = make_mesh(dict(data=devices, fsdp=1), jax.devices()[:devices])
    abstract, shardings = abstract_train_state(config.model, tx, mesh)
    rng = np.random.default_rng(1)
    batch = dict(
        x=jnp.asarray(rng.uniform(-1, 1, (16, 28, 28, 1)), jnp.float32),
        label=jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
    )
    spec = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in batch.items()}
    step = make_train_step(graphdef, tx, config, learning_rate_schedule(config.optim, 10))
    compiled, _ = compile_train_step(step, abstract, shardings, spec, mesh)
    state = create_train_state(config.model, tx, mesh, 0)
    key = jax.random.key_data(jax.random.key(3))
    new_state, metrics = compiled(state, batch, key)
    return new_state, metrics, compiled.as_text()


@pytest.mark.integration
def test_micro_batches_give_one_pass_gradients_with_one_all_reduce():
    """Micro-batches split the batch's own draws (not new ones): the step equals one pass to
    float32 rounding, on one device and on two (where the devices add their sums once)."""
    want, want_metrics, one_pass_hlo = one_step(small_config(), devices=2)
    runs = {
        "accum_steps=2, 1 device": one_step(small_config(), devices=1, accum=2),
        "micro_batch_per_device=2, 2 devices": one_step(small_config(), devices=2, micro=2),
    }
    for name, (state, metrics, _) in runs.items():
        np.testing.assert_allclose(metrics["loss"], want_metrics["loss"], rtol=2e-6, err_msg=name)
        np.testing.assert_array_equal(metrics["loss_by_t_count"], want_metrics["loss_by_t_count"])
        np.testing.assert_allclose(
            metrics["loss_by_t_sum"], want_metrics["loss_by_t_sum"], rtol=2e-6, err_msg=name
        )
        np.testing.assert_allclose(metrics["grad_norm"], want_metrics["grad_norm"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(want.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=name)
    # Four micro-batches of 2 per device, their gradients added on each device, then one
    # all-reduce for all of them (and the loss sums) in the step's entry computation, outside
    # the micro-batch loop, as in the single pass.
    for hlo in (runs["micro_batch_per_device=2, 2 devices"][2], one_pass_hlo):
        assert computations_calling("all-reduce", hlo) == ["ENTRY"]


def computations_calling(op: str, hlo: str) -> list[str]:
    """The computations of compiled HLO text that hold an `op` instruction, one entry per
    instruction: "ENTRY" for the entry computation, else the computation's name."""
    found, name = [], None
    for line in hlo.splitlines():
        if line and not line.startswith((" ", "}")):
            name = "ENTRY" if line.startswith("ENTRY") else line.split()[0]
        elif re.search(rf" {op}(?:-start)?\(", line):
            found.append(name)
    return found


def test_micro_batch_count():
    train = get_config("").train  # at most 4 examples per device per pass
    assert [micro_batch_count(train, b, 2) for b in (8, 16, 32, 64)] == [1, 2, 4, 8]
    assert micro_batch_count(train, 16, 1) == 4
    # The fewest passes that split each device's share evenly: 6 -> 2 of 3, 5 -> 5 of 1.
    assert [micro_batch_count(train, b, 2) for b in (12, 10, 2)] == [2, 5, 1]
    train.update(micro_batch_per_device=0, accum_steps=2)
    assert micro_batch_count(train, 32, 2) == 2
    with pytest.raises(ConfigError, match=r"batch_size=33 is not divisible by .*accum_steps=2"):
        micro_batch_count(train, 33, 1)
    train.micro_batch_per_device = 4
    with pytest.raises(ConfigError, match=r"micro_batch_per_device=4 and .*accum_steps=2: set one"):
        micro_batch_count(train, 32, 2)


@pytest.mark.integration
def test_resume_on_another_process_count_rebuilds_the_data_stream(fmnist_dir, tmp_path):
    """grain keeps one iterator file per process; a run resumed on another number of processes
    finds none for itself and restarts the stream at the step, with the same batches."""
    common = ["--config.train.ckpt_every=4", "--config.train.keep_ckpts=10"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for workdir, steps in ((straight, 8), (resumed, 4)):
        cmd = train_cmd(workdir, fmnist_dir, f"--config.train.num_steps={steps}", *common)
        subprocess.run(cmd, env=subprocess_env(), check=True, capture_output=True)
    # What a checkpoint written by 2 processes holds for a 1-process run: no file of its own.
    step_dir = resumed / "checkpoints" / "4"
    (step_dir / "data_iter" / "process_0-of-1.json").rename(
        step_dir / "data_iter" / "process_0-of-2.json"
    )
    checkpoints.write_checksums(epath.Path(step_dir))  # as that run would have sealed it
    subprocess.run(train_cmd(resumed, fmnist_dir, "--config.train.num_steps=8", *common),
                   env=subprocess_env(), check=True, capture_output=True)  # fmt: skip
    for a, b in zip(jax.tree.leaves(restored_params(straight, 8)),
                    jax.tree.leaves(restored_params(resumed, 8)), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


@pytest.mark.integration
def test_relative_workdir_trains_saves_and_loads(fmnist_dir, tmp_path, monkeypatch):
    """The README's command uses a relative --workdir; orbax itself needs absolute paths."""
    import uvit_jax

    cmd = train_cmd("rel/run", fmnist_dir, "--config.train.num_steps=2",
                    "--config.train.ckpt_every=1")  # fmt: skip
    run = subprocess.run(cmd, env=subprocess_env(), cwd=tmp_path, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    monkeypatch.chdir(tmp_path)
    assert uvit_jax.load("rel/run").step == 2
    assert uvit_jax.load("rel/run/checkpoints/1", ema=False).step == 1


class ToyEval:
    """An evaluator added through the registry: records the steps and EMA it was given."""

    runs: list[tuple[int, float]] = []

    def __init__(self, context, section):
        self.offset = float(section.offset)

    def run(self, step, graphdef, ema):
        total = sum(float(jnp.sum(x)) for x in jax.tree.leaves(ema))
        ToyEval.runs.append((step, total))
        return {"value": step + self.offset}


@pytest.mark.integration
def test_an_evaluator_from_the_registry_runs_at_its_interval(fmnist_dir, tmp_path, monkeypatch,
                                                             one_device):  # fmt: skip
    import uvit_jax
    from uvit_jax import evals

    monkeypatch.setitem(evals.EVALS, "toy", "test_train:ToyEval")
    monkeypatch.setattr(ToyEval, "runs", [])
    c = loop_config(fmnist_dir, num_steps=7, ckpt_every=3)
    c.train.evals.toy = dict(type="toy", every=3, offset=0.5)
    train_job.train_job(c, tmp_path)
    assert [step for step, _ in ToyEval.runs] == [3, 6]
    # It is given the EMA weights of its step: those saved at that step.
    for step, total in ToyEval.runs:
        saved = uvit_jax.load(tmp_path, step=step).params
        assert total == sum(float(jnp.sum(x)) for x in jax.tree.leaves(saved))
    assert logged(tmp_path, "train_toy/value") == {3: 3.5, 6: 6.5}
