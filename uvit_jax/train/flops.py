"""Model FLOPs of U-ViT, counted from the model itself, and known accelerator peaks for MFU.

forward = 2 x the multiply-adds of every matmul and convolution of the model's forward pass for
one example, read off its traced program (`jax.make_jaxpr`; nothing runs): 2 x (weights of every
matmul, applied to the tokens it sees) + 4 L^2 D per block for attention (QK^T and AV), and
whatever a `config.model` variant adds, without a formula to keep in step with the model.
Embedding lookups, norms and elementwise operations are not counted. A training step = 3 x
forward.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping

import jax
import jax.extend as jex
import jax.numpy as jnp
from flax import nnx

from uvit_jax.models.uvit import UViT, UViTConfig
from uvit_jax.parallel.chips import chip_of_device_kind


def peak_tflops(device_kind: str) -> float | None:
    """Known dense bf16 peak (TFLOP/s) of a device kind (`uvit_jax.parallel.chips`), or None
    (then MFU needs `--peak_tflops`)."""
    chip = chip_of_device_kind(device_kind)
    return None if chip is None else chip.peak_bf16_flops / 1e12


def matmul_flops(jaxpr: jex.core.Jaxpr) -> int:
    """2 x the multiply-adds of a jaxpr's `dot_general` and `conv_general_dilated` equations,
    those of inner jaxprs included (a scan's body times its length, a cond's costliest branch).
    """
    total = 0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        out = math.prod(eqn.outvars[0].aval.shape) if eqn.outvars else 0
        if name == "dot_general":
            (contracting, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * out * math.prod(lhs[i] for i in contracting)
        elif name == "conv_general_dilated":
            # Each output element: the kernel's window x its input features (per group).
            rhs, spec = eqn.invars[1].aval.shape, eqn.params["dimension_numbers"].rhs_spec
            total += 2 * out * math.prod(rhs[i] for i in spec[1:])
        elif name == "while":
            raise ValueError("matmul_flops: a while loop's trip count is not in its jaxpr")
        inner = [matmul_flops(j) for j in _inner_jaxprs(eqn)]
        if name == "cond":
            total += max(inner)
        elif name == "scan":
            total += eqn.params["length"] * sum(inner)
        else:
            total += sum(inner)
    return total


def _inner_jaxprs(eqn) -> list[jex.core.Jaxpr]:
    found = []
    for value in eqn.params.values():
        for v in value if isinstance(value, tuple | list) else (value,):
            if isinstance(v, jex.core.ClosedJaxpr):
                found.append(v.jaxpr)
            elif isinstance(v, jex.core.Jaxpr):
                found.append(v)
    return found


def forward_flops(model: Mapping | UViTConfig) -> float:
    """FLOPs of one forward pass for one example of a `config.model` section."""
    # The compute options change no matmul; XLA attention is traceable anywhere.
    return float(_forward_flops(UViTConfig.from_config(model, attention="xla", remat="none")))


@functools.lru_cache(maxsize=32)
def _forward_flops(fields: UViTConfig) -> int:
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UViT(fields, rngs=nnx.Rngs(0))))
    side, c = fields.img_size, fields.in_chans
    x = jax.ShapeDtypeStruct((1, side, side, c), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    y = jax.ShapeDtypeStruct((1,), jnp.int32)
    context = jax.ShapeDtypeStruct((1, fields.num_clip_token, fields.clip_dim), jnp.float32)

    def forward(state, x, t, y, context):
        return nnx.merge(graphdef, state)(x, t, y=y, context=context)

    # Outside any mesh: one example cannot be split over the batch axes.
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        return matmul_flops(jax.make_jaxpr(forward)(state, x, t, y, context).jaxpr)


def train_step_flops(model: Mapping | UViTConfig, batch_size: int) -> float:
    """FLOPs of one training step (forward + backward = 3 x forward) for the global batch."""
    return 3.0 * forward_flops(model) * batch_size
