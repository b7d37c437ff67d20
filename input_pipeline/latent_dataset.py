"""The extracted dataset: a TFDS dataset directory in array_record format.

Layout of a dataset directory (`config.data.latent_dir`):

  dataset_info.json, features.json, metadata.json    TFDS metadata, written last (`finalize`)
  uvit_latents-<split>.array_record-SSSSS-of-NNNNN    shard files, written atomically
  _extraction/plan.json                              what the extraction promises (`DatasetSpec`)
  _extraction/shard-SSSSS.json                       done-marker of shard S: records, bytes,
                                                     skipped images
  contexts/                                          text datasets only (MS-COCO): a second
                                                     TFDS dataset of per-caption CLIP contexts,
                                                     one shard per image shard, and
  contexts/empty_context.npy                         the encoding of "" (the unconditional
                                                     context of classifier-free guidance)

Records (TFDS features): `x` the posterior moments [h, w, 2 * embed_dim] (latent configs, float32
or float16) or the preprocessed pixels [res, res, C] (pixel configs, uint8 0..255), stored as raw
bytes; `label` int32 (-1 for unlabelled sources); `index` int64, the example's position in the
source; `flip` int32, 1 for the horizontally flipped copy. Every source example gives two adjacent
records, 2k (original) and 2k + 1 (flip), where k counts the examples kept so far, so the pair of
an example is found without an index.

Text datasets add `context_start` int64 and `num_contexts` int32 to both records of an example:
its captions are the records [context_start, context_start + num_contexts) of the same shard's
context file (positions within the shard, because shards are written in any order and by any
process). A context record holds `context` [L, D] (the CLIP last hidden state, float32 or
float16, raw bytes), `index` (the source example) and `caption` (its text). Storing contexts apart
from the image records keeps a training read at one context per example (U-ViT draws one of the
~5 captions per step) and stores each context once rather than with both flip copies.

Shards are written uncompressed (`group_size:1,uncompressed`): latents barely compress, and zstd
decompression dominated random reads (STACK_NOTES). The directory reads with
`tfds.builder_from_directory(dir).as_data_source(split)` and never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from input_pipeline.preprocess import to_model_range

DATASET_NAME = "uvit_latents"
CONTEXTS_NAME = "uvit_contexts"
VERSION = "1.0.0"
EXTRACTION_DIR = "_extraction"
CONTEXTS_DIR = "contexts"
EMPTY_CONTEXT_FILE = "empty_context.npy"
# Uncompressed, one record per chunk: random reads decode nothing but the record itself.
WRITER_OPTIONS = "group_size:1,uncompressed"


class DatasetMismatchError(ValueError):
    """The dataset on disk does not fit the config (or the extraction being resumed)."""


class CorruptShardError(OSError):
    """A shard file is missing, truncated or unreadable; the message names the file."""


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What an extraction writes; stored in the plan file and the TFDS metadata.

    shape: [h, w, c] of each record's `x` (moments: c = 2 * embed_dim; pixels: c = channels).
    dtype: "float32" or "float16" (moments), "uint8" (pixels 0..255, read back as
      `x / 127.5 - 1`: lossless and 4x smaller than float32); always read back as float32.
    autoencoder: "identity" (pixels) or the autoencoder kind, e.g. "kl_f8".
    scale_factor: the latent scale factor the training applies (1.0 for pixels).
    source: description of the image source (`ImageSource.description`).
    split: the TFDS split name of the dataset written.
    num_source_examples: length of the source; shard s holds examples
      [s * shard_size, (s + 1) * shard_size), minus skipped (corrupt) images.
    shard_size: source examples per shard.
    num_classes: 0 for unlabelled sources.
    preprocess: the preprocessing name, and resolution of the images before encoding.
    context_shape: [L, D] of each caption's text context; () for datasets without text.
    context_dtype: "float32" or "float16" storage of the contexts (read back as float32).
    text_encoder: description of the text encoder that wrote the contexts.
    """

    shape: tuple[int, int, int]
    dtype: str
    autoencoder: str
    scale_factor: float
    source: str
    split: str
    num_source_examples: int
    shard_size: int
    num_classes: int
    preprocess: str
    resolution: int
    context_shape: tuple[int, ...] = ()
    context_dtype: str = "float32"
    text_encoder: str = ""

    def __post_init__(self):
        if self.dtype not in ("float32", "float16", "uint8"):
            raise ValueError(f"record dtype must be float32, float16 or uint8, got {self.dtype!r}")
        if self.context_dtype not in ("float32", "float16"):
            raise ValueError(
                f"context dtype must be float32 or float16, got {self.context_dtype!r}"
            )
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        object.__setattr__(self, "context_shape", tuple(int(s) for s in self.context_shape))

    @property
    def has_contexts(self) -> bool:
        return bool(self.context_shape)

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.num_source_examples / self.shard_size))

    def shard_range(self, shard: int) -> range:
        """Source indices of `shard`."""
        return range(
            shard * self.shard_size, min((shard + 1) * self.shard_size, self.num_source_examples)
        )

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape)
        d["context_shape"] = list(self.context_shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DatasetSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def features(spec: DatasetSpec):
    """The TFDS `FeaturesDict` of one record."""
    import tensorflow_datasets as tfds

    feats = {
        "x": tfds.features.Tensor(shape=spec.shape, dtype=np.dtype(spec.dtype), encoding="bytes"),
        "label": tfds.features.Scalar(dtype=np.int32),
        "index": tfds.features.Scalar(dtype=np.int64),
        "flip": tfds.features.Scalar(dtype=np.int32),
    }
    if spec.has_contexts:
        feats["context_start"] = tfds.features.Scalar(dtype=np.int64)
        feats["num_contexts"] = tfds.features.Scalar(dtype=np.int32)
    return tfds.features.FeaturesDict(feats)


def context_features(spec: DatasetSpec):
    """The TFDS `FeaturesDict` of one caption's context record."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            "context": tfds.features.Tensor(
                shape=spec.context_shape, dtype=np.dtype(spec.context_dtype), encoding="bytes"
            ),
            "index": tfds.features.Scalar(dtype=np.int64),
            "caption": tfds.features.Text(),
        }
    )


def _template(directory: pathlib.Path, split: str, name: str = DATASET_NAME):
    from tensorflow_datasets.core import naming

    return naming.ShardedFileTemplate(
        data_dir=directory, dataset_name=name, split=split, filetype_suffix="array_record"
    )


def shard_path(directory: str | os.PathLike, spec: DatasetSpec, shard: int) -> pathlib.Path:
    """The final file name of `shard`."""
    tmpl = _template(pathlib.Path(directory), spec.split)
    return pathlib.Path(
        os.fspath(tmpl.sharded_filepath(shard_index=shard, num_shards=spec.num_shards))
    )


def context_shard_path(directory: str | os.PathLike, spec: DatasetSpec, shard: int) -> pathlib.Path:
    """The final file name of the contexts of `shard` (text datasets)."""
    tmpl = _template(pathlib.Path(directory) / CONTEXTS_DIR, spec.split, CONTEXTS_NAME)
    return pathlib.Path(
        os.fspath(tmpl.sharded_filepath(shard_index=shard, num_shards=spec.num_shards))
    )


def _empty_context_path(directory: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(directory) / CONTEXTS_DIR / EMPTY_CONTEXT_FILE


def write_empty_context(directory: str | os.PathLike, context: np.ndarray) -> None:
    """Stores the encoding of "" [L, D] float32 (atomically) for a text dataset."""
    path = _empty_context_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, np.asarray(context, np.float32))
    os.replace(tmp, path)


def has_empty_context(directory: str | os.PathLike) -> bool:
    return _empty_context_path(directory).exists()


def read_empty_context(dataset: DatasetOnDisk) -> np.ndarray:
    """The unconditional context [L, D] float32 of a text dataset."""
    path = _empty_context_path(dataset.directory)
    if not dataset.spec.has_contexts:
        raise DatasetMismatchError(
            f"dataset {dataset.directory} has no text contexts; extract it with a uvit_t2i config"
        )
    if not path.exists():
        raise CorruptShardError(f"{path} is missing (the encoding of the empty caption)")
    context = np.load(path)
    if context.shape != dataset.spec.context_shape:
        raise CorruptShardError(
            f"{path} has shape {list(context.shape)}, the dataset's contexts "
            f"{list(dataset.spec.context_shape)}"
        )
    return context.astype(np.float32)


def _marker_path(directory: pathlib.Path, shard: int) -> pathlib.Path:
    return directory / EXTRACTION_DIR / f"shard-{shard:05d}.json"


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def is_finalized(directory: str | os.PathLike) -> bool:
    return (pathlib.Path(directory) / "dataset_info.json").exists()


def prepare_directory(directory: str | os.PathLike, spec: DatasetSpec) -> None:
    """Creates `directory` with the plan of `spec`, or checks that the plan there equals it.

    Resuming an extraction with another source, shard size, shape or autoencoder would mix
    incompatible shards, so a differing plan raises `DatasetMismatchError` naming the fields.
    """
    directory = pathlib.Path(directory)
    (directory / EXTRACTION_DIR).mkdir(parents=True, exist_ok=True)
    plan = directory / EXTRACTION_DIR / "plan.json"
    if plan.exists():
        old = DatasetSpec.from_json(json.loads(plan.read_text()))
        if old != spec:
            diff = {
                k: (v, getattr(spec, k))
                for k, v in dataclasses.asdict(old).items()
                if v != getattr(spec, k) and not (k == "shape" and tuple(v) == spec.shape)
            }
            raise DatasetMismatchError(
                f"{directory} holds an extraction with another plan {{field: (on disk, now)}}: "
                f"{diff}. Use another config.data.latent_dir or delete the directory."
            )
    else:
        _write_json_atomic(plan, spec.to_json())


def completed_shards(directory: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """{shard: done-marker} of the shards whose file and marker were both written."""
    directory = pathlib.Path(directory)
    done = {}
    for p in sorted((directory / EXTRACTION_DIR).glob("shard-*.json")):
        marker = json.loads(p.read_text())
        done[int(marker["shard"])] = marker
    return done


def _write_atomic(final: pathlib.Path, serialized: Iterable[bytes]) -> tuple[int, int]:
    """Writes serialized records to `final` through a temporary file; (records, bytes)."""
    from array_record.python import array_record_module

    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(final.name + ".tmp*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), WRITER_OPTIONS)
    count = 0
    try:
        for record in serialized:
            writer.write(record)
            count += 1
    finally:
        writer.close()
    os.replace(tmp, final)
    return count, final.stat().st_size


def write_shard(
    directory: str | os.PathLike,
    spec: DatasetSpec,
    shard: int,
    records: Iterable[dict[str, Any]],
    skipped: Sequence[dict[str, str]] = (),
    contexts: Iterable[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Writes `records` (and, for text datasets, `contexts`) as shard `shard`, then its marker.

    Each file goes to a temporary name that is renamed into place once closed, and the marker is
    written after both renames: a crash at any point leaves either a complete shard with its
    marker, or no marker (the shard is then rewritten on resume, replacing any partial file).

    Args:
      records: dicts with `x` ([*spec.shape] array), `label`, `index` and `flip` (ints); text
        datasets also `context_start` and `num_contexts` (positions in this shard's contexts).
      skipped: [{"key": file or id, "reason": message}] of the images this shard skipped.
      contexts: text datasets: dicts with `context` ([*spec.context_shape]), `index` (source
        example) and `caption` (str), in the order `context_start` refers to.
    Returns:
      The marker: {"shard", "num_records", "num_bytes", "skipped"} (+ "num_contexts",
      "context_bytes" for text datasets).
    """
    directory = pathlib.Path(directory)
    marker: dict[str, Any] = {"shard": shard}
    if spec.has_contexts:
        cfeats = context_features(spec)

        def serialized_contexts():
            for c in contexts:
                context = np.asarray(c["context"], dtype=spec.context_dtype)
                if context.shape != spec.context_shape:
                    raise ValueError(
                        f"context has shape {context.shape}, the dataset {spec.context_shape}"
                    )
                yield cfeats.serialize_example(
                    {"context": context, "index": c["index"], "caption": c["caption"]}
                )

        marker["num_contexts"], marker["context_bytes"] = _write_atomic(
            context_shard_path(directory, spec, shard), serialized_contexts()
        )

    feats = features(spec)
    keys = list(feats.keys())

    def serialized_records():
        for rec in records:
            x = np.asarray(rec["x"], dtype=spec.dtype)
            if x.shape != spec.shape:
                raise ValueError(f"record x has shape {x.shape}, the dataset {spec.shape}")
            yield feats.serialize_example(dict({k: rec[k] for k in keys}, x=x))

    marker["num_records"], marker["num_bytes"] = _write_atomic(
        shard_path(directory, spec, shard), serialized_records()
    )
    marker["skipped"] = list(skipped)
    _write_json_atomic(_marker_path(directory, shard), marker)
    return marker


def finalize(directory: str | os.PathLike, spec: DatasetSpec) -> dict[str, Any]:
    """Writes the TFDS metadata once every shard is done; returns the metadata dict.

    Text datasets get their contexts' metadata first (`contexts/`); the main dataset's
    `dataset_info.json` is written last because its presence marks the dataset complete.

    Raises:
      CorruptShardError: a shard has no done-marker yet, its file is missing or has another
        size than its marker records, or a text dataset lacks its empty-caption context.
    """
    directory = pathlib.Path(directory)
    done = completed_shards(directory)
    missing = [s for s in range(spec.num_shards) if s not in done]
    if missing:
        raise CorruptShardError(
            f"{directory}: shards {missing[:20]}{'...' if len(missing) > 20 else ''} of "
            f"{spec.num_shards} are not written yet; run the extraction again to finish them"
        )
    markers = [done[s] for s in range(spec.num_shards)]
    for m in markers:
        _check_shard_file(shard_path(directory, spec, m["shard"]), m["num_bytes"])
    skipped = [s for m in markers for s in m["skipped"]]
    num_records = sum(m["num_records"] for m in markers)
    metadata = dict(
        spec.to_json(),
        format_version=VERSION,
        num_records=num_records,
        num_examples=num_records // 2,
        num_skipped=len(skipped),
        flip_copies=True,
        shard_bytes=[m["num_bytes"] for m in markers],
    )
    if spec.has_contexts:
        for m in markers:
            _check_shard_file(context_shard_path(directory, spec, m["shard"]), m["context_bytes"])
        if not has_empty_context(directory):
            raise CorruptShardError(
                f"{_empty_context_path(directory)} is missing: run the extraction again"
            )
        metadata.update(
            num_contexts=sum(m["num_contexts"] for m in markers),
            context_shard_bytes=[m["context_bytes"] for m in markers],
        )
        _write_info(
            directory / CONTEXTS_DIR,
            CONTEXTS_NAME,
            f"CLIP text contexts of the captions of {spec.source}, written by uvit_jax.",
            context_features(spec),
            dict(spec.to_json(), format_version=VERSION),
            spec.split,
            [(m["num_contexts"], m["context_bytes"]) for m in markers],
        )
    _write_info(
        directory,
        DATASET_NAME,
        f"{'Pixels' if spec.autoencoder == 'identity' else 'Autoencoder moments'} of "
        f"{spec.source} and their horizontal flips, written by uvit_jax.",
        features(spec),
        metadata,
        spec.split,
        [(m["num_records"], m["num_bytes"]) for m in markers],
    )
    return metadata


def _write_info(
    directory: pathlib.Path,
    name: str,
    description: str,
    feats: Any,
    metadata: dict[str, Any],
    split: str,
    shards: Sequence[tuple[int, int]],
) -> None:
    """Writes the TFDS metadata of one dataset: shards = [(records, bytes)] per shard file."""
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import utils as tfds_utils

    identity = tfds.core.DatasetIdentity(
        name=name,
        version=tfds_utils.Version(VERSION),
        data_dir=os.fspath(directory),
        module_name=__name__,
    )
    info = tfds.core.DatasetInfo(
        builder=identity,
        description=description,
        features=feats,
        metadata=tfds.core.MetadataDict(metadata),
    )
    info.set_file_format("array_record")
    info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=split,
                    shard_lengths=[n for n, _ in shards],
                    num_bytes=sum(b for _, b in shards),
                    filename_template=_template(directory, split, name),
                )
            ]
        )
    )
    info.write_to_directory(directory)


def _check_shard_file(path: pathlib.Path, expected_bytes: int) -> None:
    if not path.exists():
        raise CorruptShardError(f"shard file {path} is missing")
    size = path.stat().st_size
    if size != expected_bytes:
        raise CorruptShardError(
            f"shard file {path} is truncated or changed: {size} bytes, the dataset recorded "
            f"{expected_bytes}"
        )


@dataclasses.dataclass(frozen=True)
class DatasetOnDisk:
    """A finalized dataset directory: its spec, metadata and shard files."""

    directory: str
    spec: DatasetSpec
    metadata: dict[str, Any]
    shard_paths: tuple[str, ...]
    shard_lengths: tuple[int, ...]
    # Text datasets: the context shard files (one per image shard) and their record counts.
    context_paths: tuple[str, ...] = ()
    context_lengths: tuple[int, ...] = ()

    @property
    def num_records(self) -> int:
        return sum(self.shard_lengths)

    @property
    def num_examples(self) -> int:
        """Source images kept (each has two records: original and flip)."""
        return self.num_records // 2


def open_dataset(directory: str | os.PathLike, split: str | None = None) -> DatasetOnDisk:
    """Reads the metadata of a finalized dataset and checks every shard file's size.

    Raises:
      FileNotFoundError: no finalized dataset there (the message says how to make one).
      CorruptShardError: a shard file is missing or truncated (names the file).
    """
    import tensorflow_datasets as tfds

    directory = pathlib.Path(directory)
    if not is_finalized(directory):
        state = (
            "an unfinished extraction" if (directory / EXTRACTION_DIR).exists() else "no dataset"
        )
        raise FileNotFoundError(
            f"{directory} holds {state}: run `main.py --mode extract` with this config first"
        )
    info = tfds.builder_from_directory(os.fspath(directory)).info
    metadata = dict(info.metadata)
    spec = DatasetSpec.from_json(metadata)
    split = split or spec.split
    if split not in info.splits:
        raise DatasetMismatchError(f"{directory} has splits {list(info.splits)}, not {split!r}")
    split_info = info.splits[split]
    paths = tuple(os.fspath(p) for p in split_info.filepaths)
    for path, nbytes in zip(paths, metadata["shard_bytes"], strict=True):
        _check_shard_file(pathlib.Path(path), nbytes)
    context_paths: tuple[str, ...] = ()
    context_lengths: tuple[int, ...] = ()
    if spec.has_contexts:
        cinfo = tfds.builder_from_directory(os.fspath(directory / CONTEXTS_DIR)).info
        csplit = cinfo.splits[split]
        context_paths = tuple(os.fspath(p) for p in csplit.filepaths)
        context_lengths = tuple(int(n) for n in csplit.shard_lengths)
        for path, nbytes in zip(context_paths, metadata["context_shard_bytes"], strict=True):
            _check_shard_file(pathlib.Path(path), nbytes)
    return DatasetOnDisk(
        directory=os.fspath(directory),
        spec=spec,
        metadata=metadata,
        shard_paths=paths,
        shard_lengths=tuple(int(n) for n in split_info.shard_lengths),
        context_paths=context_paths,
        context_lengths=context_lengths,
    )


def expected_shape(config: Any) -> tuple[int, int, int]:
    """The record shape a config trains on: moments [s, s, 2 C] or pixels [s, s, C]."""
    side, chans = config.model.img_size, config.model.in_chans
    if config.autoencoder.kind == "identity":
        return (side, side, chans)
    return (side, side, 2 * chans)


def expected_context_shape(config: Any) -> tuple[int, ...]:
    """[L, D] of the text contexts a text-to-image config trains on; () for other configs."""
    if config.model.kind != "uvit_t2i":
        return ()
    return (int(config.model.num_clip_token), int(config.model.clip_dim))


def check_compatible(dataset: DatasetOnDisk, config: Any) -> None:
    """Fails before training when the dataset does not fit `config`, naming both values."""
    want_shape = expected_shape(config)
    problems = []
    want_context = expected_context_shape(config)
    if want_context and dataset.spec.context_shape != want_context:
        have = list(dataset.spec.context_shape) or "none"
        problems.append(
            f"text contexts {have} on disk, but the config (model.num_clip_token="
            f"{config.model.num_clip_token}, model.clip_dim={config.model.clip_dim}) needs "
            f"{list(want_context)}"
        )
    if dataset.spec.shape != want_shape:
        problems.append(
            f"record shape {list(dataset.spec.shape)} on disk, but the config "
            f"(model.img_size={config.model.img_size}, model.in_chans={config.model.in_chans}, "
            f"autoencoder.kind={config.autoencoder.kind!r}) needs {list(want_shape)}"
        )
    if dataset.spec.autoencoder != config.autoencoder.kind:
        problems.append(
            f"autoencoder {dataset.spec.autoencoder!r} on disk, config.autoencoder.kind="
            f"{config.autoencoder.kind!r}"
        )
    if not math.isclose(
        dataset.spec.scale_factor, float(config.autoencoder.scale_factor), rel_tol=1e-6
    ):
        problems.append(
            f"scale factor {dataset.spec.scale_factor} on disk, config.autoencoder.scale_factor="
            f"{config.autoencoder.scale_factor}"
        )
    if problems:
        raise DatasetMismatchError(
            f"dataset {dataset.directory} does not match the config: " + "; ".join(problems)
        )


def decode_x(x: np.ndarray) -> np.ndarray:
    """Stored `x` -> float32: moments as they are, uint8 pixels to [-1, 1]."""
    if x.dtype == np.uint8:
        return to_model_range(x)
    return x.astype(np.float32, copy=False)


class _ShardFiles:
    """Random access by global record id over a list of array_record shard files.

    Picklable (grain ships readers to worker processes): the files open lazily in the process
    that reads. Errors name the shard file.
    """

    def __init__(self, paths: Sequence[str], lengths: Sequence[int]):
        self.paths = tuple(paths)
        self.starts = np.cumsum((0,) + tuple(lengths))
        self._source = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """The shard index of each global record id."""
        return np.searchsorted(self.starts, ids, side="right") - 1

    def get(self, ids: Sequence[int]) -> list[bytes]:
        if self._source is None:
            from array_record.python import array_record_data_source

            try:
                self._source = array_record_data_source.ArrayRecordDataSource(list(self.paths))
            except Exception as e:  # array_record raises plain RuntimeError/ValueError
                named = [p for p in self.paths if os.path.basename(p) in str(e)]
                where = ", ".join(named) if named else f"of {os.path.dirname(self.paths[0])}"
                raise CorruptShardError(f"cannot open the shards {where}: {e}") from e
        try:
            return self._source.__getitems__(list(ids))
        except Exception as batch_error:
            # Find the record (hence the file) that fails, to name it.
            for i in ids:
                try:
                    self._source[i]
                except Exception as e:
                    raise CorruptShardError(self.read_error([i], e)) from e
            raise CorruptShardError(self.read_error(ids, batch_error)) from batch_error

    def read_error(self, ids: Sequence[int], error: Exception) -> str:
        ids = [i for i in ids if 0 <= i < self.starts[-1]]
        files = sorted({self.paths[int(s)] for s in self.shard_of(np.asarray(ids, np.int64))})
        where = ", ".join(files) if files else f"records {list(ids)[:4]}"
        return f"cannot read shard {where}: {type(error).__name__}: {error}"


def _tensor(feature: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    data = feature.bytes_list.value[0]
    size = int(np.prod(shape)) * dtype.itemsize
    if len(data) != size:
        raise ValueError(f"a tensor has {len(data)} bytes, expected {size}")
    return np.frombuffer(data, dtype).reshape(shape)


class RecordReader:
    """Batched random reads of records by global record index, decoded to numpy.

    Picklable. Reads parse the `tf.train.Example` protos directly (no TFDS decode step: it
    doubled the cost per record) and name the shard file when a read fails.
    """

    def __init__(self, dataset: DatasetOnDisk):
        self._records = _ShardFiles(dataset.shard_paths, dataset.shard_lengths)
        self._shape = dataset.spec.shape
        self._dtype = np.dtype(dataset.spec.dtype)
        self.has_contexts = dataset.spec.has_contexts
        if self.has_contexts:
            self._contexts = _ShardFiles(dataset.context_paths, dataset.context_lengths)
            self._context_shape = dataset.spec.context_shape
            self._context_dtype = np.dtype(dataset.spec.context_dtype)

    def read(self, record_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Records `record_ids` [n] -> {"x": float32 [n, *shape], "label", "index", "flip"}.

        Text datasets add "context_start" int64 [n] (the global id of the example's first
        context record) and "num_contexts" int32 [n].
        """
        from tensorflow_datasets.proto import tf_example_pb2

        ids = [int(i) for i in record_ids]
        raw = self._records.get(ids)
        n = len(ids)
        x = np.empty((n, *self._shape), self._dtype)
        names = ["label", "index", "flip"]
        if self.has_contexts:
            names += ["context_start", "num_contexts"]
        ints = np.empty((len(names), n), np.int64)
        for j, record in enumerate(raw):
            try:
                feats = tf_example_pb2.Example.FromString(record).features.feature
                x[j] = _tensor(feats["x"], self._dtype, self._shape)
                for r, name in enumerate(names):
                    ints[r, j] = feats[name].int64_list.value[0]
            except Exception as e:
                raise CorruptShardError(self._records.read_error([ids[j]], e)) from e
        out = {
            "x": decode_x(x),
            "label": ints[0].astype(np.int32),
            "index": ints[1],
            "flip": ints[2].astype(np.int32),
        }
        if self.has_contexts:
            # Contexts are numbered within their shard: add the shard's first global id.
            shards = self._records.shard_of(np.asarray(ids, np.int64))
            out["context_start"] = ints[3] + self._contexts.starts[shards]
            out["num_contexts"] = ints[4].astype(np.int32)
        return out

    def read_contexts(self, context_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Context records [n] -> {"context": float32 [n, L, D], "index" int64 [n], "caption"}."""
        from tensorflow_datasets.proto import tf_example_pb2

        if not self.has_contexts:
            raise DatasetMismatchError("this dataset has no text contexts")
        ids = [int(i) for i in context_ids]
        raw = self._contexts.get(ids)
        context = np.empty((len(ids), *self._context_shape), self._context_dtype)
        index = np.empty(len(ids), np.int64)
        captions = []
        for j, record in enumerate(raw):
            try:
                feats = tf_example_pb2.Example.FromString(record).features.feature
                context[j] = _tensor(feats["context"], self._context_dtype, self._context_shape)
                index[j] = feats["index"].int64_list.value[0]
                captions.append(feats["caption"].bytes_list.value[0].decode("utf-8"))
            except Exception as e:
                raise CorruptShardError(self._contexts.read_error([ids[j]], e)) from e
        return {
            "context": context.astype(np.float32, copy=False),
            "index": index,
            "caption": np.asarray(captions, dtype=object),
        }
