"""`--mode convert`: an official `.pth` becomes an orbax checkpoint that restores exactly."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from numerics import relative_error

from uvit_jax import checkpoints, jobs
from uvit_jax.config_defaults import default_config
from uvit_jax.models.uvit import abstract_uvit, apply_fn


def golden_as_pth(golden_dir, tmp_path):
    torch = pytest.importorskip("torch", reason="writing a .pth needs PyTorch")
    d = np.load(golden_dir / "uvit_class_cond.npz")
    sd = {
        k.removeprefix("param/"): torch.from_numpy(d[k]) for k in d.files if k.startswith("param/")
    }
    path = tmp_path / "nnet_ema.pth"
    torch.save(sd, path)
    return path, d


def test_pth_to_orbax_round_trip(golden_dir, tmp_path):
    path, d = golden_as_pth(golden_dir, tmp_path)
    official = json.loads(str(d["config"]))
    config = default_config()
    config.model.update({k: v for k, v in official.items() if k in config.model}, dtype="float32")
    config.convert.source = str(path)
    jobs.run("convert", config, str(tmp_path / "w"))

    model = abstract_uvit(config.model)
    graphdef, target = nnx.split(model)
    with checkpoints.open_manager(tmp_path / "w", read_only=True) as manager:
        step = checkpoints.good_step(manager, None, ("ema",))
        saved = checkpoints.read_config(manager, step)
        ema = checkpoints.restore(manager, step, ema_target=target)["ema"]
    assert step == 0 and saved["model"]["embed_dim"] == official["embed_dim"]
    out = apply_fn(graphdef)(ema, d["x"].transpose(0, 2, 3, 1), d["t"], d["y"], None)
    assert relative_error(jax.device_get(out), d["out"].transpose(0, 2, 3, 1)) < 1e-5

    with pytest.raises(checkpoints.CheckpointError, match="already holds checkpoints"):
        jobs.run("convert", config, str(tmp_path / "w"))


def test_unknown_mode_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"--mode='nope' is not available; modes: .*convert"):
        jobs.run("nope", default_config(), "/tmp/unused")


def test_convert_without_source_says_which_field():
    with pytest.raises(ValueError, match=r"--config.convert.source"):
        jobs.run("convert", default_config(), "/tmp/unused")
