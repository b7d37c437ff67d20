"""The optional Weights & Biases writer (config.logging.wandb): an offline run written through
`dashboard.metric_writer` is read back from its transaction log, values and steps exact; off,
the factory never imports wandb; on without wandb, a one-line ConfigError."""

import glob
import json
import os
import struct
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from uvit_jax.config_defaults import default_config
from uvit_jax.errors import ConfigError
from uvit_jax.train import dashboard


def wandb_config(**fields):
    config = default_config()
    config.logging.wandb.update({"enabled": True, "mode": "offline", **fields})
    return config


@pytest.fixture
def quiet_wandb(monkeypatch, tmp_path):
    """No console capture, system metrics, git or banner, and nothing written to ~/."""
    for name, value in dict(
        WANDB_SILENT="true",
        WANDB_CONSOLE="off",
        WANDB__DISABLE_STATS="true",
        WANDB__DISABLE_META="true",
        WANDB_DISABLE_GIT="true",
        WANDB_DISABLE_CODE="true",
        WANDB_CONFIG_DIR=str(tmp_path / "wandb_config"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb_cache"),
        WANDB_DATA_DIR=str(tmp_path / "wandb_data"),
    ).items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_PROJECT"):
        monkeypatch.delenv(name, raising=False)


def transaction_log(path: str):
    """The protobuf Records of a run's `.wandb` file: a LevelDB-style log (":W&B", magic 0xBEE1,
    version 0; 32 KiB blocks of records with a CRC-32 of type + data, length and type
    FULL / FIRST / MIDDLE / LAST), as wandb-core writes it."""
    from wandb.proto import wandb_internal_pb2

    data = open(path, "rb").read()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:  # zero padding
            continue
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def nested(items) -> dict:
    """{key: value} of history / summary items, nested where wandb nests (media fields)."""
    out: dict = {}
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = out
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = json.loads(item.value_json)
    return out


@pytest.mark.integration  # wandb.init starts wandb's service process (wandb-core)
def test_offline_run_reads_back_what_was_written(tmp_path, quiet_wandb):
    pytest.importorskip("wandb")
    from clu import metric_writers

    workdir = tmp_path / "run7"
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 256, (1, 6, 8, 3), dtype=np.uint8)  # the trainer's grid[None]
    gray = rng.random((2, 5, 4, 1)).astype(np.float32)  # floats in [0, 1], one channel
    protocol = json.dumps({"num_samples": 2048, "ref": "test.npz", "seed": 0}, indent=2)
    hparams = {"model.embed_dim": 96, "optim.lr": 2e-4, "name": "fmnist", "train.ema_warmup": False}

    writer = dashboard.metric_writer(wandb_config(name="t", tags=("a", "b")), str(workdir))
    assert isinstance(writer, metric_writers.MultiWriter)
    writer.write_hparams(hparams)
    writer.write_scalars(0, {"compile_seconds": 1.25})
    writer.write_scalars(100, {"loss": np.float32(0.1), "grad_norm": 2.0})
    writer.write_scalars(200, {"loss": 0.25})
    writer.write_images(200, {"samples": samples, "gray": gray})
    writer.write_scalars(200, {"train_fid/fid": 12.5})  # the same step, another call
    writer.write_texts(200, {"eval/protocol": protocol})
    writer.write_scalars(150, {"late": 3})  # lower than the last step: wandb would drop it
    writer.write_scalars(250, {"loss": 0.125})
    writer.close()

    assert glob.glob(str(workdir / "events.out.tfevents.*"))  # TensorBoard still written
    (run_dir,) = glob.glob(str(workdir / "wandb" / "offline-run-*"))
    (log,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    records = list(transaction_log(log))
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "exit" in kinds  # close() finished the run

    (run,) = [r.run for r in records if r.HasField("run")]
    assert (run.project, run.display_name, run.job_type) == ("uvit_jax", "t", "train")
    assert (run.run_group, list(run.tags)) == ("run7", ["a", "b"])

    config = {}
    for r in records:
        if r.HasField("config"):
            config.update(nested(r.config.update))
    assert {k: config[k] for k in hparams} == hparams

    metrics = {(m.name, m.glob_name, m.step_metric) for r in records if r.HasField("metric")
               for m in [r.metric]}  # fmt: skip
    assert ("", "*", "train/step") in metrics

    rows = [nested(r.history.item) for r in records if r.HasField("history")]
    for row in rows:
        for key in ("_timestamp", "_runtime"):
            row.pop(key)
    images = rows[2].pop("samples"), rows[2].pop("gray")
    assert rows == [
        {"_step": 0, "train/step": 0, "compile_seconds": 1.25},
        {"_step": 100, "train/step": 100, "loss": float(np.float32(0.1)), "grad_norm": 2.0},
        {"_step": 200, "train/step": 200, "loss": 0.25, "train_fid/fid": 12.5,
         "eval/protocol": protocol},
        {"_step": 201, "train/step": 150, "late": 3},  # kept, at its true step
        {"_step": 250, "train/step": 250, "loss": 0.125},
    ]  # fmt: skip

    def png(name):
        return np.asarray(Image.open(os.path.join(run_dir, "files", name)))

    one, two = images
    assert one["_type"] == "image-file" and (one["width"], one["height"]) == (8, 6)
    np.testing.assert_array_equal(png(one["path"]), samples[0])
    assert two["_type"] == "images/separated" and two["count"] == 2
    as_bytes = np.clip(gray * np.float64(255.5), 0, 255).astype(np.uint8)[..., 0]  # as TF does
    for name, expected in zip(two["filenames"], as_bytes, strict=True):
        np.testing.assert_array_equal(png(name), expected)


def test_off_imports_no_wandb_and_on_without_it_is_one_line(tmp_path, monkeypatch):
    from clu import metric_writers

    for name in ("wandb", "uvit_jax.train.wandb_writer"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    writer = dashboard.metric_writer(default_config(), str(tmp_path / "off"))
    writer.close()
    assert isinstance(writer, metric_writers.AsyncWriter)  # what the trainer had before
    assert "wandb" not in sys.modules and "uvit_jax.train.wandb_writer" not in sys.modules
    assert not (tmp_path / "off" / "wandb").exists()

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError) as e:
        dashboard.metric_writer(wandb_config(), str(tmp_path / "on"))
    message = str(e.value)
    assert "\n" not in message
    assert "config.logging.wandb.enabled" in message and 'pip install -e ".[wandb]"' in message

    # Processes other than 0 write nothing, W&B included (no import, no run).
    monkeypatch.setattr(dashboard.jax, "process_index", lambda: 1)
    writer = dashboard.metric_writer(wandb_config(), str(tmp_path / "other"))
    assert isinstance(writer, metric_writers.MultiWriter) and not (tmp_path / "other").exists()


def test_bad_mode_is_a_config_error(tmp_path):
    pytest.importorskip("wandb")
    with pytest.raises(ConfigError, match=r"config.logging.wandb.mode='cloud'"):
        dashboard.metric_writer(wandb_config(mode="cloud"), str(tmp_path))
