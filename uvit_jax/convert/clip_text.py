"""Hugging Face CLIP text-encoder weights -> `CLIPTextTransformer`.

Where the text encoder's keys live, by file:
  - `CLIPModel` (e.g. openai/clip-vit-large-patch14): `text_model.*`, next to `vision_model.*`,
    `visual_projection.weight`, `text_projection.weight` and `logit_scale` (all ignored);
  - `CLIPTextModel` saved by transformers < 5: `text_model.*`; by transformers >= 5: bare
    `embeddings.*`, `encoder.*`, `final_layer_norm.*`;
  - Stable Diffusion v1 checkpoints: `cond_stage_model.transformer.text_model.*`.
The prefix is found from the anchor key `embeddings.token_embedding.weight` (bare, or behind a
prefix ending in `text_model.`); keys outside it are ignored, as is the `position_ids` buffer
older files saved. Our parameter paths mirror the HF names, so the rest is mechanical:
`encoder/layers/3/mlp/fc1/kernel` is `encoder.layers.3.mlp.fc1.weight` transposed (Linear
[out, in] -> kernel [in, out]); LayerNorm `scale` is `weight`; `Embed`'s `embedding` is `weight`.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvit_jax.convert.state_dict import (
    ConversionError,
    StateDict,
    check_keys,
    check_shape,
    load_state_dict,
)
from uvit_jax.errors import MissingFile
from uvit_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer, resolve_dtype

_ANCHOR = "embeddings.token_embedding.weight"
_PREFIX_END = "text_model."
# Keys a bare-keyed file (CLIPModel-like or CLIPTextModelWithProjection saved by transformers 5)
# may hold besides the text encoder's; under a `text_model.` prefix they are outside anyway.
_IGNORED_PREFIXES = ("vision_model.", "visual_projection.", "text_projection.")
_IGNORED_KEYS = ("logit_scale", "embeddings.position_ids")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}
# Looked for in this order; sharded checkpoints come with an index naming their shards.
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
Path = tuple[str | int, ...]


def find_text_prefix(keys: list[str], *, source: str) -> str:
    """The prefix in front of the text encoder's keys: "" or one ending in "text_model."."""
    prefixes = sorted({k[: -len(_ANCHOR)] for k in keys if k.endswith(_ANCHOR)})
    prefixes = [p for p in prefixes if p == "" or p.endswith(_PREFIX_END)]
    if not prefixes:
        raise ConversionError(
            f"{source}: no CLIP text encoder found: no key is {_ANCHOR!r} or ends with "
            f"{_PREFIX_END + _ANCHOR!r} (first keys: {', '.join(sorted(keys)[:5])})"
        )
    if len(prefixes) > 1:
        raise ConversionError(f"{source}: several CLIP text encoders found, under {prefixes}")
    return prefixes[0]


def _hf_name(path: Path) -> tuple[str, str]:
    """Param path -> (HF key without prefix, leaf kind)."""
    *module, leaf = (str(p) for p in path)
    return ".".join([*module, _LEAF_TO_TORCH[leaf]]), leaf


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[::-1]) if leaf == "kernel" else tuple(shape)


def clip_text_from_state_dict(
    state: Mapping[str, np.ndarray],
    config: CLIPTextConfig,
    *,
    source: str,
    dtype: Any = jnp.float32,
) -> CLIPTextTransformer:
    """Builds a `CLIPTextTransformer` holding the text-encoder weights of a HF state dict.

    Args:
      state: `{key: numpy array}` in PyTorch layouts, e.g. from
        `uvit_jax.convert.state_dict.load_state_dict`; float arrays of any precision (stored as
        float32 parameters).
      config: the architecture the weights must fit.
      source: names the checkpoint in error messages.
      dtype: compute dtype of the model, float32 or bfloat16 (or their names).

    Raises:
      ConversionError: no (or several) text encoders in `state`, keys missing or unexpected
        (listed by their names in the file) or a shape that differs (key, both shapes).
    """
    prefix = find_text_prefix(list(state), source=source)
    if prefix:
        logging.info("%s: using the keys under %r", source, prefix)
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    ignored = [k for k in state if k.startswith(_IGNORED_PREFIXES) or k in _IGNORED_KEYS]
    abstract = nnx.eval_shape(lambda: CLIPTextTransformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    expected = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        key, leaf = _hf_name(tuple(path))
        expected[key] = (tuple(path), leaf, tuple(var.shape))
    check_keys(
        [prefix + k for k in expected],
        [prefix + k for k in state],
        source=source,
        ignore=[prefix + k for k in ignored],
    )
    flat = []
    for key, (path, leaf, shape) in expected.items():
        value = np.asarray(state[key], np.float32)
        check_shape(prefix + key, value, _torch_shape(leaf, shape), source=source)
        if leaf == "kernel":  # torch Linear [out, in] -> Flax [in, out]
            value = value.T
        flat.append((path, jnp.asarray(value)))
    nnx.update(abstract, nnx.from_flat_state(flat))
    return abstract


def find_weight_files(directory: str) -> list[str]:
    """The weights file(s) of a HF model folder, in `load_clip_text`'s order of preference.

    Raises:
      FileNotFoundError: naming the folder and the files looked for.
      ConversionError: several candidate files and none preferred, or a bad shard index.
    """
    for name in _WEIGHT_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return [path]
    for name in _INDEX_FILES:
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return _shards_of(path)
    for pattern in ("*.safetensors", "*.bin"):
        found = sorted(glob.glob(os.path.join(glob.escape(directory), pattern)))
        if len(found) == 1:
            return found
        if len(found) > 1:
            raise ConversionError(
                f"{directory}: several weights files ({', '.join(map(os.path.basename, found))}) "
                f"and none of {', '.join(_WEIGHT_FILES + _INDEX_FILES)}: keep only one"
            )
    raise MissingFile(
        f"{directory}: no CLIP text encoder weights found; looked for "
        f"{', '.join(_WEIGHT_FILES + _INDEX_FILES)}, or a single *.safetensors / *.bin file"
    )


def _shards_of(index_path: str) -> list[str]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConversionError(f"{index_path}: not a sharded-checkpoint index: {e}") from e
    if not names:
        raise ConversionError(f"{index_path}: the weight_map lists no files")
    directory = os.path.dirname(index_path)
    paths = [os.path.join(directory, n) for n in names]
    missing = [n for n, p in zip(names, paths, strict=True) if not os.path.isfile(p)]
    if missing:
        raise MissingFile(f"{index_path}: lists shards that are not there: {missing}")
    return paths


def read_clip_text_config(directory: str | os.PathLike) -> CLIPTextConfig:
    """The text encoder's architecture from `<directory>/config.json` (CLIPModel or CLIPTextModel).

    Raises:
      FileNotFoundError: no such folder, or no config.json in it (names the folder and the files
        a HF CLIP folder holds).
      ValueError: config.json is not JSON or not a supported CLIP text encoder (names the field).
    """
    directory = os.path.abspath(os.fspath(directory))
    if not os.path.isdir(directory):
        raise MissingFile(f"CLIP text encoder folder not found: {directory}")
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise MissingFile(
            f"{directory}: no config.json (a Hugging Face CLIPModel / CLIPTextModel folder holds "
            "config.json, the weights model.safetensors or pytorch_model.bin, and the tokenizer "
            "files vocab.json, merges.txt)"
        )
    with open(config_path) as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path}: not valid JSON: {e}") from e
    return CLIPTextConfig.from_hf_dict(raw, source=config_path)


def load_clip_text(
    directory: str | os.PathLike, *, dtype: str = "float32"
) -> tuple[CLIPTextTransformer, CLIPTextConfig]:
    """Reads a HF model folder (`CLIPModel` or `CLIPTextModel`) into a `CLIPTextTransformer`.

    Args:
      directory: holds `config.json` and the weights (`model.safetensors`, `pytorch_model.bin`,
        a sharded checkpoint with its `*.index.json`, or a single other `*.safetensors`/`*.bin`).
      dtype: compute dtype, "float32" or "bfloat16"; parameters are float32.

    Returns:
      (model, config); `model(input_ids [B, L] int32) -> float32 [B, L, config.hidden_size]`.

    Raises:
      FileNotFoundError: the folder, its config.json or its weights are missing (names the
        folder and the files looked for).
      ValueError: config.json does not describe a supported CLIP text encoder (names the field);
        ConversionError (a ValueError) when the weights do not fit it.
    """
    directory = os.path.abspath(os.fspath(directory))
    config = read_clip_text_config(directory)
    files = find_weight_files(directory)
    state: StateDict = {}
    for path in files:
        state.update(load_state_dict(path))
    source = files[0] if len(files) == 1 else f"{directory} ({len(files)} shards)"
    model = clip_text_from_state_dict(state, config, source=source, dtype=resolve_dtype(dtype))
    return model, config
