"""Extraction benchmark: our extraction beside its anchors, timed alternately in one process.

Pixels (the embedded default, `configs/fashion_mnist_uvit.py`: 60,000 Fashion-MNIST images,
stored as uint8 with flip copies): `input_pipeline.extract.run_extraction` end to end (source
read, preprocessing, flips, tf.Example records, array_record shards, done-markers, metadata)
against the raw anchor: the same idx files read with numpy, padded and flipped as whole arrays,
and every record's pixels and (label, index, flip) written as raw bytes to array_record shards
of the same size and options: the I/O floor with no record format. The issue's target: within
2x of the anchor (ratio >= 0.5).

Latents: the same images (test split) through a small random-weight KL autoencoder of
`uvit_jax.models.autoencoder` (32 x 32 RGB -> moments 16 x 16 x 4): the extraction against the
autoencoder alone on the same number of images (originals and flips, the extraction's batch
size). A ratio near 1 means the extraction is autoencoder-bound.

Rates are source images per second (each image gives two records); each row's two programs
alternate (A, B, A, B, ...) and the medians are compared, so load from other processes falls on
both; the load average is printed.

  python launch/bench_extract.py                       # pixels, 3 repeats; latents, 2 repeats
  python launch/bench_extract.py --latent_examples 0   # pixels only
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

sys.path.insert(0, os.fspath(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
from absl import logging  # noqa: E402
from array_record.python import array_record_module  # noqa: E402

from configs.fashion_mnist_uvit import get_config  # noqa: E402
from input_pipeline import extract, latent_dataset, sources  # noqa: E402
from uvit_jax.parallel.host import describe_host  # noqa: E402

# Autoencoder of the latent row: uvit_jax's KL architecture at test size, random weights.
LATENT_DDCONFIG = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=2, resolution=32)
LATENT_EMBED_DIM = 2


def _pixel_config(latent_dir: str, max_examples: int):
    config = get_config()
    config.data.latent_dir = latent_dir
    config.data.max_examples = max_examples
    return config


def _fresh_dir(root: str) -> str:
    return tempfile.mkdtemp(dir=root)


def ours(config) -> float:
    """Seconds of one extraction of `config` into its (empty) `config.data.latent_dir`."""
    t = time.perf_counter()
    extract.run_extraction(config)
    return time.perf_counter() - t


def anchor(config, out_dir: str, shard_size: int = extract.DEFAULT_SHARD_SIZE) -> float:
    """Seconds of the raw anchor for `config`'s pixel dataset (see the module docstring)."""
    t = time.perf_counter()
    d = config.data
    prefix = {"train": "train", "test": "t10k"}[d.split]
    images = sources.read_idx(f"{d.source_dir}/{prefix}-images-idx3-ubyte.gz", 2051)
    labels = sources.read_idx(f"{d.source_dir}/{prefix}-labels-idx1-ubyte.gz", 2049)
    n = min(len(images), d.max_examples or len(images))
    h, w = images.shape[1:]
    top, left = (d.resolution - h) // 2, (d.resolution - w) // 2
    pad = ((0, 0), (top, d.resolution - h - top), (left, d.resolution - w - left))
    for s, start in enumerate(range(0, n, shard_size)):  # shard by shard: arrays stay in cache
        ids = np.arange(start, min(start + shard_size, n))
        padded = np.pad(images[ids], pad)
        both = np.stack([padded, padded[:, :, ::-1]], axis=1).reshape(2 * len(ids), -1)
        meta = np.stack([labels[ids], ids, np.zeros_like(ids)], axis=1).astype(np.int64)
        meta = np.repeat(meta, 2, axis=0)
        meta[1::2, 2] = 1  # the flip copy
        rows = np.concatenate([both, meta.view(np.uint8)], axis=1)  # pixels + 24 bytes
        path = os.path.join(out_dir, f"anchor-{s:05d}.array_record")
        writer = array_record_module.ArrayRecordWriter(path, latent_dataset.layout.WRITER_OPTIONS)
        for row in rows:
            writer.write(row.tobytes())
        writer.close()
    return time.perf_counter() - t


def alternate(programs: list[Callable[[], float]], repeats: int) -> list[float]:
    """Median seconds of each program, run A, B, A, B, ... `repeats` times each after one
    untimed round (first imports, compilations, page cache)."""
    for program in programs:
        program()
    times: list[list[float]] = [[] for _ in programs]
    for _ in range(repeats):
        for t, program in zip(times, programs, strict=True):
            t.append(program())
    return [statistics.median(t) for t in times]


def bench_pixels(num_examples: int, repeats: int) -> dict[str, float | str]:
    """The pixel row: our extraction of the default's first `num_examples` images vs the raw
    anchor; img/s each."""
    root = tempfile.mkdtemp(prefix="uvit_bench_extract_")
    try:

        def run_ours() -> float:
            return ours(_pixel_config(_fresh_dir(root), num_examples))

        def run_anchor() -> float:
            return anchor(_pixel_config("", num_examples), _fresh_dir(root))

        t_ours, t_anchor = alternate([run_ours, run_anchor], repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "job": f"extraction (fashion-mnist, pixels, {num_examples} images)",
        "ours": num_examples / t_ours,
        "anchor": num_examples / t_anchor,
        "unit": "img/s",
        "ratio": t_anchor / t_ours,
        "note": "anchor: numpy pad+flip + raw array_record writes of the same pixels; "
        "target ratio >= 0.5 (within 2x)",
    }


def _random_autoencoder_encode() -> Callable[[np.ndarray], np.ndarray]:
    """`encode_moments_local` of a KL autoencoder of `LATENT_DDCONFIG` with random weights."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from uvit_jax.latent_codec import JittedAutoencoder
    from uvit_jax.models import autoencoder as ae

    ddconfig = ae.DDConfig(**LATENT_DDCONFIG)
    # Weights from numpy: the model's eager random init compiles one program per shape (~20 s).
    abstract = ae.abstract_autoencoder_kl(
        ddconfig, LATENT_EMBED_DIM, scale_factor=1.0, dtype=jnp.float32
    )
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(rng.normal(0, 0.1, s.shape), s.dtype), state)
    return JittedAutoencoder(nnx.merge(graphdef, state)).encode_moments_local


def _latent_config(latent_dir: str, num_examples: int):
    config = get_config()
    side = LATENT_DDCONFIG["resolution"] // 2 ** (len(LATENT_DDCONFIG["ch_mult"]) - 1)
    config.model.update(img_size=side, in_chans=LATENT_EMBED_DIM)
    config.autoencoder.update(kind="kl_f8", scale_factor=1.0)
    config.data.update(
        split="test",
        resolution=LATENT_DDCONFIG["resolution"],
        latent_dir=latent_dir,
        max_examples=num_examples,
        latent_dtype="float32",
    )
    return config


def bench_latents(num_examples: int, repeats: int) -> dict[str, float | str]:
    """The latent row: extraction through a random KL autoencoder vs the autoencoder alone."""
    encode = _random_autoencoder_encode()
    config = _latent_config("", num_examples)
    batch = int(config.data.get("extract_batch_size", 64))
    images = np.zeros((batch, config.data.resolution, config.data.resolution, 3), np.float32)
    root = tempfile.mkdtemp(prefix="uvit_bench_extract_")

    def run_ours() -> float:
        t = time.perf_counter()
        extract.run_extraction(_latent_config(_fresh_dir(root), num_examples), encode_fn=encode)
        return time.perf_counter() - t

    def run_autoencoder() -> float:
        t = time.perf_counter()
        for _ in range(-(-2 * num_examples // batch)):  # originals and flips, whole batches
            encode(images)
        return time.perf_counter() - t

    try:
        t_ours, t_ae = alternate([run_ours, run_autoencoder], repeats)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "job": f"extraction (fashion-mnist, random KL autoencoder -> 16x16x4 moments, "
        f"{num_examples} images)",
        "ours": num_examples / t_ours,
        "anchor": num_examples / t_ae,
        "unit": "img/s",
        "ratio": t_ae / t_ours,
        "note": "anchor: the autoencoder alone on the same images and flips; ratio ~1: "
        "autoencoder-bound",
    }


def summary() -> list[dict]:
    """A quick run (< 60 s on 2 cores): the pixel row (all 60k images, 3 repeats) and the
    latent row (256 images, 2 repeats)."""
    return [bench_pixels(60_000, 3), bench_latents(256, 2)]


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        print(
            f"{r['job']}: ours {r['ours']:,.0f} {r['unit']}, anchor {r['anchor']:,.0f} "
            f"{r['unit']}, ratio {r['ratio']:.2f} ({r['note']})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=60_000, help="pixel images (<= 60k)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each program")
    parser.add_argument(
        "--latent_examples", type=int, default=2048, help="latent row images (0: skip the row)"
    )
    parser.add_argument("--verbose", action="store_true", help="the extraction's progress lines")
    args = parser.parse_args()
    logging.set_verbosity(logging.INFO if args.verbose else logging.WARNING)
    print(f"host: {describe_host()}", flush=True)
    rows = [bench_pixels(args.examples, args.repeats)]
    print_rows(rows)
    if args.latent_examples:
        latent = [bench_latents(args.latent_examples, max(2, args.repeats - 1))]
        print_rows(latent)
    print(f"host: {describe_host()}", flush=True)


if __name__ == "__main__":
    main()
