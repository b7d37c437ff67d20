"""Inception feature throughput: our jitted, sharded network vs pytorch-fid on the same device.

    python launch/bench_inception.py --batch_size 100 [--image_size 32] [--iters 5]
        [--precision highest|default] [--weights converted.npz]

Both sides do the whole per-image work of an FID evaluation: uint8 images on the host ->
/255, bilinear resize to 299, 2x - 1 -> pool3 features (and our logits) back on the host. Random
weights unless --weights is given (speed does not depend on the values). Prints images/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from uvit_jax.parallel.xla_flags import add_cpu_flags  # noqa: E402

add_cpu_flags()  # as main.py: YNNPACK convolutions on CPUs

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402


def bench(fn, images: np.ndarray, iters: int) -> float:
    """Images per second of `fn(images)` after one warm-up (compile) call."""
    fn(images)
    start = time.perf_counter()
    for _ in range(iters):
        fn(images)
    return iters * len(images) / (time.perf_counter() - start)


def ours(args, images: np.ndarray) -> float:
    from uvit_jax.convert.inception import load_inception
    from uvit_jax.evaluation.features import make_feature_fn
    from uvit_jax.models.inception import InceptionV3
    from uvit_jax.parallel.mesh import make_mesh

    precision = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}[
        args.precision
    ]
    if args.weights:
        model = load_inception(args.weights, precision=precision)
    else:
        model = InceptionV3(precision=precision, rngs=nnx.Rngs(0))
    features = make_feature_fn(model, make_mesh({"data": -1, "fsdp": 1}))
    return bench(lambda x: features(x)["pool3"], images, args.iters)


def pytorch_fid(args, images: np.ndarray) -> tuple[float, str] | None:
    try:
        import pytorch_fid.inception as pfi
        import torch
        import torchvision
    except ImportError:
        return None
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keys = torchvision.models.inception_v3(
        num_classes=1008, aux_logits=False, weights=None, init_weights=False
    ).state_dict()
    # Random weights with unit running variances (no NaNs to slow the arithmetic down).
    state = {
        k: torch.ones(v.shape) if k.endswith("running_var") else torch.randn(v.shape) * 0.05
        for k, v in keys.items()
        if v.is_floating_point()
    }
    pfi.load_state_dict_from_url = lambda *a, **k: state  # offline: random weights
    net = pfi.InceptionV3([3]).eval().to(device)  # resize_input / normalize_input as in FID

    @torch.no_grad()
    def features(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).to(device).permute(0, 3, 1, 2).float() / 255
        return net(t)[0][:, :, 0, 0].cpu().numpy()

    return bench(features, images, args.iters), str(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, required=True, help="images per call")
    parser.add_argument("--image_size", type=int, default=32, help="input side before resize")
    parser.add_argument("--iters", type=int, default=5, help="timed calls after a warm-up")
    parser.add_argument("--precision", choices=("highest", "default"), default="highest")
    parser.add_argument("--weights", default="", help="converted Inception .npz (else random)")
    args = parser.parse_args()
    size = args.image_size
    images = np.random.default_rng(0).integers(0, 256, (args.batch_size, size, size, 3), np.uint8)
    print(f"batch {args.batch_size}, {size}x{size} uint8 -> 299x299, {args.iters} timed calls")
    devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"uvit_jax (jit, {args.precision} precision, {devices}): {ours(args, images):.1f} img/s")
    reference = pytorch_fid(args, images)
    if reference is None:
        print("pytorch-fid: not installed")
    else:
        print(f"pytorch-fid ({reference[1]}): {reference[0]:.1f} img/s")


if __name__ == "__main__":
    main()
