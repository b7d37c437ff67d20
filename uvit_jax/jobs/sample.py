"""`python main.py --mode sample --workdir W`: images from a checkpoint's EMA weights (or the
post-hoc EMA of `--config.sample.ema_std=<std>`, made by `--mode posthoc_ema`).

Writes `W/samples/sample_step<step>_seed<seed>_<digest>.png` (a grid) and `.npz` (`arr_0`:
uint8 [N, H, W, C], `labels`, `settings`), sharded over every device and host. The command
line's `config.sample` section wins over the checkpoint's saved one, field by field. `settings`
is a JSON string of everything that decides the images (every `config.sample` field as used,
the seed, the checkpoint step, EMA or raw weights, autoguidance's guide checkpoint and step);
`<digest>` is the first 8 hex digits of its
SHA-256, so runs with other settings write other files and a rerun of the same overwrites its
own. Text-to-image models draw from
`config.sample.prompts` (or the dataset's captions, see `uvit_jax/sampling/prompts.py`); the
captions go to the `.npz` (`captions`) and a `.txt` beside the grid, one line per image in grid
order.
Batch i is drawn with `fold_in(key(config.seed), i)`: the same images on any device count, and
batch 0 equals `uvit_jax.sample(uvit_jax.load(W), seed=config.seed)` for the same labels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from uvit_jax import images
from uvit_jax.api import load, load_guide
from uvit_jax.api import sample as draw
from uvit_jax.conditioning import Conditioning
from uvit_jax.parallel.mesh import batch_size_per_shard, make_mesh
from uvit_jax.sampling.prompts import text_conditions


def sample_settings(run_config, loaded, seed: int, guide=None) -> dict[str, Any]:
    """Everything that decides `--mode sample`'s images: every `config.sample` field as used
    (sampler, steps, grid, guidance, guide_checkpoint, thresholding, denoise_to_zero,
    num_samples, batch_size, prompts, ...), the seed, the class labels' rule, the checkpoint
    step and which weights (`ema`, and `ema_std` for a post-hoc EMA: the classic EMA's settings
    are as before it); with an autoguidance `guide` (a `Loaded`), its folder and step."""
    sample = json.loads(json.dumps(run_config.sample.to_dict(), default=list))
    sample.pop("ema_std", None)  # which weights: below
    conditioning = Conditioning.from_config(run_config)
    labels = conditioning.kind  # "none", "text" (captions: prompts or the dataset's)
    if labels == "class":
        labels = f"sample j: class j mod {conditioning.num_classes}"
    settings = dict(sample=sample, seed=seed, labels=labels, step=int(loaded.step), ema=loaded.ema)
    if loaded.ema_std:
        settings["ema_std"] = loaded.ema_std
    if guide is not None:  # "W" alone names the newest step, which moves as W trains
        settings["guide"] = dict(path=guide.path, step=int(guide.step))
    return settings


def settings_digest(settings: dict[str, Any]) -> str:
    """8 hex digits of the settings' SHA-256: the file name part that tells runs apart."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]


def sample_job(config, workdir: str) -> str:
    """Samples `config.sample.num_samples` images (from the post-hoc EMA of
    `config.sample.ema_std` where set); returns the `.npz` path."""
    mesh = make_mesh(config.mesh)
    loaded = load(workdir, mesh=mesh, ema_std=float(config.sample.get("ema_std", 0.0)))
    # The command line's sample settings win, every field (as --mode eval's do).
    run_config = loaded.config.copy_and_resolve_references()
    run_config.update(sample=config.sample)
    loaded = dataclasses.replace(loaded, config=run_config)
    guide = load_guide(loaded)  # autoguidance's weaker model, read once
    n, batch = int(config.sample.num_samples), int(config.sample.batch_size)
    batch_size_per_shard(mesh, batch, field="config.sample.batch_size")
    conditioning = Conditioning.from_config(loaded.config)
    labels = conditioning.labels(n)
    text = text_conditions(config, n, workdir) if conditioning.kind == "text" else None
    settings = sample_settings(run_config, loaded, int(config.seed), guide)
    n_batches = -(-n // batch)
    out, start = [], time.perf_counter()
    for i in range(n_batches):
        # The last batch is filled up to the compiled size, then cut.
        y, conditions = None, {}
        if labels is not None:
            y = np.resize(labels[i * batch : (i + 1) * batch], batch)
        if text is not None:
            rows = np.resize(np.arange(i * batch, min((i + 1) * batch, n)), batch)
            conditions = dict(contexts=text.contexts[rows], null_context=text.null_context)
        x = draw(loaded, labels=y, num=batch, seed=config.seed, batch=i, guide=guide, **conditions)
        out.append(images.to_uint8(multihost_utils.process_allgather(x, tiled=True)))
        rate = (i + 1) / (time.perf_counter() - start)
        logging.info("sample: batch %d/%d, %.2f batches/s, ETA %.0f s", i + 1, n_batches, rate,
                     (n_batches - i - 1) / rate)  # fmt: skip
    pixels = np.concatenate(out)[:n]
    digest = settings_digest(settings)
    name = f"sample_step{loaded.step}_seed{config.seed}_{digest}"
    stem = os.path.join(workdir, "samples", name)
    if jax.process_index() == 0:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        extra = {} if labels is None else {"labels": labels}
        if text is not None:
            extra["captions"] = np.asarray(text.captions)
            with open(stem + ".txt", "w") as f:
                f.writelines(c.replace("\n", " ") + "\n" for c in text.captions)
        extra["settings"] = np.asarray(json.dumps(settings, sort_keys=True))
        np.savez(stem + ".npz", arr_0=pixels, **extra)
        ncol = None if labels is None else int(labels.max()) + 1
        images.save_png(stem + ".png", images.make_grid(pixels, ncol=ncol))
    logging.info("sample: wrote %s.npz and .png (%d images)", stem, n)
    return stem + ".npz"
