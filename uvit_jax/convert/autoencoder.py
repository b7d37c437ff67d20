"""KL autoencoder weights: LDM / Stable Diffusion / diffusers files -> `AutoencoderKL` params.

Two namings exist in the wild, detected automatically from the keys:
  - LDM (`ldm.models.autoencoder.AutoencoderKL`): U-ViT's `autoencoder_kl.pth` /
    `autoencoder_kl_ema.pth` (bare keys) and Stable Diffusion `.ckpt` files (every key prefixed
    with `first_stage_model.`; any prefix in front of `encoder.conv_in.weight` is recognised).
    Keys `loss.*` (LPIPS / discriminator of a training checkpoint) are ignored.
  - diffusers (`AutoencoderKL`, e.g. `sd-vae-ft-ema` / `sd-vae-ft-mse`
    `diffusion_pytorch_model.safetensors` / `.bin`): `down_blocks.i.resnets.j`, decoder
    `up_blocks` in reversed order, mid attention as `to_q/to_k/to_v/to_out.0` linears (older
    files: `query/key/value/proj_attn`).
diffusers names are first renamed to LDM names, then LDM names map one-to-one onto this model's
parameter paths (`encoder.down.0.block.0.norm1.weight` <-> `encoder/down/0/block/0/norm1/scale`);
PyTorch conv weights [O, I, kh, kw] become Flax kernels [kh, kw, I, O].

Converted models are saved as an orbax checkpoint folder with two items: `params` (the nested
parameter dict, float32) and `config` (JSON: kind, ddconfig, embed_dim, source file), written by
`save_converted` and read by `load_converted` (or `uvit_jax.latent_codec.make_autoencoder` given
the folder).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvit_jax.convert.state_dict import (
    ConversionError,
    check_keys,
    check_shape,
    load_state_dict,
)
from uvit_jax.models.autoencoder import (
    SD_EMBED_DIM,
    SD_KL_F8,
    AutoencoderKL,
    DDConfig,
    abstract_autoencoder_kl,
)

_ANCHOR = "encoder.conv_in.weight"  # present under both namings
_IGNORED_PREFIXES = ("loss.",)  # LPIPS + discriminator of LDM training checkpoints
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias"}
Path = tuple[str | int, ...]


def expected_ldm_shapes(model: AutoencoderKL) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """LDM key -> (this model's parameter path, PyTorch shape) for every parameter of `model`."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        path = tuple(path)
        key = ".".join(str(p) for p in path[:-1]) + "." + _LEAF_TO_TORCH[path[-1]]
        shape = tuple(var.shape)
        if len(shape) == 4:  # Flax [kh, kw, I, O] <- PyTorch [O, I, kh, kw]
            shape = (shape[3], shape[2], shape[0], shape[1])
        out[key] = (path, shape)
    return out


def find_prefix(keys: list[str], *, source: str) -> str:
    """The prefix in front of the autoencoder's keys ("" or e.g. "first_stage_model.")."""
    prefixes = sorted({k[: -len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)})
    prefixes = [p for p in prefixes if p == "" or p.endswith((".", "/"))]
    if not prefixes:
        raise ConversionError(
            f"{source}: no autoencoder found: no key ends with {_ANCHOR!r} "
            f"(first keys: {', '.join(sorted(keys)[:5])})"
        )
    if len(prefixes) > 1:
        raise ConversionError(
            f"{source}: several autoencoders found, under the prefixes {prefixes}; pass "
            "prefix= to load_autoencoder"
        )
    return prefixes[0]


def detect_naming(state: Mapping[str, np.ndarray], *, source: str) -> str:
    """Returns "ldm" or "diffusers", from the keys of an un-prefixed autoencoder state dict."""
    if any(k.startswith(("encoder.mid.", "encoder.down.")) for k in state):
        return "ldm"
    if any(k.startswith(("encoder.mid_block.", "encoder.down_blocks.")) for k in state):
        return "diffusers"
    raise ConversionError(
        f"{source}: keys follow neither LDM naming (encoder.down.0.block.0...) nor diffusers "
        "naming (encoder.down_blocks.0.resnets.0...)"
    )


def ldm_to_diffusers_name(key: str, num_levels: int, *, legacy_attention: bool = False) -> str:
    """One LDM key -> its name in a diffusers AutoencoderKL state dict.

    diffusers' decoder `up_blocks` run from low to high resolution, LDM's `up` list the other way
    round; mid attention is `to_q/to_k/to_v/to_out.0` (`query/key/value/proj_attn` in files
    saved by older diffusers).
    """
    attn = (
        {"q": "query", "k": "key", "v": "value", "proj_out": "proj_attn"}
        if legacy_attention
        else {"q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
    )
    k = re.sub(r"^(encoder|decoder)\.norm_out\.", r"\1.conv_norm_out.", key)
    k = k.replace(".mid.block_1.", ".mid_block.resnets.0.")
    k = k.replace(".mid.block_2.", ".mid_block.resnets.1.")
    k = k.replace(".mid.attn_1.norm.", ".mid_block.attentions.0.group_norm.")
    k = re.sub(
        r"\.mid\.attn_1\.(q|k|v|proj_out)\.",
        lambda m: f".mid_block.attentions.0.{attn[m.group(1)]}.",
        k,
    )
    k = re.sub(r"^encoder\.down\.(\d+)\.block\.", r"encoder.down_blocks.\1.resnets.", k)
    k = re.sub(r"^encoder\.down\.(\d+)\.downsample\.", r"encoder.down_blocks.\1.downsamplers.0.", k)
    k = re.sub(
        r"^decoder\.up\.(\d+)\.block\.",
        lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.resnets.",
        k,
    )
    k = re.sub(
        r"^decoder\.up\.(\d+)\.upsample\.",
        lambda m: f"decoder.up_blocks.{num_levels - 1 - int(m.group(1))}.upsamplers.0.",
        k,
    )
    return k.replace(".nin_shortcut.", ".conv_shortcut.")


def params_from_state_dict(
    state: Mapping[str, np.ndarray],
    model: AutoencoderKL,
    *,
    source: str,
) -> dict[Path, np.ndarray]:
    """Any supported state dict -> {parameter path: float32 Flax-layout array} for `model`.

    The key prefix and the naming (LDM or diffusers) are detected. Raises ConversionError
    listing missing/unexpected keys by the file's names, or naming a key whose shape differs.
    """
    prefix = find_prefix(list(state), source=source)
    if prefix:
        logging.info("%s: using the keys under %r", source, prefix)
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    naming = detect_naming(state, source=source)
    expected = expected_ldm_shapes(model)
    cfg = model.ddconfig
    if naming == "diffusers":
        if cfg.attn_resolutions:
            raise ConversionError(
                f"{source}: diffusers' AutoencoderKL has attention only in the middle blocks, "
                f"but ddconfig.attn_resolutions={list(cfg.attn_resolutions)}"
            )
        legacy = any(".attentions.0.query." in k for k in state)
        names = {
            k: ldm_to_diffusers_name(k, cfg.num_resolutions, legacy_attention=legacy)
            for k in expected
        }
    else:
        names = {k: k for k in expected}
    ignored = [k for k in state if k.startswith(_IGNORED_PREFIXES)]
    if ignored:
        logging.info("%s: ignoring %d loss/discriminator keys (loss.*)", source, len(ignored))
    check_keys(names.values(), state, source=source, ignore=ignored)
    params = {}
    for key, (path, torch_shape) in expected.items():
        name = names[key]
        value = np.asarray(state[name], np.float32)
        if value.ndim == 2 and len(torch_shape) == 4:  # diffusers attention: Linear [O, I]
            value = value[:, :, None, None]
        check_shape(name, value, torch_shape, source=source)
        if value.ndim == 4:  # PyTorch [O, I, kh, kw] -> Flax [kh, kw, I, O]
            value = value.transpose(2, 3, 1, 0)
        params[path] = value
    return params


def with_params(model: AutoencoderKL, params: Mapping[Path, Any]) -> AutoencoderKL:
    """A concrete model with `model`'s structure (may be abstract) and the given parameters."""
    graphdef, state = nnx.split(model)
    flat = nnx.to_flat_state(state)
    missing = [p for p, _ in flat if tuple(p) not in params]
    if missing:
        raise ConversionError(f"parameters missing for {['/'.join(map(str, p)) for p in missing]}")
    values = [(tuple(p), v.replace(jnp.asarray(params[tuple(p)]))) for p, v in flat]
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def _resolve(ddconfig, embed_dim) -> tuple[DDConfig, int]:
    if isinstance(ddconfig, Mapping):
        ddconfig = DDConfig.from_dict(ddconfig)
    return ddconfig or SD_KL_F8, embed_dim or SD_EMBED_DIM


def load_autoencoder(
    path: str | os.PathLike,
    *,
    ddconfig: DDConfig | Mapping[str, Any] | None = None,
    embed_dim: int | None = None,
    scale_factor: float = 0.18215,
    dtype: Any = jnp.float32,
    prefix: str | None = None,
) -> AutoencoderKL:
    """Builds an `AutoencoderKL` from a converted folder or an LDM / diffusers weights file.

    Args:
      path: a folder from `save_converted`, or a `.pth`/`.ckpt`/`.bin`/`.safetensors`/`.npz`
        file in LDM or diffusers naming.
      ddconfig, embed_dim: the architecture; default Stable Diffusion's KL-f8. A converted folder
        stores its own; passing a different one is an error.
      prefix: key prefix to strip; default: detected (e.g. `first_stage_model.`).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return load_converted(
            path, ddconfig=ddconfig, embed_dim=embed_dim, scale_factor=scale_factor, dtype=dtype
        )
    ddconfig, embed_dim = _resolve(ddconfig, embed_dim)
    state = load_state_dict(path, prefix=prefix)
    model = abstract_autoencoder_kl(ddconfig, embed_dim, scale_factor=scale_factor, dtype=dtype)
    return with_params(model, params_from_state_dict(state, model, source=path))


def _nested(params: Mapping[Path, Any]) -> dict:
    # orbax trees want string keys: nnx.List indices become "0", "1", ...
    out: dict = {}
    for path, value in params.items():
        node = out
        for p in path[:-1]:
            node = node.setdefault(str(p), {})
        node[path[-1]] = value
    return out


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, (*prefix, k)))
        else:
            out[(*prefix, k)] = v
    return out


def save_converted(path: str | os.PathLike, model: AutoencoderKL, *, source: str = "") -> None:
    """Writes `model`'s parameters and architecture to an orbax checkpoint folder at `path`."""
    from uvit_jax import checkpoints

    params = {
        tuple(p): np.asarray(jax.device_get(v[...]))
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    config = {
        "kind": "kl_f8",
        "ddconfig": model.ddconfig.to_dict(),
        "embed_dim": model.embed_dim,
        "source": os.fspath(source),
    }
    checkpoints.save_weights_folder(path, _nested(params), config)


def load_converted(
    path: str | os.PathLike,
    *,
    ddconfig: DDConfig | Mapping[str, Any] | None = None,
    embed_dim: int | None = None,
    scale_factor: float = 0.18215,
    dtype: Any = jnp.float32,
) -> AutoencoderKL:
    """Reads a `save_converted` folder; `ddconfig`/`embed_dim`, if given, must match its own."""
    from uvit_jax import checkpoints

    path = os.path.abspath(os.fspath(path))
    try:
        config = checkpoints.read_weights_folder_config(path)
    except (FileNotFoundError, ValueError, KeyError) as e:
        raise ConversionError(
            f"{path}: not a converted autoencoder folder (written by save_converted): {e}"
        ) from e
    stored = DDConfig.from_dict(config["ddconfig"], source=f"{path} config")
    stored_dim = int(config["embed_dim"])
    if isinstance(ddconfig, Mapping):
        ddconfig = DDConfig.from_dict(ddconfig)
    if (ddconfig is not None and ddconfig != stored) or (
        embed_dim is not None and embed_dim != stored_dim
    ):
        raise ConversionError(
            f"{path}: holds ddconfig={stored.to_dict()}, embed_dim={stored_dim}; the requested "
            f"ddconfig={ddconfig.to_dict() if ddconfig else None}, embed_dim={embed_dim} differ"
        )
    model = abstract_autoencoder_kl(stored, stored_dim, scale_factor=scale_factor, dtype=dtype)
    target = _nested(
        {
            tuple(p): jax.ShapeDtypeStruct(v.shape, jnp.float32)
            for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
        }
    )
    restored = checkpoints.load_weights_folder_params(path, target)
    by_str = {tuple(map(str, p)): v for p, v in _flatten(restored).items()}
    params = {
        tuple(p): by_str[tuple(map(str, p))]
        for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }
    return with_params(model, params)


def convert_file(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    ddconfig: DDConfig | Mapping[str, Any] | None = None,
    embed_dim: int | None = None,
) -> AutoencoderKL:
    """Converts an LDM/diffusers file into a `save_converted` folder (the `convert` job)."""
    model = load_autoencoder(src, ddconfig=ddconfig, embed_dim=embed_dim)
    save_converted(dst, model, source=os.fspath(src))
    return model
