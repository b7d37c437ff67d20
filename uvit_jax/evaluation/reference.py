"""Reference statistics files: read and write FID `mu` / `sigma` `.npz` files.

Three formats are read, all holding float64 `mu` [2048] and `sigma` [2048, 2048]:
- pytorch-fid / U-ViT (`fid_stats_cifar10_train_pytorch.npz`,
  `fid_stats_imagenet256_guided_diffusion.npz`);
- the ADM evaluator's reference batches (`VIRTUAL_imagenet256_labeled.npz`), which add the
  images as `arr_0` [N, H, W, 3] uint8 and spatial-feature statistics `mu_s` / `sigma_s`;
- ours (`--mode fid_stats`): `mu`, `sigma`, `mu_s` [2023], `sigma_s` [2023, 2023], the pool3
  vectors `features` [N, 2048] float32 for precision/recall and KID (8 KiB per image: 82 MB for
  10k images, 410 MB for 50k), `num_images`, and `protocol`, a JSON record of how the features
  were made (Inception weights, input protocol, dataset), which `--mode eval` compares with its
  own before it compares anything else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from uvit_jax.errors import MissingFile, UserError
from uvit_jax.models.inception import FEATURE_DIM, SPATIAL_DIM


class ReferenceFileError(UserError, ValueError):
    """A reference statistics file that cannot be used: not an `.npz`, truncated, or an array
    of the wrong shape or with non-finite values; the message names the file and the array."""


class ReferenceKeyError(UserError, KeyError):
    """A reference statistics file lacks an array; the message names the file and the key."""

    __str__ = Exception.__str__  # the message as written, not KeyError's repr of it


def _open(path: str | os.PathLike):
    path = os.fspath(path)
    if not path:
        raise MissingFile(
            "no FID reference statistics given (eval.ref_stats): point it at a pytorch-fid/U-ViT "
            "or ADM .npz with `mu` and `sigma`, or compute one with --mode fid_stats"
        )
    if not os.path.exists(path):
        raise MissingFile(f"FID reference statistics not found: {path}")
    try:
        f = np.load(path, allow_pickle=False)
    except Exception as e:  # OSError, ValueError (pickles refused), zipfile.BadZipFile, ...
        raise ReferenceFileError(f"{path}: not a readable .npz file ({_reason(e)})") from e
    if not hasattr(f, "files"):  # a bare .npy array, not an archive of named arrays
        raise ReferenceFileError(f"{path}: a single .npy array, not an .npz of named arrays")
    return path, f


def _reason(e: Exception) -> str:
    """What went wrong reading a file, on one line, without numpy's advice to load pickled
    data unsafely (these files never hold pickles)."""
    text = str(e).splitlines()[0] if str(e) else ""
    if "pickle" in text:
        return "it holds pickled Python objects or is not an .npy/.npz file at all"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _array(f: Any, path: str, key: str, dtype: Any) -> np.ndarray:
    """The array `key` of an open `.npz` in `dtype`; ReferenceFileError naming the file and the
    key when it cannot be read (a truncated archive, a pickled object array, text)."""
    try:
        return np.asarray(f[key], dtype)
    except Exception as e:
        raise ReferenceFileError(f"{path}: cannot read array {key} ({_reason(e)})") from e


def _finite(path: str, key: str, value: np.ndarray) -> np.ndarray:
    """`value`, or ReferenceFileError naming the file and the array when it has inf/NaN."""
    if not np.all(np.isfinite(value)):
        count = int(np.size(value) - np.count_nonzero(np.isfinite(value)))
        raise ReferenceFileError(
            f"{path}: {key} has {count} non-finite values (inf or NaN); recompute the file"
        )
    return value


def _moments(
    f: Any, path: str, mean_key: str, cov_key: str, dim: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """The mean [dim] and covariance [dim, dim] stored under two keys of an open `.npz`, as
    float64; ReferenceFileError naming the file when they are not those of `what` or hold
    non-finite values."""
    mean = _array(f, path, mean_key, np.float64)
    cov = _array(f, path, cov_key, np.float64)
    if mean.shape != (dim,) or cov.shape != (dim, dim):
        raise ReferenceFileError(
            f"{path}: {mean_key} has shape {mean.shape} and {cov_key} {cov.shape}; expected "
            f"({dim},) and ({dim}, {dim}) ({what})"
        )
    return _finite(path, mean_key, mean), _finite(path, cov_key, cov)


def load_stats(path: str | os.PathLike, dim: int = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """Reads `mu` [dim] and `sigma` [dim, dim] as float64 from a pytorch-fid/U-ViT/ADM `.npz`.

    Raises:
      FileNotFoundError: no such file. ReferenceKeyError (a KeyError): a key is missing (the
        message names the file, the key and the keys present). ReferenceFileError (a
        ValueError): not a readable `.npz`, wrong shapes or non-finite values.
    """
    path, f = _open(path)
    with f:
        missing = [k for k in ("mu", "sigma") if k not in f.files]
        if missing:
            hint = (
                " (it holds images as arr_0: compute their statistics with --mode fid_stats)"
                if "arr_0" in f.files
                else ""
            )
            raise ReferenceKeyError(
                f"{path}: missing key(s) {', '.join(missing)}; FID statistics need `mu` and "
                f"`sigma`, the file has {', '.join(f.files) or 'no arrays'}{hint}"
            )
        mu, sigma = _moments(f, path, "mu", "sigma", dim, "pool3 features of the FID Inception")
    return mu, sigma


def load_reference_images(path: str | os.PathLike) -> np.ndarray:
    """The images `arr_0` [N, H, W, 3] uint8 of an ADM reference batch (or a sample `.npz`)."""
    path, f = _open(path)
    with f:
        if "arr_0" not in f.files:
            raise ReferenceKeyError(
                f"{path}: missing key arr_0 (images [N, H, W, 3] uint8); the file has "
                f"{', '.join(f.files) or 'no arrays'}"
            )
        images = _array(f, path, "arr_0", None)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ReferenceFileError(
            f"{path}: arr_0 is {images.dtype} {images.shape}; expected uint8 [N, H, W, 3]"
        )
    return images


def save_stats(
    path: str | os.PathLike, mu: np.ndarray, sigma: np.ndarray, **extra: np.ndarray
) -> str:
    """Writes `mu`, `sigma` (float64) and any `extra` arrays (e.g. `num_samples`) to an `.npz`.

    Readable by `load_stats`, pytorch-fid (`--save-stats` format) and U-ViT. Written to a
    temporary name first, so an interrupted job never leaves a truncated file.
    """
    path = os.fspath(path)
    if not path.endswith(".npz"):
        path += ".npz"
    mu = np.asarray(mu, np.float64)
    sigma = np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
        raise ValueError(f"mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path[: -len(".npz")] + ".tmp.npz"
    np.savez(tmp, mu=mu, sigma=sigma, **extra)
    os.replace(tmp, path)
    return path


@dataclasses.dataclass(frozen=True)
class Reference:
    """A reference set as the metrics need it (see the module docstring for the file keys).

    mu [2048], sigma [2048, 2048] float64; mu_s [2023], sigma_s [2023, 2023] or None (no sFID);
    features [N, 2048] float32 or None (no precision/recall, KID); num_images or None (not
    recorded); protocol: the JSON record of `--mode fid_stats`, or None for files made elsewhere.
    """

    path: str
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None = None
    sigma_s: np.ndarray | None = None
    features: np.ndarray | None = None
    num_images: int | None = None
    protocol: dict[str, Any] | None = None


def load_reference(path: str | os.PathLike) -> Reference:
    """Reads any of the three formats (module docstring); missing optional parts are None.

    Raises:
      As `load_stats`, plus ReferenceFileError for spatial statistics or features of the wrong
      shape or with non-finite values, and a `protocol` that is not a JSON record.
    """
    mu, sigma = load_stats(path)
    path, f = _open(path)
    with f:
        mu_s = sigma_s = features = None
        if "mu_s" in f.files and "sigma_s" in f.files:
            mu_s, sigma_s = _moments(f, path, "mu_s", "sigma_s", SPATIAL_DIM, "spatial features")
        if "features" in f.files:
            features = _array(f, path, "features", np.float32)
            if features.ndim != 2 or features.shape[1] != FEATURE_DIM:
                raise ReferenceFileError(
                    f"{path}: features has shape {features.shape}; expected [N, {FEATURE_DIM}]"
                )
            _finite(path, "features", features)
        num = None
        if "num_images" in f.files:
            count = _array(f, path, "num_images", None)
            if count.shape != () or count.dtype.kind not in "iu":
                raise ReferenceFileError(
                    f"{path}: num_images is {count.dtype} {count.shape}; expected an integer"
                )
            num = int(count)
        protocol = _protocol(f, path) if "protocol" in f.files else None
    if features is not None:
        num = len(features)
    return Reference(path, mu, sigma, mu_s, sigma_s, features, num, protocol)


def _protocol(f: Any, path: str) -> dict[str, Any]:
    """The JSON record `protocol` of an open `.npz` (written by --mode fid_stats)."""
    text = _array(f, path, "protocol", None)
    try:
        record = json.loads(str(text))
    except ValueError as e:
        raise ReferenceFileError(f"{path}: protocol is not a JSON record ({_reason(e)})") from e
    if not isinstance(record, dict):
        raise ReferenceFileError(
            f"{path}: protocol is a JSON {type(record).__name__}; expected an object"
        )
    return record


def save_reference(path: str | os.PathLike, features, protocol: dict[str, Any]) -> str:
    """Writes a reference file from a gathered `uvit_jax.evaluation.metrics.FeatureSet`.

    The pool3 vectors are stored when the set kept them. Written under a temporary name first.
    """
    mu, sigma = features.pool.mean_cov(min_samples=2)
    mu_s, sigma_s = features.spatial.mean_cov(min_samples=2)
    extra = dict(
        mu_s=mu_s,
        sigma_s=sigma_s,
        num_images=np.asarray(features.n, np.int64),
        protocol=np.asarray(json.dumps(protocol, sort_keys=True)),
    )
    if features.pool_features is not None:
        extra["features"] = features.pool_features
    return save_stats(path, mu, sigma, **extra)
