"""The latent scale, `config.autoencoder.scale_factor`: a number, or "auto", one over the
standard deviation of the latents measured on the extracted dataset.

Latent models train on z = scale * (mean + std * noise) drawn from the autoencoder's moments
(`models.autoencoder.sample_latent`); the scale brings z to about unit variance, which the noise
schedules assume. It is one over the latents' std: 0.18215 for Stable Diffusion's autoencoder
on ImageNet, 0.2301 on MS-COCO (U-ViT's configs keep these numbers). `--mode extract` measures
the std of the dataset it writes (`measure`; `latent_stats.json` beside the records), and
"auto" uses it (`resolve`): the train job resolves it once and saves the number in the config
of every checkpoint, so sampling, evaluation and `uvit_jax.load` use exactly the number
training used, whether the dataset is still there or not.

What is measured: the std of the latents as training draws them, over the data and the noise.
By the law of total variance, Var(z / scale) = Var(mean) + E[exp(logvar)] (logvar clipped as
`sample_latent` clips it), over every value of every record (positions, channels, flips). It is
computed from the moments in float64, with no noise drawn: the exact expectation that a std of
sampled latents (Stable Diffusion's and EDM2's way) estimates, and the same on every rerun.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
from typing import Any

import numpy as np

from input_pipeline.latent_stats import AUTO_SCALE as AUTO
from input_pipeline.latent_stats import LATENT_STATS_FILE
from uvit_jax.errors import ConfigError
from uvit_jax.models.autoencoder import LOGVAR_RANGE

# Records per read while measuring (ImageNet 256's moments: 32 KB each, 32 MB a read).
READ_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class LatentMoments:
    """Statistics of the latents drawn from posterior moments, merged batch by batch.

    count: latent values seen; mean: the mean of their posterior means; m2: the sum of the
    squared deviations of the posterior means from `mean`; var_sum: the sum of the posterior
    variances exp(logvar).
    """

    count: int = 0
    mean: float = 0.0
    m2: float = 0.0
    var_sum: float = 0.0

    @classmethod
    def of(cls, moments: np.ndarray) -> LatentMoments:
        """Of moments [..., 2C]: mean then logvar on the last axis, any float dtype."""
        mean, logvar = np.split(np.asarray(moments, np.float64), 2, axis=-1)
        if not mean.size:
            return cls()
        mu = float(mean.mean())
        var = np.exp(np.clip(logvar, *LOGVAR_RANGE))
        return cls(int(mean.size), mu, float(np.sum((mean - mu) ** 2)), float(var.sum()))

    def merge(self, other: LatentMoments) -> LatentMoments:
        """The statistics of both batches (Chan et al.'s pairwise update: no cancellation)."""
        n = self.count + other.count
        if not n:
            return self
        delta = other.mean - self.mean
        return LatentMoments(
            n,
            self.mean + delta * other.count / n,
            self.m2 + other.m2 + delta**2 * self.count * other.count / n,
            self.var_sum + other.var_sum,
        )

    @property
    def std(self) -> float:
        """sqrt(Var(mean) + E[exp(logvar)]): the std of z / scale over the data and the noise."""
        return math.sqrt((self.m2 + self.var_sum) / self.count)


def measure(directory: str | os.PathLike, split: str | None = None) -> dict[str, Any]:
    """The latents' statistics of the extracted latent dataset in `directory`, read back record
    by record as training reads them (float16 storage included): what `latent_stats.json`
    holds, "std" and its inverse "scale_factor" first."""
    from input_pipeline import latent_dataset  # loads TFDS: only where a dataset is read

    dataset = latent_dataset.open_dataset(directory, split)
    if not dataset.num_records:
        raise ConfigError(f"dataset {directory} holds no records: no latents to measure")
    reader = latent_dataset.RecordReader(dataset)
    total = LatentMoments()
    for start in range(0, dataset.num_records, READ_BATCH):
        ids = np.arange(start, min(start + READ_BATCH, dataset.num_records))
        total = total.merge(LatentMoments.of(reader.read(ids)["x"]))
    return dict(
        std=total.std,
        scale_factor=1.0 / total.std,
        mean=total.mean,
        variance_of_means=total.m2 / total.count,
        mean_posterior_variance=total.var_sum / total.count,
        num_values=total.count,
        num_records=dataset.num_records,
        measured="std of z = mean + exp(logvar / 2) * noise over the records and the noise: "
        "sqrt(Var(mean) + E[exp(logvar)])",
    )


def is_auto(config: Any) -> bool:
    """Whether `config.autoencoder.scale_factor` asks for the dataset's measured scale."""
    return config.autoencoder.scale_factor == AUTO


def number(value: float | str) -> float:
    """A scale factor a model applies, as a float; an "auto" that no dataset resolved is
    refused (the train job resolves it and saves the number with its checkpoints)."""
    if value == AUTO:
        raise ConfigError(
            "config.autoencoder.scale_factor='auto' has no number here: it is 1 / the latents' "
            "std measured on the extracted dataset, which --mode train reads (and saves with "
            "its checkpoints); give the number"
        )
    return float(value)


def with_scale(config: Any, value: float) -> Any:
    """A copy of `config` whose `autoencoder.scale_factor` is `value`."""
    out = copy.deepcopy(config)
    with out.autoencoder.ignore_type():  # a field that held "auto" takes the number
        out.autoencoder.scale_factor = value
    return out


def resolve(config: Any, data_dir: str | os.PathLike) -> Any:
    """`config` with "auto" replaced by 1 / the latent std measured on the dataset in
    `data_dir` (a copy); a config with a number is returned as it is.

    Raises:
      DatasetMismatchError: the dataset was extracted for another (numeric) scale, or does not
        fit the config otherwise.
      ConfigError: the dataset has no measured std (one line naming the field, the dataset
        and the fix: `--mode extract` measures it).
    """
    if not is_auto(config):
        return config
    from input_pipeline import latent_dataset  # loads TFDS: only where a dataset is read

    dataset = latent_dataset.open_dataset(data_dir, config.data.split)
    latent_dataset.check_compatible(dataset, config)
    stats = latent_dataset.read_latent_stats(data_dir)
    if stats is None:
        raise ConfigError(
            f"config.autoencoder.scale_factor='auto' needs the latents' std measured on the "
            f"dataset, and {data_dir} has none ({LATENT_STATS_FILE} is missing): "
            "run `main.py --mode extract` with this config to measure it"
        )
    scale = 1.0 / stats["std"]
    logging.info(
        "config.autoencoder.scale_factor='auto': %r (1 / the latents' std %.6g in %s)",
        scale,
        stats["std"],
        data_dir,
    )
    return with_scale(config, scale)


def check(config: Any) -> None:
    """Refuses "auto" for pixel models: they have no latents to measure."""
    if is_auto(config) and config.autoencoder.kind == "identity":
        raise ConfigError(
            "config.autoencoder.scale_factor='auto' needs a latent autoencoder "
            "(autoencoder.kind='kl_f8'); pixel models (kind='identity') use a number (1.0)"
        )
