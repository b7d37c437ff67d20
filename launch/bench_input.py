"""Input-pipeline benchmark: examples/s through the training pipeline, and the default's balance.

ImageNet-256-shaped latents: writes a synthetic latent dataset (moments float32 [32, 32, 8],
i.e. 32x32x4 latents, + label, with flip copies, in the extraction's format) unless one exists,
then times `make_train_iterator` from one process: shuffled, per-example flip choice, batched
reads, decode to float32, for each worker count (the ImageNet configs' `data.num_workers` is 2).
The issue's target: >= 10,000 examples/s per host on 2 cores. With `--captions K`, an
MS-COCO-shaped text dataset instead: no labels, K CLIP contexts [77, 768] per image (in
`--context_dtype`), one drawn per example (a second batched read).

The default (`configs/fashion_mnist_uvit.py`: pixels 28x28x1, batch 16, in-process reads):
extracts Fashion-MNIST (once, to a temp dir), then times its iterator's batches and its train
step alternately (the step of `launch/bench_train.py`, synthetic data), so the rate the input
gives sits beside the rate the step consumes: input-bound when the first is the smaller.

  python launch/bench_input.py --examples 10000 --batch 256 --workers 0,2
  python launch/bench_input.py --examples 2000 --captions 5 --context_dtype float16
  python launch/bench_input.py --workers 2 --default_steps 0    # latents only
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.fspath(pathlib.Path(__file__).resolve().parents[1]))

from input_pipeline import latent_dataset, train_input  # noqa: E402
from uvit_jax.config_defaults import default_config  # noqa: E402
from uvit_jax.parallel.host import describe_host  # noqa: E402

TARGET = 10_000  # latents/s per host on 2 cores (issue 17)
CONTEXT_SHAPE = (77, 768)  # CLIP ViT-L/14


def _write_synthetic(
    directory: str, num_examples: int, dtype: str, captions: int, context_dtype: str
) -> None:
    import numpy as np

    spec = latent_dataset.DatasetSpec(
        shape=(32, 32, 8),
        dtype=dtype,
        autoencoder="kl_f8",
        scale_factor=0.18215,
        source="synthetic",
        split="train",
        num_source_examples=num_examples,
        shard_size=2048,
        num_classes=0 if captions else 1000,
        preprocess="adm_center_crop",
        resolution=256,
        context_shape=CONTEXT_SHAPE if captions else (),
        context_dtype=context_dtype,
    )
    latent_dataset.prepare_directory(directory, spec)
    rng = np.random.default_rng(0)
    for shard in range(spec.num_shards):
        ids = spec.shard_range(shard)
        x = rng.standard_normal((2 * len(ids), *spec.shape), dtype=np.float32)
        records = [
            {"x": x[r], "label": ids[r // 2] % 1000, "index": ids[r // 2], "flip": r % 2}
            for r in range(len(x))
        ]
        contexts = []
        if captions:
            for r, rec in enumerate(records):
                rec.update(label=-1, context_start=captions * (r // 2), num_contexts=captions)
            ctx = rng.standard_normal((captions, *CONTEXT_SHAPE), dtype=np.float32)
            contexts = (
                {"context": ctx[k % captions], "index": i, "caption": f"caption {k}"}
                for i in ids
                for k in range(captions)
            )
        latent_dataset.write_shard(directory, spec, shard, records, contexts=contexts)
    if captions:
        latent_dataset.write_empty_context(directory, np.zeros(CONTEXT_SHAPE, np.float32))
    latent_dataset.finalize(directory, spec)


def latent_config(directory: str, batch: int, workers: int, captions: int = 0):
    """An ImageNet-256 latent config (kl_f8, 32x32x4) reading `directory` (synthetic)."""
    config = default_config()
    config.model.update(img_size=32, in_chans=4)
    if captions:
        config.model.update(kind="uvit_t2i", clip_dim=CONTEXT_SHAPE[1])
    config.autoencoder.update(kind="kl_f8", scale_factor=0.18215)
    config.data.update(latent_dir=directory, split="train", prefetch=2, num_workers=workers)
    config.train.batch_size = batch
    return config


def iterator_rate(config, steps: int) -> tuple[float, dict]:
    """(examples/s of `steps` batches of `config`'s training iterator after 10 start-up batches,
    the last batch)."""
    it = train_input.make_train_iterator(config, seed=0, process_index=0, process_count=1)
    for _ in range(10):  # start-up: worker processes, first reads, filling the prefetch
        next(it)
    t = time.perf_counter()
    for _ in range(steps):
        batch = next(it)
    return steps * config.train.batch_size / (time.perf_counter() - t), batch


def synthetic_dataset(
    directory: str,
    examples: int,
    dtype: str = "float32",
    captions: int = 0,
    context_dtype: str = "float32",
) -> str:
    """`directory`, holding the synthetic latent dataset (written unless finalized)."""
    if not latent_dataset.is_finalized(directory):
        t = time.perf_counter()
        _write_synthetic(directory, examples, dtype, captions, context_dtype)
        print(f"wrote {directory} ({examples} examples) in {time.perf_counter() - t:.1f}s")
    return directory


def default_balance(steps: int, repeats: int) -> dict[str, float]:
    """The default's input rate beside its consumption, timed alternately: {"input": img/s of
    its iterator, "consume": img/s of its train step, "steps_per_s", "batch_ms"} (medians of
    `repeats` rounds of `steps` batches, then `steps` train steps)."""
    import jax

    sys.path.insert(0, os.fspath(pathlib.Path(__file__).resolve().parent))
    import bench_train

    from configs.fashion_mnist_uvit import get_config
    from input_pipeline import extract
    from uvit_jax.parallel.mesh import make_mesh

    config = get_config()
    config.data.latent_dir = os.path.join(tempfile.gettempdir(), "uvit_bench_input_default")
    extract.run_extraction(config)  # once: later runs find it complete
    b = config.train.batch_size
    it = train_input.make_train_iterator(config, seed=0, process_index=0, process_count=1)
    mesh = make_mesh(config.mesh)
    step = bench_train.bench_our_step(
        config, mesh, bench_train.put(bench_train.synthetic_batch(config, b), mesh)
    )
    next(it), jax.block_until_ready(step.run())  # start-up outside the timings
    batch_s, step_s = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(steps):
            next(it)
        batch_s.append((time.perf_counter() - t) / steps)
        t = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(step.run())
        step_s.append((time.perf_counter() - t) / steps)
    batch_med, step_med = statistics.median(batch_s), statistics.median(step_s)
    return {
        "input": b / batch_med,
        "consume": b / step_med,
        "steps_per_s": 1 / step_med,
        "batch_ms": 1e3 * batch_med,
        "batch": b,
    }


def summary() -> list[dict]:
    """A quick run (< 60 s on 2 cores): 32x32x4 latents at batch 256 with the ImageNet configs'
    2 workers against the 10k/s target, and the default's input against its consumption."""
    directory = os.path.join(tempfile.gettempdir(), "uvit_bench_input")
    synthetic_dataset(directory, 10_000)
    workers = int(default_config().data.num_workers)
    rate, _ = iterator_rate(latent_config(directory, 256, workers), 80)
    d = default_balance(steps=20, repeats=3)
    return [
        {
            "job": f"input pipeline (32x32x4 latents, batch 256, {workers} workers)",
            "ours": rate,
            "anchor": TARGET,
            "unit": "examples/s",
            "ratio": rate / TARGET,
            "note": "anchor: the target of 10k latents/s per host on 2 cores",
        },
        {
            "job": f"input pipeline (default: fashion-mnist 28x28x1, batch {d['batch']}, "
            "in-process)",
            "ours": d["input"],
            "anchor": d["consume"],
            "unit": "img/s",
            "ratio": d["input"] / d["consume"],
            "note": f"anchor: what the default's train step consumes ({d['steps_per_s']:.1f} "
            f"steps/s x {d['batch']}); ratio > 1: compute-bound",
        },
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--examples", type=int, default=10_000, help="source examples (2 records each)"
    )
    parser.add_argument("--batch", type=int, default=256, help="batch size (one process)")
    parser.add_argument("--steps", type=int, default=60, help="timed batches per worker count")
    parser.add_argument("--workers", default="0,1,2", help="grain worker counts to time")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "float16"], help="moments on disk"
    )
    parser.add_argument("--dir", default="", help="dataset directory (default: a temp dir, kept)")
    parser.add_argument(
        "--captions", type=int, default=0, help="text contexts per image (0: class labels)"
    )
    parser.add_argument(
        "--context_dtype",
        default="float32",
        choices=["float32", "float16"],
        help="contexts on disk",
    )
    parser.add_argument(
        "--default_steps",
        type=int,
        default=30,
        help="the default's batches and train steps per round (0: skip)",
    )
    args = parser.parse_args()
    print(f"host: {describe_host()}", flush=True)
    directory = args.dir or os.path.join(tempfile.gettempdir(), "uvit_bench_input")
    synthetic_dataset(directory, args.examples, args.dtype, args.captions, args.context_dtype)
    for workers in (int(w) for w in args.workers.split(",")):
        config = latent_config(directory, args.batch, workers, args.captions)
        rate, batch = iterator_rate(config, args.steps)
        extra = f"context {batch['context'].shape}" if args.captions else "label"
        print(
            f"workers={workers}: {rate:,.0f} examples/s ({batch['x'].shape} float32 + {extra}, "
            f"batch {args.batch}, {args.steps} batches; target {TARGET:,})",
            flush=True,
        )
    if args.default_steps:
        d = default_balance(args.default_steps, repeats=3)
        print(
            f"default (fashion-mnist 28x28x1, batch {d['batch']}, in-process): input "
            f"{d['input']:,.0f} img/s ({d['batch_ms']:.2f} ms/batch), consumption "
            f"{d['consume']:,.0f} img/s ({d['steps_per_s']:.1f} steps/s x {d['batch']}): "
            f"{'compute' if d['input'] > d['consume'] else 'input'}-bound, input "
            f"{d['input'] / d['consume']:.1f}x the consumption",
            flush=True,
        )
    print(f"host: {describe_host()}", flush=True)


if __name__ == "__main__":
    main()
