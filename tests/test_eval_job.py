"""`--mode fid_stats` then `--mode eval` on a trained default model, end to end (random-weight
Inception), the fingerprint, the eval job's resume and its error messages."""

import json

import numpy as np
import pytest
from random_inception import use_random_inception
from runs import small_config

from uvit_jax import jobs
from uvit_jax.evaluation.reference import load_reference, save_stats
from uvit_jax.jobs import train as train_job


@pytest.fixture(scope="module")
def eval_setup(fmnist_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    config = small_config()
    config.model.update(embed_dim=32)
    config.data.latent_dir = fmnist_dir
    config.train.update(num_steps=2, ckpt_every=2, log_every=1)
    config.sample.steps = 3
    use_random_inception(config, root, ref_num_images=24)
    train_job.train_job(config, str(root / "w"))
    return config, root


@pytest.mark.integration
def test_fid_stats_then_eval(eval_setup, monkeypatch):
    config, root = eval_setup
    jobs.run("fid_stats", config, str(root / "w"))
    ref = load_reference(config.eval.ref_stats)
    assert ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048)
    assert np.allclose(ref.sigma, ref.sigma.T) and np.isfinite(ref.sigma).all()
    assert ref.num_images == 24 and ref.features.shape == (24, 2048) and ref.mu_s.shape == (2023,)
    assert ref.protocol["input_protocol"] == "pytorch_fid"
    assert ref.protocol["dataset"]["split"] == "train"

    jobs.run("eval", config, str(root / "w"))
    result = json.loads((root / "w" / "eval" / "result_step_2.json").read_text())
    assert result["num_samples"] == 16 and result["step"] == 2
    for key in ("fid", "sfid", "kid"):
        assert np.isfinite(result[key]), key
    assert result["fid"] > 0 and result["inception_score"] >= 1.0
    assert 0 <= result["precision"] <= 1 and 0 <= result["recall"] <= 1
    fp = result["protocol"]
    assert fp["reference"]["num_images"] == 24 and len(fp["reference"]["sha256"]) == 64
    assert fp["inception"]["feature_sha256"] == ref.protocol["inception_feature_sha256"]
    # The objective the model was trained with (the runlocal default's), shown, not checked.
    assert fp["objective"] == dict(
        path="flow", target="velocity", time_sampling="logit_normal", time_mean=0.0, time_std=1.0,
        time_shift=1.0,
    )  # fmt: skip
    assert (fp["sampler"], fp["steps"], fp["weights"], fp["labels"]) == (
        config.sample.sampler,
        3,
        "ema",
        "balanced",
    )
    assert fp["num_samples"] == 16 and fp["quantisation"].startswith("floor(clip(")
    assert (fp["guidance"], fp["guide"]) == ("cfg", None)  # autoguidance: test_autoguidance.py

    # Running again resumes from the kept batches: nothing is sampled, the result is the same.
    from uvit_jax.jobs import evaluate as evaluate_job

    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished evaluation sampled again")

    (folder,) = (root / "w" / "eval" / "step_2").iterdir()
    assert sorted(p.name for p in folder.glob("batch_*")) == [
        "batch_00000_process0.npz",
        "batch_00001_process0.npz",
    ]
    monkeypatch.setattr(evaluate_job, "make_sample_batches", lambda *a, **k: no_sampling)
    jobs.run("eval", config, str(root / "w"))
    again = json.loads((root / "w" / "eval" / "result_step_2.json").read_text())
    assert again["fid"] == result["fid"] and again["protocol"] == fp


@pytest.mark.integration
def test_eval_with_other_settings_starts_afresh(eval_setup):
    config, root = eval_setup
    c = config.copy_and_resolve_references()
    c.sample.steps = 2
    c.eval.labels = "random"
    jobs.run("eval", c, str(root / "w"))
    result = json.loads((root / "w" / "eval" / "result_step_2.json").read_text())
    assert (result["protocol"]["steps"], result["protocol"]["labels"]) == (2, "random")
    assert len(list((root / "w" / "eval" / "step_2").iterdir())) == 2  # one folder per setting


@pytest.mark.integration
def test_eval_refuses_a_reference_of_another_protocol(eval_setup, tmp_path):
    config, root = eval_setup
    c = config.copy_and_resolve_references()
    c.eval.protocol = "tf_graph"
    mismatch = r"input_protocol='pytorch_fid'.*input_protocol='tf_graph'"
    with pytest.raises(ValueError, match=mismatch):
        jobs.run("eval", c, str(root / "w"))


@pytest.mark.integration
def test_eval_refuses_too_few_samples_before_sampling(eval_setup):
    config, root = eval_setup
    c = config.copy_and_resolve_references()
    c.eval.update(num_samples=8, min_samples=2048)
    with pytest.raises(ValueError, match=r"num_samples=8 is below config.eval.min_samples=2048"):
        jobs.run("eval", c, str(root / "w"))
    # Samples come in whole batches: a count that leaves a partial one would be misreported.
    c.eval.update(num_samples=12, min_samples=8)
    message = (
        r"config.eval.num_samples=12 is not a multiple of config.eval.batch_size=8: use 8 or 16"
    )
    with pytest.raises(ValueError, match=message):
        jobs.run("eval", c, str(root / "w"))


@pytest.mark.integration
def test_eval_needs_reference_statistics(eval_setup):
    config, root = eval_setup
    c = config.copy_and_resolve_references()
    c.eval.ref_stats = ""
    with pytest.raises(ValueError, match=r"--config.eval.ref_stats=<.npz>.*--mode fid_stats"):
        jobs.run("eval", c, str(root / "w"))


@pytest.mark.integration
def test_eval_without_inception_weights_says_how_to_import_them(eval_setup, tmp_path):
    config, root = eval_setup
    c = config.copy_and_resolve_references()
    c.eval.inception_path = str(tmp_path / "missing.npz")
    # Own reference statistics: the module's are written by another test, which may not have run.
    c.eval.ref_stats = save_stats(tmp_path / "ref.npz", np.zeros(2048), np.eye(2048))
    with pytest.raises(FileNotFoundError, match=r"--mode convert_inception"):
        jobs.run("eval", c, str(root / "w"))


@pytest.mark.integration
def test_fid_during_training_is_written_to_tensorboard(eval_setup, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    config, root = eval_setup
    c = config.copy_and_resolve_references()
    c.train.update(num_steps=2)
    c.train.evals.fid.every = 2
    c.eval.train_num_samples = 16
    train_job.train_job(c, str(tmp_path))
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    (fid,) = events.Tensors("train_fid/fid")
    assert fid.step == 2 and np.isfinite(float(tensor_util.make_ndarray(fid.tensor_proto)))
    (n,) = events.Tensors("train_fid/num_samples")
    assert float(tensor_util.make_ndarray(n.tensor_proto)) == 16


@pytest.mark.integration
def test_sweep_is_an_eval_per_cell_and_resumes_cell_by_cell(eval_setup, tmp_path, monkeypatch):
    import shutil

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from uvit_jax.jobs import evaluate as evaluate_job
    from uvit_jax.jobs import sweep as sweep_job

    config, root = eval_setup
    workdir = tmp_path / "w"
    shutil.copytree(root / "w" / "checkpoints", workdir / "checkpoints")
    c = config.copy_and_resolve_references()
    c.eval.ref_stats = str(tmp_path / "ref.npz")  # its own: another test writes the module's
    jobs.run("fid_stats", c, str(workdir))
    c.sample.update(sampler="dpm_solver++_3s", steps=2, cfg_scale=1.0, cfg_schedule="constant")
    jobs.run("eval", c, str(workdir))
    plain = json.loads((workdir / "eval" / "result_step_2.json").read_text())

    c.sweep.update(samplers=("dpm_solver++_3s", "unipc_bh2"), steps=(2, 3))
    rows = sweep_job.sweep_job(c, str(workdir))
    assert [(r["sampler"], r["steps"], r["nfe"]) for r in rows] == [
        ("dpm_solver++_3s", 2, 3),  # + the final denoising step
        ("dpm_solver++_3s", 3, 4),
        ("unipc_bh2", 2, 3),
        ("unipc_bh2", 3, 4),
    ]
    # The cell with the eval's own settings is that evaluation, read back.
    assert rows[0]["fid"] == plain["fid"] and rows[0]["protocol"] == plain["protocol"]
    assert len({r["fid"] for r in rows}) == 4  # each cell sampled with its own settings
    for r in rows:
        assert (r["protocol"]["sampler"], r["protocol"]["steps"]) == (r["sampler"], r["steps"])
        assert r["cfg_interval"] == "all" and np.isfinite(r["fid"]) and r["seconds"] >= 0
        assert r["cfg_schedule"] == r["protocol"]["cfg_schedule"] == "constant"
    csv_lines = (workdir / "sweep" / "step_2.csv").read_text().splitlines()
    header = (
        "sampler,steps,nfe,cfg_scale,cfg_interval,cfg_schedule,grid,guidance,guide,num_samples,fid"
    )
    assert csv_lines[0].startswith(header)
    assert len(csv_lines) == 5
    with Image.open(workdir / "sweep" / "step_2.png") as png:
        assert png.size == (640, 400)
    events = EventAccumulator(str(workdir / "sweep"), size_guidance={"tensors": 0})
    events.Reload()
    curve = events.Tensors("sweep/fid/unipc_bh2, cfg 1")
    assert sorted(e.step for e in curve) == [3, 4]

    # Run again: every cell is read back, nothing is sampled.
    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished sweep cell sampled again")

    monkeypatch.setattr(evaluate_job, "make_sample_batches", lambda *a, **k: no_sampling)
    again = sweep_job.sweep_job(c, str(workdir))
    assert [r["fid"] for r in again] == [r["fid"] for r in rows]


def test_sweep_cells_cover_the_guidance_schedules():
    from configs.fashion_mnist_uvit import get_config
    from uvit_jax.jobs.sweep import sweep_cells

    c = get_config("runlocal")
    c.sample.cfg_scale = 2.0  # the line names below spell the scale
    c.sweep.update(
        steps=(5, 10), cfg_intervals=((), (0.3, 6)), cfg_schedules=("constant", "linear")
    )
    cells = sweep_cells(c)
    assert [(x.steps, x.cfg_interval, x.cfg_schedule) for x in cells[:4]] == [
        (5, (), "constant"),
        (5, (), "linear"),
        (5, (0.3, 6.0), "constant"),
        (5, (0.3, 6.0), "linear"),
    ]
    assert len(cells) == 8 and cells[3].apply(c).sample.cfg_schedule == "linear"
    assert cells[3].line == "dpm_solver++_3s, cfg 2 in (0.3, 6], linear schedule"
    assert cells[0].line == "dpm_solver++_3s, cfg 2"  # constant: the line's name as before
    # Scale 0 beside them: one unguided cell per step count, which the config check accepts.
    c.sweep.cfg_scales = (0.0, 2.0)
    cells = sweep_cells(c)
    unguided = [x for x in cells if x.cfg_scale == 0]
    assert [(x.steps, x.cfg_interval, x.cfg_schedule) for x in unguided] == [
        (5, (), "constant"), (10, (), "constant")
    ]  # fmt: skip
    assert len(cells) == 2 + 8


@pytest.mark.integration
def test_sweep_checks_every_cell_before_sampling(eval_setup, monkeypatch):
    from uvit_jax.jobs import evaluate as evaluate_job

    config, root = eval_setup
    c = config.copy_and_resolve_references()
    # The run's model is flow matching, where Euler-Maruyama is not defined: its cell, after
    # a good one, is refused before anything is sampled.
    c.sweep.update(samplers=("dpm_solver++_3s", "euler_maruyama"))
    monkeypatch.setattr(evaluate_job, "make_sample_batches", lambda *a, **k: pytest.fail("sampled"))
    message = (
        r"config.sweep: the cell \(euler_maruyama, .*\): config.sample.sampler='euler_maruyama' "
        r"is not defined on formulation 'flow'"
    )
    with pytest.raises(ValueError, match=message):
        jobs.run("sweep", c, str(root / "w"))


@pytest.mark.integration
def test_ablate_trains_every_variant_alike_and_resumes_variant_by_variant(
    eval_setup, tmp_path, monkeypatch
):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import uvit_jax
    from uvit_jax.errors import ConfigError
    from uvit_jax.jobs import ablate
    from uvit_jax.train.step import TrainProgram

    config, _ = eval_setup
    c = config.copy_and_resolve_references()
    c.eval.ref_stats = str(tmp_path / "ref.npz")  # its own: another test writes the module's
    jobs.run("fid_stats", c, str(tmp_path / "stats"))
    c.train.update(num_steps=4)
    c.ablate.update(variants=("base:",), eval_every=2)
    workdir = tmp_path / "w"
    first = ablate.ablate_job(c, str(workdir))

    trained = []
    real_train_job = ablate.train_job
    monkeypatch.setattr(
        ablate, "train_job", lambda cfg, wd: trained.append(wd) or real_train_job(cfg, wd)
    )
    c.ablate.variants = ("base:", "deep: model.depth=4, train.batch_size=8")
    rows = ablate.ablate_job(c, str(workdir))
    # The finished variant is read back: neither trained nor evaluated again.
    assert trained == [str(workdir / "ablate" / "deep" / "seed0")]
    assert [(r["variant"], r["seed"], r["step"]) for r in rows] == [
        ("base", 0, 2), ("base", 0, 4), ("deep", 0, 2), ("deep", 0, 4)
    ]  # fmt: skip
    assert [r["fid"] for r in rows[:2]] == [r["fid"] for r in first]
    assert rows[2]["fields"] == "model.depth=4; train.batch_size=8"
    assert len({r["fid"] for r in rows}) == 4 and all(np.isfinite(r["fid"]) for r in rows)
    deep = uvit_jax.load(workdir / "ablate" / "deep" / "seed0", step=2)
    assert (deep.config.model.depth, deep.config.train.batch_size) == (4, 8)
    assert deep.config.seed == 0 and deep.config.data.latent_dir == config.data.latent_dir
    assert len((workdir / "ablate" / "results.csv").read_text().splitlines()) == 5
    with Image.open(workdir / "ablate" / "fid.png") as png:
        assert png.size == (640, 400)
    events = EventAccumulator(str(workdir / "ablate"), size_guidance={"tensors": 0})
    events.Reload()
    assert sorted(e.step for e in events.Tensors("ablate/fid/deep/seed0")) == [2, 4]

    # Every variant is checked before any trains; each problem is named with its variant.
    monkeypatch.setattr(TrainProgram, "compile", lambda *a: pytest.fail("compiled"))
    c.ablate.variants = ("base:", "heads: model.num_heads=3", "typo: model.dpth=2")
    with pytest.raises(ConfigError, match=r"heads \(model.num_heads=3\): .*does not divide"
                                          r"(.|\n)*typo \(model.dpth=2\): config.model.dpth: "
                                          r"no such field"):  # fmt: skip
        ablate.ablate_job(c, str(workdir))
