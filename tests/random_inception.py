"""Random FID Inception weights for tests (FIDs meaningless): in pytorch-fid's key layout, and
converted into the `.npz` that `load_inception` reads."""

import functools
import os
import tempfile

import numpy as np
from flax import nnx

from uvit_jax.convert.inception import convert_inception, torch_key
from uvit_jax.convert.state_dict import StateDict
from uvit_jax.models.inception import NUM_CLASSES, abstract_inception


@functools.lru_cache(maxsize=2)
def _torch_shapes(head: bool) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Flax path -> the PyTorch shape of that parameter (the abstract network takes a second)."""
    _, state = nnx.split(abstract_inception(num_classes=NUM_CLASSES if head else None))
    out = {}
    for path, var in nnx.to_flat_state(state):
        path, shape = tuple(str(k) for k in path), tuple(var.shape)
        if path[-1] == "kernel":  # conv: Flax HWIO -> torch OIHW; linear: [in, out] -> [out, in]
            shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
        out[path] = shape
    return out


def random_state_dict(seed: int = 0, *, head: bool = True) -> StateDict:
    """Random weights in pytorch-fid's key layout.

    He-scaled convolutions, BatchNorm scales and running variances in [0.5, 1.5], biases and
    running means ~ N(0, 0.1): activations stay O(1) through all 94 convolutions, so a parity
    test compares real numbers rather than zeros. `head=False` leaves out the classifier.
    """
    rng = np.random.default_rng(seed)
    out = {}
    for path, shape in _torch_shapes(head).items():
        if path[-1] == "kernel":
            fan_in = int(np.prod(shape[1:]))
            value = rng.normal(0.0, np.sqrt((2.0 if len(shape) == 4 else 1.0) / fan_in), shape)
        elif path[-1] in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, shape)
        else:
            value = rng.normal(0.0, 0.1, shape)
        out[torch_key(path)] = value.astype(np.float32)
    return out


def save_random_inception(dst: str | os.PathLike, seed: int = 0) -> str:
    """Converts `random_state_dict(seed)` into `dst` (`.npz` appended when missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, f"random_inception_seed{seed}.npz")
        np.savez(src, **random_state_dict(seed))
        return convert_inception(src, dst, check_hash=False)


def use_random_inception(config, root: str | os.PathLike, ref_num_images: int) -> None:
    """Points `config.eval` at a random-weight Inception saved in `root` (FID plumbing tests
    need no real features) and at reference statistics `root/ref.npz` of `ref_num_images`
    images; 16 samples in batches of 8."""
    config.eval.update(
        inception_path=os.path.join(root, "inception.npz"),
        ref_stats=os.path.join(root, "ref.npz"),
        ref_num_images=ref_num_images,
        num_samples=16,
        batch_size=8,
        min_samples=8,
    )
    save_random_inception(config.eval.inception_path, seed=0)
