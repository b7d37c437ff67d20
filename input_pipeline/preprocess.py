"""The image preprocessing of U-ViT's datasets (official `datasets.py`), PIL in, uint8 out.

Every function takes a decoded PIL image and returns uint8 [res, res, C] (C = 3 for RGB, 1 for
grayscale); `to_model_range` then maps 0..255 to [-1, 1] exactly as the official code
(`x / 127.5 - 1`). Horizontal-flip copies (`flip`) are made after cropping, as U-ViT's extraction
script flips the preprocessed tensor.

  * "adm_center_crop" (ImageNet, ADM's `center_crop_arr`): halve with a BOX filter while the
    short side >= 2 res, BICUBIC-resize the short side to res (sizes rounded), centre crop.
  * "celeba" (U-ViT's CelebA 64): the fixed 128 x 128 box at rows 57..184, columns 25..152 of the
    aligned 178 x 218 image, then a bilinear resize to res (torchvision's `Resize` on PIL).
  * "coco" (U-ViT's MS-COCO): centre square crop of the short side, LANCZOS resize to res.
  * "pad" (Fashion-MNIST 28 -> 32): zero (black, -1 after scaling) padding to res, centred.
  * "center_crop" (CIFAR10 and other small images): no change when already res x res, else a
    BICUBIC short-side resize and a centre crop.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image

from input_pipeline.errors import DataConfigError

# U-ViT's CelebA crop: centre (cx, cy) = (89, 121), 128 x 128; PIL box (left, top, right, bottom).
CELEBA_BOX = (89 - 64, 121 - 64, 89 + 64, 121 + 64)

PREPROCESSORS = ("adm_center_crop", "celeba", "coco", "pad", "center_crop")


def _as_array(image: Image.Image) -> np.ndarray:
    """uint8 [H, W, C] (a grayscale image keeps one channel)."""
    arr = np.asarray(image, dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _centre(arr: np.ndarray, res: int) -> np.ndarray:
    top = (arr.shape[0] - res) // 2
    left = (arr.shape[1] - res) // 2
    return arr[top : top + res, left : left + res]


def adm_center_crop(image: Image.Image, res: int) -> np.ndarray:
    """ADM `center_crop_arr`: BOX halving, BICUBIC short side to `res`, centre crop."""
    while min(image.size) >= 2 * res:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = res / min(image.size)
    image = image.resize(tuple(round(s * scale) for s in image.size), resample=Image.BICUBIC)
    return _centre(_as_array(image), res)


def celeba_crop(image: Image.Image, res: int) -> np.ndarray:
    """U-ViT's CelebA: fixed 128 x 128 face box, then bilinear resize to `res` x `res`."""
    if image.size[0] < CELEBA_BOX[2] or image.size[1] < CELEBA_BOX[3]:
        raise ValueError(
            f"CelebA crop needs an aligned image of at least {CELEBA_BOX[2]}x{CELEBA_BOX[3]}, "
            f"got {image.size[0]}x{image.size[1]}"
        )
    image = image.crop(CELEBA_BOX).resize((res, res), resample=Image.BILINEAR)
    return _as_array(image)


def coco_center_crop(image: Image.Image, res: int) -> np.ndarray:
    """U-ViT's MS-COCO `center_crop`: square crop of the short side, LANCZOS to `res`."""
    arr = _as_array(image)
    side = min(arr.shape[:2])
    top = (arr.shape[0] - side) // 2
    left = (arr.shape[1] - side) // 2
    square = arr[top : top + side, left : left + side]
    square = square[..., 0] if square.shape[-1] == 1 else square
    return _as_array(Image.fromarray(square).resize((res, res), resample=Image.LANCZOS))


def pad_to(image: Image.Image, res: int) -> np.ndarray:
    """Centres the image on a black `res` x `res` canvas (Fashion-MNIST 28 -> 32)."""
    arr = _as_array(image)
    h, w = arr.shape[:2]
    if h > res or w > res:
        raise ValueError(f"cannot pad a {h}x{w} image to {res}x{res}: it is larger")
    top, left = (res - h) // 2, (res - w) // 2
    out = np.zeros((res, res, arr.shape[2]), np.uint8)
    out[top : top + h, left : left + w] = arr
    return out


def center_crop(image: Image.Image, res: int) -> np.ndarray:
    """Unchanged when already `res` x `res`; else BICUBIC short side to `res`, centre crop."""
    if image.size != (res, res):
        scale = res / min(image.size)
        size = tuple(max(res, round(s * scale)) for s in image.size)
        image = image.resize(size, resample=Image.BICUBIC)
    return _centre(_as_array(image), res)


def make_preprocessor(name: str, res: int, channels: int) -> Callable[[Image.Image], np.ndarray]:
    """PIL image -> uint8 [res, res, channels] with the named preprocessing.

    The image is first converted to RGB (channels 3) or grayscale "L" (channels 1), as the
    official loaders do with `convert("RGB")`.
    """
    fns = {
        "adm_center_crop": adm_center_crop,
        "celeba": celeba_crop,
        "coco": coco_center_crop,
        "pad": pad_to,
        "center_crop": center_crop,
    }
    if name not in fns:
        raise DataConfigError(f"config.data.preprocess={name!r}; expected one of {PREPROCESSORS}")
    if channels not in (1, 3):
        raise ValueError(f"images have 1 or 3 channels, the config asks for {channels}")
    mode = "RGB" if channels == 3 else "L"
    fn = fns[name]

    def preprocess(image: Image.Image) -> np.ndarray:
        if image.mode != mode:
            image = image.convert(mode)
        out = fn(image, res)
        assert out.shape == (res, res, channels), out.shape
        return out

    return preprocess


def preprocess_arrays(name: str, res: int, channels: int, images: np.ndarray) -> np.ndarray | None:
    """`make_preprocessor(name, res, channels)` on a batch of raw images at once, where it needs
    no resampling; None where it does (the caller then goes image by image through PIL).

    The per-image path costs ~20 us of Python per image (a PIL image, a mode check, a new
    canvas), more than the rest of a pixel extraction together. It equals a pure array operation
    here: "pad" of images no larger than `res`, and "center_crop" of images already `res` x
    `res`; the grayscale -> RGB conversion copies the channel, as PIL's does.

    Args:
      images: uint8 [n, H, W] (grayscale, PIL mode "L") or [n, H, W, 3] (RGB).
    Returns:
      uint8 [n, res, res, channels], or None.
    """
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        return None
    if images.ndim == 4 and (images.shape[-1] != 3 or channels != 3):
        return None  # RGB -> L weighs and rounds the channels: PIL's path
    arr = images[..., None] if images.ndim == 3 else images
    if channels == 3 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    h, w = arr.shape[1:3]
    if name == "center_crop" and (h, w) == (res, res):
        return np.ascontiguousarray(arr)
    if name == "pad" and h <= res and w <= res:
        top, left = (res - h) // 2, (res - w) // 2
        out = np.zeros((len(arr), res, res, channels), np.uint8)
        out[:, top : top + h, left : left + w] = arr
        return out
    return None


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 [..., H, W, C] -> float32 in [-1, 1] (`x / 127.5 - 1`, as the official code)."""
    return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def flip(images: np.ndarray) -> np.ndarray:
    """Horizontal flip of [..., H, W, C] images (the W axis)."""
    return images[..., :, ::-1, :]
