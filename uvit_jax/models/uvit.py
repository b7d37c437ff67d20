"""U-ViT (Bao et al., CVPR 2023) in Flax NNX, faithful to the official PyTorch release.

All inputs are tokens: the time, the condition (class label or CLIP context tokens) and the image
patches; long skip connections join shallow and deep blocks. Parameter paths mirror the official
state-dict names (`in_blocks/3/attn/qkv/kernel` <-> `in_blocks.3.attn.qkv.weight`) so that
`uvit_jax.convert.uvit` maps them mechanically.

Precision: parameters are float32; matmuls and attention run in `dtype` (bf16 for speed);
LayerNorm statistics, softmax and the residual stream stay float32.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvit_jax.errors import ConfigError
from uvit_jax.parallel.activations import constrain_batch

Array = jax.Array

# Official init: timm trunc_normal_(std=.02) truncates at +-2 *absolute*, i.e. ~100 std, so it
# is a plain normal in practice.
_linear_init = nnx.initializers.normal(0.02)
# PyTorch's default conv init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

ATTENTION_IMPLS = ("auto", "xla", "cudnn")
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _torch_conv_bias_init(fan_in: int) -> Callable:
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def timestep_embedding(t: Array, dim: int, max_period: float = 10000.0) -> Array:
    """Sinusoidal embedding of (fractional) timesteps, cos half first as in the official code.

    Args:
      t: [B] float timesteps in the network's units (999 t or n).
      dim: embedding width D.
    Returns:
      [B, D] float32.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def resolve_attention(requested: str, dtype: jnp.dtype) -> str:
    """Chooses the `jax.nn.dot_product_attention` implementation.

    "cudnn" needs a CUDA backend and 16-bit inputs; where either is missing we fall back to XLA
    with a log line rather than failing, so one config runs on CPU, GPU and TPU.
    """
    if requested not in ATTENTION_IMPLS:
        raise ConfigError(f"model.attention={requested!r}; expected one of {ATTENTION_IMPLS}")
    if requested == "xla":
        return "xla"
    on_gpu = jax.default_backend() == "gpu"
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if on_gpu and half:
        return "cudnn"
    if requested == "cudnn":
        why = "the backend is not CUDA" if not on_gpu else f"dtype {jnp.dtype(dtype)} is not 16-bit"
        logging.warning("cuDNN attention requested but %s: using XLA attention", why)
    return "xla"


class Attention(nnx.Module):
    """Multi-head self-attention; qkv output split as (3, heads, head_dim), 3 outermost."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, *, dtype, impl: str, rngs):
        self.num_heads = num_heads
        self.impl = impl
        self.dtype = dtype
        self.qkv = nnx.Linear(
            dim, 3 * dim, use_bias=qkv_bias, dtype=dtype, kernel_init=_linear_init, rngs=rngs
        )
        self.proj = nnx.Linear(dim, dim, dtype=dtype, kernel_init=_linear_init, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        qkv = constrain_batch(qkv)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # [B, N, H, Dh]
        # The default scale is head_dim**-0.5, as in the official code.
        out = jax.nn.dot_product_attention(q, k, v, implementation=self.impl)
        return self.proj(out.reshape(b, n, d))


class Mlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, dtype, rngs):
        self.fc1 = nnx.Linear(dim, hidden, dtype=dtype, kernel_init=_linear_init, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, dtype=dtype, kernel_init=_linear_init, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class Block(nnx.Module):
    """Pre-LN transformer block; out-blocks first fuse a long skip with a 2D -> D linear."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        skip: bool,
        *,
        dtype,
        attention: str,
        rngs,
    ):
        norm = functools.partial(nnx.LayerNorm, dim, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
        self.skip_linear = (
            nnx.Linear(2 * dim, dim, dtype=dtype, kernel_init=_linear_init, rngs=rngs)
            if skip
            else None
        )
        self.norm1 = norm()
        self.attn = Attention(dim, num_heads, qkv_bias, dtype=dtype, impl=attention, rngs=rngs)
        self.norm2 = norm()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, skip: Array | None = None) -> Array:
        if self.skip_linear is not None:
            x = self.skip_linear(jnp.concatenate([x, skip], axis=-1)).astype(jnp.float32)
        x = x + self.attn(self.norm1(x)).astype(jnp.float32)
        x = x + self.mlp(self.norm2(x)).astype(jnp.float32)
        return constrain_batch(x)


class TimeMLP(nnx.Module):
    """Optional time-embedding MLP (official `time_embed`: Linear D->4D, SiLU, Linear 4D->D)."""

    def __init__(self, dim: int, *, dtype, rngs):
        self.layers = nnx.List(
            [
                nnx.Linear(dim, 4 * dim, dtype=dtype, kernel_init=_linear_init, rngs=rngs),
                None,  # the SiLU sits at official index 1 and has no parameters
                nnx.Linear(4 * dim, dim, dtype=dtype, kernel_init=_linear_init, rngs=rngs),
            ]
        )

    def __call__(self, t_emb: Array) -> Array:
        return self.layers[2](jax.nn.silu(self.layers[0](t_emb))).astype(jnp.float32)


class UViT(nnx.Module):
    """U-ViT noise-prediction network.

    Class-conditional when `num_classes > 0` (tokens [label, time, patches]); unconditional when
    `num_classes <= 0` ([time, patches]); text-to-image when `clip_dim`/`num_clip_token` are given
    with `text=True` ([time, context..., patches]).
    """

    def __init__(
        self,
        *,
        img_size: int,
        patch_size: int,
        in_chans: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        num_classes: int = -1,
        conv: bool = True,
        skip: bool = True,
        text: bool = False,
        clip_dim: int = 768,
        num_clip_token: int = 77,
        dtype: jnp.dtype | str = jnp.float32,
        attention: str = "auto",
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if img_size % patch_size:
            raise ConfigError(f"model.patch_size={patch_size} does not divide img_size={img_size}")
        if embed_dim % num_heads:
            raise ConfigError(f"model.num_heads={num_heads} does not divide embed_dim={embed_dim}")
        if remat not in REMAT_POLICIES:
            raise ConfigError(f"model.remat={remat!r}; expected one of {tuple(REMAT_POLICIES)}")
        dtype = jnp.dtype(dtype)
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim = embed_dim
        self.text = text
        self.num_classes = num_classes
        self.remat = remat
        self.dtype = dtype
        num_patches = (img_size // patch_size) ** 2
        if text:
            self.extras = 1 + num_clip_token
        else:
            self.extras = 2 if num_classes > 0 else 1

        fan_in = in_chans * patch_size * patch_size
        self.patch_embed = nnx.Module()
        self.patch_embed.proj = nnx.Conv(
            in_chans,
            embed_dim,
            (patch_size, patch_size),
            strides=patch_size,
            padding="VALID",
            dtype=dtype,
            kernel_init=_torch_conv_init,
            bias_init=_torch_conv_bias_init(fan_in),
            rngs=rngs,
        )
        self.time_embed = TimeMLP(embed_dim, dtype=dtype, rngs=rngs) if mlp_time_embed else None
        self.label_emb = (
            nnx.Embed(
                num_classes, embed_dim, embedding_init=nnx.initializers.normal(1.0), rngs=rngs
            )
            if num_classes > 0 and not text
            else None
        )
        self.context_embed = (
            nnx.Linear(clip_dim, embed_dim, dtype=dtype, kernel_init=_linear_init, rngs=rngs)
            if text
            else None
        )
        self.pos_embed = nnx.Param(
            _linear_init(rngs.params(), (1, self.extras + num_patches, embed_dim), jnp.float32)
        )
        impl = resolve_attention(attention, dtype)
        block = functools.partial(
            Block, embed_dim, num_heads, mlp_ratio, qkv_bias, dtype=dtype, attention=impl, rngs=rngs
        )
        self.in_blocks = nnx.List([block(skip=False) for _ in range(depth // 2)])
        self.mid_block = block(skip=False)
        self.out_blocks = nnx.List([block(skip=skip) for _ in range(depth // 2)])
        self.norm = nnx.LayerNorm(embed_dim, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
        self.decoder_pred = nnx.Linear(
            embed_dim, patch_size * patch_size * in_chans, kernel_init=_linear_init, rngs=rngs
        )
        self.final_layer = (
            nnx.Conv(
                in_chans,
                in_chans,
                (3, 3),
                padding="SAME",
                kernel_init=_torch_conv_init,
                bias_init=_torch_conv_bias_init(in_chans * 9),
                rngs=rngs,
            )
            if conv
            else None
        )

    def _run_block(self, block: Block, x: Array, skip: Array | None) -> Array:
        policy = REMAT_POLICIES[self.remat]
        if self.remat == "none":
            return block(x, skip)
        return nnx.remat(lambda b, h, s: b(h, s), policy=policy)(block, x, skip)

    def __call__(
        self, x: Array, t: Array, y: Array | None = None, context: Array | None = None
    ) -> Array:
        """Predicts the noise.

        Args:
          x: [B, H, W, C] float32 noisy input (NHWC).
          t: [B] float timesteps in network units (999 t for VP-continuous, n for discrete).
          y: [B] int32 class labels (class-conditional models).
          context: [B, L, clip_dim] float32 text encodings (text-to-image models).
        Returns:
          [B, H, W, C] float32 predicted noise.
        """
        b, h, w, c = x.shape
        if (h, w, c) != (self.img_size, self.img_size, self.in_chans):
            raise ValueError(
                f"input of shape {x.shape[1:]} (H, W, C); the model expects "
                f"({self.img_size}, {self.img_size}, {self.in_chans})"
            )
        tokens = self.patch_embed.proj(x).astype(jnp.float32).reshape(b, -1, self.embed_dim)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        time_token = timestep_embedding(t, self.embed_dim)
        if self.time_embed is not None:
            time_token = self.time_embed(time_token)
        prefix = [time_token[:, None]]
        if self.text:
            if context is None:
                raise ValueError("a text-to-image U-ViT needs `context` [B, L, clip_dim]")
            prefix.append(self.context_embed(context).astype(jnp.float32))
        elif self.label_emb is not None:
            if y is None:
                raise ValueError("a class-conditional U-ViT needs labels `y` [B]")
            prefix.insert(0, self.label_emb(y)[:, None].astype(jnp.float32))
        x = jnp.concatenate([*prefix, tokens], axis=1) + self.pos_embed[...]
        x = constrain_batch(x)

        skips = []
        for blk in self.in_blocks:
            x = self._run_block(blk, x, None)
            skips.append(x)
        x = self._run_block(self.mid_block, x, None)
        for blk in self.out_blocks:
            x = self._run_block(blk, x, skips.pop())

        x = self.decoder_pred(self.norm(x)).astype(jnp.float32)[:, self.extras :]
        x = unpatchify(x, self.patch_size, self.in_chans, self.img_size // self.patch_size)
        if self.final_layer is not None:
            x = self.final_layer(x)
        return x


def unpatchify(x: Array, p: int, c: int, n_side: int) -> Array:
    """[B, N, p*p*C] (per-patch vector ordered p1, p2, C) -> [B, H, W, C]."""
    b = x.shape[0]
    x = x.reshape(b, n_side, n_side, p, p, c)
    return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, n_side * p, n_side * p, c)


# ---------------------------------------------------------------------------------------------
# Construction from configs
# ---------------------------------------------------------------------------------------------

_OFFICIAL_ARGS = (
    "img_size",
    "patch_size",
    "in_chans",
    "embed_dim",
    "depth",
    "num_heads",
    "mlp_ratio",
    "qkv_bias",
    "mlp_time_embed",
    "num_classes",
    "conv",
    "skip",
    "clip_dim",
    "num_clip_token",
)


def model_kwargs(model_config) -> dict:
    """Constructor kwargs of `UViT` from a `config.model` section (or official-args mapping).

    Accepts both our config (`kind`, `dtype`, `attention`, `remat`) and the official
    constructor dicts of the golden files (`kind` = "uvit" / "uvit_t2i", no compute options).
    """
    cfg = dict(model_config)
    kind = cfg.get("kind", "uvit")
    if kind not in ("uvit", "uvit_t2i"):
        raise ConfigError(f"model.kind={kind!r}; expected 'uvit' or 'uvit_t2i'")
    kwargs = {k: cfg[k] for k in _OFFICIAL_ARGS if k in cfg}
    kwargs["text"] = kind == "uvit_t2i"
    if kwargs["text"]:
        kwargs.pop("num_classes", None)
    for k in ("dtype", "attention", "remat"):
        if k in cfg:
            kwargs[k] = cfg[k]
    return kwargs


def build_uvit(model_config, *, seed: int = 0) -> UViT:
    """Builds (and initialises) a U-ViT from a `config.model` section."""
    return UViT(**model_kwargs(model_config), rngs=nnx.Rngs(seed))


def abstract_uvit(model_config) -> UViT:
    """The model with `jax.ShapeDtypeStruct` leaves: no memory (for counting and sharding)."""
    return nnx.eval_shape(lambda: build_uvit(model_config))


def count_params(model: nnx.Module) -> int:
    """Number of parameters (works on abstract models)."""
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(np.prod(x.shape) for x in leaves))


@functools.lru_cache(maxsize=16)
def apply_fn(graphdef: nnx.GraphDef) -> Callable:
    """fn(params, x, t, y, context) -> eps for a model structure: a pure function of the weights.

    Cached per graphdef so that jitted callers (samplers) see one callable and compile once.
    """

    def apply(params: nnx.State, x: Array, t: Array, y: Array | None, context: Array | None):
        return nnx.merge(graphdef, params)(x, t, y=y, context=context)

    return apply
