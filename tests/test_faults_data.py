"""Fault injection in the data and file readers ("Nothing silent, round two"): labels deeper in
the data than the first batch, garbage dataset metadata, damaged reference statistics and
Inception weights, a full disk during extraction and non-finite float pixels. Each test checks
that the failure is one line naming the file (or folder) and the problem."""

import errno
import functools
import io
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
from PIL import Image
from runs import small_config, subprocess_env, train_cmd

from input_pipeline import extract, latent_dataset, sources
from input_pipeline.latent_dataset import writer
from uvit_jax.errors import EXPECTED, ConfigError
from uvit_jax.evaluation import reference
from uvit_jax.jobs import train as train_job
from uvit_jax.models.inception import FEATURE_DIM, SPATIAL_DIM


def one_line(e: BaseException) -> str:
    """The message main.py would print: an expected error, on one line."""
    assert isinstance(e, EXPECTED), type(e).__mro__
    text = str(e)
    assert "\n" not in text, text
    assert "allow_pickle" not in text and "unsafely" not in text, text
    return text


class ArraySource:
    """An in-memory source: grayscale 28 x 28 images (uint8, or float where given) and labels."""

    num_classes = 10
    description = "arrays"

    def __init__(self, labels, images=None):
        self.labels = list(labels)
        rng = np.random.default_rng(0)
        self.images = images or [rng.integers(0, 256, (28, 28), np.uint8) for _ in self.labels]

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if not 0 <= index < len(self):
            raise IndexError(index)
        return sources.RawExample(self.images[index], self.labels[index], f"array:{index}")


def extract_arrays(out_dir, source, shard_size=None) -> str:
    c = small_config()
    c.data.latent_dir = str(out_dir)
    return extract.run_extraction(c, None, source=source, shard_size=shard_size)


def first_batch(labels) -> dict[str, np.ndarray]:
    return {"x": np.zeros((len(labels), 28, 28, 1), np.float32), "label": np.asarray(labels)}


# ---- 2. labels deeper in the data --------------------------------------------------------------


def test_extraction_records_the_label_range(tmp_path):
    data = extract_arrays(tmp_path / "d", ArraySource([3, 1, 4, 1, 5, 9, 2, 6]), shard_size=3)
    metadata = latent_dataset.open_dataset(data).metadata
    assert (metadata["label_min"], metadata["label_max"]) == (1, 9)


@pytest.mark.parametrize(
    "deep, problem",
    [(10, r"label 10, the null class"), (12, r"label 12, but config.model.num_classes=11"),
     (-1, r"label -1, but")],
)  # fmt: skip
def test_check_labels_refuses_a_label_deeper_than_the_first_batch(tmp_path, deep, problem):
    """The first batch is clean; the bad label is the dataset's last (the null class of the
    FMNIST config, num_classes=11 with p_uncond > 0, or outside the classes)."""
    labels = [i % 10 for i in range(40)] + [deep]
    data = extract_arrays(tmp_path / "d", ArraySource(labels))
    config = small_config()
    with pytest.raises(ConfigError) as e:
        train_job.check_labels(config, data)
    message = one_line(e.value)
    assert data in message and "fashion_mnist" in message
    assert re.search(problem, message), message


def test_every_batch_is_checked_for_datasets_without_a_recorded_range(tmp_path):
    """A dataset written before the label range was recorded: the pipeline checks each batch and
    names the dataset, the example and the label (example 40 is drawn in some later batch)."""
    from input_pipeline.train_input import LabelOutOfRangeError, make_train_iterator

    data = extract_arrays(tmp_path / "d", ArraySource([i % 10 for i in range(40)] + [10]))
    meta_file = pathlib.Path(data) / "metadata.json"
    meta = json.loads(meta_file.read_text())
    del meta["label_min"], meta["label_max"]
    meta_file.write_text(json.dumps(meta))
    config = small_config()
    train_job.check_labels(config, data)  # nothing recorded: passes
    batches = make_train_iterator(config, seed=0, data_dir=data, label_limit=10)
    with pytest.raises(LabelOutOfRangeError) as e:
        for _ in range(50):
            next(batches)
    assert one_line(e.value) == (
        f"dataset {data} (train): example 40 has label 10: expected labels in [0, 10), the "
        "model's classes"
    )
    clean = make_train_iterator(config, seed=0, data_dir=data, label_limit=11)
    assert all(next(clean)["label"].max() <= 10 for _ in range(50))


@pytest.mark.integration
def test_main_refuses_a_null_class_label_before_compiling(tmp_path):
    labels = [i % 10 for i in range(40)] + [10]
    data = extract_arrays(tmp_path / "d", ArraySource(labels))
    out = subprocess.run(
        train_cmd(tmp_path / "w", data, "--config.train.num_steps=2"),
        env=subprocess_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and data in errors[0] and "label 10, the null class" in errors[0]
    assert "Traceback" not in out.stderr


# ---- 7. garbage dataset metadata ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> str:
    return extract_arrays(tmp_path_factory.mktemp("ds") / "d", ArraySource(list(range(8))))


@pytest.mark.parametrize("name", ["dataset_info.json", "features.json", "metadata.json"])
@pytest.mark.parametrize("garbage", [b"{not json\x00\xff", b"", b"[1, 2]", b'{"what": 3}'])
def test_garbage_metadata_names_the_file(small_dataset, tmp_path, name, garbage):
    data = tmp_path / "copy"
    shutil.copytree(small_dataset, data)
    (data / name).write_bytes(garbage)
    with pytest.raises(latent_dataset.CorruptMetadataError) as e:
        latent_dataset.open_dataset(data, "train")
    assert one_line(e.value).startswith(f"{data / name}: "), str(e.value)


# ---- 8. reference statistics -------------------------------------------------------------------


def write_reference(path, **changes) -> pathlib.Path:
    """A small but well-formed reference file of our format, with `changes` applied."""
    arrays = dict(
        mu=np.zeros(FEATURE_DIM),
        sigma=np.eye(FEATURE_DIM),
        mu_s=np.zeros(SPATIAL_DIM),
        sigma_s=np.eye(SPATIAL_DIM),
        features=np.zeros((4, FEATURE_DIM), np.float32),
        num_images=np.asarray(4, np.int64),
        protocol=np.asarray(json.dumps({"dataset": "test"})),
    )
    arrays.update(changes)
    np.savez(path, **arrays)
    return pathlib.Path(path)


def _nan_at(array: np.ndarray, value: float) -> np.ndarray:
    array = array.copy()
    array.flat[7] = value
    return array


@pytest.mark.parametrize(
    "changes, problem",
    [
        (dict(protocol=np.asarray("{not json")), "protocol is not a JSON record"),
        (dict(protocol=np.asarray("[1]")), "protocol is a JSON list"),
        (dict(sigma_s=_nan_at(np.eye(SPATIAL_DIM), np.inf)), "sigma_s has 1 non-finite"),
        (dict(features=_nan_at(np.zeros((4, FEATURE_DIM), np.float32), np.nan)),
         "features has 1 non-finite"),
        (dict(mu=np.zeros(FEATURE_DIM + 1)), "mu has shape (2049,)"),
        (dict(mu=_nan_at(np.zeros(FEATURE_DIM), np.nan)), "mu has 1 non-finite"),
        (dict(features=np.asarray([object()], dtype=object)), "cannot read array features"),
    ],
)  # fmt: skip
def test_damaged_reference_is_one_line(tmp_path, changes, problem):
    path = write_reference(tmp_path / "ref.npz", **changes)
    with pytest.raises(reference.ReferenceFileError) as e:
        reference.load_reference(path)
    message = one_line(e.value)
    assert message.startswith(f"{path}: ") and problem in message, message


def test_truncated_reference_is_one_line(tmp_path):
    path = write_reference(tmp_path / "ref.npz")
    os.truncate(path, path.stat().st_size // 2)
    for load in (reference.load_stats, reference.load_reference):
        with pytest.raises(reference.ReferenceFileError) as e:
            load(path)
        message = one_line(e.value)
        assert message.startswith(f"{path}: not a readable .npz file"), message
        assert isinstance(e.value.__cause__, zipfile.BadZipFile)


def test_garbage_reference_is_one_line(tmp_path):
    path = tmp_path / "ref.npz"
    path.write_bytes(b"\x80\x04garbage" * 100)
    with pytest.raises(reference.ReferenceFileError) as e:
        reference.load_stats(path)
    assert one_line(e.value).startswith(f"{path}: not a readable .npz file")


def test_missing_reference_key_is_one_line(tmp_path):
    path = tmp_path / "ref.npz"
    np.savez(path, mu=np.zeros(FEATURE_DIM))
    with pytest.raises(KeyError) as e:
        reference.load_stats(path)
    assert one_line(e.value).startswith(f"{path}: missing key(s) sigma")


# ---- 9. Inception weights ----------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"garbage bytes\x00\xff" * 50, b"\x80\x04pickle?" * 50, b""])
def test_garbage_inception_weights_name_the_path(tmp_path, content):
    from uvit_jax.convert import inception

    path = tmp_path / "inception.npz"
    path.write_bytes(content)
    for read in (inception.inception_info, inception.load_inception):
        with pytest.raises(inception.ConversionError) as e:
            read(path)
        message = one_line(e.value)
        assert message.startswith(f"{path} (config.eval.inception_path): not readable"), message


@pytest.mark.integration  # converts the Inception weights three times: 11 s
@pytest.mark.parametrize("name", ["inception", "inception.npz", "weights.bin"])
def test_convert_inception_writes_the_path_the_readers_read(tmp_path, monkeypatch, name):
    """`--mode convert_inception --config.eval.inception_path=X` writes X itself, which
    `fid_stats` and `eval` (both `resolve_inception_path` then `inception_info` and
    `load_inception` of `evaluation/evaluator.py`) read as given."""
    from random_inception import random_state_dict

    from uvit_jax.convert import inception
    from uvit_jax.jobs import convert

    src = tmp_path / "random_weights.npz"
    np.savez(src, **random_state_dict(0))
    monkeypatch.setattr(  # random weights: not the FID network's known hash
        inception, "convert_inception",
        functools.partial(inception.convert_inception, check_hash=False),
    )  # fmt: skip
    config = small_config()
    config.convert.source = str(src)
    config.eval.inception_path = str(tmp_path / name)
    written = convert.convert_inception_job(config, None)
    assert written == config.eval.inception_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "random_weights.npz"])
    path = inception.resolve_inception_path(config.eval.inception_path)
    assert path == written
    assert inception.inception_info(path)["source"] == "random_weights.npz"
    assert inception.load_inception(path) is not None


# ---- 15. disk full during extraction -----------------------------------------------------------


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS, errno.EACCES])
def test_disk_full_during_extraction_is_one_line_and_a_rerun_resumes(tmp_path, monkeypatch, code):
    out = tmp_path / "d"
    real = writer._write_atomic
    calls = {"n": 0}

    def failing(final, serialized):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(code, os.strerror(code), str(final) + ".tmp1")
        return real(final, serialized)

    monkeypatch.setattr(writer, "_write_atomic", failing)
    labels = list(range(10)) * 2
    with pytest.raises(extract.ExtractionWriteError) as e:
        extract_arrays(out, ArraySource(labels), shard_size=4)
    message = one_line(e.value)
    assert message.startswith(f"cannot write the dataset folder {out}: {os.strerror(code)}")
    assert "rerun" in message and "resumes" in message
    assert e.value.errno == code
    monkeypatch.setattr(writer, "_write_atomic", real)
    data = extract_arrays(out, ArraySource(labels), shard_size=4)
    dataset = latent_dataset.open_dataset(data)
    assert dataset.num_examples == len(labels)
    read = latent_dataset.RecordReader(dataset).read(np.arange(0, 2 * len(labels), 2))
    assert sorted(read["index"].tolist()) == list(range(len(labels)))


def test_other_extraction_errors_keep_their_type(tmp_path, monkeypatch):
    """Only the disk's errors become the one-line error; a bug stays a bug."""

    def failing(final, serialized):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(writer, "_write_atomic", failing)
    with pytest.raises(OSError) as e:
        extract_arrays(tmp_path / "d", ArraySource([0, 1]))
    assert not isinstance(e.value, extract.ExtractionWriteError)


# ---- 16. non-finite float pixels ---------------------------------------------------------------


def test_float_images_with_nan_or_inf_are_skipped_with_a_warning(tmp_path, caplog):
    rng = np.random.default_rng(1)
    images = [rng.uniform(0, 255, (28, 28)).astype(np.float32) for _ in range(6)]
    images[2][3, 4] = np.nan
    images[4][0, 0] = np.inf
    with caplog.at_level(logging.WARNING):
        data = extract_arrays(tmp_path / "d", ArraySource(list(range(6)), images))
    dataset = latent_dataset.open_dataset(data)
    assert dataset.num_examples == 4 and dataset.metadata["num_skipped"] == 2
    assert "array:2" in caplog.text and "NaN or inf" in caplog.text
    assert "array:4" in caplog.text


def test_float_tiff_with_nan_is_a_corrupt_image():
    pixels = np.full((8, 8), 100.0, np.float32)
    pixels[1, 1] = np.nan
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="F").save(buffer, format="TIFF")
    example = sources.RawExample(buffer.getvalue(), 0, "float.tif")
    with pytest.raises(sources.CorruptImageError, match=r"float.tif: 1 of its 64 float pixels"):
        sources.load_image(example)
