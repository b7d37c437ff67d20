"""Reading an extracted dataset: open and check it, then batched random reads of its records.

Reads parse the `tf.train.Example` protos directly (no TFDS decode step: it doubled the cost per
record), never import TensorFlow, and name the shard file when a read fails.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import pathlib
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.proto import tf_example_pb2

from input_pipeline.errors import MissingDataFile
from input_pipeline.latent_dataset import layout
from input_pipeline.latent_stats import AUTO_SCALE, latent_stats_path
from input_pipeline.preprocess import to_model_range


@dataclasses.dataclass(frozen=True)
class DatasetOnDisk:
    """A finalized dataset directory: its spec, metadata and shard files (image shards, then
    context shards: `spec.tables` order)."""

    directory: str
    spec: layout.DatasetSpec
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


# The TFDS metadata files of a dataset directory.
METADATA_FILES = ("dataset_info.json", "features.json", "metadata.json")


def _read_info(directory: pathlib.Path) -> Any:
    """TFDS's `DatasetInfo` of a dataset directory; `CorruptMetadataError` naming the file when
    one of its metadata files is not JSON or not what TFDS reads."""
    for name in METADATA_FILES:
        path = directory / name
        if not path.exists():
            continue
        try:
            content = json.loads(path.read_bytes())
        except (ValueError, OSError) as e:  # UnicodeDecodeError and JSONDecodeError included
            raise layout.CorruptMetadataError(f"{path}: not readable JSON ({_one_line(e)})") from e
        if not isinstance(content, dict):
            raise layout.CorruptMetadataError(
                f"{path}: expected a JSON object, got {type(content).__name__}"
            )
    try:
        return tfds.builder_from_directory(os.fspath(directory)).info
    except Exception as e:  # TFDS raises anything from KeyError to protobuf's ParseError
        # TFDS's messages name the proto (DatasetInfo: dataset_info.json; Feature, or a feature
        # class name: features.json) rather than the file.
        text = str(e)
        if "Feature" in text or "class name" in text:
            where = f"{directory / 'features.json'}: not TFDS features"
        elif "DatasetInfo" in text or "version" in text.lower():
            where = f"{directory / 'dataset_info.json'}: not a TFDS dataset info"
        else:
            where = f"{directory}: unreadable TFDS metadata ({', '.join(METADATA_FILES)})"
        raise layout.CorruptMetadataError(f"{where} ({_one_line(e)})") from e


def _one_line(e: Exception) -> str:
    """`Type: message`, its first line only."""
    return (f"{type(e).__name__}: {e}".splitlines() or [type(e).__name__])[0]


def _table_files(
    directory: pathlib.Path, table: layout.Table, split: str, metadata: dict[str, Any]
) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """(shard paths, record counts) of one table of a finalized dataset, sizes checked."""
    info = _read_info(directory / table.subdir)
    if split not in info.splits:
        raise layout.DatasetMismatchError(
            f"{directory} has splits {list(info.splits)}, not {split!r}"
        )
    split_info = info.splits[split]
    paths = tuple(os.fspath(p) for p in split_info.filepaths)
    for path, nbytes in zip(paths, metadata[table.shard_bytes_key], strict=True):
        layout.check_shard_file(pathlib.Path(path), nbytes)
    return paths, tuple(int(n) for n in split_info.shard_lengths)


def open_dataset(directory: str | os.PathLike, split: str | None = None) -> DatasetOnDisk:
    """Reads the metadata of a finalized dataset and checks every shard file's size.

    Raises:
      FileNotFoundError: no finalized dataset there (the message says how to make one).
      CorruptShardError: a shard file is missing or truncated (names the file).
    """
    directory = pathlib.Path(directory)
    if not layout.is_finalized(directory):
        state = (
            "an unfinished extraction"
            if (directory / layout.EXTRACTION_DIR).exists()
            else "no dataset"
        )
        raise MissingDataFile(
            f"{directory} holds {state}: run `main.py --mode extract` with this config first"
        )
    metadata = dict(_read_info(directory).metadata or {})
    try:
        spec = layout.DatasetSpec.from_json(metadata)
    except (TypeError, ValueError) as e:
        raise layout.CorruptMetadataError(
            f"{directory / METADATA_FILES[2]}: not the metadata of a uvit_jax dataset ({e})"
        ) from e
    # (paths, record counts) of each table's shards, in the order of DatasetOnDisk's fields.
    try:
        files = [_table_files(directory, t, split or spec.split, metadata) for t in spec.tables]
    except (KeyError, TypeError) as e:  # a field of metadata.json missing or of another type
        raise layout.CorruptMetadataError(
            f"{directory / METADATA_FILES[2]}: not the metadata of a uvit_jax dataset "
            f"({_one_line(e)})"
        ) from e
    return DatasetOnDisk(os.fspath(directory), spec, metadata, *itertools.chain(*files))


def read_empty_context(dataset: DatasetOnDisk) -> np.ndarray:
    """The unconditional context [L, D] float32 of a text dataset."""
    path = layout.empty_context_path(dataset.directory)
    if not dataset.spec.has_contexts:
        raise layout.DatasetMismatchError(
            f"dataset {dataset.directory} has no text contexts; extract it with a text-to-image "
            "config"
        )
    if not path.exists():
        raise layout.CorruptShardError(f"{path} is missing (the encoding of the empty caption)")
    context = np.load(path)
    if context.shape != dataset.spec.context_shape:
        raise layout.CorruptShardError(
            f"{path} has shape {list(context.shape)}, the dataset's contexts "
            f"{list(dataset.spec.context_shape)}"
        )
    return context.astype(np.float32)


def check_compatible(dataset: DatasetOnDisk, config: Any) -> None:
    """Fails before training when the dataset does not fit `config`, naming both values."""
    want_shape = layout.expected_shape(config)
    problems = []
    want_context = layout.expected_context_shape(config)
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
    scale_problem = _scale_problem(dataset, config.autoencoder.scale_factor)
    if scale_problem:
        problems.append(scale_problem)
    if problems:
        raise layout.DatasetMismatchError(
            f"dataset {dataset.directory} does not match the config: " + "; ".join(problems)
        )


def _scale_problem(dataset: DatasetOnDisk, want: float | str) -> str | None:
    """Why `config.autoencoder.scale_factor` (`want`) does not fit the dataset, or None.

    Numbers must agree with the number the dataset was extracted for. A dataset extracted with
    "auto" fits "auto", and the number a run resolved from it: 1 / its measured latent std
    (what a checkpoint's saved config holds).
    """
    have = dataset.spec.scale_factor
    field = f"config.autoencoder.scale_factor={want!r}"
    if have == want:  # "auto" on both sides, or the same number
        return None
    on_disk = f"scale factor {have!r} on disk"
    if want == AUTO_SCALE:
        return f"{on_disk}, {field}"
    if have == AUTO_SCALE:
        stats = read_latent_stats(dataset.directory)
        if stats is None:
            path = latent_stats_path(dataset.directory)
            return f"{on_disk} without its measured std ({path}), {field}"
        have = 1.0 / stats["std"]
        on_disk = f"scale factor 'auto' on disk (1/std = {have!r})"
    if math.isclose(have, float(want), rel_tol=1e-6):
        return None
    return f"{on_disk}, {field}"


def read_latent_stats(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The latents' statistics `--mode extract` measured (`latent_stats.json`: "std" and how it
    was measured), or None when the dataset has none (pixels, or written before the
    measurement existed); `CorruptMetadataError` naming the file when it is unreadable."""
    path = latent_stats_path(directory)
    if not path.exists():
        return None
    try:
        stats = json.loads(path.read_bytes())
        std = float(stats["std"])
    except (ValueError, OSError, KeyError, TypeError) as e:
        raise layout.CorruptMetadataError(
            f"{path}: not the latent statistics of a uvit_jax dataset ({_one_line(e)})"
        ) from e
    if not (math.isfinite(std) and std > 0):
        raise layout.CorruptMetadataError(f"{path}: std={std!r}, expected a finite number > 0")
    return dict(stats, std=std)


def decode_x(x: np.ndarray) -> np.ndarray:
    """Stored `x` -> float32: moments as they are, uint8 pixels to [-1, 1]."""
    if x.dtype == np.uint8:
        return to_model_range(x)
    return x.astype(np.float32, copy=False)


class _ShardFiles:
    """Random access by global record id over a list of array_record shard files.

    A batch's records are read shard by shard in the calling thread: parallelism comes from
    grain's read threads and worker processes, one level up. (array_record's
    `ArrayRecordDataSource.__getitems__` starts a thread pool for every call, one thread per
    shard touched: on a 2-core host that cost 20x the reads themselves, CPU taken from the
    train step; docs/benchmarks.md.)

    Picklable (grain ships readers to worker processes): each file opens lazily in the process
    that reads, once, under a lock: a worker's read threads call `get` together, and two of them
    opening a file at once (which imports modules lazily) can deadlock on the import lock.
    Errors name the shard file.
    """

    def __init__(self, paths: Sequence[str], lengths: Sequence[int]):
        self.paths = tuple(paths)
        self.starts = np.cumsum((0,) + tuple(lengths))
        self._readers: list[Any] = [None] * len(self.paths)
        self._opening = threading.Lock()

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_readers"] = [None] * len(self.paths)
        del state["_opening"]  # a lock does not pickle; each process makes its own
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._opening = threading.Lock()

    def shard_of(self, ids: np.ndarray) -> np.ndarray:
        """The shard index of each global record id."""
        return np.searchsorted(self.starts, ids, side="right") - 1

    def _reader(self, shard: int) -> Any:
        reader = self._readers[shard]
        if reader is not None:
            return reader
        with self._opening:
            if self._readers[shard] is None:  # not opened by another thread while this waited
                try:
                    self._readers[shard] = array_record_module.ArrayRecordReader(
                        self.paths[shard],
                        options="readahead_buffer_size:0",  # random access: no read-ahead
                        file_reader_buffer_size=32768,
                    )
                except Exception as e:  # array_record raises plain RuntimeError/ValueError
                    raise layout.CorruptShardError(
                        f"cannot open the shard {self.paths[shard]}: {e}"
                    ) from e
            return self._readers[shard]

    def get(self, ids: Sequence[int]) -> list[bytes]:
        """The records of global ids `ids`, in their order."""
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.starts[-1]):
            raise IndexError(f"record ids outside [0, {self.starts[-1]}): {ids[:4].tolist()}")
        shards = self.shard_of(ids)
        out: list[bytes] = [b""] * len(ids)
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            positions = (ids[rows] - self.starts[shard]).tolist()
            reader = self._reader(int(shard))
            try:
                records = reader.read(positions)
            except Exception as e:
                raise layout.CorruptShardError(self.read_error(ids[rows].tolist(), e)) from e
            for row, record in zip(rows, records, strict=True):
                out[row] = record
        return out

    def read_error(self, ids: Sequence[int], error: Exception) -> str:
        """The message for records `ids` (ids `get` accepted) that failed: names their files."""
        files = sorted({self.paths[int(s)] for s in self.shard_of(np.asarray(ids, np.int64))})
        return f"cannot read shard {', '.join(files)}: {type(error).__name__}: {error}"


def _tensor(feature: Any, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    data = feature.bytes_list.value[0]
    size = int(np.prod(shape)) * dtype.itemsize
    if len(data) != size:
        raise ValueError(f"a tensor has {len(data)} bytes, expected {size}")
    return np.frombuffer(data, dtype).reshape(shape)


def _read_table(
    table: layout.Table, files: _ShardFiles, ids: Sequence[int]
) -> dict[str, np.ndarray]:
    """Records `ids` of `table` -> {its array feature [n, *shape] in the stored dtype, each
    integer feature [n] in its dtype, each text feature [n] (object array of str)}."""
    raw = files.get(ids)
    dtype = np.dtype(table.dtype)
    out = {table.tensor: np.empty((len(ids), *table.shape), dtype)}
    out.update({name: np.empty(len(ids), scalar_dtype) for name, scalar_dtype in table.scalars})
    texts: dict[str, list[str]] = {name: [] for name in table.texts}
    for j, record in enumerate(raw):
        try:
            feats = tf_example_pb2.Example.FromString(record).features.feature
            out[table.tensor][j] = _tensor(feats[table.tensor], dtype, table.shape)
            for name, _ in table.scalars:
                out[name][j] = feats[name].int64_list.value[0]
            for name, values in texts.items():
                values.append(feats[name].bytes_list.value[0].decode("utf-8"))
        except Exception as e:
            raise layout.CorruptShardError(files.read_error([ids[j]], e)) from e
    out.update({name: np.asarray(values, dtype=object) for name, values in texts.items()})
    return out


class RecordReader:
    """Batched random reads of records by global record index, decoded to numpy. Picklable."""

    def __init__(self, dataset: DatasetOnDisk):
        self._images = dataset.spec.images
        self._records = _ShardFiles(dataset.shard_paths, dataset.shard_lengths)
        self.has_contexts = dataset.spec.has_contexts
        if self.has_contexts:
            self._context_table = dataset.spec.contexts
            self._contexts = _ShardFiles(dataset.context_paths, dataset.context_lengths)

    def read(self, record_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Records `record_ids` [n] -> {"x": float32 [n, *shape], "label" int32, "index" int64,
        "flip" int32}.

        Text datasets add "context_start" int64 [n] (the global id of the example's first
        context record) and "num_contexts" int32 [n].
        """
        ids = [int(i) for i in record_ids]
        out = _read_table(self._images, self._records, ids)
        out["x"] = decode_x(out["x"])
        if self.has_contexts:
            # Contexts are numbered within their shard: add the shard's first global id.
            shards = self._records.shard_of(np.asarray(ids, np.int64))
            out["context_start"] = out["context_start"] + self._contexts.starts[shards]
        return out

    def read_contexts(self, context_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Context records [n] -> {"context": float32 [n, L, D], "index" int64 [n], "caption"}."""
        if not self.has_contexts:
            raise layout.DatasetMismatchError("this dataset has no text contexts")
        ids = [int(i) for i in context_ids]
        out = _read_table(self._context_table, self._contexts, ids)
        out["context"] = out["context"].astype(np.float32, copy=False)
        return out
