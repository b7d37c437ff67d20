"""An independent judge of Fashion-MNIST samples: a small CNN trained on the real training split.

The embedded default trains a class-conditional diffusion model on Fashion-MNIST (32x32x1 uint8:
the 28x28 images zero-padded by 2 pixels on each side). Loss curves say little about whether a
sample of class "Sneaker" looks like a sneaker, so this module trains a classifier on the real
60,000 training images, read and padded by the project's own input pipeline
(`FashionMnistFilesSource`, `load_image`, the "pad" preprocessor, `to_model_range`), so it sees
exactly the pixels the diffusion model was trained on. Asked about generated samples, it reports
per requested class how often a sample is recognised as that class; its accuracy on the real test
split is the ceiling to compare those numbers with.

  from launch.fashion_mnist_judge import train_judge
  judge = train_judge(cache="/tmp/fashion_mnist_judge.npz")  # trains once (~2 min), then loads
  judge.per_class_accuracy(samples, labels)  # uint8 [N, 32, 32, 1], int [N] -> float64 [10]

  python launch/fashion_mnist_judge.py --cache /tmp/fashion_mnist_judge.npz

The network is sized for 2 CPU cores: a 2x2 space-to-depth turns the 32x32x1 image into 16x16x4
(4x fewer positions for the convolutions, no pixels lost), then two conv stages and a dense head.
It is trained with random horizontal flips (the diffusion data holds flip copies, so mirrored
samples are legitimate) and predicts from the mean logits of an image and its mirror.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.fspath(pathlib.Path(__file__).resolve().parents[1]))

from input_pipeline import preprocess, sources  # noqa: E402

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = len(CLASS_NAMES)
RESOLUTION = 32  # the diffusion model's resolution: 28x28 padded by 2 pixels on each side
DEFAULT_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
# Bump when the network, the training or the cache layout changes, so old caches retrain.
_FORMAT_VERSION = 1
# Prediction batch: one compiled shape for every N (the tail batch is zero-padded).
_PREDICT_BATCH = 1024

Params = list[tuple[jax.Array, jax.Array]]  # (weight, bias) per layer, convs first


@dataclasses.dataclass(frozen=True)
class JudgeSettings:
    """Everything that determines the trained weights (the cache key, with the data)."""

    seed: int = 0
    widths: tuple[int, ...] = (32, 64)  # conv channels of the 16x16 and 8x8 stages
    convs_per_stage: int = 1
    dense: int = 128
    # Light dropout before the dense head: at 0.3 the small net underfit (90.8% on test).
    dropout: float = 0.1
    epochs: int = 12
    # Small batches: more updates per epoch, and no slower per image on 2 CPU cores.
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 1e-4
    flip: bool = True


SETTINGS = JudgeSettings()


@dataclasses.dataclass
class Judge:
    """A trained Fashion-MNIST classifier and its numbers on the real test split.

    params: the network weights (`Params`).
    test_accuracy: fraction of the 10,000 real test images classified correctly.
    test_per_class: float64 [10], per class the fraction of its test images predicted as it.
    train_seconds: wall time of the training loop when the weights were trained (also when they
      were loaded from the cache).
    settings: the settings the weights were trained with.
    from_cache: whether the weights were loaded rather than trained in this call.
    """

    params: Params
    test_accuracy: float
    test_per_class: np.ndarray
    train_seconds: float
    settings: JudgeSettings
    from_cache: bool = False

    def predict(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N, 32, 32, 1] -> int64 [N] predicted classes (any N, batches of 1024)."""
        images = _check_images(images)
        out = np.empty(len(images), np.int64)
        for start in range(0, len(images), _PREDICT_BATCH):
            chunk = images[start : start + _PREDICT_BATCH]
            n = len(chunk)
            if n < _PREDICT_BATCH:  # pad instead of compiling a new shape for the tail
                chunk = np.concatenate(
                    [chunk, np.zeros((_PREDICT_BATCH - n, *chunk.shape[1:]), np.uint8)]
                )
            predicted = _predict_batch(self.params, chunk, self.settings)
            out[start : start + n] = np.asarray(predicted)[:n]
        return out

    def per_class_accuracy(self, images: np.ndarray, labels: np.ndarray) -> np.ndarray:
        """Per class c, the fraction of the images labelled c that are predicted as c.

        images: uint8 [N, 32, 32, 1]; labels: int [N] in 0..9 (the requested classes).
        Returns float64 [10], NaN for a class without images.
        """
        labels = np.asarray(labels)
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {labels.dtype}")
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be [{len(images)}], got shape {labels.shape}")
        if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
            raise ValueError(f"labels must lie in 0..{NUM_CLASSES - 1}")
        return _per_class(self.predict(images), labels)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (32, 32, 1):
        raise ValueError(
            f"images must be uint8 [N, 32, 32, 1], got {images.dtype} {list(images.shape)}"
        )
    return images


def _per_class(predicted: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """float64 [10]: per class, the fraction of `labels == c` with `predicted == c` (NaN: none)."""
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    hits = np.bincount(labels[predicted == labels], minlength=NUM_CLASSES).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


# ----------------------------------------------------------------------------- data


def load_split(source_dir: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 [N, 32, 32, 1] images, int32 [N] labels) of a split, padded as the diffusion data.

    Goes through the extraction's own path (`load_image`, then the "pad" preprocessor) rather
    than padding the idx arrays here, so any change there reaches the judge too.
    """
    source = sources.FashionMnistFilesSource(source_dir, split)
    pad = preprocess.make_preprocessor("pad", RESOLUTION, 1)
    images = np.stack([pad(sources.load_image(source[i])) for i in range(len(source))])
    return images, source.labels.astype(np.int32)


# ----------------------------------------------------------------------------- network


def _space_to_depth(x: jax.Array) -> jax.Array:
    """[N, H, W, C] -> [N, H/2, W/2, 4C]: every 2x2 block becomes one position."""
    n, h, w, c = x.shape
    x = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, h // 2, w // 2, 4 * c)


def _max_pool(x: jax.Array) -> jax.Array:
    """2x2 max pooling, [N, H, W, C] -> [N, H/2, W/2, C] (a reshape: faster than reduce_window
    on the CPU)."""
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def _init(key: jax.Array, s: JudgeSettings) -> Params:
    """He-initialised weights: 3x3 HWIO convs, then the dense layer and the classifier."""
    params: Params = []
    cin, side = 4, RESOLUTION // 2
    for width in s.widths:
        for _ in range(s.convs_per_stage):
            key, k = jax.random.split(key)
            w = jax.random.normal(k, (3, 3, cin, width)) * np.sqrt(2.0 / (9 * cin))
            params.append((w, jnp.zeros(width)))
            cin = width
        side //= 2
    # ReLU layers get He gain 2; the classifier gets 1 (unit-variance logits at the start).
    for fan_in, fan_out, gain in ((side * side * cin, s.dense, 2.0), (s.dense, NUM_CLASSES, 1.0)):
        key, k = jax.random.split(key)
        w = jax.random.normal(k, (fan_in, fan_out)) * np.sqrt(gain / fan_in)
        params.append((w, jnp.zeros(fan_out)))
    return params


def _logits(
    params: Params,
    x: jax.Array,
    s: JudgeSettings,
    dropout_key: jax.Array | None = None,
) -> jax.Array:
    """float32 [N, 32, 32, 1] in [-1, 1] -> float32 [N, 10]; dropout only with a key."""
    x = _space_to_depth(x)
    convs = params[:-2]
    for stage in range(len(s.widths)):
        for w, b in convs[stage * s.convs_per_stage : (stage + 1) * s.convs_per_stage]:
            x = jax.lax.conv_general_dilated(
                x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            x = jax.nn.relu(x + b)
        x = _max_pool(x)
    x = x.reshape(x.shape[0], -1)
    if dropout_key is not None and s.dropout > 0:
        keep = jax.random.bernoulli(dropout_key, 1.0 - s.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - s.dropout), 0.0)
    (w1, b1), (w2, b2) = params[-2:]
    return jax.nn.relu(x @ w1 + b1) @ w2 + b2


def _to_input(images: jax.Array) -> jax.Array:
    """uint8 [N, 32, 32, 1] -> float32 in [-1, 1], the diffusion model's `x / 127.5 - 1`.

    The project's own `to_model_range` (it only uses `astype` and arithmetic, so it traces).
    """
    return preprocess.to_model_range(images)


@functools.partial(jax.jit, static_argnums=2)
def _predict_batch(params: Params, images: jax.Array, s: JudgeSettings) -> jax.Array:
    """uint8 [B, 32, 32, 1] -> int32 [B]: argmax of the mean logits of image and mirror.

    Averaging over the mirror makes the judge flip-invariant, as the flip-augmented diffusion
    data is. `s` (hashable, static) gives the layer structure.
    """
    x = _to_input(images)
    logits = _logits(params, x, s) + _logits(params, x[:, :, ::-1, :], s)
    return jnp.argmax(logits, axis=-1)


# ----------------------------------------------------------------------------- training


def _fit(
    train_images: np.ndarray, train_labels: np.ndarray, s: JudgeSettings
) -> tuple[Params, float]:
    """Trains the network: AdamW with a warmup-cosine schedule. Returns (params, seconds)."""
    steps_per_epoch = len(train_images) // s.batch_size  # drop the ragged tail: one shape
    total = steps_per_epoch * s.epochs
    schedule = optax.warmup_cosine_decay_schedule(0.0, s.lr, min(200, total // 10), total)
    optimizer = optax.adamw(schedule, weight_decay=s.weight_decay)
    key = jax.random.key(s.seed)
    key, init_key = jax.random.split(key)
    params = _init(init_key, s)
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, images, labels, key):
        flip_key, dropout_key = jax.random.split(key)
        x = _to_input(images)
        if s.flip:
            mirror = jax.random.bernoulli(flip_key, 0.5, (x.shape[0], 1, 1, 1))
            x = jnp.where(mirror, x[:, :, ::-1, :], x)

        def loss_fn(p):
            logits = _logits(p, x, s, dropout_key)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(s.seed)
    start = time.perf_counter()
    for epoch in range(s.epochs):
        order = rng.permutation(len(train_images))
        losses = []
        for i in range(steps_per_epoch):
            idx = order[i * s.batch_size : (i + 1) * s.batch_size]
            key, step_key = jax.random.split(key)
            params, opt_state, loss = step(
                params, opt_state, train_images[idx], train_labels[idx], step_key
            )
            losses.append(loss)
        mean_loss = float(jnp.mean(jnp.stack(losses)))
        print(
            f"  epoch {epoch + 1}/{s.epochs}: train loss {mean_loss:.4f} "
            f"({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    jax.block_until_ready(params)
    return params, time.perf_counter() - start


def _cache_key(source_dir: str, s: JudgeSettings) -> str:
    """A digest of the settings, the data files (path, size) and the format version."""
    files = sorted(pathlib.Path(source_dir).resolve().glob("*-ubyte.gz"))
    data = [(f.name, f.stat().st_size) for f in files]
    blob = json.dumps(
        dict(version=_FORMAT_VERSION, settings=dataclasses.asdict(s), data=data), sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _save(path: str, judge: Judge, key: str) -> None:
    arrays: dict[str, Any] = {}
    for i, (w, b) in enumerate(judge.params):
        arrays[f"w{i}"], arrays[f"b{i}"] = np.asarray(w), np.asarray(b)
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp.npz"  # write then rename: a killed run leaves no half-written cache
    np.savez(
        tmp,
        key=np.array(key),
        num_layers=np.array(len(judge.params)),
        test_accuracy=np.array(judge.test_accuracy),
        test_per_class=judge.test_per_class,
        train_seconds=np.array(judge.train_seconds),
        **arrays,
    )
    os.replace(tmp, path)


def _load(path: str, key: str, s: JudgeSettings) -> Judge | None:
    """The cached judge, or None when there is none or it was trained with other settings."""
    if not os.path.exists(path):
        return None
    try:
        f = np.load(path)
    except (OSError, ValueError):  # not an npz (or truncated): retrain and overwrite it
        return None
    with f:
        if "key" not in f.files or str(f["key"]) != key:
            return None
        params = [
            (jnp.asarray(f[f"w{i}"]), jnp.asarray(f[f"b{i}"])) for i in range(int(f["num_layers"]))
        ]
        return Judge(
            params=params,
            test_accuracy=float(f["test_accuracy"]),
            test_per_class=np.asarray(f["test_per_class"], np.float64),
            train_seconds=float(f["train_seconds"]),
            settings=s,
            from_cache=True,
        )


def train_judge(source_dir: str = DEFAULT_SOURCE_DIR, *, cache: str | None, seed: int = 0) -> Judge:
    """Trains the judge on the real training split (or loads it from `cache`).

    source_dir: the folder of Debian's `dataset-fashion-mnist` idx files.
    cache: an `.npz` path for the weights and test numbers, or None to always train. A cache
      written with other settings, seed or data files is retrained and overwritten.
    seed: initialisation, shuffling, flips and dropout.
    """
    s = dataclasses.replace(SETTINGS, seed=seed)
    key = _cache_key(source_dir, s)
    if cache is not None:
        judge = _load(cache, key, s)
        if judge is not None:
            return judge
    train_images, train_labels = load_split(source_dir, "train")
    test_images, test_labels = load_split(source_dir, "test")
    params, seconds = _fit(train_images, train_labels, s)
    judge = Judge(params, float("nan"), np.full(NUM_CLASSES, np.nan), seconds, s)
    predicted = judge.predict(test_images)  # the same path that judges samples
    judge.test_accuracy = float(np.mean(predicted == test_labels))
    judge.test_per_class = _per_class(predicted, test_labels)
    if cache is not None:
        _save(cache, judge, key)
    return judge


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source_dir", default=DEFAULT_SOURCE_DIR)
    parser.add_argument("--cache", default=None, help=".npz for the weights (default: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    judge = train_judge(args.source_dir, cache=args.cache, seed=args.seed)
    how = "loaded from the cache" if judge.from_cache else "trained"
    print(f"judge {how} in {time.perf_counter() - start:.1f}s")
    epochs = judge.settings.epochs
    print(f"training wall time {judge.train_seconds:.1f}s ({epochs} epochs, data loading excluded)")
    print(f"test accuracy {judge.test_accuracy:.4f}")
    for name, acc in zip(CLASS_NAMES, judge.test_per_class, strict=True):
        print(f"  {name:<12} {acc:.4f}")


if __name__ == "__main__":
    main()
