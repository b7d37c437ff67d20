"""Model FLOPs of U-ViT, counted the usual way, and known accelerator peaks for MFU.

forward = 2 x (weights of every matmul, applied to the tokens it sees) + 4 L^2 D per block for
attention (QK^T and AV); a training step = 3 x forward.
"""

from __future__ import annotations

from collections.abc import Mapping

from uvit_jax.models.uvit import model_kwargs
from uvit_jax.parallel.chips import chip_of_device_kind


def peak_tflops(device_kind: str) -> float | None:
    """Known dense bf16 peak (TFLOP/s) of a device kind (`uvit_jax.parallel.chips`), or None
    (then MFU needs `--peak_tflops`)."""
    chip = chip_of_device_kind(device_kind)
    return None if chip is None else chip.peak_bf16_flops / 1e12


def forward_flops(model: Mapping) -> float:
    """FLOPs of one forward pass for one example of a `config.model` section."""
    d, depth = model["embed_dim"], model["depth"]
    p, c, side = model["patch_size"], model["in_chans"], model["img_size"]
    m = int(d * model["mlp_ratio"])
    n = (side // p) ** 2
    text = model_kwargs(model)["text"]
    extras = 1 + model["num_clip_token"] if text else (2 if model["num_classes"] > 0 else 1)
    tokens = extras + n
    blocks = depth + 1
    per_block = 3 * d * d + d * d + 2 * d * m
    matmul = blocks * per_block * tokens
    if model.get("skip", True):
        matmul += (depth // 2) * 2 * d * d * tokens
    matmul += n * p * p * c * d  # patch embedding
    matmul += tokens * d * p * p * c  # decoder_pred over all tokens
    if text:
        matmul += model["num_clip_token"] * model["clip_dim"] * d
    if model.get("mlp_time_embed", False):
        matmul += 8 * d * d
    if model.get("conv", True):
        matmul += side * side * 9 * c * c
    attention = blocks * 4 * tokens * tokens * d
    return 2.0 * matmul + attention


def train_step_flops(model: Mapping, batch_size: int) -> float:
    """FLOPs of one training step (forward + backward = 3 x forward) for the global batch."""
    return 3.0 * forward_flops(model) * batch_size
