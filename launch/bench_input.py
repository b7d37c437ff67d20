"""Input-pipeline benchmark: ImageNet-256-shaped examples/s through the training pipeline.

Writes a synthetic latent dataset (moments float32 [32, 32, 8] + label, with flip copies, in the
extraction's format) unless one exists, then times `make_train_iterator` from one process:
shuffled, per-example flip choice, batched reads, decode to float32, for each worker count.
With `--captions K`, an MS-COCO-shaped text dataset instead: no labels, K CLIP contexts
[77, 768] per image (in `--context_dtype`), one drawn per example (a second batched read).

  python launch/bench_input.py --examples 10000 --batch 256 --workers 0,2
  python launch/bench_input.py --examples 2000 --captions 5 --context_dtype float16
"""

from __future__ import annotations

import os
import pathlib
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.fspath(pathlib.Path(__file__).resolve().parents[1]))

from input_pipeline import latent_dataset, train_input  # noqa: E402
from uvit_jax.config_defaults import default_config  # noqa: E402

_EXAMPLES = flags.DEFINE_integer("examples", 10_000, "source examples (2 records each)")
_BATCH = flags.DEFINE_integer("batch", 256, "batch size (one process)")
_STEPS = flags.DEFINE_integer("steps", 60, "timed batches per worker count")
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "grain worker counts to time")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "moments on disk")
_DIR = flags.DEFINE_string("dir", "", "dataset directory (default: a temp dir, kept)")
_CAPTIONS = flags.DEFINE_integer("captions", 0, "text contexts per image (0: class labels)")
_CONTEXT_DTYPE = flags.DEFINE_enum(
    "context_dtype", "float32", ["float32", "float16"], "contexts on disk"
)
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


def main(argv):
    del argv
    directory = _DIR.value or os.path.join(tempfile.gettempdir(), "uvit_bench_input")
    if not latent_dataset.is_finalized(directory):
        t = time.perf_counter()
        _write_synthetic(
            directory, _EXAMPLES.value, _DTYPE.value, _CAPTIONS.value, _CONTEXT_DTYPE.value
        )
        print(f"wrote {directory} ({_EXAMPLES.value} examples) in {time.perf_counter() - t:.1f}s")
    config = default_config()
    config.model.update(img_size=32, in_chans=4)
    if _CAPTIONS.value:
        config.model.update(kind="uvit_t2i", clip_dim=CONTEXT_SHAPE[1])
    config.autoencoder.update(kind="kl_f8", scale_factor=0.18215)
    config.data.update(latent_dir=directory, split="train", prefetch=2)
    config.train.batch_size = _BATCH.value
    for workers in (int(w) for w in _WORKERS.value):
        config.data.num_workers = workers
        it = train_input.make_train_iterator(config, seed=0, process_index=0, process_count=1)
        for _ in range(5):  # start-up: worker processes, first reads
            next(it)
        t = time.perf_counter()
        for _ in range(_STEPS.value):
            batch = next(it)
        dt = time.perf_counter() - t
        rate = _STEPS.value * _BATCH.value / dt
        extra = f"context {batch['context'].shape}" if _CAPTIONS.value else "label"
        print(
            f"workers={workers}: {rate:,.0f} examples/s ({batch['x'].shape} float32 + {extra}, "
            f"batch {_BATCH.value}, {_STEPS.value} batches in {dt:.2f}s)",
            flush=True,
        )
        del it


if __name__ == "__main__":
    app.run(main)
