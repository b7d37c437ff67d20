"""A table's records as `tf.train.Example` bytes, written directly in protobuf wire format.

TFDS's `FeaturesDict.serialize_example` spends ~25 us of Python per record (nested dict
flattening, per-feature numpy checks, a proto object tree), 4x the cost of writing the record:
it bounded the extraction of pixel datasets. The records here are the same `tf.train.Example`
(the same features, values and encodings: the array as raw bytes in a `bytes_list`, integers in
a packed `int64_list`, texts as UTF-8 in a `bytes_list`), serialized with the map entries in key
order, which is protobuf's deterministic serialization: `Example.SerializeToString(
deterministic=True)` of TFDS's proto gives the same bytes. (TFDS's own bytes list the entries in
the order of upb's hash table, which is seeded per process: they parse alike but differ from run
to run; these are reproducible.)

Wire format used (field numbers of tensorflow/core/example/{example,feature}.proto):
  Example  { 1: Features }                 Features { 1: repeated map entry { 1: key, 2: Feature } }
  Feature  { 1: BytesList | 3: Int64List }  BytesList { 1: repeated bytes }
  Int64List { 1: packed varints (two's complement: a negative int64 takes 10 bytes) }
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from input_pipeline.latent_dataset import layout

_RANGES = {"int32": (-(2**31), 2**31), "int64": (-(2**63), 2**63)}


def _varint(n: int) -> bytes:
    """Base-128 varint of a non-negative int below 2**64."""
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _delimited(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: tag, byte length, payload."""
    return tag + _varint(len(payload)) + payload


def _bytes_feature(value: bytes) -> bytes:
    """Feature { bytes_list { value: [value] } }."""
    return _delimited(b"\x0a", _delimited(b"\x0a", value))


def _int64_feature(value: int) -> bytes:
    """Feature { int64_list { value: [value] } } (packed)."""
    return _delimited(b"\x1a", _delimited(b"\x0a", _varint(value & 0xFFFF_FFFF_FFFF_FFFF)))


def _entry(key: str, feature: bytes) -> bytes:
    """One entry of the Features map: key -> feature."""
    return _delimited(b"\x0a", _delimited(b"\x0a", key.encode()) + _delimited(b"\x12", feature))


class RecordEncoder:
    """Encodes the rows of one table (`layout.Table`) as `tf.train.Example` bytes.

    A row is a mapping with the table's array feature (`table.shape`, cast to `table.dtype`),
    its integer features (ints in their dtype's range) and text features (str or bytes).
    """

    def __init__(self, table: layout.Table):
        self._table = table
        self._dtype = np.dtype(table.dtype)
        nbytes = int(np.prod(table.shape, dtype=np.int64)) * self._dtype.itemsize
        # Everything but the values is fixed per key: the framing of the array (of fixed byte
        # length) and of an integer whose varint takes L bytes are computed once.
        self._array_head = _entry(table.tensor, _bytes_feature(bytes(nbytes)))[:-nbytes]
        # _int_heads[name][L]: the entry of `name` up to an L-byte varint (1 << 7 (L - 1) has L).
        self._int_heads = {
            name: [b""]
            + [_entry(name, _int64_feature(1 << 7 * (n - 1)))[:-n] for n in range(1, 11)]
            for name, _ in table.scalars
        }
        self._dtypes = {n: np.dtype(d).name for n, d in table.scalars}
        kinds = {table.tensor: "array", **{n: "int" for n, _ in table.scalars}}
        kinds.update({n: "text" for n in table.texts})
        self._fields = sorted(kinds.items())

    def _array(self, value: Any) -> bytes:
        array = np.asarray(value, dtype=self._dtype)
        if array.shape != self._table.shape:
            raise ValueError(
                f"record {self._table.tensor} has shape {array.shape}, the dataset "
                f"{self._table.shape}"
            )
        return self._array_head + array.tobytes()

    def _int(self, name: str, value: Any) -> bytes:
        v = int(value)
        low, high = _RANGES[self._dtypes[name]]
        if not low <= v < high:
            raise ValueError(f"record {name}={v} is out of the range of {self._dtypes[name]}")
        data = _varint(v & 0xFFFF_FFFF_FFFF_FFFF)
        return self._int_heads[name][len(data)] + data

    def encode(self, row: Mapping[str, Any]) -> bytes:
        """One row -> the serialized `tf.train.Example`."""
        parts = []
        for key, kind in self._fields:
            if kind == "array":
                parts.append(self._array(row[key]))
            elif kind == "int":
                parts.append(self._int(key, row[key]))
            else:
                text = row[key]
                data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
                parts.append(_entry(key, _bytes_feature(data)))
        return _delimited(b"\x0a", b"".join(parts))
