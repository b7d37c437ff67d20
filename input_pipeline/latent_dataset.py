"""The extracted dataset: a TFDS dataset directory in array_record format.

Layout of a dataset directory (`config.data.latent_dir`):

  dataset_info.json, features.json, metadata.json    TFDS metadata, written last (`finalize`)
  uvit_latents-<split>.array_record-SSSSS-of-NNNNN    shard files, written atomically
  _extraction/plan.json                              what the extraction promises (`DatasetSpec`)
  _extraction/shard-SSSSS.json                       done-marker of shard S: records, bytes,
                                                     skipped images

Records (TFDS features): `x` the posterior moments [h, w, 2 * embed_dim] (latent configs, float32
or float16) or the preprocessed pixels [res, res, C] (pixel configs, uint8 0..255), stored as raw
bytes; `label` int32 (-1 for unlabelled sources); `index` int64, the example's position in the
source; `flip` int32, 1 for the horizontally flipped copy. Every source example gives two adjacent
records, 2k (original) and 2k + 1 (flip), where k counts the examples kept so far, so the pair of
an example is found without an index.

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
VERSION = "1.0.0"
EXTRACTION_DIR = "_extraction"
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

    def __post_init__(self):
        if self.dtype not in ("float32", "float16", "uint8"):
            raise ValueError(f"record dtype must be float32, float16 or uint8, got {self.dtype!r}")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

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
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DatasetSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in fields})


def features(spec: DatasetSpec):
    """The TFDS `FeaturesDict` of one record."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict(
        {
            "x": tfds.features.Tensor(
                shape=spec.shape, dtype=np.dtype(spec.dtype), encoding="bytes"
            ),
            "label": tfds.features.Scalar(dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int64),
            "flip": tfds.features.Scalar(dtype=np.int32),
        }
    )


def _template(directory: pathlib.Path, split: str):
    from tensorflow_datasets.core import naming

    return naming.ShardedFileTemplate(
        data_dir=directory, dataset_name=DATASET_NAME, split=split, filetype_suffix="array_record"
    )


def shard_path(directory: str | os.PathLike, spec: DatasetSpec, shard: int) -> pathlib.Path:
    """The final file name of `shard`."""
    tmpl = _template(pathlib.Path(directory), spec.split)
    return pathlib.Path(
        os.fspath(tmpl.sharded_filepath(shard_index=shard, num_shards=spec.num_shards))
    )


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


def write_shard(
    directory: str | os.PathLike,
    spec: DatasetSpec,
    shard: int,
    records: Iterable[dict[str, Any]],
    skipped: Sequence[dict[str, str]] = (),
) -> dict[str, Any]:
    """Writes `records` as shard `shard`, atomically, then its done-marker.

    The shard goes to a temporary file that is renamed into place once closed, and the marker is
    written after the rename: a crash at any point leaves either a complete shard with its
    marker, or no marker (the shard is then rewritten on resume, replacing any partial file).

    Args:
      records: dicts with `x` ([*spec.shape] array), `label`, `index` and `flip` (ints).
      skipped: [{"key": file or id, "reason": message}] of the images this shard skipped.
    Returns:
      The marker: {"shard", "num_records", "num_bytes", "skipped"}.
    """
    directory = pathlib.Path(directory)
    from array_record.python import array_record_module

    feats = features(spec)
    final = shard_path(directory, spec, shard)
    for stale in final.parent.glob(final.name + ".tmp*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), WRITER_OPTIONS)
    count = 0
    try:
        for rec in records:
            x = np.asarray(rec["x"], dtype=spec.dtype)
            if x.shape != spec.shape:
                raise ValueError(f"record x has shape {x.shape}, the dataset {spec.shape}")
            writer.write(
                feats.serialize_example(
                    {"x": x, "label": rec["label"], "index": rec["index"], "flip": rec["flip"]}
                )
            )
            count += 1
    finally:
        writer.close()
    os.replace(tmp, final)
    marker = {
        "shard": shard,
        "num_records": count,
        "num_bytes": final.stat().st_size,
        "skipped": list(skipped),
    }
    _write_json_atomic(_marker_path(directory, shard), marker)
    return marker


def finalize(directory: str | os.PathLike, spec: DatasetSpec) -> dict[str, Any]:
    """Writes the TFDS metadata once every shard is done; returns the metadata dict.

    Raises:
      CorruptShardError: a shard has no done-marker yet, or its file is missing or has another
        size than its marker records.
    """
    import tensorflow_datasets as tfds
    from tensorflow_datasets.core import utils as tfds_utils

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
    identity = tfds.core.DatasetIdentity(
        name=DATASET_NAME,
        version=tfds_utils.Version(VERSION),
        data_dir=os.fspath(directory),
        module_name=__name__,
    )
    info = tfds.core.DatasetInfo(
        builder=identity,
        description=(
            f"{'Pixels' if spec.autoencoder == 'identity' else 'Autoencoder moments'} of "
            f"{spec.source} and their horizontal flips, written by uvit_jax."
        ),
        features=features(spec),
        metadata=tfds.core.MetadataDict(metadata),
    )
    info.set_file_format("array_record")
    info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=spec.split,
                    shard_lengths=[m["num_records"] for m in markers],
                    num_bytes=sum(m["num_bytes"] for m in markers),
                    filename_template=_template(directory, spec.split),
                )
            ]
        )
    )
    info.write_to_directory(directory)
    return metadata


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
    return DatasetOnDisk(
        directory=os.fspath(directory),
        spec=spec,
        metadata=metadata,
        shard_paths=paths,
        shard_lengths=tuple(int(n) for n in split_info.shard_lengths),
    )


def expected_shape(config: Any) -> tuple[int, int, int]:
    """The record shape a config trains on: moments [s, s, 2 C] or pixels [s, s, C]."""
    side, chans = config.model.img_size, config.model.in_chans
    if config.autoencoder.kind == "identity":
        return (side, side, chans)
    return (side, side, 2 * chans)


def check_compatible(dataset: DatasetOnDisk, config: Any) -> None:
    """Fails before training when the dataset does not fit `config`, naming both values."""
    want_shape = expected_shape(config)
    problems = []
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


class RecordReader:
    """Batched random reads of records by global record index, decoded to numpy.

    Picklable (grain ships it to worker processes): the array_record readers open lazily in
    the process that reads. Reads parse the `tf.train.Example` protos directly (no TFDS decode
    step: it doubled the cost per record) and name the shard file when a read fails.
    """

    def __init__(self, dataset: DatasetOnDisk):
        self._paths = dataset.shard_paths
        self._starts = np.cumsum((0,) + dataset.shard_lengths)
        self._shape = dataset.spec.shape
        self._dtype = np.dtype(dataset.spec.dtype)
        self._source = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_source"] = None
        return state

    def _open(self):
        from array_record.python import array_record_data_source

        try:
            self._source = array_record_data_source.ArrayRecordDataSource(list(self._paths))
        except Exception as e:  # array_record raises plain RuntimeError/ValueError
            raise CorruptShardError(f"cannot open the shards {self._file_of_error(e)}: {e}") from e
        return self._source

    def _file_of_error(self, error: Exception) -> str:
        named = [p for p in self._paths if os.path.basename(p) in str(error)]
        return ", ".join(named) if named else f"of {os.path.dirname(self._paths[0])}"

    def read(self, record_ids: np.ndarray) -> dict[str, np.ndarray]:
        """Records `record_ids` [n] -> {"x": float32 [n, *shape], "label", "index", "flip"}."""
        from tensorflow_datasets.proto import tf_example_pb2

        source = self._source if self._source is not None else self._open()
        ids = [int(i) for i in record_ids]
        try:
            raw = source.__getitems__(ids)
        except Exception as batch_error:
            # Find the record (hence the file) that fails, to name it.
            for i in ids:
                try:
                    source[i]
                except Exception as e:
                    raise CorruptShardError(self._read_error([i], e)) from e
            raise CorruptShardError(self._read_error(ids, batch_error)) from batch_error
        n = len(ids)
        x = np.empty((n, *self._shape), self._dtype)
        ints = np.empty((3, n), np.int64)
        size = int(np.prod(self._shape)) * self._dtype.itemsize
        for j, record in enumerate(raw):
            try:
                feats = tf_example_pb2.Example.FromString(record).features.feature
                data = feats["x"].bytes_list.value[0]
                if len(data) != size:
                    raise ValueError(f"x has {len(data)} bytes, expected {size}")
                x[j] = np.frombuffer(data, self._dtype).reshape(self._shape)
                ints[0, j] = feats["label"].int64_list.value[0]
                ints[1, j] = feats["index"].int64_list.value[0]
                ints[2, j] = feats["flip"].int64_list.value[0]
            except Exception as e:
                raise CorruptShardError(self._read_error([ids[j]], e)) from e
        return {
            "x": decode_x(x),
            "label": ints[0].astype(np.int32),
            "index": ints[1],
            "flip": ints[2].astype(np.int32),
        }

    def _read_error(self, ids: Sequence[int], error: Exception) -> str:
        files = sorted(
            {
                self._paths[int(np.searchsorted(self._starts, i, side="right")) - 1]
                for i in ids
                if 0 <= i < self._starts[-1]
            }
        )
        where = ", ".join(files) if files else f"records {ids[:4]}"
        return f"cannot read shard {where}: {type(error).__name__}: {error}"
