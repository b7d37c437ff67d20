"""The extracted dataset: a TFDS dataset directory in array_record format.

`layout` is the format (directory layout, `DatasetSpec`, the record tables), `writer` writes a
dataset shard by shard and finalizes it, `reader` opens, checks and reads one.
"""

from input_pipeline.latent_dataset.layout import (
    EXTRACTION_DIR,
    CorruptMetadataError,
    CorruptShardError,
    DatasetMismatchError,
    DatasetSpec,
    expected_context_shape,
    expected_shape,
    has_empty_context,
    is_finalized,
    shard_path,
)
from input_pipeline.latent_dataset.reader import (
    DatasetOnDisk,
    RecordReader,
    check_compatible,
    open_dataset,
    read_empty_context,
    read_latent_stats,
)
from input_pipeline.latent_dataset.writer import (
    completed_shards,
    finalize,
    prepare_directory,
    write_empty_context,
    write_latent_stats,
    write_shard,
)

__all__ = [
    "EXTRACTION_DIR",
    "CorruptMetadataError",
    "CorruptShardError",
    "DatasetMismatchError",
    "DatasetOnDisk",
    "DatasetSpec",
    "RecordReader",
    "check_compatible",
    "completed_shards",
    "expected_context_shape",
    "expected_shape",
    "finalize",
    "has_empty_context",
    "is_finalized",
    "open_dataset",
    "prepare_directory",
    "read_empty_context",
    "read_latent_stats",
    "shard_path",
    "write_empty_context",
    "write_latent_stats",
    "write_shard",
]
