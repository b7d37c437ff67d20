"""`type: sample_grid`: a grid of samples from the EMA weights, drawn the same way each time.

The config's sampler and guidance, `config.sample.num_samples` images from the seed
`config.seed + 1`; class-conditional grids put one class per column, text-to-image grids use
the training dataset's first captions (no text encoder is needed). The grid is written to
`<workdir>/samples/step_<step>.png` and to the dashboards as image `samples`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from uvit_jax import images
from uvit_jax.conditioning import Conditioning
from uvit_jax.evals import TrainContext
from uvit_jax.sampling.generate import sample_images
from uvit_jax.sampling.prompts import TextConditions, dataset_conditions


class SampleGrid:
    """Writes the grid; returns no scalars."""

    def __init__(self, context: TrainContext, section: Any) -> None:
        del section  # the sampler settings are the config's `sample` section
        self._context = context
        self._text: TextConditions | None = None

    def _conditions(self) -> dict[str, Any]:
        """Text-to-image models: the grid's captions (read once, on the first run)."""
        config = self._context.config
        if Conditioning.from_config(config).kind != "text":
            return {}
        if self._text is None:
            n = int(config.sample.num_samples)
            self._text = dataset_conditions(self._context.data_dir, config.data.split, n)
        return dict(contexts=self._text.contexts, null_context=self._text.null_context)

    def run(self, step: int, graphdef: nnx.GraphDef, ema: nnx.State) -> Mapping[str, float]:
        config = self._context.config
        n = int(config.sample.num_samples)
        labels = Conditioning.from_config(config).labels(n)
        key = jax.random.key(config.seed + 1)
        x = sample_images(graphdef, ema, config, key, labels=labels, num=n, **self._conditions())
        x = np.asarray(jax.device_get(x))
        ncol = None if labels is None else int(labels.max()) + 1
        grid = images.make_grid(images.to_uint8(x), ncol=ncol)
        if jax.process_index() == 0:
            path = os.path.join(self._context.workdir, "samples", f"step_{step:08d}.png")
            images.save_png(path, grid)
            self._context.writer.write_images(step, {"samples": grid[None]})
        return {}
