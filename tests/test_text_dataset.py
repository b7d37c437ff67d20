"""MS-COCO-style text data: COCO files, caption contexts in the extracted dataset, the training
batches' contexts, and text-to-image training / sampling on top of them.

A deterministic stand-in text encoder (a random array seeded by the caption's CRC) keeps these
tests independent of CLIP; tests/test_clip_text.py checks the CLIP encoder itself, and the last
test here runs extraction through it.
"""

from __future__ import annotations

import json
import pathlib
import zlib

import numpy as np
import pytest
from PIL import Image

from input_pipeline import extract, latent_dataset, sources, train_input
from uvit_jax.config_defaults import default_config

RES = 16
L, D = 5, 8  # context tokens and width of the stand-in encoder


def fake_encode(texts):
    """Captions -> float32 [n, L, D], a fixed random array per caption."""
    out = [
        np.random.default_rng(zlib.crc32(t.encode())).standard_normal((L, D)).astype(np.float32)
        for t in texts
    ]
    return np.stack(out) if out else np.zeros((0, L, D), np.float32)


# Image id -> captions ([] for an image without captions); ids deliberately out of file order.
CAPTIONS = {
    7: ["a red square", "red box on white", "a square"],
    3: ["a blue circle"],
    12: ["two cats", "cats on a sofa", "a sofa", "pets", "animals resting"],
    5: [],
    9: ["a green field", "grass"],
    1: ["a tall tower", "a building", "a tower at night", "city"],
    20: ["a bowl of fruit", "apples and pears"],
    15: ["a corrupt file"],
    4: ["a dog", "a puppy", "dog running"],
    30: ["a boat", "a sailboat on water"],
}
CORRUPT = 15


def _write_coco(root: pathlib.Path) -> pathlib.Path:
    images = root / "train2014"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries, anns = [], []
    for image_id, caps in CAPTIONS.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        if image_id == CORRUPT:
            (images / name).write_bytes(b"not a jpeg")
        else:
            h, w = rng.integers(18, 40, size=2)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8)).save(images / name)
        entries.append({"id": image_id, "file_name": name, "height": 1, "width": 1})
        anns += [{"id": 1000 * image_id + k, "image_id": image_id, "caption": c}
                 for k, c in enumerate(caps)]  # fmt: skip
    ann_file = root / "annotations" / "captions_train2014.json"
    ann_file.parent.mkdir()
    ann_file.write_text(json.dumps({"images": entries, "annotations": anns}))
    return ann_file


def t2i_config(root: pathlib.Path, latent_dir: pathlib.Path):
    """A tiny pixel-space text-to-image config over the COCO folder of `_write_coco`."""
    c = default_config()
    c.model.update(
        kind="uvit_t2i", img_size=RES, patch_size=4, in_chans=3, embed_dim=32, depth=2,
        num_heads=2, clip_dim=D, num_clip_token=L, dtype="float32",
    )  # fmt: skip
    c.data.update(
        source="coco_files",
        source_dir=str(root / "train2014"),
        captions_file=str(root / "annotations" / "captions_train2014.json"),
        resolution=RES,
        preprocess="coco",
        latent_dir=str(latent_dir),
        num_workers=0,
        extract_shard_size=4,
    )
    c.diffusion.update(formulation="sd_discrete", p_uncond=0.5)
    c.train.update(batch_size=4, num_steps=3, log_every=1, ckpt_every=3)
    c.train.evals.sample_grid.every = 3
    c.optim.update(lr=1e-3, warmup_steps=1)
    c.sample.update(sampler="dpm_solver++_3s", steps=3, cfg_scale=1.0, num_samples=4, batch_size=4)
    return c


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """The COCO folder, extracted with the stand-in encoder by 2 simulated processes."""
    root = tmp_path_factory.mktemp("coco")
    _write_coco(root)
    config = t2i_config(root, root / "latents")
    for p in (0, 1):
        extract.run_extraction(config, encode_text_fn=fake_encode, process_index=p, process_count=2)
    return config, root


def test_coco_files_source_orders_by_image_id_and_names_bad_files(tmp_path):
    ann = _write_coco(tmp_path)
    src = sources.CocoCaptionsFilesSource(tmp_path / "train2014", ann)
    ids = sorted(CAPTIONS)
    assert len(src) == len(ids) and src.num_classes == 0
    for i, image_id in enumerate(ids):
        ex = src[i]
        assert ex.captions == tuple(CAPTIONS[image_id]) and ex.label == -1
        assert ex.key.endswith(f"{image_id:012d}.jpg")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match=r"bad\.json is not a COCO captions file.*file_name"):
        sources.CocoCaptionsFilesSource(tmp_path / "train2014", bad)
    with pytest.raises(FileNotFoundError, match="config.data.captions_file"):
        sources.CocoCaptionsFilesSource(tmp_path / "train2014", tmp_path / "missing.json")


def test_extraction_stores_every_caption_and_the_empty_context(coco):
    config, _ = coco
    ds = latent_dataset.open_dataset(config.data.latent_dir)
    kept = [i for i in sorted(CAPTIONS) if CAPTIONS[i] and i != CORRUPT]
    assert ds.num_examples == len(kept) and ds.spec.context_shape == (L, D)
    assert ds.metadata["num_contexts"] == sum(len(CAPTIONS[i]) for i in kept)
    reasons = sorted(
        s["reason"][:11] for m in latent_dataset.completed_shards(ds.directory).values()
        for s in m["skipped"]
    )  # fmt: skip
    assert len(reasons) == 2 and reasons[1] == "no captions"
    np.testing.assert_array_equal(latent_dataset.read_empty_context(ds), fake_encode([""])[0])

    # Every context record holds its caption's encoding and its source example.
    reader = latent_dataset.RecordReader(ds)
    recs = reader.read_contexts(np.arange(ds.metadata["num_contexts"]))
    ids = sorted(CAPTIONS)
    for ctx, index, caption in zip(recs["context"], recs["index"], recs["caption"], strict=True):
        assert caption in CAPTIONS[ids[index]]
        np.testing.assert_array_equal(ctx, fake_encode([caption])[0])
    # Both records of an example point at all of its captions.
    images = reader.read(np.arange(ds.num_records))
    for r in range(ds.num_records):
        start, n = images["context_start"][r], images["num_contexts"][r]
        got = reader.read_contexts(np.arange(start, start + n))
        assert list(got["caption"]) == CAPTIONS[ids[images["index"][r]]]


def test_training_batches_draw_one_caption_per_example_and_epoch(coco):
    config, _ = coco
    ids = sorted(CAPTIONS)
    ds = latent_dataset.open_dataset(config.data.latent_dir)
    reader = latent_dataset.RecordReader(ds)
    chosen: dict[int, set[str]] = {}
    seen = {0: [], 1: []}
    for p in (0, 1):
        it = train_input.make_train_iterator(
            config, seed=5, process_index=p, process_count=2, include_index=True
        )
        for _ in range(40):  # 2 per process and step, 2 steps per epoch: 20 epochs
            b = next(it)
            assert b["context"].shape == (2, L, D) and b["context"].dtype == np.float32
            caps = reader.read_contexts(b["context_id"])["caption"]
            for ctx, index, cap in zip(b["context"], b["index"], caps, strict=True):
                assert cap in CAPTIONS[ids[index]]  # a caption of this very image
                np.testing.assert_array_equal(ctx, fake_encode([cap])[0])
                chosen.setdefault(int(index), set()).add(cap)
            seen[p].extend(b["index"].tolist())
    assert not set(seen[0][:4]) & set(seen[1][:4])  # first epoch: disjoint processes
    # Over 20 epochs every caption of every example shows up (at most 5 captions each).
    assert all(chosen[i] == set(CAPTIONS[ids[i]]) for i in chosen)

    # Same batches for the same seed (caption choice included), new ones for another seed.
    again = next(train_input.make_train_iterator(config, seed=5, process_index=0, process_count=2))
    first = next(train_input.make_train_iterator(config, seed=5, process_index=0, process_count=2))
    np.testing.assert_array_equal(again["context"], first["context"])


def test_caption_choices_uniform_and_independent_of_flip():
    n = 200_000
    examples = np.arange(n, dtype=np.int64)
    epochs = np.zeros(n, np.int64)
    choice = train_input.caption_choices(1, epochs, examples, np.full(n, 5))
    flips = train_input.flip_bits(1, epochs, examples)
    counts = np.bincount(choice, minlength=5) / n
    assert np.abs(counts - 0.2).max() < 0.005
    for c in range(5):  # the flip is not tied to the caption
        assert abs(flips[choice == c].mean() - 0.5) < 0.01


def test_context_shape_mismatch_fails_naming_both(coco):
    config, _ = coco
    config = config.copy_and_resolve_references()
    config.model.clip_dim = 16
    ds = latent_dataset.open_dataset(config.data.latent_dir)
    with pytest.raises(
        latent_dataset.DatasetMismatchError, match=r"\[5, 8\].*clip_dim=16.*\[5, 16\]"
    ):
        latent_dataset.check_compatible(ds, config)


def test_interrupted_text_extraction_resumes_complete(coco, tmp_path):
    config, root = coco
    config = config.copy_and_resolve_references()
    config.data.latent_dir = str(tmp_path / "resumed")

    class Failing(sources.CocoCaptionsFilesSource):
        def __getitem__(self, i):
            if i == 5:
                raise RuntimeError("injected crash")
            return super().__getitem__(i)

    src = Failing(config.data.source_dir, config.data.captions_file)
    with pytest.raises(RuntimeError, match="injected crash"):
        extract.run_extraction(config, source=src, encode_text_fn=fake_encode,
                               process_index=0, process_count=1)  # fmt: skip
    assert set(latent_dataset.completed_shards(config.data.latent_dir)) == {0}
    extract.run_extraction(config, encode_text_fn=fake_encode, process_index=0, process_count=1)
    got = latent_dataset.open_dataset(config.data.latent_dir)
    want = latent_dataset.open_dataset(coco[0].data.latent_dir)
    assert got.num_records == want.num_records
    assert got.metadata["num_contexts"] == want.metadata["num_contexts"]
    a, b = latent_dataset.RecordReader(got), latent_dataset.RecordReader(want)
    ids = np.arange(got.metadata["num_contexts"])
    np.testing.assert_array_equal(a.read_contexts(ids)["context"], b.read_contexts(ids)["context"])


@pytest.mark.integration
def test_text_to_image_training_sample_grid_and_sample_job(coco, tmp_path):
    """Trains 3 steps (contexts dropped to the stored empty context with p=0.5), draws the grid
    from the dataset's captions, then `--mode sample` writes images with their captions."""
    from uvit_jax.jobs.sample import sample_job
    from uvit_jax.jobs.train import train_job

    config, _ = coco
    config = config.copy_and_resolve_references()
    config.train.batch_size = 8
    config.sample.update(num_samples=8, batch_size=8)
    workdir = tmp_path / "run"
    state = train_job(config, str(workdir))
    assert int(state.step) == 3
    grid = np.asarray(Image.open(workdir / "samples" / "step_00000003.png"))
    assert grid.ndim == 3 and grid.std() > 0

    npz = sample_job(config, str(workdir))
    with np.load(npz) as f:
        pixels, captions = f["arr_0"], list(f["captions"])
    assert pixels.shape == (8, RES, RES, 3) and pixels.dtype == np.uint8
    lines = pathlib.Path(npz).with_suffix(".txt").read_text().splitlines()
    firsts = [CAPTIONS[i][0] for i in sorted(CAPTIONS) if CAPTIONS[i] and i != CORRUPT]
    assert lines == captions == firsts  # the first caption of each image, in dataset order


def test_fid_captions_cover_the_dataset_without_repeats(coco):
    from uvit_jax.sampling.prompts import CaptionSampler

    config, _ = coco
    ds = latent_dataset.open_dataset(config.data.latent_dir)
    n = ds.metadata["num_contexts"]
    a = CaptionSampler(config.data.latent_dir, seed=0, context_shape=(L, D))
    got = np.concatenate([a.contexts(s, 4) for s in range(0, n, 4)])[:n]
    want = latent_dataset.RecordReader(ds).read_contexts(np.arange(n))["context"]
    # Every caption once (in a seeded order), the same for another instance with the seed.
    assert sorted(map(bytes, got)) == sorted(map(bytes, want))
    np.testing.assert_array_equal(CaptionSampler(ds.directory, 0, (L, D)).contexts(3, 5),
                                  a.contexts(3, 5))  # fmt: skip
    np.testing.assert_array_equal(a.null_context, fake_encode([""])[0])
    with pytest.raises(latent_dataset.DatasetMismatchError, match=r"\[5, 8\].*\[77, 768\]"):
        CaptionSampler(ds.directory, 0, (77, 768))


@pytest.mark.integration
def test_clip_extraction_training_and_prompt_sampling(tmp_path):
    """The real (tiny, random) CLIP text encoder end to end: extraction through
    `config.text_encoder.path`, one training step, then `uvit_jax.sample(prompts=...)`."""
    from tiny_clip import write_tiny_clip

    import uvit_jax
    from uvit_jax.jobs.extract import extract_job
    from uvit_jax.text_encoder import TextEncoder

    clip_dir = tmp_path / "clip"
    clip_dir.mkdir()
    write_tiny_clip(clip_dir)
    _write_coco(tmp_path)
    config = t2i_config(tmp_path, tmp_path / "latents")
    config.model.update(clip_dim=32, num_clip_token=77)
    config.text_encoder.update(path=str(clip_dir), batch_size=8)
    config.train.update(batch_size=8, num_steps=1, ckpt_every=1)
    config.train.evals.sample_grid.every = 0

    extract_job(config, None)
    ds = latent_dataset.open_dataset(config.data.latent_dir)
    encoder = TextEncoder(clip_dir, batch_size=8)
    recs = latent_dataset.RecordReader(ds).read_contexts(np.arange(ds.metadata["num_contexts"]))
    want = encoder.encode(list(recs["caption"]))
    np.testing.assert_allclose(recs["context"], want, rtol=0, atol=1e-6)
    np.testing.assert_allclose(
        latent_dataset.read_empty_context(ds), encoder.empty_context(), rtol=0, atol=1e-6
    )
    assert ds.spec.text_encoder == f"clip:{clip_dir}"

    from uvit_jax.jobs.train import train_job

    workdir = tmp_path / "run"
    train_job(config, str(workdir))
    loaded = uvit_jax.load(workdir)
    prompts = ["a photo of a cat", "the dog on the table"]
    x = uvit_jax.sample(loaded, prompts=prompts, seed=1)
    y = uvit_jax.sample(loaded, contexts=encoder.encode(prompts),
                        null_context=encoder.empty_context(), seed=1)  # fmt: skip
    assert x.shape == (2, RES, RES, 3)
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-5)
