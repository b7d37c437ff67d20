"""Writing an extracted dataset: the plan, shards with done-markers, then the TFDS metadata.

Every file is written to a temporary name and renamed into place once complete, so a crash (even
kill -9) leaves whole files only; a shard counts as written when its done-marker exists, and
the dataset as complete when `dataset_info.json` exists (written last, by `finalize`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from array_record.python import array_record_module
from tensorflow_datasets.core import utils as tfds_utils

from input_pipeline.latent_dataset import layout, records
from input_pipeline.latent_stats import latent_stats_path


def _marker_path(directory: pathlib.Path, shard: int) -> pathlib.Path:
    return directory / layout.EXTRACTION_DIR / f"shard-{shard:05d}.json"


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def write_empty_context(directory: str | os.PathLike, context: np.ndarray) -> None:
    """Stores the encoding of "" [L, D] float32 (atomically) for a text dataset."""
    path = layout.empty_context_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, np.asarray(context, np.float32))
    os.replace(tmp, path)


def write_latent_stats(directory: str | os.PathLike, stats: Mapping[str, Any]) -> None:
    """Stores the latents' measured statistics (`stats`, with "std") of a complete dataset, as
    `latent_stats.json` (atomically: a reader finds the whole file or none)."""
    _write_json_atomic(latent_stats_path(directory), dict(stats))


def prepare_directory(directory: str | os.PathLike, spec: layout.DatasetSpec) -> None:
    """Creates `directory` with the plan of `spec`, or checks that the plan there equals it.

    Resuming an extraction with another source, shard size, shape or autoencoder would mix
    incompatible shards, so a differing plan raises `DatasetMismatchError` naming the fields.
    """
    directory = pathlib.Path(directory)
    (directory / layout.EXTRACTION_DIR).mkdir(parents=True, exist_ok=True)
    plan = directory / layout.EXTRACTION_DIR / "plan.json"
    if plan.exists():
        old = layout.DatasetSpec.from_json(json.loads(plan.read_text()))
        if old != spec:
            diff = {
                k: (v, getattr(spec, k))
                for k, v in dataclasses.asdict(old).items()
                if v != getattr(spec, k) and not (k == "shape" and tuple(v) == spec.shape)
            }
            raise layout.DatasetMismatchError(
                f"{directory} holds an extraction with another plan {{field: (on disk, now)}}: "
                f"{diff}. Use another config.data.latent_dir or delete the directory."
            )
    else:
        _write_json_atomic(plan, spec.to_json())


def completed_shards(directory: str | os.PathLike) -> dict[int, dict[str, Any]]:
    """{shard: done-marker} of the shards whose file and marker were both written."""
    directory = pathlib.Path(directory)
    done = {}
    for p in sorted((directory / layout.EXTRACTION_DIR).glob("shard-*.json")):
        marker = json.loads(p.read_text())
        done[int(marker["shard"])] = marker
    return done


def _write_atomic(final: pathlib.Path, serialized: Iterable[bytes]) -> tuple[int, int]:
    """Writes serialized records to `final` through a temporary file; (records, bytes)."""

    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(final.name + ".tmp*"):  # left by a killed run
        stale.unlink(missing_ok=True)
    tmp = final.with_name(final.name + f".tmp{os.getpid()}")
    writer = array_record_module.ArrayRecordWriter(os.fspath(tmp), layout.WRITER_OPTIONS)
    count = 0
    try:
        for record in serialized:
            writer.write(record)
            count += 1
    finally:
        writer.close()
    os.replace(tmp, final)
    return count, final.stat().st_size


def _serialized(table: layout.Table, rows: Iterable[Mapping[str, Any]]) -> Iterable[bytes]:
    """`table`'s records as tf.Example bytes; the array feature is checked against its shape."""
    encoder = records.RecordEncoder(table)
    for row in rows:
        yield encoder.encode(row)


def write_shard(
    directory: str | os.PathLike,
    spec: layout.DatasetSpec,
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
    labels: list[int] = []
    records = _noting_labels(records, labels)
    for table, rows in zip(spec.tables, (records, contexts), strict=False):
        marker[table.count_key], marker[table.bytes_key] = _write_atomic(
            spec.shard_path(directory, table, shard), _serialized(table, rows)
        )
    marker["skipped"] = list(skipped)
    if labels:  # the label range, which training checks against the model's classes
        marker["label_min"], marker["label_max"] = min(labels), max(labels)
    _write_json_atomic(_marker_path(directory, shard), marker)
    return marker


def _noting_labels(rows: Iterable[dict[str, Any]], labels: list[int]) -> Iterable[dict[str, Any]]:
    """`rows` as they are, appending each row's label to `labels` on the way."""
    for row in rows:
        labels.append(int(row["label"]))
        yield row


def label_range(markers: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """{"label_min", "label_max"} over the shards' done-markers; {} when a marker (of an
    extraction begun before markers recorded labels) or every shard has none."""
    ranges = [(m["label_min"], m["label_max"]) for m in markers if "label_min" in m]
    if not ranges or any("label_min" not in m and m.get("num_records") for m in markers):
        return {}
    return {"label_min": min(r[0] for r in ranges), "label_max": max(r[1] for r in ranges)}


def finalize(directory: str | os.PathLike, spec: layout.DatasetSpec) -> dict[str, Any]:
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
        raise layout.CorruptShardError(
            f"{directory}: shards {missing[:20]}{'...' if len(missing) > 20 else ''} of "
            f"{spec.num_shards} are not written yet; run the extraction again to finish them"
        )
    markers = [done[s] for s in range(spec.num_shards)]
    images, *others = spec.tables
    for table in spec.tables:
        for m in markers:
            layout.check_shard_file(
                spec.shard_path(directory, table, m["shard"]), m[table.bytes_key]
            )
    if spec.has_contexts and not layout.has_empty_context(directory):
        raise layout.CorruptShardError(
            f"{layout.empty_context_path(directory)} is missing: run the extraction again"
        )
    metadata = dict(spec.to_json(), format_version=layout.VERSION)
    for table in spec.tables:
        metadata[table.count_key] = sum(m[table.count_key] for m in markers)
        metadata[table.shard_bytes_key] = [m[table.bytes_key] for m in markers]
    metadata.update(
        num_examples=metadata["num_records"] // 2,
        num_skipped=sum(len(m["skipped"]) for m in markers),
        flip_copies=True,
        **label_range(markers),
    )
    for table in others:
        _write_info(
            directory, table, dict(spec.to_json(), format_version=layout.VERSION), spec, markers
        )
    _write_info(directory, images, metadata, spec, markers)  # last: marks the dataset complete
    return metadata


def _write_info(
    directory: pathlib.Path,
    table: layout.Table,
    metadata: dict[str, Any],
    spec: layout.DatasetSpec,
    markers: Sequence[Mapping[str, Any]],
) -> None:
    """Writes the TFDS metadata of one table of the dataset `directory`."""

    table_dir = directory / table.subdir
    identity = tfds.core.DatasetIdentity(
        name=table.name,
        version=tfds_utils.Version(layout.VERSION),
        data_dir=os.fspath(table_dir),
        module_name="input_pipeline.latent_dataset",
    )
    info = tfds.core.DatasetInfo(
        builder=identity,
        description=table.description,
        features=table.features(),
        metadata=tfds.core.MetadataDict(metadata),
    )
    info.set_file_format("array_record")
    info.set_splits(
        tfds.core.SplitDict(
            [
                tfds.core.SplitInfo(
                    name=spec.split,
                    shard_lengths=[m[table.count_key] for m in markers],
                    num_bytes=sum(m[table.bytes_key] for m in markers),
                    filename_template=table.template(directory, spec.split),
                )
            ]
        )
    )
    info.write_to_directory(table_dir)
