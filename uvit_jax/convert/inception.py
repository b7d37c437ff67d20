"""pytorch-fid's Inception weights -> the Flax FID network (`uvit_jax.models.inception`).

The FID protocol fixes one set of weights: `pt_inception-2015-12-05-6726825d.pth`, TensorFlow's
2015-12-05 Inception graph ported by pytorch-fid; the 8 hex digits start the file's SHA-256.
`convert_inception` checks that digest, maps the torchvision-named keys onto the Flax parameter
paths and writes an `.npz` keyed by those paths ("Mixed_5b/branch1x1/conv/kernel", ...), which
`load_inception` reads without PyTorch.
"""

from __future__ import annotations

import functools
import hashlib
import os

import jax
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
from uvit_jax.models.inception import InceptionV3, abstract_inception

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
)
IMPORT_HINT = (
    f"download {FID_WEIGHTS_URL} and import it once with\n"
    f"  python main.py --mode convert_inception --config.convert.source=/path/to/{FID_WEIGHTS_NAME}"
    " --config.eval.inception_path=/path/to/inception_fid.npz"
)

# Flax leaf name -> torch parameter suffix, per module kind.
_TORCH_NAMES = {
    ("conv", "kernel"): "weight",
    ("bn", "scale"): "weight",
    ("bn", "bias"): "bias",
    ("bn", "mean"): "running_mean",
    ("bn", "var"): "running_var",
    ("fc", "kernel"): "weight",
    ("fc", "bias"): "bias",
}


def _flat_paths(state: nnx.State) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    return {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


@functools.lru_cache(maxsize=1)
def _flat_abstract_state() -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    # Cached: building the abstract network takes a second or two; callers only read it.
    return _flat_paths(nnx.split(abstract_inception())[1])


def torch_key(path: tuple[str, ...]) -> str:
    """Flax path ("Mixed_5b", "branch1x1", "bn", "var") -> "Mixed_5b.branch1x1.bn.running_var"."""
    return ".".join((*path[:-1], _TORCH_NAMES[path[-2:]]))


def _torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "kernel" and len(shape) == 4:  # conv: Flax HWIO, torch OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-1] == "kernel":  # linear: Flax [in, out], torch [out, in]
        return shape[::-1]
    return shape


def _to_flax(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))
    if path[-1] == "kernel":
        return value.T
    return value


def convert_state_dict(state: StateDict, *, source: str = "state dict") -> dict[str, np.ndarray]:
    """pytorch-fid / torchvision keys -> {"Conv2d_1a_3x3/conv/kernel": float32 array, ...}.

    `num_batches_tracked` buffers (torchvision state dicts have them, the FID file need not) are
    ignored. Raises ConversionError naming missing/unexpected keys and wrong shapes.
    """
    abstract = _flat_abstract_state()
    by_torch = {torch_key(path): path for path in abstract}
    ignore = [k for k in state if k.endswith("num_batches_tracked")]
    check_keys(by_torch, state, source=source, ignore=ignore)
    out = {}
    for key, path in by_torch.items():
        value = np.asarray(state[key], np.float32)
        check_shape(key, value, _torch_shape(path, abstract[path].shape), source=source)
        out["/".join(path)] = _to_flax(path, value)
    return out


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_inception(
    src_pth: str | os.PathLike, dst: str | os.PathLike, check_hash: bool = True
) -> str:
    """Imports pytorch-fid's Inception weights into an `.npz` that `load_inception` reads.

    Args:
      src_pth: `pt_inception-2015-12-05-6726825d.pth` (any torch/npz/safetensors state dict when
        `check_hash` is False, e.g. random weights in tests).
      dst: output path; `.npz` is appended when missing.
      check_hash: refuse a file whose SHA-256 does not start with 6726825d: FID numbers are only
        comparable with that exact network.

    Returns:
      The path written.
    """
    src_pth = os.fspath(src_pth)
    if not os.path.exists(src_pth):
        raise FileNotFoundError(f"Inception weights not found: {src_pth}; {IMPORT_HINT}")
    if check_hash:
        digest = sha256_of(src_pth)
        if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
            raise ConversionError(
                f"{src_pth} is not pytorch-fid's FID Inception: its SHA-256 is {digest}, expected "
                f"one starting with {FID_WEIGHTS_SHA256_PREFIX} ({FID_WEIGHTS_NAME}). Other "
                "Inception weights (e.g. torchvision's) give FIDs that cannot be compared with "
                f"published ones; {IMPORT_HINT}"
            )
    params = convert_state_dict(load_state_dict(src_pth), source=src_pth)
    dst = os.fspath(dst)
    if not dst.endswith(".npz"):
        dst += ".npz"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = dst[: -len(".npz")] + ".tmp.npz"
    np.savez(tmp, **params)
    os.replace(tmp, dst)  # never leave a half-written weights file under the final name
    return dst


def random_state_dict(seed: int = 0) -> StateDict:
    """Random weights in pytorch-fid's key layout, for tests and benchmarks (FIDs meaningless).

    He-scaled convolutions, BatchNorm scales and running variances in [0.5, 1.5], biases and
    running means ~ N(0, 0.1): activations stay O(1) through all 94 convolutions, so a parity
    test compares real numbers rather than zeros.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, var in _flat_abstract_state().items():
        shape = _torch_shape(path, var.shape)
        if path[-1] == "kernel":
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt((2.0 if len(shape) == 4 else 1.0) / fan_in), shape)
        elif path[-1] in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        out[torch_key(path)] = value.astype(np.float32)
    return out


def save_random_inception(dst: str | os.PathLike, seed: int = 0) -> str:
    """Writes random converted weights (see `random_state_dict`) that `load_inception` reads."""
    dst = os.fspath(dst)
    if not dst.endswith(".npz"):
        dst += ".npz"
    np.savez(dst, **convert_state_dict(random_state_dict(seed), source="random weights"))
    return dst


def load_inception(
    path: str | os.PathLike,
    *,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
) -> InceptionV3:
    """Builds the FID network from an `.npz` written by `convert_inception`.

    Args:
      path: the converted weights (the config's `eval.inception_path`).
      precision: convolution precision, see `InceptionV3`.
    Returns:
      An `InceptionV3` with float32 parameters on the default device.
    """
    path = os.fspath(path)
    if not path:
        raise FileNotFoundError(
            f"FID needs converted Inception weights (eval.inception_path); {IMPORT_HINT}"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"converted Inception weights not found: {path}; {IMPORT_HINT}")
    with np.load(path, allow_pickle=False) as f:
        stored = {k: f[k] for k in f.files}
    graphdef, state = nnx.split(abstract_inception(precision))
    abstract = _flat_paths(state)
    expected = {"/".join(p): p for p in abstract}
    check_keys(expected, stored, source=path)
    nested: dict = {}
    for key, p in expected.items():
        check_shape(key, stored[key], abstract[p].shape, source=path)
        node = nested
        for part in p[:-1]:
            node = node.setdefault(part, {})
        node[p[-1]] = jnp.asarray(stored[key], jnp.float32)
    nnx.replace_by_pure_dict(state, nested)
    return nnx.merge(graphdef, state)
