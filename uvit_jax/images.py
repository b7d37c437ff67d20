"""Images for people: uint8 quantisation, grids, PNG files."""

from __future__ import annotations

import math
import os

import numpy as np


def to_uint8(x: np.ndarray) -> np.ndarray:
    """[..., C] float in [-1, 1] -> uint8 numpy, as U-ViT quantises samples (clamp, x*255 + 0.5)."""
    from uvit_jax.evaluation.preprocess import quantize_samples

    return np.asarray(quantize_samples(x))


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
