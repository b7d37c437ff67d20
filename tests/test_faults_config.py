"""Nothing silent, round two: every config field is checked by `jobs.run` before a job compiles
or reads anything (uvit_jax/config_checks.py), and `--mode sample` names and records its
settings."""

import importlib
import json
import numbers
import pkgutil
import re
import subprocess
import sys

import numpy as np
import pytest
from runs import REPO, small_config, subprocess_env

import configs
from configs.fashion_mnist_uvit import get_config
from uvit_jax import checkpoints, jobs
from uvit_jax.config_checks import FIELD_CHECKS, check_config
from uvit_jax.config_defaults import default_config
from uvit_jax.errors import ConfigError


class Reached(Exception):
    """The job started (device set-up): the config was not refused first."""


@pytest.fixture
def no_job(monkeypatch):
    def reached():
        raise Reached()

    monkeypatch.setattr(jobs, "initialize_distributed", reached)


def _set(config, field, value):
    *sections, name = field.split(".")
    node = config
    for key in sections:
        node = node[key]
    node[name] = value


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "mode,field,value,message",
    [
        ("train", "train.ema_rate", 1.5, r"config.train.ema_rate=1.5: expected a finite number "
                                         r"in \[0, 1\)$"),
        ("train", "train.ema_rate", -0.5, r"config.train.ema_rate=-0.5: expected a finite "
                                          r"number in \[0, 1\)$"),
        ("sample", "sample.cfg_scale", NAN, r"config.sample.cfg_scale=nan: expected a finite "
                                            r"number >= 0$"),
        ("eval", "sample.cfg_scale", -1.0, r"config.sample.cfg_scale=-1.0: expected a finite "
                                           r"number >= 0$"),
        ("train", "optim.lr", NAN, r"config.optim.lr=nan: expected a finite number > 0$"),
        ("train", "optim.lr", 0.0, r"config.optim.lr=0.0: expected a finite number > 0$"),
        ("train", "optim.b2", 1.0, r"config.optim.b2=1.0: expected a finite number in \[0, 1\)$"),
        ("train", "optim.eps", INF, r"config.optim.eps=inf: expected a finite number >= 0$"),
        ("train", "optim.weight_decay", NAN, r"config.optim.weight_decay=nan: expected a "
                                             r"finite number >= 0$"),
        ("train", "optim.grad_clip", -1.0, r"config.optim.grad_clip=-1.0: expected a finite "
                                           r"number >= 0$"),
        ("train", "optim.schedule", "cos", r"config.optim.schedule='cos': expected one of "
                                           r"'constant', 'cosine', 'linear'$"),
        ("train", "optim.name", "adam", r"config.optim.name='adam': expected one of "
                                        r"'adamw', 'muon'$"),
        ("train", "optim.muon_rms", 0.0, r"config.optim.muon_rms=0.0: expected a finite "
                                         r"number > 0$"),
        ("sample", "sample.sampler", "dpm_solver_fats", r"config.sample.sampler="
         r"'dpm_solver_fats': expected one of 'dpm_solver_fast', .*'probability_flow'$"),
        ("train", "sample.sampler", "dpm", r"config.sample.sampler='dpm': expected one of "),
        ("sample", "sample.grid", "uniform", r"config.sample.grid='uniform': expected one of '', "
                                             r"'time_uniform', 'logSNR'"),
        ("sample", "sample.cfg_schedule", "cosine", r"config.sample.cfg_schedule='cosine': "
                                                    r"expected one of 'constant', 'linear'$"),
        ("train", "diffusion.formulation", "vp", r"config.diffusion.formulation='vp': expected "
                                                 r"one of 'vp_continuous', 'sd_discrete', "
                                                 r"'sd_zero_snr', 'flow'$"),
        ("train", "diffusion.target", "noise", r"config.diffusion.target='noise': expected one "
                                               r"of 'eps', 'x0', 'v', 'velocity'$"),
        ("train", "diffusion.time_sampling", "lognormal", r"config.diffusion.time_sampling="
                                                          r"'lognormal': expected one of "
                                                          r"'uniform', 'logit_normal'$"),
        ("train", "diffusion.loss_weighting", "snr", r"config.diffusion.loss_weighting='snr': "
                                                     r"expected one of 'none', 'min_snr', "),
        ("train", "train.evals.fid.type", "fdi", r"config.train.evals.fid.type='fdi': expected "
                                                 r"one of fid, sample_grid$"),
        ("sample", "sample.num_samples", 0, r"config.sample.num_samples=0: expected an integer "
                                            r">= 1$"),
        ("sample", "sample.steps", 0, r"config.sample.steps=0: expected an integer >= 1$"),
        ("eval", "eval.batch_size", 0, r"config.eval.batch_size=0: expected an integer >= 1$"),
        ("eval", "eval.protocol", "tf", r"config.eval.protocol='tf': expected one of "
                                        r"'pytorch_fid', 'tf_graph'$"),
        ("sweep", "sweep.samplers", ("heun", "hune"), r"config.sweep.samplers=\('heun', 'hune'\)"
         r": expected a list of one of .* \(element 'hune' is not\)$"),
        ("sweep", "sweep.cfg_scales", (0.0, NAN), r"config.sweep.cfg_scales=\(0.0, nan\): "
         r"expected a list of a finite number >= 0 \(element nan is not\)$"),
        ("train", "model.patch_size", 0, r"config.model.patch_size=0: expected an integer >= 1$"),
        ("train", "mesh.fsdp", 0, r"config.mesh.fsdp=0: expected an integer >= 1 or -1$"),
        ("train", "diffusion.p_uncond", 1.5, r"config.diffusion.p_uncond=1.5: expected a finite "
                                             r"number in \[0, 1\]$"),
    ],
)  # fmt: skip
def test_a_field_out_of_range_fails_in_one_line_before_the_job_starts(
    tmp_path, no_job, mode, field, value, message
):
    config = get_config("runlocal")
    _set(config, field, value)
    with pytest.raises(ConfigError, match=message) as e:
        jobs.run(mode, config, str(tmp_path / "workdir"))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "workdir").exists()  # nothing written


def test_the_edges_of_the_ranges_pass(tmp_path, no_job):
    config = get_config("runlocal")
    config.train.ema_rate = 0.0
    config.sample.cfg_scale = 0.0
    config.optim.update(weight_decay=0.0, eps=0.0, grad_clip=0.0)
    config.mesh.data = -1
    with pytest.raises(Reached):  # passed the checks, reached the job
        jobs.run("train", config, str(tmp_path))


def _config_variants():
    for info in pkgutil.iter_modules(configs.__path__):
        module = importlib.import_module(f"configs.{info.name}")
        if not hasattr(module, "get_config"):
            continue
        for arg in ("", "runlocal", "paper_recipe", "deep", "deep,runlocal"):
            try:
                config = module.get_config(arg)
            except ValueError:  # the argument is not one of this config's
                continue
            yield pytest.param(config, id=f"{info.name}:{arg}")


@pytest.mark.parametrize("config", list(_config_variants()))
def test_every_shipped_config_passes_the_checks(config, monkeypatch):
    for mode in jobs.MODES:
        jobs.check(mode, config)


def test_the_shipped_configs_are_all_checked():
    ids = {p.id for p in _config_variants()}
    assert {"fashion_mnist_uvit:paper_recipe", "mscoco_uvit_small:deep", "cifar10_uvit_small:",
            "imagenet256_uvit_huge:runlocal"} <= ids  # fmt: skip


def _numeric_leaves(node, prefix=""):
    for key, value in node.items():
        field = f"{prefix}{key}"
        if hasattr(value, "items"):
            if field not in ("autoencoder.ddconfig", "train.evals"):  # free-form sections
                yield from _numeric_leaves(value, field + ".")
        elif isinstance(value, numbers.Number) and not isinstance(value, bool):
            yield field


def test_every_number_of_the_schema_has_its_check():
    missing = [f for f in _numeric_leaves(default_config()) if f not in FIELD_CHECKS]
    assert not missing, f"add these fields' ranges to config_checks.FIELD_CHECKS: {missing}"


def test_every_check_names_a_field_of_the_schema():
    defaults = default_config()
    for field in FIELD_CHECKS:
        node = defaults
        for key in field.split("."):
            assert key in node, field
            node = node[key]


def test_every_registry_backed_field_is_given_its_names():
    registries = jobs.registry_choices()
    for field, check in FIELD_CHECKS.items():
        if getattr(check, "registry", False):
            assert field in registries, field
    check_config(default_config(), registries)


def test_literal_names_agree_with_their_modules():
    from uvit_jax.train.wandb_writer import MODES

    assert FIELD_CHECKS["logging.wandb.mode"].choices == MODES


def test_a_config_saved_before_a_field_existed_is_checked_on_what_it_has():
    config = default_config()
    del config.sample["cfg_schedule"]
    check_config(config, jobs.registry_choices())


# ---- --mode sample: file names and settings -------------------------------------------------


@pytest.mark.integration  # the sample job end to end on 8 devices, twice (~10 s)
def test_sample_runs_with_other_settings_keep_both_outputs_and_record_them(tmp_path):
    from uvit_jax.parallel.mesh import make_mesh
    from uvit_jax.train.optimizer import make_optimizer
    from uvit_jax.train.state import create_train_state

    config = small_config()
    config.model.update(embed_dim=32)
    config.sample.update(num_samples=8, batch_size=8, steps=3, denoise_to_zero=False)
    mesh = make_mesh(config.mesh)
    state = create_train_state(config.model, make_optimizer(config.optim, 10), mesh, 0)
    manager = checkpoints.open_manager(tmp_path)
    item, ema = state.checkpoint_items()
    checkpoints.save(manager, 7, ema=ema, config=config, state=item)  # saved: no denoise
    manager.wait_until_finished()

    plain = config.copy_and_resolve_references()
    denoised = config.copy_and_resolve_references()
    denoised.sample.denoise_to_zero = True  # as --config.sample.denoise_to_zero=True
    from uvit_jax.jobs.sample import sample_job

    first, second = sample_job(plain, str(tmp_path)), sample_job(denoised, str(tmp_path))
    assert first != second
    a, b = np.load(first), np.load(second)
    # The command line's field won over the checkpoint's: one more NFE, other images.
    assert not np.array_equal(a["arr_0"], b["arr_0"])
    settings_a, settings_b = json.loads(str(a["settings"])), json.loads(str(b["settings"]))
    assert settings_a["sample"]["denoise_to_zero"] is False
    assert settings_b["sample"]["denoise_to_zero"] is True
    for key, value in dict(sampler=config.sample.sampler, steps=3, num_samples=8).items():
        assert settings_b["sample"][key] == value
    assert {"cfg_scale", "cfg_interval", "cfg_schedule", "grid", "batch_size"} <= set(
        settings_b["sample"]
    )
    assert settings_b["seed"] == 0 and settings_b["step"] == 7 and settings_b["ema"] is True
    assert settings_b["labels"] == "sample j: class j mod 10"
    names = sorted(p.name for p in (tmp_path / "samples").glob("sample_step7_seed0_*.npz"))
    assert len(names) == 2


def _main_py(tmp_path, case: str) -> list[str]:
    """main.py's arguments for one of the ways a command line can be wrong before any job."""
    default = str(REPO / "configs/fashion_mnist_uvit.py")
    (tmp_path / "raises.py").write_text('def get_config():\n    raise RuntimeError("boom")\n')
    (tmp_path / "syntax.py").write_text("def get_config(:\n")
    (tmp_path / "a_file").write_text("")
    w = str(tmp_path / "w")
    return {
        "missing config file": ["--config", str(tmp_path / "nope.py"), "--workdir", w],
        "misspelt field": ["--config", default, "--workdir", w, "--config.trian.batch_size=3"],
        "config file raises": ["--config", str(tmp_path / "raises.py"), "--workdir", w],
        "config file syntax": ["--config", str(tmp_path / "syntax.py"), "--workdir", w],
        "workdir under a file": ["--config", default, "--workdir", str(tmp_path / "a_file/w")],
        "convert source missing": ["--config", default, "--workdir", w, "--mode", "convert",
                                   f"--config.convert.source={tmp_path / 'nope.pth'}"],
        "eval without reference": ["--config", default, "--workdir", w, "--mode", "eval",
                                   "--config.eval.ref_stats="],
        "reference missing": ["--config", default, "--workdir", w, "--mode", "eval",
                              f"--config.eval.ref_stats={tmp_path / 'nope.npz'}"],
        "inception missing": ["--config", default, "--workdir", w, "--mode", "fid_stats",
                              f"--config.eval.inception_path={tmp_path / 'nope_inception.npz'}",
                              f"--config.eval.ref_stats={tmp_path / 'ref.npz'}"],
    }[case]  # fmt: skip


@pytest.mark.integration
@pytest.mark.parametrize(
    "case, message",
    [
        ("missing config file", r"error: --config: OSError: .*nope.py"),
        ("misspelt field", r"error: --config: no such field 'trian' Did you mean \"train\""),
        ("config file raises", r"error: --config: RuntimeError: boom$"),
        ("config file syntax", r"error: --config: SyntaxError: invalid syntax \(syntax.py"),
        ("workdir under a file", r"error: --workdir=.*a_file/w: cannot be a folder \(Not a dir"),
        ("convert source missing", r"error: checkpoint file not found: .*nope.pth$"),
        ("eval without reference", r"error: evaluation needs a reference: --config.eval.ref_stats"),
        ("reference missing", r"error: FID reference statistics not found: .*nope.npz$"),
        ("inception missing", r"error: converted Inception weights not found: .*nope_inception"),
    ],
)
def test_command_line_mistakes_are_one_line_and_exit_status_2(tmp_path, case, message):
    command = [sys.executable, str(REPO / "main.py"), *_main_py(tmp_path, case)]
    run = subprocess.run(command, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    lines = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert len(lines) == 1 and re.search(message, lines[0]), run.stderr[-3000:]
