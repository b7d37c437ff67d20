"""The evaluation metrics between two reference files, e.g. real training vs real test images
(the floor a model's FID is read against), or one set under two input protocols.

    python main.py --mode fid_stats --config configs/fashion_mnist_uvit.py --workdir w \
        --config.data.split=test --config.eval.ref_stats=test.npz
    python main.py --mode fid_stats --config configs/fashion_mnist_uvit.py --workdir w \
        --config.eval.ref_num_images=10000 --config.eval.ref_stats=train10k.npz
    python launch/compare_references.py test.npz train10k.npz

The second file plays the samples: FID, sFID, precision/recall and KID as `--mode eval`
computes them (no Inception Score: reference files keep no logits). Files made with different
Inception weights or input protocols are refused unless --any_protocol (to measure exactly that
difference, compare each protocol's pair separately).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from uvit_jax.evaluation.metrics import FeatureSet, evaluation_metrics  # noqa: E402
from uvit_jax.evaluation.reference import Reference, load_reference  # noqa: E402
from uvit_jax.evaluation.statistics import FeatureMoments  # noqa: E402


def as_samples(ref: Reference) -> FeatureSet:
    """A reference file's statistics as the `FeatureSet` of a sample set."""
    if ref.num_images is None or ref.mu_s is None:
        raise ValueError(f"{ref.path}: needs num_images and spatial statistics (--mode fid_stats)")
    n = ref.num_images
    return FeatureSet(
        FeatureMoments(n, ref.mu, ref.sigma * (n - 1)),
        FeatureMoments(n, ref.mu_s, ref.sigma_s * (n - 1)),
        None,
        ref.features,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", help="the reference set (.npz from --mode fid_stats)")
    parser.add_argument("other", help="the set compared with it, in the samples' place")
    parser.add_argument("--any_protocol", action="store_true")
    args = parser.parse_args()
    ref, other = load_reference(args.reference), load_reference(args.other)
    keys = ("input_protocol", "inception_feature_sha256")
    mine, theirs = ({k: (r.protocol or {}).get(k) for k in keys} for r in (ref, other))
    if mine != theirs and not args.any_protocol:
        raise SystemExit(f"different protocols: {mine} vs {theirs} (--any_protocol to compare)")
    result = evaluation_metrics(as_samples(other), ref, min_samples=2)
    print(json.dumps(dict(reference=args.reference, other=args.other, **result), indent=2))


if __name__ == "__main__":
    main()
