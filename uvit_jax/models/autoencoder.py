"""The Stable Diffusion KL-f8 autoencoder (LDM `AutoencoderKL`) in Flax NNX, NHWC.

U-ViT's latent models (ImageNet 256/512, MS-COCO) train on the posterior of this autoencoder,
scaled by a fixed factor (0.18215 ImageNet, 0.23010 MS-COCO), and decode their samples with it.
The architecture is generic over LDM's `ddconfig`; parameter paths mirror the LDM state-dict
names (`encoder/down/0/block/0/norm1/scale` <-> `encoder.down.0.block.0.norm1.weight`) so
`uvit_jax.convert.autoencoder` maps them mechanically.

Pixel-space configs use `IdentityAutoencoder`, which has the same interface: its "moments" are
the preprocessed pixels themselves and decoding is the identity (up to the scale factor).

Interface shared by both autoencoders (`x` images [B, H, W, C] in [-1, 1], NHWC):
  - `encode_moments(x)` -> moments, float32 [B, H/f, W/f, M] (what latent datasets store);
  - `sample_latent(moments, key)` -> the scaled latent the diffusion model sees (pure; no params);
  - `decode(z)` -> images, float32 [B, H, W, C].

Precision: parameters are float32; convolutions and attention matmuls run in `dtype` (bf16 for
speed); GroupNorm, swish, the attention softmax, the residual stream and the outputs are float32
(in bf16 this cuts the error against float32 from 1.2e-2 to 0.9e-2 on the golden model).

The network only: building one from a config or a weights file, and running it jitted over a
mesh, is `uvit_jax.latent_codec`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

_NUM_GROUPS = 32  # LDM's Normalize(): GroupNorm(32 groups, eps 1e-6, affine)
_EPS = 1e-6
# PyTorch's default conv init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
# Only used for randomly initialised (test) autoencoders; real ones are converted checkpoints.
_torch_conv_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


@dataclasses.dataclass(frozen=True)
class DDConfig:
    """LDM's `ddconfig` (the `Encoder`/`Decoder` constructor arguments).

    `dropout` is accepted for compatibility with LDM configs and unused: the autoencoder only
    runs in inference mode here.
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 4
    double_z: bool = True
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    dropout: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "ddconfig") -> DDConfig:
        """Builds a DDConfig from an LDM-style mapping; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"{source}: unknown ddconfig keys {unknown}; expected {sorted(known)}")
        kw = dict(d)
        for key in ("ch_mult", "attn_resolutions"):
            if key in kw:
                kw[key] = tuple(int(v) for v in kw[key])
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_resolutions"] = list(self.attn_resolutions)
        return d

    @property
    def num_resolutions(self) -> int:
        return len(self.ch_mult)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def validate(self) -> None:
        """Raises ValueError naming the field when LDM's modules could not be built from it."""
        if not self.double_z:
            raise ValueError("ddconfig.double_z=False: the KL autoencoder needs mean and logvar")
        if not self.ch_mult or self.ch <= 0 or self.num_res_blocks < 1:
            raise ValueError(
                f"ddconfig: need ch > 0, a non-empty ch_mult, num_res_blocks >= 1: {self}"
            )
        for m in self.ch_mult:
            if (self.ch * m) % _NUM_GROUPS:
                raise ValueError(
                    f"ddconfig: channel count ch*ch_mult = {self.ch}*{m} = {self.ch * m} is not "
                    f"divisible by the {_NUM_GROUPS} GroupNorm groups"
                )


# Stable Diffusion's KL-f8 (first_stage_config of SD v1 / LDM kl-f8): the default for "kl_f8".
SD_KL_F8 = DDConfig()
SD_EMBED_DIM = 4


def _conv(cin: int, cout: int, k: int, *, stride: int = 1, padding, dtype, rngs: nnx.Rngs):
    # In float32 mode ask for full-precision convolutions, so "float32" means float32 on TPU/GPU
    # too (their default conv precision is bf16 / TF32 passes).
    precision = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
    return nnx.Conv(
        cin,
        cout,
        (k, k),
        strides=stride,
        padding=padding,
        dtype=dtype,
        precision=precision,
        kernel_init=_torch_conv_init,
        rngs=rngs,
    )


def _swish(x: Array) -> Array:
    return x * jax.nn.sigmoid(x)


class GroupNorm(nnx.Module):
    """GroupNorm(32, eps=1e-6) as PyTorch computes it, entirely in float32 (output too).

    Written out (rather than `nnx.GroupNorm`) because that one casts the input to its `dtype`
    before taking statistics; the following conv casts to the compute dtype.
    """

    def __init__(self, channels: int):
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        b, h, w, c = x.shape
        g = x.astype(jnp.float32).reshape(b, h * w, _NUM_GROUPS, c // _NUM_GROUPS)
        mean = g.mean(axis=(1, 3), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 3), keepdims=True)  # biased, as torch
        g = (g - mean) * jax.lax.rsqrt(var + _EPS)
        return g.reshape(b, h, w, c) * self.scale[...] + self.bias[...]


class ResnetBlock(nnx.Module):
    """norm1, swish, conv1, norm2, swish, conv2; plus a 1x1 nin_shortcut when widths differ."""

    def __init__(self, cin: int, cout: int, *, dtype, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin)
        self.conv1 = _conv(cin, cout, 3, padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(cout)
        self.conv2 = _conv(cout, cout, 3, padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)
        if cin != cout:
            self.nin_shortcut = _conv(cin, cout, 1, padding="VALID", dtype=dtype, rngs=rngs)
        else:
            self.nin_shortcut = None

    def __call__(self, x: Array) -> Array:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x.astype(jnp.float32) + h.astype(jnp.float32)  # float32 residual stream


class AttnBlock(nnx.Module):
    """Single-head self-attention over all pixels, 1x1-conv q/k/v/proj_out, residual."""

    def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
        self.norm = GroupNorm(c)
        self.q = _conv(c, c, 1, padding="VALID", dtype=dtype, rngs=rngs)
        self.k = _conv(c, c, 1, padding="VALID", dtype=dtype, rngs=rngs)
        self.v = _conv(c, c, 1, padding="VALID", dtype=dtype, rngs=rngs)
        self.proj_out = _conv(c, c, 1, padding="VALID", dtype=dtype, rngs=rngs)
        self.dtype = dtype

    def __call__(self, x: Array) -> Array:
        b, hh, ww, c = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, hh * ww, c)
        k = self.k(h).reshape(b, hh * ww, c)
        v = self.v(h).reshape(b, hh * ww, c)
        precision = jax.lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None
        logits = jnp.einsum(
            "bic,bjc->bij", q, k, precision=precision, preferred_element_type=jnp.float32
        )
        w = jax.nn.softmax(logits * (c**-0.5), axis=-1)  # float32
        out = jnp.einsum("bij,bjc->bic", w.astype(v.dtype), v, precision=precision)
        return x.astype(jnp.float32) + self.proj_out(out.reshape(b, hh, ww, c)).astype(jnp.float32)


class Downsample(nnx.Module):
    """Pad (0, 1) on the bottom/right, then a 3x3 stride-2 conv (LDM's asymmetric padding)."""

    def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, padding=((1, 1), (1, 1)), dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class Level(nnx.Module):
    """One resolution level: `block` (ResnetBlocks), `attn` (AttnBlocks, possibly none) and an
    optional `downsample` (encoder) or `upsample` (decoder), named as LDM's `down.i` / `up.i`."""

    def __init__(self, cin: int, cout: int, n_blocks: int, use_attn: bool, *, dtype, rngs):
        blocks, attns = [], []
        for _ in range(n_blocks):
            blocks.append(ResnetBlock(cin, cout, dtype=dtype, rngs=rngs))
            cin = cout
            if use_attn:
                attns.append(AttnBlock(cout, dtype=dtype, rngs=rngs))
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)

    def run_blocks(self, x: Array) -> Array:
        for i, block in enumerate(self.block):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        return x


class Mid(nnx.Module):
    def __init__(self, c: int, *, dtype, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(c, c, dtype=dtype, rngs=rngs)
        self.attn_1 = AttnBlock(c, dtype=dtype, rngs=rngs)
        self.block_2 = ResnetBlock(c, c, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
    """Images [B, H, W, in_channels] -> [B, H/f, W/f, 2 * z_channels] (f = 2^(levels - 1))."""

    def __init__(self, cfg: DDConfig, *, dtype, rngs: nnx.Rngs):
        pad1 = ((1, 1), (1, 1))
        self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, padding=pad1, dtype=dtype, rngs=rngs)
        levels, res = [], cfg.resolution
        cin = cfg.ch
        for i, mult in enumerate(cfg.ch_mult):
            cout = cfg.ch * mult
            level = Level(
                cin, cout, cfg.num_res_blocks, res in cfg.attn_resolutions, dtype=dtype, rngs=rngs
            )
            if i != cfg.num_resolutions - 1:
                level.downsample = Downsample(cout, dtype=dtype, rngs=rngs)
                res //= 2
            levels.append(level)
            cin = cout
        self.down = nnx.List(levels)
        self.mid = Mid(cin, dtype=dtype, rngs=rngs)
        self.norm_out = GroupNorm(cin)
        self.conv_out = _conv(cin, 2 * cfg.z_channels, 3, padding=pad1, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        h = self.conv_in(x)
        for level in self.down:
            h = level.run_blocks(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nnx.Module):
    """Latents [B, h, w, z_channels] -> images [B, h*f, w*f, out_ch] (no tanh, as SD's VAE).

    `up` is indexed like LDM's `up` list: `up[0]` is the highest resolution and runs last.
    """

    def __init__(self, cfg: DDConfig, *, dtype, rngs: nnx.Rngs):
        pad1 = ((1, 1), (1, 1))
        cin = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // cfg.downsample_factor
        self.conv_in = _conv(cfg.z_channels, cin, 3, padding=pad1, dtype=dtype, rngs=rngs)
        self.mid = Mid(cin, dtype=dtype, rngs=rngs)
        levels: dict[int, Level] = {}
        for i in reversed(range(cfg.num_resolutions)):
            cout = cfg.ch * cfg.ch_mult[i]
            level = Level(
                cin,
                cout,
                cfg.num_res_blocks + 1,
                res in cfg.attn_resolutions,
                dtype=dtype,
                rngs=rngs,
            )
            if i != 0:
                level.upsample = Upsample(cout, dtype=dtype, rngs=rngs)
                res *= 2
            levels[i] = level
            cin = cout
        self.up = nnx.List([levels[i] for i in range(cfg.num_resolutions)])
        self.norm_out = GroupNorm(cin)
        self.conv_out = _conv(cin, cfg.out_ch, 3, padding=pad1, dtype=dtype, rngs=rngs)

    def __call__(self, z: Array) -> Array:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            h = level.run_blocks(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


# The range LDM's DiagonalGaussianDistribution clamps the posterior's log-variance to.
LOGVAR_RANGE = (-30.0, 20.0)


def sample_latent(moments: Array, key: Array, scale_factor: float) -> Array:
    """Draws z = scale * (mean + std * noise) from KL moments, as LDM/U-ViT do at train time.

    Args:
      moments: [..., 2 * embed_dim] mean then logvar on the last axis (any float dtype).
      key: a PRNG key.
      scale_factor: 0.18215 for ImageNet / SD, 0.23010 for U-ViT's MS-COCO models.
    Returns:
      float32 [..., embed_dim]; std = exp(0.5 * clip(logvar, -30, 20)).
    """
    moments = moments.astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    std = jnp.exp(0.5 * jnp.clip(logvar, *LOGVAR_RANGE))
    return scale_factor * (mean + std * jax.random.normal(key, mean.shape, jnp.float32))


def _check_images(x: Array, channels: int, multiple: int, what: str) -> None:
    if x.ndim != 4 or x.shape[-1] != channels:
        raise ValueError(
            f"{what}: expected NHWC [B, H, W, {channels}] input, got shape {tuple(x.shape)}"
        )
    if x.shape[1] % multiple or x.shape[2] % multiple:
        raise ValueError(
            f"{what}: height and width must be multiples of {multiple} (the downsampling "
            f"factor), got shape {tuple(x.shape)}"
        )


class AutoencoderKL(nnx.Module):
    """LDM/Stable Diffusion `AutoencoderKL`: encoder, quant_conv, post_quant_conv, decoder."""

    def __init__(
        self,
        ddconfig: DDConfig = SD_KL_F8,
        embed_dim: int = SD_EMBED_DIM,
        *,
        scale_factor: float = 0.18215,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        ddconfig.validate()
        self.ddconfig = ddconfig
        self.embed_dim = embed_dim
        self.scale_factor = float(scale_factor)
        self.dtype = dtype
        self.encoder = Encoder(ddconfig, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(ddconfig, dtype=dtype, rngs=rngs)
        zc = ddconfig.z_channels
        self.quant_conv = _conv(2 * zc, 2 * embed_dim, 1, padding="VALID", dtype=dtype, rngs=rngs)
        self.post_quant_conv = _conv(embed_dim, zc, 1, padding="VALID", dtype=dtype, rngs=rngs)

    @property
    def downsample_factor(self) -> int:
        return self.ddconfig.downsample_factor

    @property
    def moments_channels(self) -> int:
        return 2 * self.embed_dim

    @property
    def latent_channels(self) -> int:
        return self.embed_dim

    def encode_moments(self, x: Array) -> Array:
        """x: [B, H, W, in_channels] in [-1, 1] -> float32 [B, H/f, W/f, 2*embed_dim].

        Channels: mean then logvar (f = 8 for KL-f8).
        """
        _check_images(x, self.ddconfig.in_channels, self.downsample_factor, "encode_moments")
        h = self.encoder(x.astype(self.dtype))
        return self.quant_conv(h).astype(jnp.float32)

    def decode(self, z: Array) -> Array:
        """z: [B, h, w, embed_dim] scaled latents -> float32 [B, 8h, 8w, out_ch], about [-1, 1]."""
        _check_images(z, self.embed_dim, 1, "decode")
        z = (z.astype(jnp.float32) / self.scale_factor).astype(self.dtype)
        return self.decoder(self.post_quant_conv(z)).astype(jnp.float32)

    def sample_latent(self, moments: Array, key: Array) -> Array:
        """moments [..., 2*embed_dim] -> scaled latent sample [..., embed_dim] (float32)."""
        return sample_latent(moments, key, self.scale_factor)


class IdentityAutoencoder(nnx.Module):
    """Pixel space behind the autoencoder interface: moments are the pixels, decode unscales.

    The pixel "latent dataset" stores preprocessed pixels in [-1, 1] as its moments (C channels,
    not 2C: there is no variance to store), and `sample_latent` is deterministic.
    """

    downsample_factor = 1

    def __init__(self, channels: int = 3, *, scale_factor: float = 1.0):
        self.channels = channels
        self.scale_factor = float(scale_factor)

    @property
    def moments_channels(self) -> int:
        return self.channels

    @property
    def latent_channels(self) -> int:
        return self.channels

    def encode_moments(self, x: Array) -> Array:
        _check_images(x, self.channels, 1, "encode_moments")
        return x.astype(jnp.float32)

    def decode(self, z: Array) -> Array:
        _check_images(z, self.channels, 1, "decode")
        return z.astype(jnp.float32) / self.scale_factor

    def sample_latent(self, moments: Array, key: Array) -> Array:
        del key
        return self.scale_factor * moments.astype(jnp.float32)


Autoencoder = AutoencoderKL | IdentityAutoencoder


def moments_shape(ae: Autoencoder, image_shape: Sequence[int]) -> tuple[int, int, int]:
    """(H, W, C) of an image -> (h, w, M) of its moments; ValueError if H, W don't divide."""
    h, w, _ = image_shape
    f = ae.downsample_factor
    if h % f or w % f:
        raise ValueError(f"image shape {tuple(image_shape)} is not divisible by the factor {f}")
    return (h // f, w // f, ae.moments_channels)


def abstract_autoencoder_kl(
    ddconfig: DDConfig, embed_dim: int, *, scale_factor: float, dtype: Any
) -> AutoencoderKL:
    """The model's structure with ShapeDtypeStruct leaves (no allocation), for loading weights."""
    return nnx.eval_shape(
        lambda: AutoencoderKL(
            ddconfig, embed_dim, scale_factor=scale_factor, dtype=dtype, rngs=nnx.Rngs(0)
        )
    )
