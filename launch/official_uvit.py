"""The official PyTorch U-ViT for side-by-side benchmarks, built from one of our model configs.

With `official_dir` (a clone of the official release; its `libs/uvit.py` needs einops and the
`libs/timm.py` beside it) the official class itself; without it, the repository's PyTorch U-ViT
(tests/torch_uvit.py: the same architecture and module names, checked against the official golden
outputs by tests/test_uvit.py), so a benchmark runs with only torch installed.
"""

from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def official_uvit_class(official_dir: str) -> tuple[type, str]:
    """(the UViT class, where it came from)."""
    if official_dir:
        sys.path.insert(0, os.path.abspath(os.path.expanduser(official_dir)))
        try:
            from libs.uvit import UViT
        except ImportError as e:
            raise SystemExit(
                f"--official_dir={official_dir}: cannot import libs.uvit ({e}); the official "
                "file also needs einops and the libs/timm.py beside it"
            ) from e
        return UViT, "official libs/uvit.py"
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from torch_uvit import UViT

    return UViT, "torch stand-in tests/torch_uvit.py"


def build_official_uvit(model_config, official_dir: str = ""):
    """(torch UViT with `model_config`'s shape and fresh weights, source), for class-conditional
    or unconditional pixel/latent U-ViTs (`model_config.kind == "uvit"`)."""
    if model_config.kind != "uvit":
        raise SystemExit(f"official U-ViT benchmark: model.kind={model_config.kind!r} unsupported")
    m = model_config
    uvit_cls, source = official_uvit_class(official_dir)
    model = uvit_cls(
        img_size=m.img_size, patch_size=m.patch_size, in_chans=m.in_chans, embed_dim=m.embed_dim,
        depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio, qkv_bias=m.qkv_bias,
        mlp_time_embed=m.mlp_time_embed, num_classes=m.num_classes, conv=m.conv, skip=m.skip,
    )  # fmt: skip
    return model, source
