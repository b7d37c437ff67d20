"""The notebook API: `uvit_jax.load` restores a checkpoint written on 8 devices onto one device or
another mesh, with the saved weights bit for bit and the same samples; plain errors."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from numerics import relative_error
from runs import REPO, small_config, subprocess_env

import uvit_jax
from uvit_jax import checkpoints
from uvit_jax.parallel.mesh import batch_sharding, make_mesh
from uvit_jax.sampling.generate import sample_images
from uvit_jax.train.optimizer import make_optimizer
from uvit_jax.train.state import create_train_state, model_graphdef

STEP = 3
SEED = 7
LABELS = np.arange(16) % 10


def fsdp_config() -> ml_collections.ConfigDict:
    """runlocal (5 DPM-Solver steps, guidance scale 1), D=64, on a data=2 x fsdp=4 mesh."""
    c = small_config()
    c.mesh.update(data=2, fsdp=4)
    return c


def flat(tree) -> dict[str, np.ndarray]:
    leaves, _ = jax.tree_util.tree_flatten_with_path(jax.device_get(tree))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


@pytest.fixture(scope="module")
def saved8(tmp_path_factory):
    """A checkpoint written from 8 devices (data=2 x fsdp=4), and the samples that 8-device
    process draws from its EMA weights (batch sharded over the mesh)."""
    config = fsdp_config()
    mesh = make_mesh(config.mesh)
    tx = make_optimizer(config.optim, config.train.num_steps)
    state = create_train_state(config.model, tx, mesh, config.seed)
    # EMA != params, so a test can tell which item was loaded.
    state = state.replace(ema=jax.tree.map(lambda p: 0.9 * p + 0.01, state.params))
    item, ema = state.checkpoint_items()
    fc1 = ema["in_blocks"][0]["mlp"]["fc1"]["kernel"][...]
    assert "fsdp" in str(fc1.sharding.spec), "the checkpoint should be written FSDP-sharded"
    workdir = tmp_path_factory.mktemp("api") / "w8"
    manager = checkpoints.open_manager(workdir)
    checkpoints.save(manager, STEP, ema=ema, config=config, state=item)
    manager.wait_until_finished()
    manager.close()
    samples = sample_images(
        model_graphdef(config.model),
        ema,
        config,
        jax.random.fold_in(jax.random.key(SEED), 0),
        labels=jnp.asarray(LABELS),
        sharding=batch_sharding(mesh),
    )
    return dict(
        workdir=workdir,
        ema=flat(ema),
        raw=flat(item["params"]),
        samples=np.clip(np.asarray(samples), -1, 1),
    )


ONE_DEVICE_SCRIPT = """
import sys
import jax, ml_collections, numpy as np
import uvit_jax
workdir, out, seed, labels = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
m = uvit_jax.load(workdir)
raw = uvit_jax.load(workdir, ema=False)
assert jax.device_count() == 1, jax.devices()
one = jax.sharding.SingleDeviceSharding
for p in (m.params, raw.params):
    assert all(isinstance(x.sharding, one) for x in jax.tree.leaves(p))
assert isinstance(m.config, ml_collections.ConfigDict) and m.config.model.embed_dim == 64
x = uvit_jax.sample(m, labels=[int(v) for v in labels.split(",")], seed=seed)
flat = lambda t: {"%s/%s" % (k, jax.tree_util.keystr(p)): np.asarray(v)
                  for k, t in t.items() for p, v in jax.tree_util.tree_flatten_with_path(t)[0]}
np.savez(out, samples=np.asarray(x), step=m.step, **flat(dict(ema=m.params, raw=raw.params)))
"""


@pytest.mark.integration
def test_one_device_load_equals_saved_ema_and_samples_match(saved8, tmp_path):
    env = dict(subprocess_env(), PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")  # one CPU device
    out = tmp_path / "one_device.npz"
    labels = ",".join(map(str, LABELS))
    cmd = [sys.executable, "-c", ONE_DEVICE_SCRIPT, str(saved8["workdir"]), str(out), str(SEED)]
    run = subprocess.run([*cmd, labels], env=env, cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:]
    got = np.load(out)
    assert int(got["step"]) == STEP
    for which in ("ema", "raw"):
        assert saved8[which].keys() == {k.split("/", 1)[1] for k in got if k.startswith(which)}
        for k, v in saved8[which].items():
            np.testing.assert_array_equal(got[f"{which}/{k}"], v, err_msg=f"{which} {k}")
    # Same program on 1 and 8 devices; only reduction order may differ.
    err = relative_error(got["samples"], saved8["samples"])
    assert got["samples"].shape == (16, 28, 28, 1) and err < 1e-5, err


@pytest.mark.integration
def test_load_onto_another_mesh(saved8):
    mesh = make_mesh(dict(data=1, fsdp=8))  # written with fsdp=4
    m = uvit_jax.load(saved8["workdir"], mesh=mesh)
    fc1 = m.params["in_blocks"][0]["mlp"]["fc1"]["kernel"][...]
    assert fc1.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
    assert fc1.sharding.mesh.shape["fsdp"] == 8
    for k, v in flat(m.params).items():
        np.testing.assert_array_equal(v, saved8["ema"][k], err_msg=k)
    x = uvit_jax.sample(m, labels=LABELS, seed=SEED)
    assert relative_error(np.asarray(x), saved8["samples"]) < 1e-5


@pytest.mark.integration
def test_step_folder_overrides_and_model(saved8):
    m = uvit_jax.load(saved8["workdir"] / "checkpoints" / str(STEP))
    assert m.step == STEP and m.path.endswith(f"checkpoints/{STEP}") and "step=3" in repr(m)
    # The merged module is the same function as the sampler's.
    x, t, y = jnp.zeros((2, 28, 28, 1)), jnp.array([10.0, 500.0]), jnp.array([1, 2])
    eps = m.model(x, t, y=y)
    assert eps.shape == (2, 28, 28, 1) and bool(jnp.all(jnp.isfinite(eps)))

    # cfg_scale=0 is unguided although the saved config guides on the "linear" schedule.
    assert m.config.sample.cfg_schedule == "linear"
    unguided = uvit_jax.sample(m, labels=LABELS[:4], seed=SEED, cfg_scale=0, steps=3)
    want = sample_images(
        m.graphdef,
        m.params,
        _with(m.config, cfg_scale=0.0, steps=3, cfg_schedule="constant"),
        jax.random.fold_in(jax.random.key(SEED), 0),
        labels=jnp.asarray(LABELS[:4]),
    )
    np.testing.assert_array_equal(np.asarray(unguided), np.clip(np.asarray(want), -1, 1))
    # An interval holding no step's noise level: guidance never applies.
    outside = uvit_jax.sample(m, labels=LABELS[:4], seed=SEED, steps=3, cfg_interval=(1e8, 1e9))
    np.testing.assert_allclose(np.asarray(outside), np.asarray(unguided), atol=1e-6)
    saved = small_config().sample
    assert (m.config.sample.cfg_scale, m.config.sample.steps) == (saved.cfg_scale, 5), "changed"
    with pytest.raises(ValueError, match="inconsistent batch sizes"):
        uvit_jax.sample(m, labels=[1, 2], num=3)


def _with(config, **sample):
    c = config.copy_and_resolve_references()
    c.sample.update(sample)
    return c


@pytest.mark.integration
def test_plain_errors(saved8, tmp_path):
    with pytest.raises(uvit_jax.CheckpointError, match="does not exist"):
        uvit_jax.load(tmp_path / "nowhere")
    (tmp_path / "nnet_ema.pth").write_bytes(b"")
    with pytest.raises(uvit_jax.CheckpointError, match="is a file; .* --mode convert"):
        uvit_jax.load(tmp_path / "nnet_ema.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(uvit_jax.CheckpointError, match="no checkpoint in .*empty"):
        uvit_jax.load(tmp_path / "empty")
    with pytest.raises(uvit_jax.CheckpointError, match=r"no checkpoint at step 5; .* steps \[3\]"):
        uvit_jax.load(saved8["workdir"], step=5)

    newer = tmp_path / "newer"
    shutil.copytree(saved8["workdir"], newer)
    record_file = newer / "checkpoints" / str(STEP) / "config" / "metadata"
    record = json.loads(record_file.read_text())
    record["format_version"] = checkpoints.FORMAT_VERSION + 1
    record_file.write_text(json.dumps(record))
    with pytest.raises(uvit_jax.CheckpointError, match="format version 2; .*upgrade uvit_jax"):
        uvit_jax.load(newer)

    # An EMA-only checkpoint, as --mode convert writes.
    config = fsdp_config()
    manager = checkpoints.open_manager(tmp_path / "ema_only")
    m = uvit_jax.load(saved8["workdir"])
    checkpoints.save(manager, 0, ema=m.params, config=config)
    manager.wait_until_finished()
    manager.close()
    assert uvit_jax.load(tmp_path / "ema_only").step == 0
    with pytest.raises(uvit_jax.CheckpointError, match="no `state` item.* ema=True"):
        uvit_jax.load(tmp_path / "ema_only", ema=False)


@pytest.mark.integration
def test_converted_official_checkpoint(golden_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="writing an official .pth needs PyTorch")
    from uvit_jax import jobs
    from uvit_jax.config_defaults import default_config

    d = np.load(golden_dir / "uvit_class_cond.npz")
    sd = {k.removeprefix("param/"): torch.from_numpy(d[k]) for k in d.files if k[:6] == "param/"}
    torch.save(sd, tmp_path / "nnet_ema.pth")
    official = json.loads(str(d["config"]))
    config = default_config()
    config.model.update({k: v for k, v in official.items() if k in config.model}, dtype="float32")
    config.convert.source = str(tmp_path / "nnet_ema.pth")
    jobs.run("convert", config, str(tmp_path / "w"))

    m = uvit_jax.load(tmp_path / "w")
    assert m.step == 0 and m.config.model.embed_dim == official["embed_dim"]
    nhwc = (0, 2, 3, 1)
    out = m.model(jnp.asarray(d["x"].transpose(nhwc)), jnp.asarray(d["t"]), y=jnp.asarray(d["y"]))
    assert relative_error(np.asarray(out), d["out"].transpose(nhwc)) < 1e-5
    with pytest.raises(uvit_jax.CheckpointError, match="no `state` item"):
        uvit_jax.load(tmp_path / "w", ema=False)


def test_decode_latents_with_the_configs_autoencoder(golden_dir):
    path = golden_dir / "autoencoder_kl_ldm.npz"
    d = np.load(path)
    official = json.loads(str(d["config"]))
    config = small_config()
    config.autoencoder = ml_collections.ConfigDict(
        dict(
            kind="kl_f8",
            pretrained_path=str(path),
            scale_factor=official["scale_factor"],
            dtype="float32",
            ddconfig=official["ddconfig"],
            embed_dim=official["embed_dim"],
        )
    )
    nhwc = (0, 2, 3, 1)
    images = uvit_jax.decode(config, d["z"].transpose(nhwc))
    assert relative_error(np.asarray(images), d["decoded"].transpose(nhwc)) < 1e-5

    z = np.linspace(-2, 2, 2 * 4 * 4).reshape(2, 4, 4, 1).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(uvit_jax.decode(small_config(), z)), z)


def test_grid():
    x = np.stack([np.full((4, 5, 1), -1.0), np.full((4, 5, 1), 1.0), np.zeros((4, 5, 1))])
    g = uvit_jax.grid(x, ncol=2, pad=1)
    assert g.shape == (2 * 5 + 1, 2 * 6 + 1, 3) and g.dtype == np.uint8
    assert (g[1:5, 1:6] == 0).all() and (g[1:5, 7:12] == 255).all()
    assert (g[6:10, 1:6] == 128).all() and (g[6:10, 7:12] == 255).all()  # padding cell is white
    with pytest.raises(ValueError, match=r"\[N, H, W, C\] with C = 1 or 3, got shape \(4, 5\)"):
        uvit_jax.grid(np.zeros((4, 5)))
