"""Images for people and metrics: uint8 quantisation, grids, PNG files."""

from __future__ import annotations

import math
import os

import jax
import jax.numpy as jnp
import numpy as np

# How samples in [-1, 1] become pixels, recorded with every FID (it changes the numbers).
QUANTISATION = "floor(clip((x + 1) / 2, 0, 1) * 255 + 0.5)"


def quantize_samples(x: jax.Array | np.ndarray) -> jax.Array:
    """Samples in [-1, 1] -> uint8 pixels the way U-ViT saves them (jittable).

    U-ViT maps samples with (x + 1) / 2 clamped to [0, 1], and torchvision's `save_image`
    writes x * 255 + 0.5 truncated to uint8: `QUANTISATION`.

    Args:
      x: [..., C] float images, nominally in [-1, 1] (values outside are clamped).
    Returns:
      Same shape, uint8.
    """
    x = jnp.clip((jnp.asarray(x, jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    return jnp.floor(x * 255.0 + 0.5).astype(jnp.uint8)


def to_uint8(x: np.ndarray | jax.Array) -> np.ndarray:
    """[..., C] float in [-1, 1] -> uint8 numpy (`quantize_samples` on the host's copy)."""
    return np.asarray(quantize_samples(x))


def to_rgb(images: np.ndarray) -> np.ndarray:
    """[..., C] uint8 with C = 1 or 3 -> [..., 3]: grey images repeated over three channels
    (what the FID Inception and every image viewer read)."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def make_grid(images: np.ndarray, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    """[N, H, W, C] uint8 -> one [rows*(H+pad)+pad, ncol*(W+pad)+pad, C] uint8 image."""
    images = np.asarray(images)
    n, h, w, c = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + k * (w + pad) :][:, :w] = img
    return grid


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    """Writes an [H, W, C] uint8 image (C = 1 or 3) as PNG, creating the folder."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.fspath(path)) or ".", exist_ok=True)
    image = np.asarray(image)
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(path)
