"""The extraction job: crash-resume without duplicates or gaps, and real Fashion-MNIST through a
(randomly initialised, test-size) KL autoencoder end to end."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from input_pipeline import extract, latent_dataset, preprocess, sources, train_input
from uvit_jax.config_defaults import default_config

REPO = pathlib.Path(__file__).resolve().parents[1]
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")

pytestmark = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(),
    reason=f"{FMNIST} absent (apt-get install dataset-fashion-mnist)",
)


def _pixel_config(latent_dir, max_examples):
    """The embedded default's data settings (Fashion-MNIST padded to 32, pixel space)."""
    c = default_config()
    c.model.update(img_size=32, in_chans=1)
    c.data.update(
        source="fashion_mnist_files",
        source_dir=str(FMNIST),
        split="train",
        resolution=32,
        preprocess="pad",
        latent_dir=str(latent_dir),
        num_workers=0,
    )
    c.data.max_examples = max_examples
    return c


def _all_records(path):
    ds = latent_dataset.open_dataset(path)
    return latent_dataset.RecordReader(ds).read(np.arange(ds.num_records))


# A child process that extracts slowly (so that it can be killed mid-way).
_CHILD = textwrap.dedent("""
    import sys, time
    sys.path[:0] = [{repo!r}, {repo!r} + "/tests"]  # by file: other packages ship a `tests`
    from input_pipeline import extract, sources
    from test_extract import _pixel_config

    class Slow(sources.FashionMnistFilesSource):
        def arrays(self, indices):  # the extraction reads a shard's arrays at once
            time.sleep(0.002 * len(indices))
            return super().arrays(indices)

    config = _pixel_config({out!r}, 1200)
    src = Slow(config.data.source_dir, "train")  # cut to 1200 by config.data.max_examples
    extract.run_extraction(config, source=src, shard_size=100, process_index=0, process_count=1)
""")


@pytest.mark.integration
def test_sigkill_mid_extraction_then_resume_is_complete_without_duplicates(tmp_path):
    out = tmp_path / "pixels"
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD.format(repo=str(REPO), out=str(out))],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    markers = out / latent_dataset.EXTRACTION_DIR
    deadline = time.time() + 120
    while len(list(markers.glob("shard-*.json"))) < 3:
        assert child.poll() is None, child.stdout.read().decode()[-3000:]
        assert time.time() < deadline, "the child wrote no shards in 120 s"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    done_before = set(latent_dataset.completed_shards(out))
    assert 3 <= len(done_before) < 12 and not latent_dataset.is_finalized(out)
    with pytest.raises(FileNotFoundError, match="unfinished extraction"):
        latent_dataset.open_dataset(out)
    mtimes = {
        s: latent_dataset.shard_path(out, _spec(out), s).stat().st_mtime_ns for s in done_before
    }

    config = _pixel_config(out, 1200)
    extract.run_extraction(config, shard_size=100, process_index=0, process_count=1)
    ds = latent_dataset.open_dataset(out)
    assert ds.num_examples == 1200 and len(ds.shard_paths) == 12
    # Shards finished before the kill were kept, not rewritten; no temporary files remain.
    assert mtimes == {
        s: latent_dataset.shard_path(out, _spec(out), s).stat().st_mtime_ns for s in done_before
    }
    assert not list(out.glob("*.tmp*"))
    rec = _all_records(out)
    pairs = sorted(zip(rec["index"].tolist(), rec["flip"].tolist(), strict=True))
    assert pairs == [(i, f) for i in range(1200) for f in (0, 1)]  # no duplicates, no gaps
    # Records hold the padded images exactly (uint8 on disk, [-1, 1] when read).
    src = sources.FashionMnistFilesSource(FMNIST, "train")
    for r in (0, 1, 777 * 2 + 1):
        img = np.pad(src.images[rec["index"][r]], 2)[..., None]
        img = preprocess.flip(img) if rec["flip"][r] else img
        np.testing.assert_array_equal(rec["x"][r], preprocess.to_model_range(img))
        assert rec["label"][r] == src.labels[rec["index"][r]]


def _spec(out):
    return latent_dataset.DatasetSpec.from_json(
        json.loads((out / latent_dataset.EXTRACTION_DIR / "plan.json").read_text())
    )


def test_failure_mid_shard_then_resume(tmp_path):
    """An exception inside shard 2 (after 2 complete shards): the rerun completes them all."""
    out = tmp_path / "pixels"
    config = _pixel_config(out, 500)

    class Failing(sources.FashionMnistFilesSource):
        def arrays(self, indices):  # the extraction reads a shard's arrays at once
            if 250 in indices:
                raise RuntimeError("injected crash")
            return super().arrays(indices)

    with pytest.raises(RuntimeError, match="injected crash"):
        extract.run_extraction(
            config,
            source=Failing(FMNIST, "train"),
            shard_size=100,
            process_index=0,
            process_count=1,
        )
    assert set(latent_dataset.completed_shards(out)) == {0, 1}
    extract.run_extraction(config, shard_size=100, process_index=0, process_count=1)
    rec = _all_records(out)
    assert sorted(rec["index"][rec["flip"] == 0].tolist()) == list(range(500))
    assert sorted(rec["index"][rec["flip"] == 1].tolist()) == list(range(500))

    # Resuming with another plan (shard size) is refused instead of mixing shards.
    other = tmp_path / "other"
    extract.run_extraction(
        _pixel_config(other, 300), shard_size=100, process_index=0, process_count=2
    )
    with pytest.raises(latent_dataset.DatasetMismatchError, match="'shard_size': \\(100, 50\\)"):
        extract.run_extraction(
            _pixel_config(other, 300), shard_size=50, process_index=1, process_count=2
        )


def test_batched_read_writes_the_per_image_bytes_and_logs_stage_rates(tmp_path, caplog):
    """Fashion-MNIST read as arrays (one slice per shard, preprocessed at once) gives the same
    shard files, byte for byte, as the per-image PIL path; records are canonical tf.Examples;
    the progress line gives each stage's rate."""
    from array_record.python import array_record_data_source
    from tensorflow_datasets.proto import tf_example_pb2

    class PerImage(sources.FashionMnistFilesSource):
        arrays = None  # no batched form: image by image, as any other source

    caplog.set_level("INFO", logger="absl")
    paths = {}
    for name, src in (("batched", None), ("per_image", PerImage(FMNIST, "train"))):
        out = extract.run_extraction(
            _pixel_config(tmp_path / name, 300), source=src, shard_size=128,
            process_index=0, process_count=1,
        )  # fmt: skip
        paths[name] = latent_dataset.open_dataset(out).shard_paths
    for a, b in zip(*paths.values(), strict=True):
        assert pathlib.Path(a).read_bytes() == pathlib.Path(b).read_bytes()
    raw = array_record_data_source.ArrayRecordDataSource(list(paths["batched"]))
    for r in (0, 1, 599):
        proto = tf_example_pb2.Example.FromString(raw[r])
        assert raw[r] == proto.SerializeToString(deterministic=True)
    lines = [m for m in caplog.messages if m.startswith("shard 2 (3/3")]
    assert len(lines) == 2 and all(
        re.search(r"stages: read \S+/s, encode \S+/s, write \S+/s$", m) for m in lines
    )


def kl_fmnist_config(tmp_path):
    """Real Fashion-MNIST test images through a 2-channel KL autoencoder (latents 16 x 16 x 2)."""
    c = default_config()
    c.model.update(img_size=16, in_chans=2)
    c.autoencoder.update(kind="kl_f8", scale_factor=0.3)
    c.data.update(
        source="fashion_mnist_files",
        source_dir=str(FMNIST),
        split="test",
        resolution=32,
        preprocess="pad",
        latent_dir=str(tmp_path / "latents"),
    )
    return c


def test_fashion_mnist_through_a_tiny_kl_autoencoder(tmp_path):
    """300 real images -> random test-size KL autoencoder -> dataset -> training batches."""
    from uvit_jax.latent_codec import JittedAutoencoder
    from uvit_jax.models import autoencoder as ae

    ddconfig = ae.DDConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, resolution=32)
    # Random weights filled in from numpy: the model's own eager random init compiles one XLA
    # program per parameter shape (~20 s on 2 CPU cores).
    abstract = ae.abstract_autoencoder_kl(ddconfig, 2, scale_factor=0.3, dtype=jnp.float32)
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), state)
    encode = JittedAutoencoder(nnx.merge(graphdef, state)).encode_moments_local

    c = kl_fmnist_config(tmp_path)  # latent side 32 / 2, embed_dim 2
    c.data.update(latent_dtype="float16", num_workers=0)
    c.data.max_examples = 300
    c.data.extract_batch_size = 50
    c.train.batch_size = 32
    path = extract.run_extraction(c, encode_fn=encode, shard_size=128)
    ds = latent_dataset.open_dataset(path)
    assert ds.num_examples == 300 and ds.spec.shape == (16, 16, 4)
    assert ds.spec.dtype == "float16" and ds.metadata["source"].endswith("test[:300]")

    it = train_input.make_train_iterator(
        c, seed=0, process_index=0, process_count=1, include_index=True
    )
    batch = next(it)
    assert batch["x"].shape == (32, 16, 16, 4) and batch["x"].dtype == np.float32
    src = sources.FashionMnistFilesSource(FMNIST, "test")
    fn = preprocess.make_preprocessor("pad", 32, channels=3)
    for j in range(4):
        img = fn(sources.load_image(src[int(batch["index"][j])]))
        img = preprocess.flip(img) if batch["flip"][j] else img
        want = encode(preprocess.to_model_range(img[None]))[0]
        # Stored as float16 (relative rounding <= 2^-11); XLA:CPU's convolutions may round a
        # batch of 50 differently from a batch of 1 in the last float32 bits.
        np.testing.assert_allclose(batch["x"][j], want, rtol=1e-3, atol=1e-6)
        assert batch["label"][j] == src.labels[int(batch["index"][j])]


@pytest.mark.slow
@pytest.mark.integration
def test_default_encoder_from_config(tmp_path):
    """The extract job builds `config.autoencoder` (random weights: ~20 s of eager init)."""
    from uvit_jax.jobs.extract import extract_job

    c = kl_fmnist_config(tmp_path)
    c.autoencoder.ddconfig = dict(
        ch=32, ch_mult=[1, 2], num_res_blocks=1, z_channels=2, resolution=32
    )
    c.autoencoder.embed_dim = 2
    c.data.max_examples = 64
    path = extract_job(c, None)
    ds = latent_dataset.open_dataset(path)
    assert ds.num_examples == 64 and ds.spec.shape == (16, 16, 4)
    x = _all_records(path)["x"]
    assert np.isfinite(x).all() and x.std() > 0
