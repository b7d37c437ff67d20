"""Inception feature throughput: our jitted, sharded network vs pytorch-fid on the same device.

    python launch/bench_inception.py --batch_size 100 [--image_size 32] [--iters 5]
        [--precision highest|default] [--weights converted.npz]

Both sides do the whole per-image work of an FID evaluation: uint8 images on the host -> /255,
bilinear resize to 299, 2x - 1 -> pool3 features (and our logits) back on the host. They are
called alternately (medians of their call times), so load from other processes on a shared
machine falls on both alike. Random weights unless --weights is given (speed does not depend on
the values). Prints images/s and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from uvit_jax.parallel.host import describe_host  # noqa: E402
from uvit_jax.parallel.xla_flags import add_cpu_flags  # noqa: E402

add_cpu_flags()  # as main.py: YNNPACK convolutions on CPUs

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_sampling import interleaved  # noqa: E402
from flax import nnx  # noqa: E402


def ours(precision_name: str = "highest", weights: str = "") -> Callable[[np.ndarray], object]:
    """Our jitted pool3 features over all local devices: uint8 [N, H, W, 3] -> [N, 2048]."""
    from uvit_jax.convert.inception import load_inception
    from uvit_jax.evaluation.features import make_feature_fn
    from uvit_jax.models.inception import InceptionV3
    from uvit_jax.parallel.mesh import make_mesh

    precision = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}[
        precision_name
    ]
    if weights:
        model = load_inception(weights, precision=precision)
    else:
        model = InceptionV3(precision=precision, rngs=nnx.Rngs(0))
    features = make_feature_fn(model, make_mesh({"data": -1, "fsdp": 1}))
    return lambda x: np.asarray(features(x)["pool3"])


def pytorch_fid() -> tuple[Callable[[np.ndarray], object], str] | None:
    """pytorch-fid's InceptionV3 pool3 (its own resize and normalisation) and its device, or None
    when pytorch-fid is not installed."""
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

    return features, str(device)


def measure(batch_size: int, image_size: int, iters: int, precision: str, weights: str = ""):
    """(our img/s, pytorch-fid img/s or None, its device), timed alternately."""
    images = np.random.default_rng(0).integers(
        0, 256, (batch_size, image_size, image_size, 3), np.uint8
    )
    fns = {"ours": ours(precision, weights)}
    reference = pytorch_fid()
    if reference is not None:
        fns["pytorch-fid"] = reference[0]
    for fn in fns.values():  # compile, first loads
        fn(images)
    # Alternated call by call, so that load from other processes falls on both alike.
    times = interleaved(fns, lambda _: (images,), iters)
    rates = {name: len(images) / statistics.median(t) for name, t in times.items()}
    return rates["ours"], rates.get("pytorch-fid"), None if reference is None else reference[1]


def summary() -> list[dict]:
    """bench_all's row: pool3 features of 32 x 32 images at batch 100, ours vs pytorch-fid."""
    ours_rate, ref_rate, device = measure(100, 32, 3, "highest")
    return [
        dict(
            job="Inception pool3 (32x32 -> 299, batch 100)",
            ours=ours_rate,
            anchor=ref_rate,
            unit="img/s",
            ratio=None if ref_rate is None else ours_rate / ref_rate,
            note=f"anchor: pytorch-fid on {device}" if device else "pytorch-fid not installed",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_size", type=int, required=True, help="images per call")
    parser.add_argument("--image_size", type=int, default=32, help="input side before resize")
    parser.add_argument("--iters", type=int, default=5, help="timed calls after a warm-up")
    parser.add_argument("--precision", choices=("highest", "default"), default="highest")
    parser.add_argument("--weights", default="", help="converted Inception .npz (else random)")
    args = parser.parse_args()
    size = args.image_size
    print(f"host: {describe_host()}")
    print(f"batch {args.batch_size}, {size}x{size} uint8 -> 299x299, {args.iters} timed calls each")
    ours_rate, ref_rate, device = measure(
        args.batch_size, size, args.iters, args.precision, args.weights
    )
    devices = f"{jax.device_count()} x {jax.devices()[0].device_kind}"
    print(f"uvit_jax (jit, {args.precision} precision, {devices}): {ours_rate:.1f} img/s")
    if ref_rate is None:
        print("pytorch-fid: not installed")
    else:
        print(f"pytorch-fid ({device}): {ref_rate:.1f} img/s")
        print(f"ours / pytorch-fid: {ours_rate / ref_rate:.2f} (median call times, alternated)")


if __name__ == "__main__":
    main()
