"""`python main.py --mode extract`: the config's dataset, encoded by the config's networks.

The extraction itself (sources, preprocessing, resumable shards, metadata) is the data layer's
`input_pipeline.extract.run_extraction`; this job builds what it runs on every image and
caption: the autoencoder of `config.autoencoder` (latent configs) and the CLIP text encoder of
`config.text_encoder` (text-to-image configs), each jitted on one device of this process.
Then it measures the std of a complete latent dataset's latents (`latent_scale.measure`, once:
`latent_stats.json` beside the records), which `autoencoder.scale_factor="auto"` reads.
"""

from __future__ import annotations

import logging

import jax

from input_pipeline import latent_dataset
from input_pipeline.extract import resolve_latent_dir, run_extraction
from uvit_jax import latent_scale
from uvit_jax.conditioning import Conditioning
from uvit_jax.latent_codec import autoencoder_from_config
from uvit_jax.text_encoder import text_encoder_from_config


def extract_job(config, workdir: str | None) -> str:
    """Extracts (or finishes) the dataset of `config` in `config.data.latent_dir`, default
    `<workdir>/latent_dataset`, and measures its latents' std; returns its directory."""
    encode_fn = encode_text_fn = None
    # A finished dataset is only checked against the config: no encoder is read for it.
    if not latent_dataset.is_finalized(resolve_latent_dir(config, workdir)):
        if config.autoencoder.kind != "identity":
            # Moments do not depend on the scale, which "auto" leaves unknown until measured.
            encoder = (
                latent_scale.with_scale(config, 1.0) if latent_scale.is_auto(config) else config
            )
            encode_fn = autoencoder_from_config(encoder).encode_moments_local
        if Conditioning.from_config(config).kind == "text":
            encode_text_fn = text_encoder_from_config(config).encode
    directory = run_extraction(config, workdir, encode_fn, encode_text_fn=encode_text_fn)
    if config.autoencoder.kind != "identity":
        record_latent_std(directory, config)
    return directory


def record_latent_std(directory: str, config) -> None:
    """Measures the latents' std of the complete dataset in `directory` once, when it has none
    (`latent_stats.json`, written atomically by process 0; the others wait for it)."""
    if jax.process_index() == 0 and latent_dataset.read_latent_stats(directory) is None:
        logging.info("measuring the latents' std of %s", directory)
        stats = latent_scale.measure(directory, config.data.split)
        latent_dataset.write_latent_stats(directory, stats)
        logging.info(
            "latents' std %.6g over %d values: 1/std = %.6g (config.autoencoder.scale_factor=%r)",
            stats["std"],
            stats["num_values"],
            stats["scale_factor"],
            config.autoencoder.scale_factor,
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("uvit_latent_std_measured")
