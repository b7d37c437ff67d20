"""The extracted dataset's format: what its directory holds and what a record is.

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
  latent_stats.json                                  latent datasets: the standard deviation of
                                                     the latents training draws from the
                                                     moments (`--mode extract` measures it once
                                                     the dataset is complete; written atomically)

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

The two TFDS datasets are described by one `Table` each (`DatasetSpec.tables`): the writer and
the reader go through the tables, so the caption path is data, not a second code path.

Shards are written uncompressed (`group_size:1,uncompressed`): latents barely compress, and zstd
decompression dominated the cost of random reads. The directory reads with
`tfds.builder_from_directory(dir).as_data_source(split)` and never imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from typing import Any

import numpy as np

# TFDS replaces Python's import function for the whole process while `import
# tensorflow_datasets` runs (its lazy dataset-builder imports), so the first import of it must
# not overlap other threads' imports: an image-decoding or record-reading thread importing a
# PIL plugin or a protobuf module meanwhile fails (skipped images) or deadlocks (a stuck grain
# worker). Importing it here, with the data layer, does it once from the importing thread,
# before any of this package's threads start.
import tensorflow_datasets as tfds
from tensorflow_datasets.core import naming

from input_pipeline.errors import DataError
from input_pipeline.latent_stats import AUTO_SCALE

DATASET_NAME = "uvit_latents"
CONTEXTS_NAME = "uvit_contexts"
VERSION = "1.0.0"
EXTRACTION_DIR = "_extraction"
CONTEXTS_DIR = "contexts"
EMPTY_CONTEXT_FILE = "empty_context.npy"
# Uncompressed, one record per chunk: random reads decode nothing but the record itself.
WRITER_OPTIONS = "group_size:1,uncompressed"


class DatasetMismatchError(DataError, ValueError):
    """The dataset on disk does not fit the config (or the extraction being resumed)."""


class CorruptShardError(DataError, OSError):
    """A shard file is missing, truncated or unreadable; the message names the file."""


class CorruptMetadataError(DataError, ValueError):
    """A metadata file of a dataset (`dataset_info.json`, `features.json`, `metadata.json`) is
    unreadable or not what this project writes; the message names the file."""


@dataclasses.dataclass(frozen=True)
class Table:
    """One TFDS dataset of a dataset directory: its files, its records and its bookkeeping.

    name: the TFDS dataset name. subdir: its folder within the dataset directory ("": the
    directory itself). tensor, shape, dtype: the record's array feature, stored as raw bytes.
    scalars: the (name, dtype) of its integer features. texts: the names of its text features.
    count_key, bytes_key: the done-marker's record count and file size of one shard (summed /
    listed in the metadata as count_key and shard_bytes_key). description: for dataset_info.
    """

    name: str
    subdir: str
    tensor: str
    shape: tuple[int, ...]
    dtype: str
    scalars: tuple[tuple[str, type], ...]
    texts: tuple[str, ...]
    count_key: str
    bytes_key: str
    shard_bytes_key: str
    description: str

    def features(self):
        """The TFDS `FeaturesDict` of one record."""
        feats = {
            self.tensor: tfds.features.Tensor(
                shape=self.shape, dtype=np.dtype(self.dtype), encoding="bytes"
            )
        }
        feats.update({name: tfds.features.Scalar(dtype=dtype) for name, dtype in self.scalars})
        feats.update({name: tfds.features.Text() for name in self.texts})
        return tfds.features.FeaturesDict(feats)

    def template(self, directory: str | os.PathLike, split: str):
        """TFDS's file-name template of this table's shards in the dataset `directory`."""
        return naming.ShardedFileTemplate(
            data_dir=pathlib.Path(directory) / self.subdir,
            dataset_name=self.name,
            split=split,
            filetype_suffix="array_record",
        )


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """What an extraction writes; stored in the plan file and the TFDS metadata.

    shape: [h, w, c] of each record's `x` (moments: c = 2 * embed_dim; pixels: c = channels).
    dtype: "float32" or "float16" (moments), "uint8" (pixels 0..255, read back as
      `x / 127.5 - 1`: lossless and 4x smaller than float32); always read back as float32.
    autoencoder: "identity" (pixels) or the autoencoder kind, e.g. "kl_f8".
    scale_factor: the latent scale factor the training applies (1.0 for pixels), or "auto"
      (`AUTO_SCALE`): 1 / the latents' std measured on this dataset (`latent_stats.json`).
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
    scale_factor: float | str
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
        if isinstance(self.scale_factor, str) and self.scale_factor != AUTO_SCALE:
            raise ValueError(
                f"scale factor must be a number or {AUTO_SCALE!r}, got {self.scale_factor!r}"
            )
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

    @property
    def images(self) -> Table:
        """The image records: two per kept example (original and flip)."""
        scalars: tuple[tuple[str, type], ...] = (
            ("label", np.int32),
            ("index", np.int64),
            ("flip", np.int32),
        )
        if self.has_contexts:
            scalars += (("context_start", np.int64), ("num_contexts", np.int32))
        what = "Pixels" if self.autoencoder == "identity" else "Autoencoder moments"
        return Table(
            name=DATASET_NAME,
            subdir="",
            tensor="x",
            shape=self.shape,
            dtype=self.dtype,
            scalars=scalars,
            texts=(),
            count_key="num_records",
            bytes_key="num_bytes",
            shard_bytes_key="shard_bytes",
            description=f"{what} of {self.source} and their horizontal flips, written by uvit_jax.",
        )

    @property
    def contexts(self) -> Table:
        """The caption records of a text dataset: one per caption of a kept example."""
        return Table(
            name=CONTEXTS_NAME,
            subdir=CONTEXTS_DIR,
            tensor="context",
            shape=self.context_shape,
            dtype=self.context_dtype,
            scalars=(("index", np.int64),),
            texts=("caption",),
            count_key="num_contexts",
            bytes_key="context_bytes",
            shard_bytes_key="context_shard_bytes",
            description=(
                f"CLIP text contexts of the captions of {self.source}, written by uvit_jax."
            ),
        )

    @property
    def tables(self) -> tuple[Table, ...]:
        """The image table, then (text datasets) the context table."""
        return (self.images, self.contexts) if self.has_contexts else (self.images,)

    def shard_path(self, directory: str | os.PathLike, table: Table, shard: int) -> pathlib.Path:
        """The final file name of `table`'s shard `shard` in the dataset `directory`."""
        tmpl = table.template(directory, self.split)
        return pathlib.Path(
            os.fspath(tmpl.sharded_filepath(shard_index=shard, num_shards=self.num_shards))
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


def shard_path(directory: str | os.PathLike, spec: DatasetSpec, shard: int) -> pathlib.Path:
    """The final file name of image shard `shard`."""
    return spec.shard_path(directory, spec.images, shard)


def empty_context_path(directory: str | os.PathLike) -> pathlib.Path:
    return pathlib.Path(directory) / CONTEXTS_DIR / EMPTY_CONTEXT_FILE


def has_empty_context(directory: str | os.PathLike) -> bool:
    return empty_context_path(directory).exists()


def is_finalized(directory: str | os.PathLike) -> bool:
    return (pathlib.Path(directory) / "dataset_info.json").exists()


def check_shard_file(path: pathlib.Path, expected_bytes: int) -> None:
    """Raises `CorruptShardError` when a shard file is missing or not of its recorded size."""
    if not path.exists():
        raise CorruptShardError(f"shard file {path} is missing")
    size = path.stat().st_size
    if size != expected_bytes:
        raise CorruptShardError(
            f"shard file {path} is truncated or changed: {size} bytes, the dataset recorded "
            f"{expected_bytes}"
        )


def expected_shape(config: Any) -> tuple[int, int, int]:
    """The record shape a config trains on: moments [s, s, 2 C] or pixels [s, s, C]."""
    side, chans = config.model.img_size, config.model.in_chans
    if config.autoencoder.kind == "identity":
        return (side, side, chans)
    return (side, side, 2 * chans)


def expected_context_shape(config: Any) -> tuple[int, ...]:
    """[L, D] of the text contexts a text-to-image config trains on; () for other configs.

    The data layer's one reading of what conditions the model: text-to-image models
    (`config.model.kind`) take `model.num_clip_token` contexts of width `model.clip_dim`.
    """
    if config.model.kind != "uvit_t2i":
        return ()
    return (int(config.model.num_clip_token), int(config.model.clip_dim))
