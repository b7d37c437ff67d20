"""Pixels for FID: U-ViT's quantisation of samples and pytorch-fid's Inception input pipeline.

pytorch-fid reads PNGs as uint8, divides by 255, resizes bilinearly to 299 x 299 with
`F.interpolate(mode='bilinear', align_corners=False)` (half-pixel centres, no antialiasing even
when shrinking) and maps [0, 1] to [-1, 1]. U-ViT writes samples to PNG after
`(x + 1) / 2`, clamping to [0, 1] and `x * 255 + 0.5` truncated to uint8 (torchvision's
`save_image`). Doing both here on the devices gives the same numbers without the PNG round trip.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
INCEPTION_SIZE = 299


def quantize_samples(x: Array) -> Array:
    """Samples in [-1, 1] -> uint8 pixels the way U-ViT saves them.

    Args:
      x: [..., C] float images, nominally in [-1, 1] (values outside are clamped).
    Returns:
      Same shape, uint8: floor(clip((x + 1) / 2, 0, 1) * 255 + 0.5).
    """
    x = jnp.clip((jnp.asarray(x, jnp.float32) + 1.0) / 2.0, 0.0, 1.0)
    return jnp.floor(x * 255.0 + 0.5).astype(jnp.uint8)


@functools.lru_cache(maxsize=16)
def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """Weights of `F.interpolate(mode='bilinear', align_corners=False)` along one axis.

    Output pixel i samples the input at src = (i + 0.5) * in/out - 0.5, clamped below at 0, and
    mixes the two neighbouring pixels floor(src) and floor(src) + 1 (the last one repeats at the
    border). No antialiasing: a shrinking resize also reads only two pixels.

    Returns:
      [out_size, in_size] float32, rows summing to 1.
    """
    # float32 arithmetic like pytorch's CPU kernel, so that large shrinks agree to the last bits.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    src = np.maximum(scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5), f32(0))
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(f32), f32(0), f32(1)).astype(np.float64)
    weights = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights.astype(np.float32)


def resize_bilinear(x: Array, size: tuple[int, int]) -> Array:
    """Bilinear resize of NHWC float images with pytorch's `align_corners=False` semantics.

    Separable: two small matmuls with `bilinear_resize_matrix` weights, at HIGHEST precision so
    that GPUs do not round the pixels to TF32.

    Args:
      x: [B, H, W, C] float32.
      size: (out_h, out_w).
    Returns:
      [B, out_h, out_w, C] float32.
    """
    _, h, w, _ = x.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return x  # every weight row is one-hot: identity
    wh = jnp.asarray(bilinear_resize_matrix(h, out_h))
    ww = jnp.asarray(bilinear_resize_matrix(w, out_w))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("ih,bhwc->biwc", wh, x, precision=hi)
    return jnp.einsum("jw,biwc->bijc", ww, x, precision=hi)


def preprocess_uint8(images: Array) -> Array:
    """pytorch-fid's input pipeline: uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3] in [-1, 1].

    /255, bilinear resize to 299 x 299 (half-pixel centres, no antialias), then 2x - 1.
    """
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    x = resize_bilinear(x, (INCEPTION_SIZE, INCEPTION_SIZE))
    return 2.0 * x - 1.0
