"""The measured latent scale: `--mode extract` measures the std of the latents it writes,
`autoencoder.scale_factor="auto"` trains with 1/std, and the checkpoint keeps that number for
sampling after the dataset is gone; pixel and paper configs keep their numbers."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from runs import FMNIST, REPO, small_config

import uvit_jax
from configs.paper import PAPER
from input_pipeline import latent_dataset
from uvit_jax import jobs, latent_scale
from uvit_jax.errors import ConfigError
from uvit_jax.jobs import train as train_job
from uvit_jax.jobs.extract import extract_job
from uvit_jax.latent_codec import make_autoencoder
from uvit_jax.models.autoencoder import sample_latent

# LDM's tiny test autoencoder (tests/golden): 32 x 32 RGB -> moments 16 x 16 x (4 + 4).
GOLDEN_AE = REPO / "tests" / "golden" / "autoencoder_kl_ldm.npz"
NUM_IMAGES = 16

needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "t10k-images-idx3-ubyte.gz").exists(),
    reason=f"{FMNIST} absent (apt-get install dataset-fashion-mnist)",
)


def latent_config(latent_dir, scale_factor="auto"):
    """The runlocal default on 16 Fashion-MNIST test images through the golden KL autoencoder."""
    official = json.loads(str(np.load(GOLDEN_AE)["config"]))
    c = small_config()
    c.model.update(img_size=16, in_chans=4)
    c.autoencoder.update(
        kind="kl_f8",
        pretrained_path=str(GOLDEN_AE),
        scale_factor=scale_factor,
        dtype="float32",
        ddconfig=official["ddconfig"],
        embed_dim=official["embed_dim"],
    )
    c.data.update(source_dir=str(FMNIST), split="test", resolution=32, latent_dir=str(latent_dir))
    c.data.update(max_examples=NUM_IMAGES, extract_batch_size=NUM_IMAGES)
    return c


@pytest.fixture(scope="module")
def auto_dataset(tmp_path_factory):
    """(config, directory) of a dataset extracted by `--mode extract` with scale "auto"."""
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FMNIST} absent (apt-get install dataset-fashion-mnist)")
    config = latent_config(tmp_path_factory.mktemp("auto") / "latents")
    return config, extract_job(config, None)


def _moments(directory):
    ds = latent_dataset.open_dataset(directory)
    return latent_dataset.RecordReader(ds).read(np.arange(ds.num_records))["x"]


def test_extraction_writes_the_std_of_the_latents_it_writes(auto_dataset):
    config, directory = auto_dataset
    stats = latent_dataset.read_latent_stats(directory)
    x = _moments(directory)  # [2 * 16 records (flips), 16, 16, 8]
    assert x.shape == (2 * NUM_IMAGES, 16, 16, 8)
    assert latent_dataset.open_dataset(directory).spec.scale_factor == "auto"
    assert stats["num_values"] == x.size // 2 and stats["num_records"] == 2 * NUM_IMAGES
    assert stats["scale_factor"] == 1.0 / stats["std"]
    # numpy in float64 on the written moments: Var(mean) + E[exp(logvar)]. Only the summation
    # order differs (batched merges vs numpy's pairwise sums over 8,192 values): ~1e-15.
    mean, logvar = np.split(x.astype(np.float64), 2, axis=-1)
    want = np.sqrt(np.var(mean) + np.mean(np.exp(np.clip(logvar, -30, 20))))
    assert stats["std"] == pytest.approx(want, rel=1e-12)
    # ... which is the std of the latents training draws (its own sample_latent, scale 1),
    # here over 64 draws of every value (524,288 values: a sampling error near 0.1%).
    keys = jax.random.split(jax.random.key(0), 64)
    drawn = jax.vmap(lambda k: sample_latent(jnp.asarray(x), k, 1.0))(keys)
    assert float(jnp.std(drawn)) == pytest.approx(stats["std"], rel=0.01)


def test_merged_batches_give_the_whole_and_do_not_cancel():
    """Chan's update over uneven batches equals one pass (to float64 rounding), also for
    means far from zero, where E[x^2] - E[x]^2 would lose every digit."""
    rng = np.random.default_rng(0)
    moments = np.concatenate(
        [1e4 + rng.normal(0, 1, (50, 4, 4, 2)), rng.normal(-1, 0.5, (50, 4, 4, 2))], axis=-1
    )
    merged = latent_scale.LatentMoments()
    for lo, hi in ((0, 1), (1, 8), (8, 8), (8, 50)):
        merged = merged.merge(latent_scale.LatentMoments.of(moments[lo:hi]))
    mean, logvar = np.split(moments, 2, axis=-1)
    want = np.sqrt(np.var(mean) + np.mean(np.exp(logvar)))
    assert merged.count == 50 * 32
    assert merged.std == pytest.approx(want, rel=1e-12)
    assert latent_scale.LatentMoments.of(moments).std == pytest.approx(want, rel=1e-12)


def test_auto_resolves_to_one_over_the_measured_std(auto_dataset):
    config, directory = auto_dataset
    std = latent_dataset.read_latent_stats(directory)["std"]
    resolved = latent_scale.resolve(config, directory)
    assert resolved.autoencoder.scale_factor == 1.0 / std
    assert config.autoencoder.scale_factor == "auto"  # the caller's config is left as it was
    ds = latent_dataset.open_dataset(directory)
    latent_dataset.check_compatible(ds, resolved)  # the number a run saved fits its dataset
    with pytest.raises(
        latent_dataset.DatasetMismatchError,
        match=rf"scale factor 'auto' on disk \(1/std = {1.0 / std!r}\), "
        r"config.autoencoder.scale_factor=0.18215$",
    ):
        latent_dataset.check_compatible(ds, latent_config(directory, 0.18215))
    numeric = dataclasses.replace(ds, spec=dataclasses.replace(ds.spec, scale_factor=0.18215))
    with pytest.raises(
        latent_dataset.DatasetMismatchError,
        match=r"scale factor 0.18215 on disk, config.autoencoder.scale_factor='auto'$",
    ):
        latent_dataset.check_compatible(numeric, config)


def test_a_dataset_without_the_measurement_fails_in_one_line_until_extract_runs(
    auto_dataset, tmp_path
):
    config, directory = auto_dataset
    copy = tmp_path / "latents"
    shutil.copytree(directory, copy)
    (copy / "latent_stats.json").unlink()
    c = latent_config(copy)
    with pytest.raises(ConfigError) as e:
        jobs.run("train", c, str(tmp_path / "w"))
    assert str(e.value) == (
        f"config.autoencoder.scale_factor='auto' needs the latents' std measured on the "
        f"dataset, and {copy} has none (latent_stats.json is missing): run `main.py --mode "
        f"extract` with this config to measure it"
    )
    extract_job(c, None)  # the fix: measures the complete dataset, the same numbers again
    assert latent_dataset.read_latent_stats(copy) == latent_dataset.read_latent_stats(directory)


@pytest.mark.integration
def test_the_checkpoint_keeps_the_number_training_used_for_sampling_without_the_dataset(
    auto_dataset, tmp_path, one_device
):
    config, directory = auto_dataset
    data = tmp_path / "latents"
    shutil.copytree(directory, data)
    scale = 1.0 / latent_dataset.read_latent_stats(data)["std"]
    c = latent_config(data)
    c.train.update(num_steps=2, log_every=1, ckpt_every=2)
    train_job.train_job(c, str(tmp_path / "w"))
    shutil.rmtree(data)

    loaded = uvit_jax.load(tmp_path / "w")
    assert loaded.config.autoencoder.scale_factor == scale  # exactly: JSON keeps every bit
    z = uvit_jax.sample(loaded, labels=[0, 1], seed=3, decode=False)
    images = uvit_jax.sample(loaded, labels=[0, 1], seed=3)
    ae = loaded.config.autoencoder.to_dict()
    want = np.clip(make_autoencoder(dict(ae, scale_factor=scale)).decode(z), -1, 1)
    np.testing.assert_allclose(np.asarray(images), want, rtol=1e-5, atol=1e-5)
    other = np.clip(make_autoencoder(dict(ae, scale_factor=0.18215)).decode(z), -1, 1)
    assert np.abs(np.asarray(images) - other).max() > 1e-2


@needs_fmnist
def test_pixel_configs_are_unaffected(tmp_path):
    c = small_config()
    c.data.update(latent_dir=str(tmp_path / "pixels"), max_examples=8)
    directory = extract_job(c, None)
    assert not (tmp_path / "pixels" / "latent_stats.json").exists()
    assert latent_dataset.open_dataset(directory).spec.scale_factor == 1.0
    assert latent_scale.resolve(c, directory) is c
    c.autoencoder.scale_factor = "auto"
    with pytest.raises(ConfigError, match=r"^config.autoencoder.scale_factor='auto' needs a "):
        jobs.check("train", c)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_the_paper_configs_keep_their_numbers(name):
    import importlib

    config = importlib.import_module(f"configs.{name}").get_config("")
    want = {"kl_f8": 0.23010 if name.startswith("mscoco") else 0.18215, "identity": 1.0}
    assert config.autoencoder.scale_factor == want[config.autoencoder.kind]
    assert latent_scale.resolve(config, "/nonexistent") is config  # no dataset is read


def test_auto_from_the_command_line_and_where_no_number_can_be_had(tmp_path):
    def parse(value):  # main.py's --config flag, on its own flag set
        argv = ["main.py", f"--config={REPO}/configs/imagenet256_uvit_huge.py",
                f"--config.autoencoder.scale_factor={value}"]  # fmt: skip
        values = flags.FlagValues()
        config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
        values(argv)
        return values.config

    assert parse("auto").autoencoder.scale_factor == "auto"
    assert parse("0.2301").autoencoder.scale_factor == 0.2301
    with pytest.raises(
        ConfigError,
        match=r"^config.autoencoder.scale_factor='aut': expected a finite number > 0 or 'auto'$",
    ):
        jobs.check("train", parse("aut"))
    config = parse("auto")
    with pytest.raises(ConfigError, match=r"^config.autoencoder.scale_factor='auto' has no num"):
        make_autoencoder(config.autoencoder)
    config.convert.source = str(tmp_path / "official.pth")
    with pytest.raises(ConfigError, match=r"^--mode convert: config.autoencoder.scale_factor="):
        jobs.run("convert", config, str(tmp_path / "w"))
