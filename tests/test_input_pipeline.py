"""Sources, preprocessing, the latent dataset format and the grain training pipeline."""

from __future__ import annotations

import gzip
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from input_pipeline import extract, latent_dataset, preprocess, sources, train_input
from uvit_jax.config_defaults import default_config

FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")
REPO = pathlib.Path(__file__).resolve().parents[1]
RES = 16  # image side of the synthetic folder datasets
NUM_CLASSES = 3


# ---------------------------------------------------------------- preprocessing


def _gradient_image(w: int, h: int) -> Image.Image:
    """RGB image whose red channel encodes x and green channel y (to locate crops)."""
    xs = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    ys = np.linspace(0, 255, h, dtype=np.float32)[:, None].repeat(w, 1)
    arr = np.stack([xs, ys, np.full_like(xs, 7)], -1).round().astype(np.uint8)
    return Image.fromarray(arr)


def test_adm_center_crop_box_halving_then_bicubic():
    img = _gradient_image(1024, 768)
    out = preprocess.adm_center_crop(img, 128)
    # ADM: 1024x768 -> BOX 512x384 -> BOX 256x192 (192 < 2*128 stops), BICUBIC to 171x128
    # (round(256 * 128/192) = 171), centre crop columns 21..148.
    ref = img.resize((512, 384), Image.BOX).resize((256, 192), Image.BOX)
    ref = np.asarray(ref.resize((171, 128), Image.BICUBIC))[:, 21:149]
    assert out.shape == (128, 128, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, ref)
    # Centred: the red (x) ramp is symmetric about the middle.
    assert abs(int(out[64, 0, 0]) + int(out[64, -1, 0]) - 255) <= 3


def test_celeba_crop_matches_torchvision():
    tvf = pytest.importorskip("torchvision.transforms.functional", reason="torchvision reference")
    transforms = pytest.importorskip("torchvision.transforms", reason="torchvision reference")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8))
    # U-ViT: Crop(x1=57, x2=185, y1=25, y2=153) = F.crop(img, top=57, left=25, 128, 128), Resize(64)
    ref = transforms.Resize(64)(tvf.crop(img, 57, 25, 128, 128))
    np.testing.assert_array_equal(preprocess.celeba_crop(img, 64), np.asarray(ref))


def test_coco_crop_pad_flip_and_scaling():
    img = _gradient_image(300, 200)
    out = preprocess.coco_center_crop(img, 64)
    ref = np.asarray(img.crop((50, 0, 250, 200)).resize((64, 64), Image.LANCZOS))
    np.testing.assert_array_equal(out, ref)

    digit = Image.fromarray(np.full((28, 28), 255, np.uint8))
    fn = preprocess.make_preprocessor("pad", 32, channels=1)
    x = preprocess.to_model_range(fn(digit))
    assert x.shape == (32, 32, 1)
    assert (x[:2] == -1).all() and (x[:, -2:] == -1).all() and (x[2:30, 2:30] == 1).all()

    arr = np.arange(2 * 3 * 4 * 1, dtype=np.uint8).reshape(2, 3, 4, 1)
    np.testing.assert_array_equal(preprocess.flip(arr)[:, :, 0], arr[:, :, -1])
    np.testing.assert_array_equal(
        preprocess.to_model_range(np.array([0, 255], np.uint8)), [-1.0, 1.0]
    )
    with pytest.raises(ValueError, match="preprocess='nope'"):
        preprocess.make_preprocessor("nope", 32, 3)


def test_array_preprocessing_equals_the_pil_path():
    """The batched form of "pad" / "center_crop" gives the per-image PIL path's bytes, and
    declines (None) what needs resampling or PIL's weighted RGB -> L."""
    rng = np.random.default_rng(0)
    gray = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    rgb = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    cases = [("pad", 32, 1, gray), ("pad", 28, 1, gray), ("pad", 32, 3, gray)]
    cases += [("center_crop", 32, 3, rgb), ("pad", 36, 3, rgb), ("center_crop", 28, 1, gray)]
    for name, res, channels, images in cases:
        fn = preprocess.make_preprocessor(name, res, channels)
        want = np.stack([fn(Image.fromarray(im)) for im in images])
        got = preprocess.preprocess_arrays(name, res, channels, images)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, want, err_msg=f"{name} {res} {channels}")
    assert preprocess.preprocess_arrays("pad", 24, 1, gray) is None  # larger: PIL's error
    assert preprocess.preprocess_arrays("center_crop", 32, 1, gray) is None  # a resize
    assert preprocess.preprocess_arrays("pad", 32, 1, rgb) is None  # RGB -> L


def test_records_are_tfds_examples_serialized_deterministically():
    """Our records are TFDS's tf.Example of the same row, map entries in key order (protobuf's
    deterministic serialization), for every record dtype, negative and multi-byte integers,
    and text contexts with empty and non-ASCII captions."""
    from tensorflow_datasets.proto import tf_example_pb2

    from input_pipeline.latent_dataset import records

    rng = np.random.default_rng(0)
    for shape, dtype in (((28, 28, 1), "uint8"), ((4, 4, 8), "float16"), ((2, 2, 8), "float32")):
        spec = latent_dataset.DatasetSpec(
            shape=shape, dtype=dtype, autoencoder="kl_f8", scale_factor=1.0, source="s",
            split="train", num_source_examples=8, shard_size=8, num_classes=0,
            preprocess="pad", resolution=8, context_shape=(3, 5),
        )  # fmt: skip
        for table in spec.tables:
            encoder = records.RecordEncoder(table)
            for i, v in enumerate([0, 1, -1, 127, 128, 2**31 - 1, -(2**31), 1_281_166]):
                row = {table.tensor: rng.normal(0, 100, table.shape).astype(table.dtype)}
                row.update({name: v for name, _ in table.scalars})
                row.update({name: ["", "a cat", "é 猫" * 90][i % 3] for name in table.texts})
                proto = tf_example_pb2.Example.FromString(table.features().serialize_example(row))
                assert encoder.encode(row) == proto.SerializeToString(deterministic=True)
    encoder = records.RecordEncoder(spec.images)
    row = dict(x=np.zeros(shape, dtype), label=0, index=0, flip=0, context_start=0, num_contexts=1)
    with pytest.raises(ValueError, match="record label=2147483648 is out of the range of int32"):
        encoder.encode(dict(row, label=2**31))
    with pytest.raises(ValueError, match="record x has shape"):
        encoder.encode(dict(row, x=np.zeros((2, 2, 4), dtype)))


# ---------------------------------------------------------------- sources


def _write_folder(root: pathlib.Path, per_class: int = 7, corrupt: bool = True) -> list[str]:
    """Random PNGs in class folders c0..c2 (+ one corrupt file); returns the corrupt paths."""
    rng = np.random.default_rng(1)
    for c in range(NUM_CLASSES):
        d = root / f"c{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            size = (int(rng.integers(RES, 3 * RES)), int(rng.integers(RES, 3 * RES)))
            arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"img{i:02d}.png")
    bad = []
    if corrupt:
        p = root / "c1" / "img99.png"
        p.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        bad.append(str(p))
    return bad


def test_image_folder_source_labels_and_corrupt_images(tmp_path):
    bad = _write_folder(tmp_path)
    src = sources.ImageFolderSource(tmp_path)
    assert len(src) == 3 * 7 + 1 and src.num_classes == 3 and src.class_names == ["c0", "c1", "c2"]
    labels = [src[i].label for i in range(len(src))]
    assert labels == sorted(labels) and set(labels) == {0, 1, 2}
    corrupt = [i for i in range(len(src)) if src[i].key == bad[0]]
    with pytest.raises(sources.CorruptImageError, match="img99.png"):
        sources.load_image(src[corrupt[0]])
    assert sources.load_image(src[0]).mode == "RGB"


def test_fashion_mnist_idx_files(tmp_path):
    bad = tmp_path / "train-labels-idx1-ubyte.gz"
    with gzip.open(bad, "wb") as f:
        f.write(struct.pack(">iiii", 2051, 1, 1, 1) + b"\0")
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: idx magic number 2051"):
        sources.read_idx(bad, expected_magic=2049)
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"{FMNIST} absent (apt-get install dataset-fashion-mnist)")
    src = sources.FashionMnistFilesSource(FMNIST, "test")
    assert len(src) == 10_000 and src.images.shape == (10_000, 28, 28)
    assert sorted(np.unique(src.labels)) == list(range(10))
    ex = src[3]
    assert sources.load_image(ex).size == (28, 28) and 0 <= ex.label < 10


# ---------------------------------------------------------------- extraction + grain


def _config(latent_dir, *, batch_size=8, workers=0):
    """A latent config over RES x RES RGB images; the test encoder makes [RES/2, RES/2, 4]."""
    c = default_config()
    c.model.update(img_size=RES // 2, in_chans=2)
    c.autoencoder.update(kind="kl_f8", scale_factor=0.5)
    c.data.update(
        source="image_folder",
        resolution=RES,
        preprocess="adm_center_crop",
        latent_dir=str(latent_dir),
        num_workers=workers,
        prefetch=2,
    )
    c.train.batch_size = batch_size
    return c


_W = jax.random.normal(jax.random.key(0), (2, 2, 3, 4), jnp.float32)


@jax.jit
def _encode(x):
    """A random stride-2 conv: images [B, RES, RES, 3] -> 'moments' [B, RES/2, RES/2, 4]."""
    return jax.lax.conv_general_dilated(
        x, _W, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _expected(config, src):
    """{(source index, flip): moments} by encoding each image directly."""
    fn = preprocess.make_preprocessor(config.data.preprocess, RES, 3)
    out = {}
    for i in range(len(src)):
        try:
            img = fn(sources.load_image(src[i]))
        except sources.CorruptImageError:
            continue
        for f, arr in ((0, img), (1, preprocess.flip(img))):
            out[(i, f)] = np.asarray(_encode(preprocess.to_model_range(arr[None])))[0]
    return out


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory):
    """A 21-image folder dataset (plus one corrupt image) extracted by 2 simulated processes."""
    root = tmp_path_factory.mktemp("images")
    bad = _write_folder(root)
    out = root.parent / (root.name + "_latents")
    config = _config(out)
    config.data.source_dir = str(root)
    for p in (0, 1):
        path = extract.run_extraction(
            config, encode_fn=_encode, process_index=p, process_count=2, shard_size=4
        )
        assert latent_dataset.is_finalized(out) == (p == 1)  # the last process finalizes
    return config, pathlib.Path(path), bad


def test_extraction_metadata_and_skipped_images(folder_dataset):
    config, path, bad = folder_dataset
    ds = latent_dataset.open_dataset(path)
    assert ds.num_examples == 21 and ds.num_records == 42
    assert ds.spec.shape == (8, 8, 4) and ds.spec.scale_factor == 0.5
    assert ds.metadata["num_skipped"] == 1 and ds.metadata["autoencoder"] == "kl_f8"
    skipped = [s for m in latent_dataset.completed_shards(path).values() for s in m["skipped"]]
    assert [s["key"] for s in skipped] == bad
    # Rerunning a complete extraction does nothing and keeps the files.
    before = {p.name: p.stat().st_mtime_ns for p in path.iterdir() if p.is_file()}
    assert extract.run_extraction(config, encode_fn=_encode) == str(path)
    assert before == {p.name: p.stat().st_mtime_ns for p in path.iterdir() if p.is_file()}


def test_round_trip_exact_once_per_epoch_disjoint_processes(folder_dataset):
    config, path, _ = folder_dataset
    src = sources.ImageFolderSource(config.data.source_dir)
    expected = _expected(config, src)
    kept = sorted({i for i, _ in expected})
    assert len(kept) == 21
    batch = 4  # global; 2 per process, 10 examples per process per epoch, 5 steps per epoch
    config.train.batch_size = batch
    epochs = {0: [], 1: []}
    for p in (0, 1):
        it = train_input.make_train_iterator(
            config, seed=3, process_index=p, process_count=2, include_index=True
        )
        for step in range(10):
            b = next(it)
            assert b["x"].shape == (2, 8, 8, 4) and b["x"].dtype == np.float32
            assert b["label"].dtype == np.int32
            for x, label, index, flip in zip(
                b["x"], b["label"], b["index"], b["flip"], strict=True
            ):
                np.testing.assert_array_equal(x, expected[(int(index), int(flip))])
                assert label == src[int(index)].label
            epochs[step // 5].append((p, b["index"], b["flip"]))
    for e in (0, 1):
        per_proc = [np.concatenate([i for p, i, _ in epochs[e] if p == q]) for q in (0, 1)]
        assert all(len(np.unique(x)) == len(x) == 10 for x in per_proc)  # once per epoch
        assert not set(per_proc[0]) & set(per_proc[1])  # disjoint processes
        assert set(per_proc[0]) | set(per_proc[1]) <= set(kept)  # 20 of 21 (21 % 2 dropped)
    order = [np.concatenate([i for p, i, _ in epochs[e] if p == 0]) for e in (0, 1)]
    assert not np.array_equal(order[0], order[1])  # reshuffled each epoch
    flips = np.concatenate([f for e in (0, 1) for _, _, f in epochs[e]])
    assert 0 < flips.mean() < 1  # both copies are used


def test_without_random_flip_the_same_examples_come_unflipped(folder_dataset):
    config, _, _ = folder_dataset
    src = sources.ImageFolderSource(config.data.source_dir)
    expected = _expected(config, src)
    config.train.batch_size = 4
    streams = {}
    for random_flip in (True, False):
        config.data.random_flip = random_flip
        it = train_input.make_train_iterator(
            config, seed=3, process_index=0, process_count=1, include_index=True
        )
        streams[random_flip] = [next(it) for _ in range(10)]
    config.data.random_flip = True
    for flipped, plain in zip(streams[True], streams[False], strict=True):
        np.testing.assert_array_equal(flipped["index"], plain["index"])  # same order
        assert not plain["flip"].any()
        for x, index in zip(plain["x"], plain["index"], strict=True):
            np.testing.assert_array_equal(x, expected[(int(index), 0)])
    assert np.concatenate([b["flip"] for b in streams[True]]).any()


def test_iterator_checkpoint_round_trip_through_orbax(folder_dataset, tmp_path):
    config, _, _ = folder_dataset
    config.train.batch_size = 4
    it = train_input.make_train_iterator(config, seed=1, process_index=0, process_count=1)
    for _ in range(3):
        next(it)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.save(3, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
    want = [next(it) for _ in range(7)]  # crosses the epoch boundary (5 steps per epoch)

    fresh = train_input.make_train_iterator(config, seed=1, process_index=0, process_count=1)
    mngr = ocp.CheckpointManager(tmp_path / "ckpt")
    mngr.restore(3, args=ocp.args.Composite(iter=grain.checkpoint.CheckpointRestore(fresh)))
    for w in want:
        got = next(fresh)
        np.testing.assert_array_equal(got["x"], w["x"])
        np.testing.assert_array_equal(got["label"], w["label"])


@pytest.mark.integration
def test_worker_processes_give_the_same_batches_and_restore(folder_dataset):
    config, _, _ = folder_dataset
    config.train.batch_size = 4
    seq = train_input.make_train_iterator(config, seed=5, process_index=0, process_count=1)
    want = [next(seq) for _ in range(8)]
    config.data.num_workers = 2
    try:
        par = train_input.make_train_iterator(config, seed=5, process_index=0, process_count=1)
        for w in want[:3]:
            np.testing.assert_array_equal(next(par)["x"], w["x"])
        state = par.get_state()
        del par
        fresh = train_input.make_train_iterator(config, seed=5, process_index=0, process_count=1)
        fresh.set_state(state)
        for w in want[3:]:
            b = next(fresh)
            np.testing.assert_array_equal(b["x"], w["x"])
            np.testing.assert_array_equal(b["label"], w["label"])
    finally:
        config.data.num_workers = 0


def test_shape_and_scale_mismatch_fail_naming_both(folder_dataset):
    config, path, _ = folder_dataset
    wrong = _config(path)
    wrong.model.img_size = 16
    with pytest.raises(
        latent_dataset.DatasetMismatchError,
        match=r"record shape \[8, 8, 4\] on disk.*needs \[16, 16, 4\]",
    ):
        train_input.make_train_iterator(wrong, seed=0, process_index=0, process_count=1)
    wrong = _config(path)
    wrong.autoencoder.scale_factor = 0.18215
    with pytest.raises(
        latent_dataset.DatasetMismatchError,
        match=r"scale factor 0.5 on disk, config.autoencoder.scale_factor=0.18215",
    ):
        train_input.make_train_iterator(wrong, seed=0, process_index=0, process_count=1)
    with pytest.raises(FileNotFoundError, match="run `main.py --mode extract`"):
        train_input.make_train_iterator(
            _config(path.parent / "nothing"), seed=0, process_index=0, process_count=1
        )


def _copy_dataset(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_and_corrupt_shards_fail_with_file_name(folder_dataset, tmp_path):
    config, path, _ = folder_dataset
    ds = latent_dataset.open_dataset(path)
    name = pathlib.Path(ds.shard_paths[2]).name

    truncated = _copy_dataset(path, tmp_path / "truncated")
    shard = truncated / name
    shard.write_bytes(shard.read_bytes()[:-100])
    config2 = _config(truncated)
    with pytest.raises(latent_dataset.CorruptShardError, match=f"{name} is truncated"):
        train_input.make_train_iterator(config2, seed=0, process_index=0, process_count=1)

    corrupt = _copy_dataset(path, tmp_path / "corrupt")
    shard = corrupt / name
    data = bytearray(shard.read_bytes())
    data[200:1200] = bytes(1000)  # same size, damaged record data
    shard.write_bytes(bytes(data))
    reader = latent_dataset.RecordReader(latent_dataset.open_dataset(corrupt))
    first = sum(ds.shard_lengths[:2])
    with pytest.raises(latent_dataset.CorruptShardError, match=name):
        reader.read(np.arange(first, first + ds.shard_lengths[2]))


def test_flip_bits_deterministic_and_balanced():
    ex = np.arange(10_000)
    a = train_input.flip_bits(7, np.zeros_like(ex), ex)
    np.testing.assert_array_equal(a, train_input.flip_bits(7, np.zeros_like(ex), ex))
    b = train_input.flip_bits(7, np.ones_like(ex), ex)
    assert 0.47 < a.mean() < 0.53 and 0.4 < (a != b).mean() < 0.6


def test_tfds_source_unlabelled_celeba_end_to_end(tmp_path):
    """TFDS's celeb_a (mock data: no download) -> CelebA crop 64 -> pixel dataset -> batches."""
    tfds = pytest.importorskip("tensorflow_datasets")
    c = default_config()
    c.model.update(img_size=64, in_chans=3)
    c.data.update(
        source="tfds",
        name="celeb_a",
        split="train",
        resolution=64,
        preprocess="celeba",
        latent_dir=str(tmp_path / "celeba64"),
        num_workers=0,
    )
    c.data.tfds_data_dir = str(tmp_path / "tfds")
    c.train.batch_size = 4
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        src = sources.make_source(c.data)
        assert len(src) == 6 and src.num_classes == 0 and src.description == "tfds:celeb_a:train"
        extract.run_extraction(c, source=src, process_index=0, process_count=1)
        want = [
            preprocess.celeba_crop(sources.load_image(src[i]).convert("RGB"), 64) for i in range(6)
        ]
    it = train_input.make_train_iterator(
        c, seed=0, process_index=0, process_count=1, include_index=True
    )
    b = next(it)
    assert "label" not in b and b["x"].shape == (4, 64, 64, 3)
    for x, i, f in zip(b["x"], b["index"], b["flip"], strict=True):
        img = preprocess.flip(want[i]) if f else want[i]
        np.testing.assert_array_equal(x, preprocess.to_model_range(img))


def _reading_script(path, workers: int, then: str) -> str:
    """A program that opens the latent dataset at `path` (8 x 8 x 4 latents, batch 8, with
    `workers` grain processes) as iterator `it`, then runs `then`."""
    return textwrap.dedent(f"""
        import sys, time
        from uvit_jax.config_defaults import default_config
        from input_pipeline import train_input
        c = default_config()
        c.model.update(img_size=8, in_chans=2)
        c.autoencoder.update(kind="kl_f8", scale_factor=0.5)
        c.data.update(latent_dir={str(path)!r}, num_workers={workers})
        c.train.batch_size = 8
        it = train_input.make_train_iterator(c, seed=0, process_index=0, process_count=1)
    """) + textwrap.dedent(then)


@pytest.mark.integration
def test_reading_never_imports_tensorflow(folder_dataset):
    """A fresh process opens the dataset and reads a batch without importing TensorFlow."""
    _, path, _ = folder_dataset
    code = _reading_script(
        path,
        workers=0,
        then="""
        assert next(it)["x"].shape == (8, 8, 8, 4)
        print("tensorflow" in sys.modules)
    """,
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False"


def test_shard_files_open_once_when_read_threads_start_together(monkeypatch):
    """A worker's read threads share one reader: the files (and the modules opening them
    imports) are opened by one thread while the others wait, in every unpickled copy."""
    import pickle
    import threading
    import time

    from input_pipeline.latent_dataset import reader

    opened = []

    class SlowReader:
        def __init__(self, path, **options):
            opened.append(threading.get_ident())
            time.sleep(0.2)  # wide enough for every thread to find the file unopened

        def read(self, positions):
            return [b"%d" % i for i in positions]

    monkeypatch.setattr(reader.array_record_module, "ArrayRecordReader", SlowReader)
    files = pickle.loads(pickle.dumps(reader._ShardFiles(["a.array_record"], [10])))
    results = {}
    threads = [
        threading.Thread(target=lambda k=k: results.update({k: files.get([k, k + 1])}))
        for k in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(opened) == 1
    assert results == {k: [b"%d" % k, b"%d" % (k + 1)] for k in range(4)}


def test_batch_read_across_shards_keeps_order_and_starts_no_thread(folder_dataset, monkeypatch):
    """A batch touching every shard, in shuffled order, gives array_record's own records in the
    asked order, read in the calling thread (a thread per read would take the train step's CPU
    on small hosts)."""
    import threading

    from array_record.python import array_record_data_source

    from input_pipeline.latent_dataset import reader

    _, path, _ = folder_dataset
    ds = latent_dataset.open_dataset(path)
    assert len(ds.shard_paths) >= 4
    ids = np.random.default_rng(0).permutation(ds.num_records)[:24]
    expected = array_record_data_source.ArrayRecordDataSource(list(ds.shard_paths))
    expected = [expected[int(i)] for i in ids]
    started, start = [], threading.Thread.start
    monkeypatch.setattr(threading.Thread, "start", lambda t: (started.append(t), start(t))[1])
    files = reader._ShardFiles(ds.shard_paths, ds.shard_lengths)
    assert files.get(ids) == expected
    assert started == []
    with pytest.raises(IndexError, match=f"outside \\[0, {ds.num_records}\\)"):
        files.get([ds.num_records])


@pytest.mark.integration
def test_workers_exit_when_their_trainer_is_killed(folder_dataset):
    """kill -9 of the process that reads with grain workers leaves no worker (nor its shared
    memory) behind."""
    import signal
    import time

    _, path, _ = folder_dataset
    code = _reading_script(
        path,
        workers=2,
        then="""
        next(it)
        print("ready", flush=True)
        time.sleep(600)
    """,
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    shm_before = set(os.listdir("/dev/shm"))
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, env=env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        workers = [p for p in _pids() if _parent(p) == proc.pid]
        assert len(workers) >= 2, workers
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.monotonic() + 15
    alive = workers
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [w for w in workers if _running(w)]
    assert not alive, f"grain workers {alive} outlived their trainer"
    # The workers' shared memory went with them (multiprocessing's resource tracker, one of
    # the children waited for above, unlinks what they leave).
    assert set(os.listdir("/dev/shm")) <= shm_before


def _pids() -> list[int]:
    return [int(p.name) for p in pathlib.Path("/proc").iterdir() if p.name.isdigit()]


def _parent(pid: int) -> int | None:
    try:
        return int(pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None


def _running(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited (its reaper is init)
