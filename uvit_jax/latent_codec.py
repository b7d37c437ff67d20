"""Images <-> latents: the config's autoencoder at run time, built from `config.autoencoder`, jitted
over a mesh.

    ae = autoencoder_from_config(config, mesh)   # read once per process, then cached
    moments = ae.encode_moments_local(images)    # extraction: numpy rows in and out
    images = ae.decode(z)                        # sampling: global batch-sharded arrays

`config.autoencoder.kind` "identity" (pixel models) gives the `IdentityAutoencoder`, "kl_f8" the
KL-f8 of `uvit_jax.models.autoencoder`, read from `pretrained_path` (an LDM / Stable Diffusion /
diffusers weights file, or a folder converted by `uvit_jax.convert.autoencoder`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvit_jax.convert.autoencoder import load_autoencoder
from uvit_jax.errors import ConfigError, MissingFile
from uvit_jax.latent_scale import number
from uvit_jax.models.autoencoder import (
    SD_EMBED_DIM,
    SD_KL_F8,
    Autoencoder,
    AutoencoderKL,
    DDConfig,
    IdentityAutoencoder,
)
from uvit_jax.parallel.frozen import FrozenNetwork

AUTOENCODER_KINDS = ("identity", "kl_f8")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(name: str, *, field: str = "autoencoder.dtype") -> Any:
    """A dtype name of the config ("float32", "bfloat16", "float16") -> the jnp dtype."""
    if name not in _DTYPES:
        raise ConfigError(f"{field}={name!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def make_autoencoder(
    ae_config: Mapping[str, Any],
    *,
    image_channels: int = 3,
    ddconfig: DDConfig | Mapping[str, Any] | None = None,
    embed_dim: int | None = None,
    seed: int = 0,
) -> Autoencoder:
    """Builds the autoencoder of `config.autoencoder`.

    Args:
      ae_config: `config.autoencoder` with `kind` ("identity" | "kl_f8"), `pretrained_path`,
        `scale_factor` (a number: the train job resolves "auto"), `dtype`; optional
        `ddconfig` / `embed_dim` override the SD KL-f8 ones.
      image_channels: channels of pixel-space images (identity autoencoder only).
      ddconfig, embed_dim: architecture of a "kl_f8" model; default: `config` values, else
        Stable Diffusion's (ch 128, ch_mult (1, 2, 4, 4), 2 res-blocks, z 4, embed_dim 4).
        A converted checkpoint carries its own and must agree.
      seed: initialisation seed when `pretrained_path` is empty (random weights: tests only).

    `pretrained_path` may be an LDM file (`.pth`/`.ckpt`/`.safetensors`/`.npz`, with or without a
    `first_stage_model.` prefix), a diffusers VAE file, or a folder written by
    `uvit_jax.convert.autoencoder.save_converted`.
    """
    kind = ae_config.get("kind", "identity")
    scale = number(ae_config.get("scale_factor", 1.0))
    path = ae_config.get("pretrained_path", "") or ""
    if kind == "identity":
        if path:
            raise ConfigError(
                f"autoencoder.pretrained_path={path!r} is set but autoencoder.kind='identity'"
            )
        return IdentityAutoencoder(image_channels, scale_factor=scale)
    if kind != "kl_f8":
        raise ConfigError(f"autoencoder.kind={kind!r}; expected one of {AUTOENCODER_KINDS}")

    dtype = parse_dtype(ae_config.get("dtype", "float32"))
    if ddconfig is None and ae_config.get("ddconfig"):
        ddconfig = ae_config["ddconfig"]
        if hasattr(ddconfig, "to_dict"):  # an ml_collections ConfigDict is no Mapping
            ddconfig = ddconfig.to_dict()
    if isinstance(ddconfig, Mapping):
        ddconfig = DDConfig.from_dict(ddconfig, source="autoencoder.ddconfig")
    if embed_dim is None:
        embed_dim = ae_config.get("embed_dim") or None  # 0 in a config: the default

    if not path:
        logging.warning("autoencoder.pretrained_path is empty: using a randomly initialised KL-f8")
        return AutoencoderKL(
            ddconfig or SD_KL_F8,
            embed_dim or SD_EMBED_DIM,
            scale_factor=scale,
            dtype=dtype,
            rngs=nnx.Rngs(seed),
        )
    if not os.path.exists(path):
        raise MissingFile(f"autoencoder.pretrained_path={path!r} does not exist")
    return load_autoencoder(
        path, ddconfig=ddconfig, embed_dim=embed_dim, scale_factor=scale, dtype=dtype
    )


def _encode_moments(model: Autoencoder, x: jax.Array) -> jax.Array:
    return model.encode_moments(x)


def _decode(model: Autoencoder, z: jax.Array) -> jax.Array:
    return model.decode(z)


class JittedAutoencoder(FrozenNetwork):
    """Jitted encode/decode of an autoencoder, optionally data-parallel over a mesh.

    With a mesh, the weights are replicated (the SD VAE is 84M parameters) and the batch is
    sharded over ("data", "fsdp"); equal architectures share compilations.
    """

    def encode_moments(self, x: jax.Array) -> jax.Array:
        """Global images [B, H, W, C] -> moments [B, h, w, M] (B divisible by the batch shards)."""
        return self.apply(_encode_moments, x)

    def decode(self, z: jax.Array) -> jax.Array:
        """Global scaled latents [B, h, w, embed_dim] -> images float32 [B, H, W, C]."""
        return self.apply(_decode, z)

    def encode_moments_local(self, x: np.ndarray) -> np.ndarray:
        """This process's images [n, H, W, C] -> its moments [n, h, w, M], as numpy (extraction).

        Any n: the batch is padded to a multiple of this process's batch shards and the padding
        dropped again. In multi-process runs every process must pass the same n (pad the last
        batch).
        """
        return self.apply_local(_encode_moments, x)


def autoencoder_from_config(
    config: Any, mesh: jax.sharding.Mesh | None = None
) -> JittedAutoencoder:
    """The autoencoder of `config.autoencoder` (`model.in_chans` channels for pixel models).

    Cached per (config.autoencoder, channels, mesh): the KL-f8 is 84M parameters, read from
    disk once per process, not per call.
    """
    ae = config.autoencoder
    ae = ae.to_dict() if hasattr(ae, "to_dict") else dict(ae)
    return _cached_autoencoder(
        json.dumps(ae, sort_keys=True, default=str), int(config.model.in_chans), mesh
    )


@functools.lru_cache(maxsize=4)
def _cached_autoencoder(
    ae_json: str, channels: int, mesh: jax.sharding.Mesh | None
) -> JittedAutoencoder:
    model = make_autoencoder(json.loads(ae_json), image_channels=channels)
    return JittedAutoencoder(model, mesh)
