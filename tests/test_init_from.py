"""Fine-tuning from any checkpoint (`config.train.init_from`): the weight surgery on parameter
trees (what loads, what is re-initialised, how positions move to another grid, every refused
difference), the class subset of the data layer, the bad values, and two runs: the default
fine-tuned on 5 of its classes renumbered, and a converted checkpoint at another resolution."""

import logging
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from runs import FMNIST, fault_config

from configs.fashion_mnist_uvit import get_config
from input_pipeline import latent_dataset, sources
from input_pipeline.errors import DataConfigError
from uvit_jax import checkpoints, jobs
from uvit_jax.api import load
from uvit_jax.convert.uvit import official_state_dict
from uvit_jax.errors import ConfigError
from uvit_jax.jobs import train as train_job
from uvit_jax.models.uvit import abstract_uvit, build_uvit
from uvit_jax.parallel.mesh import make_mesh
from uvit_jax.train import init_from
from uvit_jax.train.optimizer import make_optimizer

FIVE = (3, 5, 7, 8, 9)
ONLY = "only model.num_classes (the label table) and the patch grid (learned positions) may differ"


def model(variant="runlocal", **fields):
    """A `config.model` section of the default's `variant` with `fields` changed."""
    m = get_config(variant).model
    m.update(fields)
    return m


def params(model_config, seed=0):
    return nnx.state(build_uvit(model_config, seed=seed))


def plan(source_model, target_model):
    return init_from.plan_transfer(
        nnx.state(abstract_uvit(source_model)),
        nnx.state(abstract_uvit(target_model)),
        source_model=source_model,
        target_model=target_model,
        where="W",
    )


def leaves(tree):
    return {k: np.asarray(v) for k, v in init_from.by_name(jax.device_get(tree)).items()}


# ---- the surgery, on parameter trees ---------------------------------------------------------


def test_another_class_count_reinitialises_the_label_table_alone():
    src_model, new_model = model(), model(num_classes=6)
    src, fresh = params(src_model, seed=0), params(new_model, seed=1)
    p = plan(src_model, new_model)
    assert p.summary() == (
        "loaded 43 of 44 parameters; re-initialised label_emb/embedding [11, 32] -> [6, 32]; "
        "interpolated nothing"
    )
    out, want_src, want_fresh = (
        leaves(init_from.transfer(p, src, fresh)),
        leaves(src),
        leaves(fresh),
    )
    assert out.keys() == want_src.keys()
    for name, value in out.items():
        expected = want_fresh[name] if name == init_from.LABEL_TABLE else want_src[name]
        np.testing.assert_array_equal(value, expected, err_msg=name)  # bit for bit
    assert out[init_from.LABEL_TABLE].shape == (6, 32)  # 5 classes + the null class, last


def test_positions_resized_to_the_same_grid_are_unchanged():
    pos = jax.random.normal(jax.random.key(0), (1, 2 + 49, 32))
    np.testing.assert_array_equal(init_from.resize_positions(pos, 2, 7), pos)


def test_positions_on_another_grid_are_the_bicubic_resize_of_the_patch_grid():
    pos = jax.random.normal(jax.random.key(0), (1, 2 + 49, 32))
    out = init_from.resize_positions(pos, 2, 8)
    assert out.shape == (1, 2 + 64, 32)
    np.testing.assert_array_equal(out[:, :2], pos[:, :2])  # label and time rows as they were
    grid = jax.image.resize(pos[0, 2:].reshape(7, 7, 32), (8, 8, 32), "bicubic")
    np.testing.assert_array_equal(out[0, 2:], grid.reshape(64, 32))
    # The cubic weights sum to one: a constant grid stays that constant, growing or shrinking.
    flat = jnp.concatenate([pos[:, :2], jnp.full((1, 49, 32), 0.25)], axis=1)
    for side in (5, 8, 14):
        np.testing.assert_allclose(init_from.resize_positions(flat, 2, side)[0, 2:], 0.25, 1e-6)


def test_another_resolution_interpolates_learned_positions_and_loads_the_rest():
    src_model = model("runlocal,sd_noise")  # learned positions, 28 x 28: 7 x 7 patches
    new_model = model("runlocal,sd_noise", img_size=32)
    src, fresh = params(src_model), params(new_model, seed=1)
    p = plan(src_model, new_model)
    assert p.summary() == (
        "loaded 44 of 45 parameters; re-initialised nothing; interpolated pos_embed "
        "[1, 51, 32] -> [1, 66, 32] (7x7 -> 8x8 patch grid, bicubic)"
    )
    out, want = leaves(init_from.transfer(p, src, fresh)), leaves(src)
    np.testing.assert_array_equal(
        out["pos_embed"], init_from.resize_positions(jnp.asarray(want["pos_embed"]), 2, 8)
    )
    for name in out.keys() - {"pos_embed"}:
        np.testing.assert_array_equal(out[name], want[name], err_msg=name)


def test_fixed_sinusoids_on_another_grid_load_everything():
    p = plan(model(), model(img_size=32))
    assert set(p.actions.values()) == {init_from.LOAD}
    assert p.summary().endswith("interpolated nothing (fixed 2D sinusoids recomputed: 7x7 -> 8x8 "
                                "patch grid)")  # fmt: skip


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(embed_dim=64), "parameter decoder_pred/kernel has shape [32, 16] there, [64, 16] "
                             "here (and 40 more differences)"),
        (dict(depth=4), "parameter in_blocks/1/attn/proj/bias [32] of this config's model is "
                        "not there (and 23 more differences)"),
        (dict(patch_size=7), "parameter decoder_pred/bias has shape [16] there, [49] here (and 2 "
                             "more differences)"),
        (dict(in_chans=3), "parameter decoder_pred/bias has shape [16] there, [48] here (and 4 "
                           "more differences)"),
        (dict(conv=False), "parameter final_layer/bias [1] there has no place in this config's "
                           "model (and 1 more difference)"),
    ],
)  # fmt: skip
def test_every_other_difference_is_one_line_naming_it(fields, message):
    with pytest.raises(ConfigError) as e:
        plan(model(), model(**fields))
    assert str(e.value) == f"W: {message}; {ONLY}"


def test_a_field_that_changes_the_function_but_no_shape_is_named():
    with pytest.raises(ConfigError) as e:
        plan(model(), model(num_heads=1))
    assert str(e.value) == f"W: model.num_heads is 2 there, 1 here; {ONLY}"
    with pytest.raises(ConfigError) as e:  # both D x D: Linear(h_m + h_s) vs h_m + Linear(h_s)
        plan(model(skip_fusion="linear_add"), model(skip_fusion="add_linear_skip"))
    assert (
        str(e.value)
        == f"W: model.skip_fusion is 'linear_add' there, 'add_linear_skip' here; {ONLY}"
    )


def test_unconditional_to_class_model_is_refused():
    with pytest.raises(ConfigError) as e:
        plan(model("runlocal,sd_noise", num_classes=-1), model("runlocal,sd_noise"))
    assert str(e.value) == (
        f"W: parameter label_emb/embedding [11, 32] of this config's model is not there (and 1 "
        f"more difference); {ONLY}"
    )


# ---- the data layer: some classes, renumbered ------------------------------------------------


@pytest.fixture(scope="module")
def fmnist_test():
    if not (FMNIST / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({FMNIST})")
    return sources.FashionMnistFilesSource(FMNIST, "test")


def test_class_subset_keeps_those_classes_renumbered_in_order(fmnist_test):
    subset = sources.ClassSubset(fmnist_test, FIVE)
    kept = np.flatnonzero(np.isin(fmnist_test.labels, FIVE))
    assert len(subset) == len(kept) == 5000 and subset.num_classes == 5
    assert subset.description.endswith(":test[classes=3,5,7,8,9]")
    for i in (0, 1, 2499, 4999):
        src = fmnist_test[int(kept[i])]
        assert subset[i].label == FIVE.index(src.label) and subset[i].key == src.key
    images, labels = subset.arrays(range(100, 164))  # the batched path, as extraction reads it
    np.testing.assert_array_equal(images, fmnist_test.images[kept[100:164]])
    np.testing.assert_array_equal(labels, [subset[i].label for i in range(100, 164)])


@pytest.mark.parametrize("classes", [(3, 10), (3, 3), (-1,)])
def test_class_subset_refuses_classes_the_source_lacks(fmnist_test, classes):
    with pytest.raises(DataConfigError) as e:
        sources.ClassSubset(fmnist_test, classes)
    assert str(e.value) == (
        f"config.data.classes={classes}: expected distinct labels in [0, 10) of "
        f"fashion_mnist_files:{FMNIST}:test (10 classes)"
    )


# ---- bad values of config.train.init_from ----------------------------------------------------


def test_parse_init_from():
    assert train_job.parse_init_from("w") == ("w", None)
    assert train_job.parse_init_from("runs/w:500") == ("runs/w", 500)
    assert train_job.parse_init_from("gs://b/w") == ("gs://b/w", None)
    assert train_job.parse_init_from("gs://b/w:7") == ("gs://b/w", 7)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """A converted official checkpoint (`--mode convert` of an .npz state dict) of the default's
    runlocal model with learned positions, random weights: (workdir, its model config)."""
    tmp = tmp_path_factory.mktemp("converted")
    c = get_config("runlocal,sd_noise")
    np.savez(tmp / "nnet_ema.npz", **official_state_dict(build_uvit(c.model, seed=3)))
    c.convert.source = str(tmp / "nnet_ema.npz")
    jobs.run("convert", c, str(tmp / "w"))
    return str(tmp / "w"), c.model


def test_an_init_from_that_is_not_there_is_one_line(tmp_path, converted):
    c = get_config("runlocal")
    c.train.init_from = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as e:
        train_job.plan_init_from(c, str(tmp_path), None)
    assert (
        str(e.value)
        == f"config.train.init_from={c.train.init_from!r}: {tmp_path}/nope does not exist"
    )
    c.train.init_from = f"{converted[0]}:7"
    with pytest.raises(ConfigError) as e:
        train_job.plan_init_from(c, str(tmp_path), None)
    assert str(e.value) == (
        f"config.train.init_from={c.train.init_from!r}: {converted[0]}/checkpoints has no "
        "checkpoint at step 7; it has steps [0]"
    )


def test_a_mismatch_names_the_field_value_and_step(tmp_path, converted):
    c = get_config("runlocal,sd_noise")
    c.model.embed_dim = 64
    c.train.init_from = converted[0]
    match = r"^config.train.init_from='.*/w' \(step 0\): parameter decoder_pred/kernel has shape "
    with pytest.raises(ConfigError, match=match + r"\[32, 16\] there, \[64, 16\] here"):
        train_job.plan_init_from(c, str(tmp_path), None)


def test_a_workdir_with_checkpoints_resumes_and_ignores_init_from(caplog):
    c = get_config("runlocal")
    c.train.init_from = "/does/not/matter"
    with caplog.at_level(logging.INFO):
        assert train_job.plan_init_from(c, "W", 40) is None
    assert (
        "config.train.init_from='/does/not/matter' ignored: W resumes from its checkpoint step 40"
        in caplog.text
    )


def test_a_converted_checkpoint_starts_a_state_at_another_resolution(converted):
    """The loading path without training: EMA weights of a converted checkpoint, learned
    positions moved to 8 x 8 patches, fresh optimizer, EMA = params, step 0."""
    path, src_model = converted
    c = get_config("runlocal,sd_noise")
    c.model.img_size = 32
    c.train.init_from = path
    mesh = make_mesh(dict(data=1, fsdp=1), jax.devices()[:1])
    tx = make_optimizer(c.optim, c.train.num_steps)
    run = types.SimpleNamespace(
        init=train_job.plan_init_from(c, "unused", None),
        config=c,
        mesh=mesh,
        program=types.SimpleNamespace(tx=tx),
    )
    state = jax.device_get(train_job.init_from_checkpoint(run))
    src = leaves(load(path).params)
    got = leaves(state.params)
    np.testing.assert_array_equal(
        got["pos_embed"], init_from.resize_positions(jnp.asarray(src["pos_embed"]), 2, 8)
    )
    for name in got.keys() - {"pos_embed"}:
        np.testing.assert_array_equal(got[name], src[name], err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, state.ema, state.params)
    assert int(state.step) == 0
    assert all(not np.any(x) for x in jax.tree.leaves(state.opt_state))  # moments and count 0


# ---- training runs ---------------------------------------------------------------------------


def spy_initial_state(monkeypatch) -> dict:
    """Captures (on the host: the step donates it) the state `init_from_checkpoint` returns."""
    seen = {}
    real = train_job.init_from_checkpoint

    def spy(run):
        state = real(run)
        seen["state"] = jax.device_get(state)
        return state

    monkeypatch.setattr(train_job, "init_from_checkpoint", spy)
    return seen


@pytest.mark.integration
def test_fine_tune_the_default_on_five_of_its_classes(fmnist_dir, tmp_path, monkeypatch,
                                                      one_device, caplog):  # fmt: skip
    source = tmp_path / "source"
    train_job.train_job(fault_config(fmnist_dir, num_steps=3), source)  # the default, 10 classes

    c = fault_config(str(tmp_path / "five_data"), num_steps=3, ckpt_every=3)
    c.data.update(classes=FIVE, source_dir=str(FMNIST), max_examples=256)
    c.model.num_classes = 6  # 5 classes + the null class
    c.train.init_from = str(source)
    seen = spy_initial_state(monkeypatch)
    with caplog.at_level(logging.INFO):
        train_job.train_job(c, tmp_path / "five")
    assert (
        "re-initialised label_emb/embedding [11, 32] -> [6, 32]; interpolated nothing"
        in caplog.text
    )

    data = latent_dataset.open_dataset(tmp_path / "five_data", "train")
    assert data.spec.num_classes == 5 and data.spec.source.endswith(
        "train[classes=3,5,7,8,9][:256]"
    )
    assert (int(data.metadata["label_min"]), int(data.metadata["label_max"])) == (0, 4)

    state, src = seen["state"], leaves(load(source).params)  # the source's EMA at step 3
    fresh = leaves(nnx.state(build_uvit(c.model, seed=c.seed)))
    got = leaves(state.params)
    np.testing.assert_array_equal(got[init_from.LABEL_TABLE], fresh[init_from.LABEL_TABLE])
    for name in got.keys() - {init_from.LABEL_TABLE}:
        np.testing.assert_array_equal(got[name], src[name], err_msg=name)
    jax.tree.map(np.testing.assert_array_equal, state.ema, state.params)
    assert int(state.step) == 0
    trained = load(tmp_path / "five")
    assert trained.step == 3 and trained.config.train.init_from == str(source)
    assert trained.config.model.num_classes == 6

    # Rerun longer: the workdir resumes from its own step 3, never from the init weights again.
    c.train.num_steps = 5
    seen.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_job.train_job(c, tmp_path / "five")
    assert not seen and "ignored: " in caplog.text and "resumed from step 3" in caplog.text
    assert load(tmp_path / "five").step == 5


@pytest.mark.integration
def test_fine_tune_a_converted_checkpoint_at_another_resolution(tmp_path, converted, monkeypatch,
                                                                one_device):  # fmt: skip
    path, _ = converted
    c = fault_config(str(tmp_path / "data32"), num_steps=3, ckpt_every=3)
    c.model.update(pos_embed="learned_1d", img_size=32)
    c.data.update(resolution=32, preprocess="pad", source_dir=str(FMNIST), max_examples=256)
    c.train.init_from = f"{path}:0"
    seen = spy_initial_state(monkeypatch)
    train_job.train_job(c, tmp_path / "w32")
    src, got = leaves(load(path).params), leaves(seen["state"].params)
    np.testing.assert_array_equal(
        got["pos_embed"], init_from.resize_positions(jnp.asarray(src["pos_embed"]), 2, 8)
    )
    for name in got.keys() - {"pos_embed"}:
        np.testing.assert_array_equal(got[name], src[name], err_msg=name)
    trained = load(tmp_path / "w32")
    assert trained.step == 3 and leaves(trained.params)["pos_embed"].shape == (1, 66, 32)
    assert checkpoints.open_manager(tmp_path / "w32", read_only=True).all_steps() == [3]
