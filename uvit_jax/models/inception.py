"""The FID Inception-v3 in Flax NNX: TensorFlow's 2015-12-05 network as pytorch-fid ports it.

It is torchvision's Inception-v3 (1008 classes, no auxiliary head) with the blocks patched the way
TensorFlow computed them: Mixed_5b/5c/5d, Mixed_6b-6e and Mixed_7b average-pool their pool branch
without counting the zero padding, and Mixed_7c max-pools it. BatchNorm runs on
its stored statistics with eps 1e-3. Layout is NHWC.

Parameter paths mirror torchvision's module names so that `uvit_jax.convert.inception` maps the
pytorch-fid state dict mechanically: `Conv2d_1a_3x3.conv.weight` <-> `Conv2d_1a_3x3/conv/kernel`,
`Mixed_5b.branch1x1.bn.running_var` <-> `Mixed_5b/branch1x1/bn/var`, `fc.weight` <-> `fc/kernel`.

The network only: the pixel pipelines in front of it live in `uvit_jax.evaluation.preprocess`,
the sharded runner in `uvit_jax.evaluation.features`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array
FEATURE_DIM = 2048
NUM_CLASSES = 1008
# sFID (Nash et al. 2021, as the ADM evaluator computes it): the first 7 channels of the 1x1
# branch of Mixed_6d (TF's `mixed_6/conv`, after its ReLU), 17 x 17 x 7 = 2023 values per image.
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
    """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU, torchvision's unit."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int = 1,
        padding: int | tuple[int, int] = 0,
        precision: jax.lax.PrecisionLike,
        rngs: nnx.Rngs,
    ):
        ph, pw = _pair(padding)
        self.conv = nnx.Conv(
            in_features,
            out_features,
            _pair(kernel_size),
            strides=stride,
            padding=((ph, ph), (pw, pw)),
            use_bias=False,
            precision=precision,
            rngs=rngs,
        )
        self.bn = nnx.BatchNorm(out_features, use_running_average=True, epsilon=1e-3, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def _max_pool_3x3_s2(x: Array) -> Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def _avg_pool_3x3_exclude_pad(x: Array) -> Array:
    """3x3 stride-1 average with padding 1 that divides by the in-image count (TF's avg_pool)."""
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    # The count depends on the shape only, so XLA folds it into a constant.
    ones = jnp.ones((1, x.shape[1], x.shape[2], 1), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), pad)
    return total / count


def _max_pool_3x3_s1_pad1(x: Array) -> Array:
    pad = ((0, 0), (1, 1), (1, 1), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), pad)


class InceptionA(nnx.Module):
    """Mixed_5b/5c/5d (pytorch-fid's FIDInceptionA): 1x1, 5x5, double 3x3, pooled 1x1."""

    def __init__(self, in_features: int, pool_features: int, *, precision, rngs: nnx.Rngs):
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, precision=precision, rngs=rngs, **kw)
        self.branch1x1 = conv(in_features, 64, 1)
        self.branch5x5_1 = conv(in_features, 48, 1)
        self.branch5x5_2 = conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = conv(in_features, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, padding=1)
        self.branch_pool = conv(in_features, pool_features, 1)

    def __call__(self, x: Array) -> Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        return jnp.concatenate([self.branch1x1(x), b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a: grid reduction 35 -> 17."""

    def __init__(self, in_features: int, *, precision, rngs: nnx.Rngs):
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, precision=precision, rngs=rngs, **kw)
        self.branch3x3 = conv(in_features, 384, 3, stride=2)
        self.branch3x3dbl_1 = conv(in_features, 64, 1)
        self.branch3x3dbl_2 = conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = conv(96, 96, 3, stride=2)

    def __call__(self, x: Array) -> Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nnx.Module):
    """Mixed_6b-6e (pytorch-fid's FIDInceptionC): factorised 7x7 branches."""

    def __init__(self, in_features: int, channels_7x7: int, *, precision, rngs: nnx.Rngs):
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, precision=precision, rngs=rngs, **kw)
        c7 = channels_7x7
        self.branch1x1 = conv(in_features, 192, 1)
        self.branch7x7_1 = conv(in_features, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(in_features, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = conv(in_features, 192, 1)

    def __call__(self, x: Array, *, with_branch1x1: bool = False) -> Array | tuple[Array, Array]:
        """x [B, 17, 17, C] -> [B, 17, 17, 768] (and the 1x1 branch [B, 17, 17, 192])."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = self.branch7x7dbl_1(x)
        for layer in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = layer(bd)
        bp = self.branch_pool(_avg_pool_3x3_exclude_pad(x))
        out = jnp.concatenate([b1, b7, bd, bp], axis=-1)
        return (out, b1) if with_branch1x1 else out


class InceptionD(nnx.Module):
    """Mixed_7a: grid reduction 17 -> 8."""

    def __init__(self, in_features: int, *, precision, rngs: nnx.Rngs):
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, precision=precision, rngs=rngs, **kw)
        self.branch3x3_1 = conv(in_features, 192, 1)
        self.branch3x3_2 = conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = conv(in_features, 192, 1)
        self.branch7x7x3_2 = conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(192, 192, 3, stride=2)

    def __call__(self, x: Array) -> Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_1(x)
        for layer in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = layer(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nnx.Module):
    """Mixed_7b (FIDInceptionE_1, average pool) and Mixed_7c (FIDInceptionE_2, max pool)."""

    def __init__(self, in_features: int, *, max_pool: bool, precision, rngs: nnx.Rngs):
        conv = lambda i, o, k, **kw: BasicConv2d(i, o, k, precision=precision, rngs=rngs, **kw)
        self.max_pool = max_pool
        self.branch1x1 = conv(in_features, 320, 1)
        self.branch3x3_1 = conv(in_features, 384, 1)
        self.branch3x3_2a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(in_features, 448, 1)
        self.branch3x3dbl_2 = conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = conv(in_features, 192, 1)

    def __call__(self, x: Array) -> Array:
        b3 = self.branch3x3_1(x)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        # TF's graph (hence pytorch-fid) max-pools in the last block; the paper averages.
        pooled = _max_pool_3x3_s1_pad1(x) if self.max_pool else _avg_pool_3x3_exclude_pad(x)
        return jnp.concatenate(
            [
                self.branch1x1(x),
                self.branch3x3_2a(b3),
                self.branch3x3_2b(b3),
                self.branch3x3dbl_3a(bd),
                self.branch3x3dbl_3b(bd),
                self.branch_pool(pooled),
            ],
            axis=-1,
        )


class InceptionV3(nnx.Module):
    """The FID Inception-v3.

    Call: x [B, 299, 299, 3] float32 in the protocol's range (see
    `uvit_jax.evaluation.preprocess`) -> {"pool3": [B, 2048], "spatial": [B, 2023],
    "logits": [B, 1008] (only with the classifier head)}, all float32.

    `num_classes=None` builds the network without its classifier head (`fc`): weight files
    that carry only the feature layers (the TorchScript FID network) give no logits, hence no
    Inception Score, rather than a made-up head.

    `precision` is the convolution/matmul precision; HIGHEST keeps float32 convolutions exact on
    GPUs (as pytorch-fid on the CPU); DEFAULT lets XLA use TF32 there (as PyTorch's cuDNN does by
    default) for speed.
    """

    def __init__(
        self,
        *,
        num_classes: int | None = NUM_CLASSES,
        precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
        rngs: nnx.Rngs,
    ):
        kw = dict(precision=precision, rngs=rngs)
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
        self.Mixed_5b = InceptionA(192, 32, **kw)
        self.Mixed_5c = InceptionA(256, 64, **kw)
        self.Mixed_5d = InceptionA(288, 64, **kw)
        self.Mixed_6a = InceptionB(288, **kw)
        self.Mixed_6b = InceptionC(768, 128, **kw)
        self.Mixed_6c = InceptionC(768, 160, **kw)
        self.Mixed_6d = InceptionC(768, 160, **kw)
        self.Mixed_6e = InceptionC(768, 192, **kw)
        self.Mixed_7a = InceptionD(768, **kw)
        self.Mixed_7b = InceptionE(1280, max_pool=False, **kw)
        self.Mixed_7c = InceptionE(2048, max_pool=True, **kw)
        self.fc = (
            nnx.Linear(FEATURE_DIM, num_classes, precision=precision, rngs=rngs)
            if num_classes
            else None
        )

    def __call__(self, x: Array) -> dict[str, Array]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3_s2(x)
        x = _max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a):
            x = block(x)
        x = self.Mixed_6c(self.Mixed_6b(x))
        x, branch = self.Mixed_6d(x, with_branch1x1=True)
        for block in (self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        # Flattened in (h, w, c) order like the ADM evaluator; FID ignores the order anyway.
        spatial = branch[..., :SPATIAL_CHANNELS].reshape(x.shape[0], SPATIAL_DIM)
        out = {"pool3": pool3, "spatial": spatial}
        if self.fc is not None:
            out["logits"] = self.fc(pool3)
        return out


def abstract_inception(
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
    num_classes: int | None = NUM_CLASSES,
) -> InceptionV3:
    """The network with `jax.ShapeDtypeStruct` leaves (no allocation), to be filled by a loader."""
    return nnx.eval_shape(
        lambda: InceptionV3(num_classes=num_classes, precision=precision, rngs=nnx.Rngs(0))
    )
