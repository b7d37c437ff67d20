"""The latent scale as a dataset records it, without TFDS: uvit_jax's model code names "auto"
through this module, and importing the dataset layer (`latent_dataset`) would load TFDS.

A latent dataset records the `config.autoencoder.scale_factor` it was extracted for (a number,
or `AUTO_SCALE`: one over the latents' measured std) in its `DatasetSpec`, and the std that
`--mode extract` measures in `LATENT_STATS_FILE` beside its records (read and written by
`latent_dataset.read_latent_stats` / `write_latent_stats`).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

AUTO_SCALE = "auto"
LATENT_STATS_FILE = "latent_stats.json"


def latent_stats_path(directory: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(directory) / LATENT_STATS_FILE


def declared_scale(value: Any) -> float | str:
    """`config.autoencoder.scale_factor` as a dataset records it: a float, or "auto"."""
    return value if value == AUTO_SCALE else float(value)
