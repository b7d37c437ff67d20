"""The FID Inception as one jitted, sharded program: uint8 images in, feature arrays out.

    features = make_feature_fn(load_inception(path), mesh, protocol="pytorch_fid")
    out = features(images)   # {"pool3": [b, 2048], "spatial": [b, 2023], "logits": [b, 1008]}

The parameters are replicated on every device of the mesh and each call's batch is split over
its batch axes (`uvit_jax.parallel.frozen`). Only uint8 pixels travel to the devices; the
protocol's resize and range (`uvit_jax.evaluation.preprocess`) run there.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from uvit_jax.evaluation.preprocess import check_protocol, inception_input
from uvit_jax.models.inception import InceptionV3
from uvit_jax.parallel.frozen import FrozenNetwork

# `features(images, pad_to=None)`: uint8 [b, H, W, 3] -> {"pool3": float32 [b, 2048],
# "spatial": float32 [b, 2023], "logits": float32 [b, 1008] (networks with a classifier head)}.
FeatureFn = Callable[..., dict[str, np.ndarray]]


def _features(model: InceptionV3, images: jax.Array, protocol: str) -> dict[str, jax.Array]:
    return model(inception_input(images, protocol))


def make_feature_fn(model: InceptionV3, mesh: Mesh, protocol: str = "pytorch_fid") -> FeatureFn:
    """One jitted program uint8 images -> Inception features, batch sharded over `mesh`.

    Multi-process: every process passes its own images; all processes must call the returned
    function the same number of times with the same padded batch size (`pad_to`), because each
    call is one collective program.

    Returns:
      `features(images, pad_to=None)`: images [b, H, W, 3] uint8 (this process's share) -> a dict
      of numpy arrays for those images (see `FeatureFn`). The batch is padded to `pad_to`
      (default b) rounded up to a multiple of the local device count; keep `pad_to` fixed
      across calls to compile once.
    """
    check_protocol(protocol)
    network = FrozenNetwork(model, mesh)
    forward = functools.partial(_features, protocol=protocol)

    def features(images: np.ndarray, pad_to: int | None = None) -> dict[str, np.ndarray]:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                "Inception features take uint8 images [b, H, W, 3]; got "
                f"{images.dtype} {images.shape} (quantise samples with "
                "uvit_jax.images.quantize_samples)"
            )
        return network.apply_local(forward, images, pad_to=pad_to)

    return features
