"""`python main.py --mode extract`: the config's dataset, encoded by the config's networks.

The extraction itself (sources, preprocessing, resumable shards, metadata) is the data layer's
`input_pipeline.extract.run_extraction`; this job builds what it runs on every image and
caption: the autoencoder of `config.autoencoder` (latent configs) and the CLIP text encoder of
`config.text_encoder` (text-to-image configs), each jitted on one device of this process.
"""

from __future__ import annotations

from input_pipeline import latent_dataset
from input_pipeline.extract import resolve_latent_dir, run_extraction
from uvit_jax.conditioning import Conditioning
from uvit_jax.latent_codec import autoencoder_from_config
from uvit_jax.text_encoder import text_encoder_from_config


def extract_job(config, workdir: str | None) -> str:
    """Extracts (or finishes) the dataset of `config` in `config.data.latent_dir`, default
    `<workdir>/latent_dataset`; returns its directory."""
    encode_fn = encode_text_fn = None
    # A finished dataset is only checked against the config: no encoder is read for it.
    if not latent_dataset.is_finalized(resolve_latent_dir(config, workdir)):
        if config.autoencoder.kind != "identity":
            encode_fn = autoencoder_from_config(config).encode_moments_local
        if Conditioning.from_config(config).kind == "text":
            encode_text_fn = text_encoder_from_config(config).encode
    return run_extraction(config, workdir, encode_fn, encode_text_fn=encode_text_fn)
