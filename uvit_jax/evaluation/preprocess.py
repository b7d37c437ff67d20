"""Pixels for the FID Inception: the two input protocols in use, as jittable functions.

Both start from uint8 images (how samples and datasets are compared) and end at 299 x 299:

- "pytorch_fid" (pytorch-fid, hence U-ViT's `tools/fid_score.py`): x / 255, bilinear resize
  with `F.interpolate(mode='bilinear', align_corners=False)` (half-pixel centres, no
  antialiasing even when shrinking), then 2x - 1: values in [-1, 1].
- "tf_graph" (the TF 2015-12-05 graph itself, as TTUR's `fid.py` and the ADM evaluator feed it
  images of any size): the graph's `ResizeBilinear` op (TF 1.x, align_corners=False without
  half-pixel centres: output pixel i samples input i * in / out), then (x - 128) / 128: values in
  [-1, 127/128].

The two differ in the resize grid (a sub-pixel shift when upscaling 32 -> 299) and by the
factor 255/256 in range, so FIDs computed under one are not comparable with the other's; every
result and reference file records which was used.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from uvit_jax.errors import ConfigError

Array = jax.Array
INCEPTION_SIZE = 299
PROTOCOLS = ("pytorch_fid", "tf_graph")


def _interpolation_matrix(src: np.ndarray, in_size: int) -> np.ndarray:
    """[out, in] float32 weights mixing pixels floor(src) and floor(src) + 1 (clamped)."""
    f32 = np.float32
    lo = np.minimum(src.astype(np.int64), in_size - 1)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = np.clip(src - lo.astype(f32), f32(0), f32(1)).astype(np.float64)
    weights = np.zeros((src.shape[0], in_size), np.float64)
    rows = np.arange(src.shape[0])
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights.astype(np.float32)


@functools.lru_cache(maxsize=16)
def bilinear_resize_matrix(in_size: int, out_size: int, half_pixel: bool = True) -> np.ndarray:
    """Weights of a bilinear resize along one axis: [out_size, in_size] float32, rows sum to 1.

    half_pixel=True: `F.interpolate(mode='bilinear', align_corners=False)`: output pixel i
    samples src = (i + 0.5) * in / out - 0.5, clamped below at 0. half_pixel=False: TF 1.x
    `ResizeBilinear(align_corners=False)`: src = i * in / out. Either way only the two
    neighbouring pixels are read (no antialiasing), the last one repeating at the border.
    """
    # float32 arithmetic like both frameworks' CPU kernels, so large shrinks agree to the bit.
    f32 = np.float32
    scale = f32(in_size) / f32(out_size)
    i = np.arange(out_size, dtype=f32)
    if half_pixel:
        src = np.maximum(scale * (i + f32(0.5)) - f32(0.5), f32(0))
    else:
        src = scale * i
    return _interpolation_matrix(src, in_size)


def resize_bilinear(x: Array, size: tuple[int, int], half_pixel: bool = True) -> Array:
    """Bilinear resize of NHWC float images (see `bilinear_resize_matrix` for the grid).

    Separable: two small matmuls, at HIGHEST precision so that GPUs do not round the pixels to
    TF32.

    Args:
      x: [B, H, W, C] float32.
      size: (out_h, out_w).
      half_pixel: pytorch's grid (True) or TF 1.x's (False).
    Returns:
      [B, out_h, out_w, C] float32.
    """
    _, h, w, _ = x.shape
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return x  # every weight row is one-hot on both grids: identity
    wh = jnp.asarray(bilinear_resize_matrix(h, out_h, half_pixel))
    ww = jnp.asarray(bilinear_resize_matrix(w, out_w, half_pixel))
    hi = jax.lax.Precision.HIGHEST
    x = jnp.einsum("ih,bhwc->biwc", wh, x, precision=hi)
    return jnp.einsum("jw,biwc->bijc", ww, x, precision=hi)


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"config.eval.protocol={protocol!r}: unknown Inception input protocol; expected one "
            f"of {PROTOCOLS}"
        )
    return protocol


def inception_input(images: Array, protocol: str = "pytorch_fid") -> Array:
    """uint8 [B, H, W, 3] -> float32 [B, 299, 299, 3], the network's input under `protocol`."""
    check_protocol(protocol)
    x = jnp.asarray(images).astype(jnp.float32)
    size = (INCEPTION_SIZE, INCEPTION_SIZE)
    if protocol == "pytorch_fid":
        return 2.0 * resize_bilinear(x / 255.0, size) - 1.0
    return (resize_bilinear(x, size, half_pixel=False) - 128.0) / 128.0
