"""Official U-ViT PyTorch weights <-> this package's `UViT`.

Our parameter paths mirror the official state-dict names, so the mapping is mechanical:
`in_blocks/3/attn/qkv/kernel` is `in_blocks.3.attn.qkv.weight` transposed; convs go from
[out, in, kh, kw] to [kh, kw, in, out]; LayerNorm `scale` is `weight`; `label_emb/embedding` is
`label_emb.weight`; the time MLP's `layers/0` is `time_embed.0`.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvit_jax.convert.state_dict import ConversionError, StateDict, check_keys, check_shape
from uvit_jax.models.uvit import UViT, UViTConfig

_SIZE_NAMES = {
    (512, 12): "U-ViT-S",
    (512, 16): "U-ViT-S-Deep",
    (768, 16): "U-ViT-M",
    (1024, 20): "U-ViT-L",
    (1152, 28): "U-ViT-H",
}


def _official_key(path: tuple) -> tuple[str, str]:
    """nnx param path -> (official key, kind of leaf)."""
    *module, leaf = (str(p) for p in path)
    module = [p for p in module if p != "layers"]  # TimeMLP's list is the official Sequential
    if leaf == "pos_embed":
        return "pos_embed", "raw"
    suffix = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}[leaf]
    return ".".join([*module, suffix]), leaf


def _to_official(leaf: str, x: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return x.T if x.ndim == 2 else np.transpose(x, (3, 2, 0, 1))
    return x


def _official_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel":
        return shape[::-1] if len(shape) == 2 else (shape[3], shape[2], shape[0], shape[1])
    return tuple(shape)


def _from_official(leaf: str, x: np.ndarray) -> np.ndarray:
    if leaf == "kernel":
        return x.T if x.ndim == 2 else np.transpose(x, (2, 3, 1, 0))
    return x


def _param_paths(model: nnx.Module) -> list[tuple[tuple, jax.ShapeDtypeStruct]]:
    state = nnx.state(model, nnx.Param)
    return [(tuple(p), v) for p, v in nnx.to_flat_state(state)]


def official_state_dict(model: UViT) -> StateDict:
    """The model's parameters under official names and PyTorch layouts (float32 numpy)."""
    return {
        key: _to_official(leaf, np.asarray(v[...], np.float32))
        for path, v in _param_paths(model)
        for key, leaf in [_official_key(path)]
    }


def describe_size(params: Mapping[str, np.ndarray]) -> tuple[int, int] | None:
    """(embed_dim, depth) of an official state dict, or None when it has no U-ViT layout."""
    if "pos_embed" not in params:
        return None
    width = int(params["pos_embed"].shape[-1])
    n_in = len({k.split(".")[1] for k in params if k.startswith("in_blocks.")})
    return width, 2 * n_in


def _size_name(width: int, depth: int) -> str:
    name = _SIZE_NAMES.get((width, depth))
    return f"{name} " if name else ""


def uvit_from_official(params: Mapping[str, np.ndarray], config: Mapping, **overrides) -> UViT:
    """Builds a `UViT` holding official PyTorch weights.

    Args:
      params: official state-dict keys -> numpy arrays (PyTorch layouts), e.g. from
        `uvit_jax.convert.state_dict.load_state_dict("imagenet256_uvit_huge.pth")`.
      config: the official constructor arguments (`img_size`, `patch_size`, ..., and `kind`:
        "uvit_t2i" selects the text-to-image model), or a `config.model` section of this
        package: `UViTConfig`'s fields (float32 unless `dtype` says otherwise); others refused.
      **overrides: compute options for the built model (`dtype`, `attention`, `remat`).

    Returns:
      The model, callable as `model(x, t, y=None, context=None)` with `x: [B, H, W, C]`.

    Raises:
      ConfigError: a field `UViTConfig` does not have, or a value that cannot work.
      ConversionError: the weights are of another model size, keys are missing or unexpected
        (listed by name), or a shape does not fit the config (key, expected and found shapes).
    """
    fields = UViTConfig.from_config({"dtype": "float32", **dict(config)}, **overrides)
    source = "official U-ViT checkpoint"
    found = describe_size(params)
    want = (fields.embed_dim, fields.depth)
    if found is not None and found != want:
        raise ConversionError(
            f"{source}: the weights are a {_size_name(*found)}model (embed_dim {found[0]}, depth "
            f"{found[1]}) but the config asks for a {_size_name(*want)}model (embed_dim "
            f"{want[0]}, depth {want[1]}): pick the config that matches the checkpoint"
        )
    abstract = nnx.eval_shape(lambda: UViT(fields, rngs=nnx.Rngs(0)))
    expected = {}
    for path, var in _param_paths(abstract):
        key, leaf = _official_key(path)
        expected[key] = (path, leaf, var)
    check_keys(expected, params, source=source)

    flat = []
    for key, (path, leaf, var) in expected.items():
        check_shape(key, params[key], _official_shape(leaf, var.shape), source=source)
        flat.append((path, jnp.asarray(_from_official(leaf, np.asarray(params[key], np.float32)))))
    nnx.update(abstract, nnx.from_flat_state(flat))
    return abstract
