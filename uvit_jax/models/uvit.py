"""U-ViT (Bao et al., CVPR 2023) in Flax NNX, faithful to the official PyTorch release.

All inputs are tokens: the time, the condition (class label or CLIP context tokens) and the image
patches; long skip connections join shallow and deep blocks. Parameter paths mirror the official
state-dict names (`in_blocks/3/attn/qkv/kernel` <-> `in_blocks.3.attn.qkv.weight`) so that
`uvit_jax.convert.uvit` maps them mechanically.

Its fields are `UViTConfig` (`config_defaults.py`): the official constructor arguments, the paper's
design alternatives (Sec. 3.1, Figure 2 a-e: `skip_fusion`, `time_conditioning`, `conv_position`,
`patch_embed`, `pos_embed`; each default is U-ViT's choice, whose parameters are the official
ones) and the compute options.

Precision: parameters are float32; matmuls and attention run in `dtype` (bf16 for speed);
LayerNorm statistics, softmax and the residual stream stay float32.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from uvit_jax.config_defaults import ATTENTION_IMPLS, REMAT_NAMES, UViTConfig
from uvit_jax.errors import ConfigError
from uvit_jax.parallel.activations import constrain_batch

Array = jax.Array

# Official init: timm trunc_normal_(std=.02) truncates at +-2 *absolute*, i.e. ~100 std, so it
# is a plain normal in practice.
_linear_init = nnx.initializers.normal(0.02)
# PyTorch's default conv init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

# config.model.remat -> what the backward pass may keep of a block's forward.
REMAT_POLICIES = dict(
    zip(
        REMAT_NAMES,
        (
            None,
            jax.checkpoint_policies.nothing_saveable,
            jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        ),
        strict=True,
    )
)


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


def _modulate(h: Array, y: list[Array] | None) -> Array:
    """AdaLN(h, y) = y_s LayerNorm(h) + y_b on a normalised h, the scale written 1 + y_s (see
    `Block`); the identity without a modulation."""
    if y is None:
        return h
    y_s, y_b = y
    return h * (1.0 + y_s) + y_b


class Block(nnx.Module):
    """Pre-LN transformer block; an out-block first joins the long skip (`skip_fusion`).

    The long skip (paper Sec. 3.1, Figure 2a), h_m the main branch and h_s the skip:
      "concat_linear"    Linear(Concat(h_m, h_s)): a 2D -> D `skip_linear` (U-ViT's, official);
      "add"              h_m + h_s: no weights;
      "add_linear_skip"  h_m + Linear(h_s): a D -> D `skip_linear`;
      "linear_add"       Linear(h_m + h_s): a D -> D `skip_linear`;
      None               no long skip: an in-block, the mid-block, or `skip=False`.

    `adaln` (time_conditioning="adaln", Sec. 3.1, Figure 2b): both LayerNorms of the block
    (`norm1` before attention, `norm2` before the MLP) become AdaLN(h, y) = y_s LayerNorm(h) +
    y_b, y_s and y_b (one pair per norm) from one linear projection of the time embedding,
    `adaln`: D -> 4D, with no activation before it (the paper: "obtained from a linear
    projection of the time embedding"). The LayerNorms keep their affine parameters (the
    formula's LayerNorm is PyTorch's, affine). The projection starts at zero and the scale is
    written 1 + y_s, as in ADM's adaptive group norm (which the paper likens AdaLN to) and DiT's
    adaLN: at initialisation the block is the plain pre-LN block, and weight decay pulls the
    modulation towards the identity, not towards a zero scale that cuts the attention and MLP
    off their input. The final LayerNorm (`UViT.norm`) is outside the blocks and stays plain.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        skip_fusion: str | None,
        *,
        adaln: bool,
        dtype,
        attention: str,
        rngs,
    ):
        linear = functools.partial(nnx.Linear, dtype=dtype, kernel_init=_linear_init, rngs=rngs)
        norm = functools.partial(nnx.LayerNorm, dim, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
        self.skip_fusion = skip_fusion
        fusion_width = {"concat_linear": 2 * dim, "add_linear_skip": dim, "linear_add": dim}
        self.skip_linear = (
            linear(fusion_width[skip_fusion], dim) if skip_fusion in fusion_width else None
        )
        self.norm1 = norm()
        self.attn = Attention(dim, num_heads, qkv_bias, dtype=dtype, impl=attention, rngs=rngs)
        self.norm2 = norm()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dtype=dtype, rngs=rngs)
        self.adaln = linear(dim, 4 * dim, kernel_init=nnx.initializers.zeros) if adaln else None

    def __call__(self, x: Array, skip: Array | None = None, t_emb: Array | None = None) -> Array:
        x = self._join_skip(x, skip)
        y1 = y2 = None
        if self.adaln is not None:
            y = jnp.split(self.adaln(t_emb).astype(jnp.float32)[:, None], 4, axis=-1)
            y1, y2 = y[:2], y[2:]
        x = x + self.attn(_modulate(self.norm1(x), y1)).astype(jnp.float32)
        x = x + self.mlp(_modulate(self.norm2(x), y2)).astype(jnp.float32)
        return constrain_batch(x)

    def _join_skip(self, h_m: Array, h_s: Array | None) -> Array:
        fusion = self.skip_fusion
        if fusion is None:
            return h_m
        if fusion == "add":
            return h_m + h_s
        if fusion == "add_linear_skip":
            return h_m + self.skip_linear(h_s).astype(jnp.float32)
        joined = jnp.concatenate([h_m, h_s], axis=-1) if fusion == "concat_linear" else h_m + h_s
        return self.skip_linear(joined).astype(jnp.float32)


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


def _torch_conv(c_in: int, c_out: int, k: int, stride: int, padding, *, dtype, rngs) -> nnx.Conv:
    """A k x k conv with PyTorch's default init (as the official convs)."""
    return nnx.Conv(
        c_in,
        c_out,
        (k, k),
        strides=stride,
        padding=padding,
        dtype=dtype,
        kernel_init=_torch_conv_init,
        bias_init=_torch_conv_bias_init(c_in * k * k),
        rngs=rngs,
    )


class PatchEmbed(nnx.Module):
    """Image [B, H, W, C] -> token map [B, H/P, W/P, D] (`patch_embed`, Sec. 3.1, Figure 2d).

    "linear": the linear projection of each P x P patch, a P x P stride-P conv `proj` (official).
    "conv_stack": the convolutional stem the paper takes from Xiao et al. 2021 ("Early
      convolutions help transformers see better"): a stack of 3x3 convs `convs`, then a 1x1
      conv `proj` D -> D. The paper says no more; as in that stem each 3x3 conv has stride 2
      (padding 1) and a ReLU after it, log2(P) of them reach the patch grid, and the widths
      double up to D (..., D/4, D/2, D). Its BatchNorms are left out (each conv has a bias
      instead): they would make an example's prediction depend on the rest of its batch and
      add running statistics to a model that has no state but its parameters.
    """

    def __init__(self, kind: str, in_chans: int, dim: int, patch_size: int, *, dtype, rngs):
        conv = functools.partial(_torch_conv, dtype=dtype, rngs=rngs)
        if kind == "linear":
            self.convs = None
            self.proj = conv(in_chans, dim, patch_size, patch_size, "VALID")
            return
        n = patch_size.bit_length() - 1  # log2(P) stride-2 convs
        widths = [in_chans, *(dim // 2 ** (n - 1 - i) for i in range(n))]
        self.convs = nnx.List(
            [conv(a, b, 3, 2, ((1, 1), (1, 1))) for a, b in zip(widths, widths[1:], strict=False)]
        )
        self.proj = conv(dim, dim, 1, 1, "VALID")

    def __call__(self, x: Array) -> Array:
        for conv in self.convs or ():
            x = jax.nn.relu(conv(x))
        return self.proj(x)


def sinusoidal_2d_embedding(n_side: int, dim: int) -> Array:
    """The fixed position embedding of an n_side x n_side patch grid, [n_side**2, dim] float32
    in token (row-major) order: the patch at row i, column j gets Concat(e(i), e(j)), e the
    sinusoidal embedding of `timestep_embedding` (cos half first) of width dim / 2."""
    rows, cols = jnp.divmod(jnp.arange(n_side * n_side), n_side)
    half = dim // 2
    return jnp.concatenate(
        [timestep_embedding(rows, half), timestep_embedding(cols, dim - half)], axis=-1
    )


class UViT(nnx.Module):
    """U-ViT noise-prediction network with the fields of `config` (`UViTConfig`).

    Tokens: class-conditional when `num_classes > 0` ([label, time, patches]); unconditional
    when `num_classes <= 0` ([time, patches]); text-to-image when `kind="uvit_t2i"` ([time,
    context..., patches]). With `time_conditioning="adaln"` there is no time token: the time
    embedding modulates every block's LayerNorms (`Block`); a label or context stays tokens.

    Position embedding (`pos_embed`, Figure 2e): "learned_1d", a parameter per token
    (official); "sinusoidal_2d", a constant, not a parameter: `sinusoidal_2d_embedding` for the
    patches and zeros for the extra tokens (time, label, context), which have no place on the
    image grid and are told apart by their own embeddings already.

    The extra 3x3 conv (`conv`, `conv_position`, Figure 2c), `final_layer`: on the image after
    the linear projection back to patches (C -> C, float32, official), or before it on the
    H/P x W/P x D map of the patch tokens, after the final LayerNorm (D -> D, in `dtype` like
    the other D-wide layers).
    """

    def __init__(self, config: UViTConfig, *, rngs: nnx.Rngs):
        cfg = self.config = config
        dtype = self.dtype = jnp.dtype(cfg.dtype)
        d = cfg.embed_dim
        self.n_side = cfg.img_size // cfg.patch_size
        self.time_token = cfg.time_conditioning == "token"
        num_classes = -1 if cfg.text else cfg.num_classes  # a t2i model has no labels
        conditions = cfg.num_clip_token if cfg.text else int(num_classes > 0)
        self.extras = int(self.time_token) + conditions  # tokens before the patches

        self.patch_embed = PatchEmbed(
            cfg.patch_embed, cfg.in_chans, d, cfg.patch_size, dtype=dtype, rngs=rngs
        )
        self.time_embed = TimeMLP(d, dtype=dtype, rngs=rngs) if cfg.mlp_time_embed else None
        self.label_emb = (
            nnx.Embed(num_classes, d, embedding_init=nnx.initializers.normal(1.0), rngs=rngs)
            if num_classes > 0
            else None
        )
        self.context_embed = (
            nnx.Linear(cfg.clip_dim, d, dtype=dtype, kernel_init=_linear_init, rngs=rngs)
            if cfg.text
            else None
        )
        self.pos_embed = (
            nnx.Param(
                _linear_init(rngs.params(), (1, self.extras + self.n_side**2, d), jnp.float32)
            )
            if cfg.pos_embed == "learned_1d"
            else None
        )
        impl = resolve_attention(cfg.attention, dtype)
        block = functools.partial(
            Block,
            d,
            cfg.num_heads,
            cfg.mlp_ratio,
            cfg.qkv_bias,
            adaln=not self.time_token,
            dtype=dtype,
            attention=impl,
            rngs=rngs,
        )
        fusion = cfg.skip_fusion if cfg.skip else None
        self.in_blocks = nnx.List([block(None) for _ in range(cfg.depth // 2)])
        self.mid_block = block(None)
        self.out_blocks = nnx.List([block(fusion) for _ in range(cfg.depth // 2)])
        self.norm = nnx.LayerNorm(d, epsilon=1e-5, dtype=jnp.float32, rngs=rngs)
        self.decoder_pred = nnx.Linear(
            d, cfg.patch_size**2 * cfg.in_chans, kernel_init=_linear_init, rngs=rngs
        )
        self.conv_before_projection = cfg.conv and cfg.conv_position == "before_projection"
        width = d if self.conv_before_projection else cfg.in_chans
        self.final_layer = (
            _torch_conv(
                width,
                width,
                3,
                1,
                "SAME",
                dtype=dtype if self.conv_before_projection else None,
                rngs=rngs,
            )
            if cfg.conv
            else None
        )

    def _run_block(self, block: Block, x: Array, skip: Array | None, t_emb: Array | None):
        if self.config.remat == "none":
            return block(x, skip, t_emb)
        policy = REMAT_POLICIES[self.config.remat]
        return nnx.remat(lambda b, h, s, c: b(h, s, c), policy=policy)(block, x, skip, t_emb)

    def _position_embedding(self) -> Array:
        if self.pos_embed is not None:
            return self.pos_embed[...]
        patches = sinusoidal_2d_embedding(self.n_side, self.config.embed_dim)
        return jnp.concatenate([jnp.zeros((self.extras, patches.shape[1])), patches])[None]

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
        cfg = self.config
        b, h, w, c = x.shape
        if (h, w, c) != (cfg.img_size, cfg.img_size, cfg.in_chans):
            raise ValueError(
                f"input of shape {x.shape[1:]} (H, W, C); the model expects "
                f"({cfg.img_size}, {cfg.img_size}, {cfg.in_chans})"
            )
        tokens = self.patch_embed(x).astype(jnp.float32).reshape(b, -1, cfg.embed_dim)
        t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), (b,))
        t_emb = timestep_embedding(t, cfg.embed_dim)
        if self.time_embed is not None:
            t_emb = self.time_embed(t_emb)
        prefix = [t_emb[:, None]] if self.time_token else []
        if cfg.text:
            if context is None:
                raise ValueError("a text-to-image U-ViT needs `context` [B, L, clip_dim]")
            prefix.append(self.context_embed(context).astype(jnp.float32))
        elif self.label_emb is not None:
            if y is None:
                raise ValueError("a class-conditional U-ViT needs labels `y` [B]")
            prefix.insert(0, self.label_emb(y)[:, None].astype(jnp.float32))
        x = jnp.concatenate([*prefix, tokens], axis=1) + self._position_embedding()
        x = constrain_batch(x)

        cond = None if self.time_token else t_emb
        skips = []
        for blk in self.in_blocks:
            x = self._run_block(blk, x, None, cond)
            skips.append(x)
        x = self._run_block(self.mid_block, x, None, cond)
        for blk in self.out_blocks:
            x = self._run_block(blk, x, skips.pop(), cond)

        x = self.norm(x)
        n = self.n_side
        if self.conv_before_projection:
            token_map = x[:, self.extras :].reshape(b, n, n, cfg.embed_dim)
            x = self.final_layer(token_map).astype(jnp.float32).reshape(b, n * n, cfg.embed_dim)
        x = self.decoder_pred(x).astype(jnp.float32)[:, -n * n :]  # the patch tokens
        x = unpatchify(x, cfg.patch_size, cfg.in_chans, n)
        if self.final_layer is not None and not self.conv_before_projection:
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


def build_uvit(model_config: Mapping | UViTConfig, *, seed: int = 0) -> UViT:
    """Builds (and initialises) a U-ViT from a `config.model` section (or a `UViTConfig`, or
    official constructor arguments); an unknown field is a `ConfigError` naming it."""
    return UViT(UViTConfig.from_config(model_config), rngs=nnx.Rngs(seed))


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
