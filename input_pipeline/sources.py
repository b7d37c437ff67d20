"""Random-access image sources for latent extraction.

Every source is a sequence of `RawExample`s in a fixed order: extraction splits that order into
fixed-size shards, so a crashed or multi-host extraction knows exactly which source examples each
shard holds. Images stay encoded (file bytes) or raw (uint8 arrays) until `load_image` turns them
into a PIL image; a corrupt or unreadable image raises `CorruptImageError` there, which the
extraction counts and reports by its `key` (a file path or a dataset id) instead of stopping.
Sources of raw arrays also give a shard's images as one array (`array_batch`), which the
extraction preprocesses without PIL where that is exact.

Sources (`make_source(config.data)`):
  * `"tfds"`: a TFDS image dataset by name (`imagenet2012` from its manual download dir,
    `cifar10`, `celeb_a`, `fashion_mnist`, `coco_captions`), prepared in array_record format.
  * `"image_folder"`: class sub-folders (ImageNet's train layout); sorted folder names give the
    labels 0..K-1. A folder with images and no sub-folders is one unlabelled class.
  * `"fashion_mnist_files"`: the gzipped idx files of Debian's `dataset-fashion-mnist`.
  * `"coco_files"`: MS-COCO as distributed: an image folder (`train2014/`) and its captions
    file (`annotations/captions_train2014.json`).
Any labelled source may be cut to some of its classes, renumbered (`config.data.classes`,
`ClassSubset`): fine-tuning on part of a dataset.
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import io
import json
import os
import pathlib
import struct
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from PIL import Image

from input_pipeline.errors import DataConfigError, MissingDataFile

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")

# Feature names of the image, label and caption in the TFDS datasets this project reads.
_TFDS_KEYS: dict[str, dict[str, str | None]] = {
    "imagenet2012": dict(image="image", label="label", captions=None),
    "cifar10": dict(image="image", label="label", captions=None),
    "celeb_a": dict(image="image", label=None, captions=None),
    "fashion_mnist": dict(image="image", label="label", captions=None),
    "coco_captions": dict(image="image", label=None, captions="captions"),
}


class CorruptImageError(ValueError):
    """An image that cannot be decoded; `key` names its file or dataset id."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"cannot read image {key}: {reason}")
        self.key = key


@dataclasses.dataclass(frozen=True)
class RawExample:
    """One source example, not yet decoded.

    image: a file path, encoded file bytes, or a uint8 array [H, W] / [H, W, C].
    label: class index, or -1 for unlabelled sources.
    key: the file path or dataset id used in reports about this example.
    captions: the captions of a text-image pair (MS-COCO), else empty.
    """

    image: pathlib.Path | bytes | np.ndarray
    label: int
    key: str
    captions: tuple[str, ...] = ()


class ImageSource(Protocol):
    """A fixed-order, random-access sequence of `RawExample`s."""

    num_classes: int  # 0 for unlabelled sources
    description: str  # recorded in the dataset metadata

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> RawExample: ...


def load_image(example: RawExample) -> Image.Image:
    """Decodes `example.image` into a fully loaded PIL image.

    Raises:
      CorruptImageError: the bytes are not a readable image (names `example.key`).
    """
    if isinstance(example.image, np.ndarray):
        _check_finite(example.key, example.image)
        return Image.fromarray(example.image)
    try:
        if isinstance(example.image, pathlib.Path):
            image = Image.open(example.image)
        else:
            image = Image.open(io.BytesIO(example.image))
        image.load()  # decode now, so truncated files fail here and not in a resize
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CorruptImageError(example.key, f"{type(e).__name__}: {e}") from e
    if image.mode == "F":  # 32-bit float pixels (e.g. a float TIFF)
        _check_finite(example.key, np.asarray(image))
    return image


def _check_finite(key: str, pixels: np.ndarray) -> None:
    """CorruptImageError for float pixels with NaN or inf: the conversion to 8 bits would make
    them black or white without a word, so the image is skipped and reported instead."""
    if pixels.dtype.kind == "f" and not np.all(np.isfinite(pixels)):
        bad = int(pixels.size - np.count_nonzero(np.isfinite(pixels)))
        raise CorruptImageError(key, f"{bad} of its {pixels.size} float pixels are NaN or inf")


class ImageFolderSource:
    """Images under `root`, labelled by their sorted class sub-folder names.

    Files are listed recursively inside each class folder and sorted, so the order (and therefore
    the shard contents of an extraction) does not depend on the filesystem.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise MissingDataFile(f"image folder {self.root} does not exist")
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if classes:
            self.class_names = classes
            self._files: list[tuple[pathlib.Path, int]] = [
                (f, label)
                for label, name in enumerate(classes)
                for f in _list_images(self.root / name)
            ]
            self.num_classes = len(classes)
        else:
            self.class_names = []
            self._files = [(f, -1) for f in _list_images(self.root)]
            self.num_classes = 0
        if not self._files:
            raise ValueError(
                f"image folder {self.root} holds no images (extensions {IMAGE_EXTENSIONS})"
            )
        self.description = f"image_folder:{self.root}"

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> RawExample:
        path, label = self._files[index]
        return RawExample(image=path, label=label, key=str(path))


def _list_images(folder: pathlib.Path) -> list[pathlib.Path]:
    return sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


class FashionMnistFilesSource:
    """Fashion-MNIST from the idx files of Debian's `dataset-fashion-mnist`.

    split "train" reads `train-{images-idx3,labels-idx1}-ubyte.gz` (60,000 images), "test"
    reads the `t10k-` files (10,000). Images are uint8 [28, 28], labels 0..9.
    """

    num_classes = 10

    def __init__(self, directory: str | os.PathLike, split: str = "train"):
        prefix = {"train": "train", "test": "t10k"}.get(split)
        if prefix is None:
            raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
        directory = pathlib.Path(directory)
        images_path = directory / f"{prefix}-images-idx3-ubyte.gz"
        labels_path = directory / f"{prefix}-labels-idx1-ubyte.gz"
        self.images = read_idx(images_path, expected_magic=2051)
        self.labels = read_idx(labels_path, expected_magic=2049)
        if len(self.images) != len(self.labels):
            raise ValueError(
                f"{images_path} holds {len(self.images)} images but {labels_path} holds "
                f"{len(self.labels)} labels"
            )
        self.description = f"fashion_mnist_files:{directory}:{split}"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> RawExample:
        return RawExample(
            image=self.images[index], label=int(self.labels[index]), key=f"fashion_mnist:{index}"
        )

    def arrays(self, indices: range) -> tuple[np.ndarray, np.ndarray]:
        """Images uint8 [n, 28, 28] and labels uint8 [n] of the examples `indices` (slices:
        no per-image decoding)."""
        return self.images[indices.start : indices.stop], self.labels[indices.start : indices.stop]


def read_idx(path: str | os.PathLike, expected_magic: int) -> np.ndarray:
    """Reads a (gzipped) idx file of unsigned bytes: 2049 = labels [N], 2051 = images [N, H, W]."""
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingDataFile(
            f"{path} does not exist (Debian: apt-get install dataset-fashion-mnist)"
        )
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{path} is too short for an idx file ({len(data)} bytes)")
    magic = struct.unpack(">i", data[:4])[0]
    if magic != expected_magic:
        raise ValueError(f"{path}: idx magic number {magic}, expected {expected_magic}")
    ndim = magic & 0xFF
    shape = struct.unpack(f">{ndim}i", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ValueError(
            f"{path}: {body.size} data bytes, expected {int(np.prod(shape))} for shape {shape}"
        )
    return body.reshape(shape)


class CocoCaptionsFilesSource:
    """MS-COCO image-caption pairs from the files COCO distributes.

    `image_dir` holds the images (e.g. `train2014/`), `captions_file` is the matching COCO
    captions annotation file (`captions_train2014.json`: "images" with id and file_name,
    "annotations" with image_id and caption). Images are ordered by id, as U-ViT's MS-COCO
    dataset orders them, and each keeps its captions in file order. Images without captions are
    kept here and skipped (and reported) by the extraction of text contexts.
    """

    num_classes = 0

    def __init__(self, image_dir: str | os.PathLike, captions_file: str | os.PathLike):
        self.image_dir = pathlib.Path(image_dir)
        captions_path = pathlib.Path(captions_file)
        if not self.image_dir.is_dir():
            raise MissingDataFile(f"COCO image folder {self.image_dir} does not exist")
        if not captions_path.is_file():
            raise MissingDataFile(
                f"COCO captions file {captions_path} does not exist (config.data.captions_file; "
                "e.g. annotations/captions_train2014.json)"
            )
        try:
            data = json.loads(captions_path.read_text())
            images = sorted((int(im["id"]), str(im["file_name"])) for im in data["images"])
            by_image: dict[int, list[str]] = collections.defaultdict(list)
            for ann in data["annotations"]:
                by_image[int(ann["image_id"])].append(str(ann["caption"]))
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{captions_path} is not a COCO captions file (expected 'images' with 'id' and "
                f"'file_name', 'annotations' with 'image_id' and 'caption'): "
                f"{type(e).__name__}: {e}"
            ) from e
        if not images:
            raise ValueError(f"{captions_path} lists no images")
        self._items = [(image_id, name, tuple(by_image[image_id])) for image_id, name in images]
        self.description = f"coco_files:{self.image_dir}:{captions_path.name}"

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> RawExample:
        image_id, name, captions = self._items[index]
        path = self.image_dir / name
        return RawExample(image=path, label=-1, key=str(path), captions=captions)


class TfdsSource:
    """A TFDS image dataset read by random access (`as_data_source`, array_record format).

    The dataset is prepared on first use in array_record format (ImageNet from
    `manual_dir`: TFDS's `imagenet2012` expects `ILSVRC2012_img_train.tar` there). Images are
    kept encoded so that a corrupt one is skipped and reported rather than failing the job.
    """

    def __init__(
        self, name: str, split: str, data_dir: str | None = None, manual_dir: str | None = None
    ):
        import tensorflow_datasets as tfds

        if name not in _TFDS_KEYS:
            raise ValueError(f"TFDS dataset {name!r} unsupported; known: {sorted(_TFDS_KEYS)}")
        self._keys = _TFDS_KEYS[name]
        builder = tfds.builder(name, data_dir=data_dir or None, file_format="array_record")
        if not builder.is_prepared():
            builder.download_and_prepare(
                download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None)
            )
        self._source = builder.as_data_source(
            split=split, decoders={self._keys["image"]: tfds.decode.SkipDecoding()}
        )
        label = self._keys["label"]
        self.num_classes = builder.info.features[label].num_classes if label else 0
        self.description = f"tfds:{name}:{split}"
        self._name = name

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> RawExample:
        ex = self._source[index]
        label = int(ex[self._keys["label"]]) if self._keys["label"] else -1
        captions: tuple[str, ...] = ()
        if self._keys["captions"]:
            texts = ex[self._keys["captions"]]["text"]
            captions = tuple(_to_str(t) for t in texts)
        return RawExample(
            image=bytes(ex[self._keys["image"]]),
            label=label,
            key=f"{self._name}:{index}",
            captions=captions,
        )


def _to_str(text: Any) -> str:
    return text.decode("utf-8") if isinstance(text, bytes) else str(text)


class Subset:
    """The first `n` examples of a source."""

    def __init__(self, source: ImageSource, n: int):
        self._source = source
        self._n = min(int(n), len(source))
        self.num_classes = source.num_classes
        self.description = f"{source.description}[:{self._n}]"

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> RawExample:
        if not 0 <= index < self._n:
            raise IndexError(index)
        return self._source[index]

    def arrays(self, indices: range) -> tuple[np.ndarray, np.ndarray] | None:
        """The source's `arrays` (None when it has none): see `array_batch`."""
        if indices.stop > self._n:
            raise IndexError(indices)
        return array_batch(self._source, indices)


class ClassSubset:
    """The examples of some classes of a labelled source, in source order, each relabelled by
    its class's position in `classes`: classes (3, 5, 7) keep labels 3, 5, 7 as 0, 1, 2
    (`config.data.classes`, e.g. to fine-tune on part of a dataset).

    The labels are read once: from the source's `labels` array where it has one
    (Fashion-MNIST), else example by example (a TFDS source reads every record once).
    """

    def __init__(self, source: ImageSource, classes: Sequence[int]):
        classes = tuple(int(c) for c in classes)
        k = source.num_classes
        if k == 0 or len(set(classes)) != len(classes) or not all(0 <= c < k for c in classes):
            raise DataConfigError(
                f"config.data.classes={classes}: expected distinct labels in [0, {k}) of "
                f"{source.description} ({k} classes)"
            )
        self._source = source
        labels = getattr(source, "labels", None)
        if labels is None:
            labels = [source[i].label for i in range(len(source))]
        self._relabel = np.full(k, -1, np.int64)
        self._relabel[list(classes)] = np.arange(len(classes))
        self._kept = np.flatnonzero(self._relabel[np.asarray(labels, np.int64)] >= 0)
        if not len(self._kept):
            raise DataConfigError(
                f"config.data.classes={classes}: {source.description} has no example of them"
            )
        self.num_classes = len(classes)
        self.description = f"{source.description}[classes={','.join(map(str, classes))}]"

    def __len__(self) -> int:
        return len(self._kept)

    def __getitem__(self, index: int) -> RawExample:
        example = self._source[int(self._kept[index])]
        return dataclasses.replace(example, label=int(self._relabel[example.label]))

    def arrays(self, indices: range) -> tuple[np.ndarray, np.ndarray] | None:
        """The source's `arrays` of the kept examples `indices` (None when it has none): one
        read of the source range that spans them, then the kept rows."""
        ids = self._kept[indices.start : indices.stop]
        if not len(ids):
            raise IndexError(indices)
        raw = array_batch(self._source, range(int(ids[0]), int(ids[-1]) + 1))
        if raw is None:
            return None
        rows = ids - ids[0]
        return raw[0][rows], self._relabel[np.asarray(raw[1], np.int64)[rows]].astype(np.int32)


def array_batch(source: ImageSource, indices: range) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 images [n, H, W] or [n, H, W, C], labels [n]) of `indices` (a step-1 range) when
    `source` holds raw arrays and has an `arrays` method (Fashion-MNIST), else None: such a
    source's images are then preprocessed as one batch (`preprocess.preprocess_arrays`)."""
    arrays = getattr(source, "arrays", None)
    return arrays(indices) if arrays is not None else None


def make_source(data_config: Any) -> ImageSource:
    """The source named by `config.data` (`source`, `name`, `source_dir`, `captions_file`,
    `split`), cut to `classes` when that lists some (`ClassSubset`)."""
    source = _named_source(data_config)
    classes = tuple(data_config.get("classes", ()))
    return ClassSubset(source, classes) if classes else source


def _named_source(data_config: Any) -> ImageSource:
    kind = data_config.source
    if kind == "fashion_mnist_files":
        return FashionMnistFilesSource(data_config.source_dir, data_config.split)
    if kind == "image_folder":
        return ImageFolderSource(data_config.source_dir)
    if kind == "coco_files":
        return CocoCaptionsFilesSource(data_config.source_dir, data_config.captions_file)
    if kind == "tfds":
        if not data_config.name:
            raise DataConfigError("config.data.name must name a TFDS dataset for source='tfds'")
        return TfdsSource(
            data_config.name,
            data_config.split,
            data_dir=data_config.get("tfds_data_dir", "") or None,
            manual_dir=data_config.source_dir or None,
        )
    raise DataConfigError(
        f"config.data.source={kind!r}; expected 'tfds', 'image_folder', 'fashion_mnist_files' "
        "or 'coco_files'"
    )
