"""The extraction job: images -> preprocessing -> (autoencoder moments | pixels) -> dataset.

`run_extraction(config, workdir)` reads `config.data`'s source, preprocesses every image
(`config.data.preprocess` at `config.data.resolution`), encodes it and its horizontal flip, and
writes the TFDS array_record dataset of `latent_dataset` to `config.data.latent_dir` (default
`<workdir>/latent_dataset`).

Resumable: the source order is cut into fixed shards of `shard_size` source examples; a shard is
written atomically with a done-marker, so after a crash (even kill -9) a rerun skips the shards
with markers and rewrites the rest: no duplicates, no gaps. The TFDS metadata is written last,
when every shard is done. Multi-host: process p of P writes the shards s with s % P == p, and
process 0 writes the metadata after a barrier.

Pixel configs (`config.autoencoder.kind == "identity"`) store the preprocessed pixels as uint8
(lossless; read back as `x / 127.5 - 1`), with flip copies like latent configs: every paper
pixel model trains with random horizontal flips too, and one layout keeps one reader.

Text-to-image configs (MS-COCO) also encode every caption of every kept image with the text
encoder into the shard's context file, and the empty caption once
(`contexts/empty_context.npy`); images without captions are skipped.

Progress: a line per shard with the images/s so far, the ETA, and each stage's own rate
(`stage_rates`: read, encode, write), so the slowest stage is named: the array_record writes for
pixel datasets, the autoencoder for latent ones (`launch/bench_extract.py` measures both against
their anchors).

The encoders come in as functions (`encode_fn`, `encode_text_fn`): this module runs no network
itself, and the `--mode extract` job (`uvit_jax/jobs/extract.py`) builds the config's.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import errno
import os
import pathlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from absl import logging

from input_pipeline import latent_dataset, preprocess, sources
from input_pipeline.errors import DataConfigError, DataError
from input_pipeline.latent_stats import declared_scale

EncodeFn = Callable[[np.ndarray], Any]
# Captions -> contexts float32 [n, L, D] (any n, including 0).
EncodeTextFn = Callable[[Sequence[str]], np.ndarray]
DEFAULT_SHARD_SIZE = 4096


def resolve_latent_dir(config: Any, workdir: str | os.PathLike | None = None) -> str:
    """`config.data.latent_dir`, or `<workdir>/latent_dataset` when that is empty."""
    if config.data.latent_dir:
        return os.fspath(config.data.latent_dir)
    if not workdir:
        raise DataConfigError("config.data.latent_dir is empty and no workdir was given")
    return os.path.join(os.fspath(workdir), "latent_dataset")


def image_channels(config: Any) -> int:
    """Channels of the preprocessed images: RGB for autoencoders, the model's for pixels."""
    return config.model.in_chans if config.autoencoder.kind == "identity" else 3


def make_spec(
    config: Any, source: sources.ImageSource, shard_size: int
) -> latent_dataset.DatasetSpec:
    """The dataset an extraction of `config` from `source` writes."""
    identity = config.autoencoder.kind == "identity"
    if identity and config.data.resolution != config.model.img_size:
        raise DataConfigError(
            f"pixel config: config.data.resolution={config.data.resolution} must equal "
            f"config.model.img_size={config.model.img_size}"
        )
    context_shape = latent_dataset.expected_context_shape(config)
    return latent_dataset.DatasetSpec(
        shape=latent_dataset.expected_shape(config),
        dtype="uint8" if identity else config.data.latent_dtype,
        autoencoder=config.autoencoder.kind,
        scale_factor=declared_scale(config.autoencoder.scale_factor),
        source=source.description,
        split=config.data.split,
        num_source_examples=len(source),
        shard_size=shard_size,
        num_classes=source.num_classes,
        preprocess=config.data.preprocess,
        resolution=config.data.resolution,
        context_shape=context_shape,
        context_dtype=config.data.get("context_dtype", "float32"),
        text_encoder=f"clip:{config.text_encoder.path}" if context_shape else "",
    )


def _load_one(
    source: sources.ImageSource, index: int, fn: Callable, need_captions: bool
) -> tuple[Any, ...]:
    """(image, label, index, captions, skip reason or None) of one source example."""
    example = source[index]
    if need_captions and not example.captions:
        return None, example.label, index, (), {"key": example.key, "reason": "no captions"}
    try:
        image = fn(sources.load_image(example))
    except (sources.CorruptImageError, OSError, ValueError) as e:
        return None, example.label, index, (), {"key": example.key, "reason": str(e)}
    return image, example.label, index, example.captions, None


def _load_shard(
    source: sources.ImageSource,
    spec: latent_dataset.DatasetSpec,
    fn: Callable,
    channels: int,
    shard: int,
    pool: concurrent.futures.Executor,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[str, ...]], list[dict[str, str]]]:
    """Decodes and preprocesses one shard's images: a source of raw arrays as one batch where
    that is exact (`preprocess.preprocess_arrays`), else image by image through PIL on `pool`'s
    threads (PIL releases the GIL: threads help).

    Returns uint8 images [n, res, res, C], labels [n], source indices [n], the captions of each
    kept image (text datasets) and the skipped images.
    """
    need = spec.has_contexts
    ids = spec.shard_range(shard)
    raw = None if need else sources.array_batch(source, ids)
    if raw is not None:
        images = preprocess.preprocess_arrays(spec.preprocess, spec.resolution, channels, raw[0])
        if images is not None:
            labels = np.asarray(raw[1], np.int32)
            return images, labels, np.asarray(ids, np.int64), [()] * len(ids), []
    loaded = list(pool.map(lambda i: _load_one(source, i, fn, need), ids))
    kept = [r for r in loaded if r[4] is None]
    skipped = [r[4] for r in loaded if r[4] is not None]
    for s in skipped:
        logging.warning("skipping image %s: %s", s["key"], s["reason"])
    res = spec.resolution
    images = np.stack([r[0] for r in kept]) if kept else np.zeros((0, res, res, channels), np.uint8)
    labels = np.asarray([r[1] for r in kept], np.int32)
    indices = np.asarray([r[2] for r in kept], np.int64)
    return images, labels, indices, [r[3] for r in kept], skipped


def _encode(
    images: np.ndarray,
    encode_fn: EncodeFn | None,
    batch_size: int,
    spec: latent_dataset.DatasetSpec,
) -> np.ndarray:
    """uint8 [n, res, res, C] -> records' x [n, *spec.shape] in `spec.dtype`.

    Batches are padded to `batch_size` so a jitted `encode_fn` compiles once.
    """
    if encode_fn is None:
        return images
    out = np.empty((len(images), *spec.shape), spec.dtype)
    for start in range(0, len(images), batch_size):
        chunk = preprocess.to_model_range(images[start : start + batch_size])
        n = len(chunk)
        if n < batch_size:
            chunk = np.concatenate(
                [chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)]
            )
        moments = np.asarray(encode_fn(chunk))[:n]
        if moments.shape[1:] != spec.shape:
            raise latent_dataset.DatasetMismatchError(
                f"the encoder gives moments of shape {list(moments.shape[1:])} per image, but "
                f"the config (model.img_size, 2 * model.in_chans) needs {list(spec.shape)}"
            )
        out[start : start + n] = moments
    return out


def _encode_captions(
    encode_text_fn: EncodeTextFn, texts: Sequence[str], spec: latent_dataset.DatasetSpec
) -> np.ndarray:
    """Captions -> contexts [n, L, D], checked against the dataset's context shape."""
    contexts = np.asarray(encode_text_fn(list(texts)), np.float32)
    if contexts.shape != (len(texts), *spec.context_shape):
        raise latent_dataset.DatasetMismatchError(
            f"the text encoder gives contexts of shape {list(contexts.shape[1:])} per caption, "
            f"but the config (model.num_clip_token, model.clip_dim) needs "
            f"{list(spec.context_shape)}"
        )
    return contexts


def _caption_contexts(
    encode_text_fn: EncodeTextFn,
    captions: Sequence[Sequence[str]],
    indices: np.ndarray,
    spec: latent_dataset.DatasetSpec,
) -> list[dict[str, Any]]:
    """The context records of a shard: every caption of every kept image, in order."""
    flat = [(int(i), c) for i, caps in zip(indices, captions, strict=True) for c in caps]
    contexts = _encode_captions(encode_text_fn, [c for _, c in flat], spec)
    return [
        {"context": ctx, "index": i, "caption": c}
        for (i, c), ctx in zip(flat, contexts, strict=True)
    ]


def run_extraction(
    config: Any,
    workdir: str | os.PathLike | None = None,
    encode_fn: EncodeFn | None = None,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    shard_size: int | None = None,
    source: sources.ImageSource | None = None,
    encode_text_fn: EncodeTextFn | None = None,
) -> str:
    """Extracts the config's dataset (resuming a partial one); returns its directory.

    Args:
      config: the training config (`data`, `autoencoder`, `model.img_size/in_chans`).
      workdir: used for the default output directory when `config.data.latent_dir` is empty.
      encode_fn: latent configs: images float32 [B, res, res, 3] in [-1, 1] -> moments
        [B, h, w, 2 C] (the config's autoencoder). Ignored for pixel configs (pixels are
        stored). It must be process-local (no cross-process collectives, e.g. a mesh over
        `jax.local_devices()`): processes write different numbers of shards, more so when
        resuming.
      process_index, process_count: this process's shards (default: jax's process index and
        count); pass them to simulate several hosts.
      shard_size: source examples per shard (default `config.data.extract_shard_size` or 4096);
        must stay the same when resuming.
      source: an image source instead of `make_source(config.data)`; either is cut to its
        first `config.data.max_examples` examples when that is set (smoke runs, tests).
      encode_text_fn: text-to-image configs: captions -> contexts float32 [n, L, D] (the
        config's text encoder).
    Returns:
      The dataset directory; finalized when all shards are written (always in a real
      multi-host run, after the barrier).
    """
    import jax

    distributed = process_count is None and jax.process_count() > 1
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    out_dir = pathlib.Path(resolve_latent_dir(config, workdir))
    shard_size = shard_size or config.data.get("extract_shard_size", DEFAULT_SHARD_SIZE)
    source = source if source is not None else sources.make_source(config.data)
    if 0 < config.data.get("max_examples", 0) < len(source):
        source = sources.Subset(source, config.data.max_examples)
    spec = make_spec(config, source, shard_size)

    if latent_dataset.is_finalized(out_dir):
        dataset = latent_dataset.open_dataset(out_dir, spec.split)
        latent_dataset.check_compatible(dataset, config)
        logging.info(
            "dataset %s is complete (%d examples): nothing to do", out_dir, dataset.num_examples
        )
        return os.fspath(out_dir)

    identity = config.autoencoder.kind == "identity"
    if not identity and encode_fn is None:
        raise ValueError(
            f"extracting latents (config.autoencoder.kind={config.autoencoder.kind!r}) needs "
            "encode_fn, the autoencoder's images -> moments"
        )
    if spec.has_contexts and encode_text_fn is None:
        raise ValueError("extracting a text dataset needs encode_text_fn, captions -> contexts")
    with writing(out_dir):
        latent_dataset.prepare_directory(out_dir, spec)
        if spec.has_contexts and not latent_dataset.has_empty_context(out_dir):
            empty = _encode_captions(encode_text_fn, [""], spec)[0]
            latent_dataset.write_empty_context(out_dir, empty)
    if identity:
        encode_fn = None
    fn = preprocess.make_preprocessor(
        config.data.preprocess, config.data.resolution, image_channels(config)
    )
    batch_size = config.data.get("extract_batch_size", 64)

    done = latent_dataset.completed_shards(out_dir)
    mine = [s for s in range(spec.num_shards) if s % process_count == process_index]
    todo = [s for s in mine if s not in done]
    logging.info(
        "extracting %s -> %s: %d shards of %d images, process %d/%d: %d to write (%d done)",
        spec.source,
        out_dir,
        spec.num_shards,
        shard_size,
        process_index,
        process_count,
        len(todo),
        len(mine) - len(todo),
    )
    _write_shards(
        out_dir,
        spec,
        source,
        fn,
        image_channels(config),
        encode_fn,
        batch_size,
        todo,
        encode_text_fn,
    )

    if distributed:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("uvit_extract_shards_written")
    if process_index == 0 or not distributed:
        done = latent_dataset.completed_shards(out_dir)
        missing = spec.num_shards - sum(s in done for s in range(spec.num_shards))
        if missing:
            logging.info(
                "%d shards of other processes are not written yet; the last process "
                "to finish writes the metadata",
                missing,
            )
        elif not latent_dataset.is_finalized(out_dir):
            with writing(out_dir):
                meta = latent_dataset.finalize(out_dir, spec)
            _report(out_dir, meta)
    if distributed:
        multihost_utils.sync_global_devices("uvit_extract_finalized")
    return os.fspath(out_dir)


# Write failures of the disk rather than of the data: full, over quota, read-only, no access.
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM)


class ExtractionWriteError(DataError, OSError):
    """The dataset folder cannot be written (disk full, read-only, no access); the message names
    the folder and says that a rerun resumes."""


@contextlib.contextmanager
def writing(out_dir: pathlib.Path) -> Iterator[None]:
    """Turns a disk's write failure (`DISK_ERRNOS`) under `out_dir` into one line naming the
    folder: the shards written so far are whole (each is renamed into place once complete), so
    a rerun resumes after the last of them."""
    try:
        yield
    except OSError as e:
        if isinstance(e, DataError) or e.errno not in DISK_ERRNOS:
            raise
        what = e.strerror or os.strerror(e.errno)
        where = f" ({e.filename})" if e.filename else ""
        error = ExtractionWriteError(
            f"cannot write the dataset folder {out_dir}: {what}{where}; the shards written so "
            "far are complete: free space (or fix the permissions) and rerun, the extraction "
            "resumes where it stopped"
        )
        error.errno = e.errno
        raise error from e


STAGES = ("read", "encode", "write")


def _timed(fn: Callable, *args: Any) -> tuple[Any, float]:
    """(fn(*args), its wall seconds)."""
    t = time.perf_counter()
    return fn(*args), time.perf_counter() - t


def stage_rates(images: int, seconds: dict[str, float]) -> str:
    """The progress line's per-stage throughput: `images` over each stage's own seconds.

    Stages: read (source read, decode, preprocessing; overlapped with the others in a prefetch
    thread), encode (flip copies, the autoencoder with its device transfers, the text encoder),
    write (records serialized, array_record writes, done-marker). The slowest stage bounds the
    extraction: e.g. "read 2.1M/s, encode 410k/s, write 52.3k/s".
    """
    return ", ".join(f"{s} {_si(images / max(seconds[s], 1e-9))}/s" for s in STAGES)


def _si(x: float) -> str:
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.3g}{suffix}"
    return f"{x:.3g}"


def _write_shards(
    out_dir: pathlib.Path,
    spec: latent_dataset.DatasetSpec,
    source: sources.ImageSource,
    fn: Callable,
    channels: int,
    encode_fn: EncodeFn | None,
    batch_size: int,
    todo: Sequence[int],
    encode_text_fn: EncodeTextFn | None,
) -> None:
    """Writes `todo`, decoding the next shard's images while the current one encodes; logs a
    progress line per shard with the rate of each stage (`stage_rates`)."""
    if not todo:
        return
    start = time.time()
    images_done = 0
    seconds = dict.fromkeys(STAGES, 0.0)
    total = sum(len(spec.shard_range(s)) for s in todo)
    with (
        concurrent.futures.ThreadPoolExecutor(max(2, os.cpu_count() or 1)) as pool,
        concurrent.futures.ThreadPoolExecutor(1) as prefetch,
    ):

        def load(shard: int) -> concurrent.futures.Future:
            return prefetch.submit(_timed, _load_shard, source, spec, fn, channels, shard, pool)

        pending = load(todo[0])
        for k, shard in enumerate(todo):
            (images, labels, indices, captions, skipped), read_s = pending.result()
            seconds["read"] += read_s
            if k + 1 < len(todo):
                pending = load(todo[k + 1])
            t = time.perf_counter()
            # Originals and flips interleaved: records 2k and 2k + 1 are one example's pair.
            both = np.stack([images, preprocess.flip(images)], axis=1)
            both = both.reshape(-1, *images.shape[1:])
            xs = _encode(both, encode_fn, batch_size, spec)
            contexts = []
            if spec.has_contexts:
                contexts = _caption_contexts(encode_text_fn, captions, indices, spec)
            seconds["encode"] += time.perf_counter() - t
            t = time.perf_counter()
            records = [
                {"x": xs[r], "label": labels[r // 2], "index": indices[r // 2], "flip": r % 2}
                for r in range(len(xs))
            ]
            if spec.has_contexts:
                starts = np.cumsum([0] + [len(c) for c in captions])
                for r, rec in enumerate(records):
                    rec["context_start"] = int(starts[r // 2])
                    rec["num_contexts"] = len(captions[r // 2])
            with writing(out_dir):
                latent_dataset.write_shard(out_dir, spec, shard, records, skipped, contexts)
            seconds["write"] += time.perf_counter() - t
            images_done += len(spec.shard_range(shard))
            elapsed = time.time() - start
            rate = images_done / max(elapsed, 1e-9)
            logging.info(
                "shard %d (%d/%d of this process): %d images, %d captions, %d skipped; "
                "%.1f images/s, ETA %s; stages: %s",
                shard,
                k + 1,
                len(todo),
                len(indices),
                len(contexts),
                len(skipped),
                rate,
                _hms((total - images_done) / max(rate, 1e-9)),
                stage_rates(images_done, seconds),
            )


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _report(out_dir: pathlib.Path, meta: dict[str, Any]) -> None:
    logging.info(
        "dataset %s complete: %d examples (%d records with flips), %d images skipped",
        out_dir,
        meta["num_examples"],
        meta["num_records"],
        meta["num_skipped"],
    )
    if meta["num_skipped"]:
        for m in latent_dataset.completed_shards(out_dir).values():
            for s in m["skipped"]:
                logging.warning("skipped %s: %s", s["key"], s["reason"])
