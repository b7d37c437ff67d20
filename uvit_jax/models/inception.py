"""The FID Inception-v3 in Flax NNX: TensorFlow's 2015-12-05 network as pytorch-fid ports it.

It is torchvision's Inception-v3 (1008 classes, no auxiliary head) with the blocks patched the way
TensorFlow computed them: Mixed_5b/5c/5d, Mixed_6b-6e and Mixed_7b average-pool their pool branch
without counting the zero padding, and Mixed_7c max-pools it (SPEC section 5). BatchNorm runs on
its stored statistics with eps 1e-3. Layout is NHWC.

Parameter paths mirror torchvision's module names so that `uvit_jax.convert.inception` maps the
pytorch-fid state dict mechanically: `Conv2d_1a_3x3.conv.weight` <-> `Conv2d_1a_3x3/conv/kernel`,
`Mixed_5b.branch1x1.bn.running_var` <-> `Mixed_5b/branch1x1/bn/var`, `fc.weight` <-> `fc/kernel`.

`make_feature_fn` wraps the network with the uint8 preprocessing into one jitted program whose
batch is sharded over every device of a mesh.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from uvit_jax.evaluation.preprocess import preprocess_uint8

Array = jax.Array
FEATURE_DIM = 2048
NUM_CLASSES = 1008
# The network is fully convolutional, but the FID protocol always feeds it 299 x 299 inputs.
INPUT_SIZE = 299

# `features(images, pad_to=None)`: uint8 [b, H, W, 3] -> (pool3 [b, 2048], logits [b, 1008]).
FeatureFn = Callable[..., tuple[np.ndarray, np.ndarray]]


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

    def __call__(self, x: Array) -> Array:
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
        return jnp.concatenate([self.branch1x1(x), b7, bd, bp], axis=-1)


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

    Call: x [B, 299, 299, 3] float32 in [-1, 1] (see `uvit_jax.evaluation.preprocess`) ->
    (pool3 [B, 2048] float32, logits [B, 1008] float32).

    `precision` is the convolution/matmul precision; HIGHEST keeps float32 convolutions exact on
    GPUs (as pytorch-fid on the CPU); DEFAULT lets XLA use TF32 there (as PyTorch's cuDNN does by
    default) for speed.
    """

    def __init__(
        self,
        *,
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
        self.fc = nnx.Linear(FEATURE_DIM, NUM_CLASSES, precision=precision, rngs=rngs)

    def __call__(self, x: Array) -> tuple[Array, Array]:
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = _max_pool_3x3_s2(x)
        x = _max_pool_3x3_s2(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)))
        for block in (
            self.Mixed_5b,
            self.Mixed_5c,
            self.Mixed_5d,
            self.Mixed_6a,
            self.Mixed_6b,
            self.Mixed_6c,
            self.Mixed_6d,
            self.Mixed_6e,
            self.Mixed_7a,
            self.Mixed_7b,
            self.Mixed_7c,
        ):
            x = block(x)
        pool3 = jnp.mean(x, axis=(1, 2))
        return pool3, self.fc(pool3)


def abstract_inception(
    precision: jax.lax.PrecisionLike = jax.lax.Precision.HIGHEST,
) -> InceptionV3:
    """The network with `jax.ShapeDtypeStruct` leaves (no allocation), to be filled by a loader."""
    return nnx.eval_shape(lambda: InceptionV3(precision=precision, rngs=nnx.Rngs(0)))


def _replicate(x: Array, sharding: NamedSharding) -> Array:
    # Built shard by shard from one host copy: also valid when the mesh spans several processes.
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def make_feature_fn(model: InceptionV3, mesh: Mesh) -> FeatureFn:
    """One jitted program uint8 images -> (pool3, logits), batch sharded over all mesh devices.

    The parameters are replicated on every device of `mesh`; each call's batch is split over all
    its axes (`P(mesh.axis_names)`, e.g. `P(('data', 'fsdp'))`). Only uint8 pixels travel to the
    devices; resizing to 299 and normalising happen there (`preprocess_uint8`).

    Multi-process: every process passes its own images; all processes must call the returned
    function the same number of times with the same local batch size (pad with `pad_to`), because
    each call is one collective program.

    Returns:
      `features(images, pad_to=None)`: images [b, H, W, 3] uint8 (this process's share) ->
      (pool3 [b, 2048] float32, logits [b, 1008] float32) numpy arrays for those images. The
      batch is zero-padded to `pad_to` (default b) rounded up to a multiple of the local device
      count; keep `pad_to` fixed across calls to compile once.
    """
    graphdef, state = nnx.split(model)
    replicated = NamedSharding(mesh, P())
    spec = P(tuple(mesh.axis_names))
    batch_sharding = NamedSharding(mesh, spec)
    state = jax.tree.map(lambda x: _replicate(x, replicated), state)

    @jax.jit
    def forward(state, images):
        net = nnx.merge(graphdef, state)
        return net(preprocess_uint8(images))

    local_devices = len(mesh.local_devices)

    def features(images: np.ndarray, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                "Inception features take uint8 images [b, H, W, 3]; got "
                f"{images.dtype} {images.shape} (quantise samples with "
                "uvit_jax.evaluation.preprocess.quantize_samples)"
            )
        b = images.shape[0]
        if pad_to is not None and b > pad_to:
            raise ValueError(f"a batch of {b} images exceeds pad_to={pad_to}")
        size = -(-(pad_to or b) // local_devices) * local_devices
        if size > b:
            images = np.concatenate([images, np.zeros((size - b, *images.shape[1:]), np.uint8)])
        batch = jax.make_array_from_process_local_data(batch_sharding, images)
        pool3, logits = forward(state, batch)
        pool3, logits = multihost_utils.global_array_to_host_local_array(
            (pool3, logits), mesh, (spec, spec)
        )
        return np.asarray(pool3)[:b], np.asarray(logits)[:b]

    return features
