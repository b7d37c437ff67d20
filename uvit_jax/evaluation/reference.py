"""Reference statistics files: read and write FID `mu` / `sigma` `.npz` files.

Two formats are common and both hold float64 `mu` [2048] and `sigma` [2048, 2048]:
- pytorch-fid / U-ViT (`fid_stats_cifar10_train_pytorch.npz`,
  `fid_stats_imagenet256_guided_diffusion.npz`);
- the ADM evaluator's reference batches (`VIRTUAL_imagenet256_labeled.npz`), which add the
  images as `arr_0` [N, H, W, 3] uint8 and spatial-feature statistics `mu_s` / `sigma_s`.
"""

from __future__ import annotations

import os

import numpy as np

from uvit_jax.evaluation.statistics import FEATURE_DIM


def _open(path: str | os.PathLike):
    path = os.fspath(path)
    if not path:
        raise FileNotFoundError(
            "no FID reference statistics given (eval.ref_stats): point it at a pytorch-fid/U-ViT "
            "or ADM .npz with `mu` and `sigma`, or compute one with --mode fid_stats"
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"FID reference statistics not found: {path}")
    try:
        return path, np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from e


def load_stats(path: str | os.PathLike, dim: int = FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
    """Reads `mu` [dim] and `sigma` [dim, dim] as float64 from a pytorch-fid/U-ViT/ADM `.npz`.

    Raises:
      FileNotFoundError: no such file. KeyError: a key is missing (the message names the file,
        the key and the keys present). ValueError: wrong shapes or non-finite values.
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
            raise KeyError(
                f"{path}: missing key(s) {', '.join(missing)}; FID statistics need `mu` and "
                f"`sigma`, the file has {', '.join(f.files) or 'no arrays'}{hint}"
            )
        mu = np.asarray(f["mu"], np.float64)
        sigma = np.asarray(f["sigma"], np.float64)
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(
            f"{path}: mu has shape {mu.shape} and sigma {sigma.shape}; expected ({dim},) and "
            f"({dim}, {dim}) (pool3 features of the FID Inception)"
        )
    if not (np.all(np.isfinite(mu)) and np.all(np.isfinite(sigma))):
        raise ValueError(f"{path}: mu or sigma has non-finite values")
    return mu, sigma


def load_reference_images(path: str | os.PathLike) -> np.ndarray:
    """The images `arr_0` [N, H, W, 3] uint8 of an ADM reference batch (or a sample `.npz`)."""
    path, f = _open(path)
    with f:
        if "arr_0" not in f.files:
            raise KeyError(
                f"{path}: missing key arr_0 (images [N, H, W, 3] uint8); the file has "
                f"{', '.join(f.files) or 'no arrays'}"
            )
        images = f["arr_0"]
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
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
