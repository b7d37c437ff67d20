"""The jobs `main.py --mode` runs; each is an importable function of (config, workdir)."""

from __future__ import annotations

import importlib
import logging
import os

import jax
from flax import nnx

from uvit_jax.parallel.distributed import initialize_distributed


def convert(config, workdir: str) -> None:
    """Official U-ViT `.pth` (config.convert.source) -> an orbax checkpoint in `workdir`.

    The checkpoint holds the weights as the `ema` item at step 0 (the official release ships
    EMA weights as `nnet_ema.pth`) and the config; sampling, evaluation and `uvit_jax.load`
    restore it like a trained run.
    """
    from uvit_jax import checkpoints
    from uvit_jax.convert.state_dict import load_state_dict
    from uvit_jax.convert.uvit import uvit_from_official

    source = config.convert.source
    if not source:
        raise ValueError("--mode convert needs --config.convert.source=<official .pth file>")
    model = uvit_from_official(load_state_dict(source), config.model)
    manager = checkpoints.open_manager(workdir, keep=None)
    if manager.latest_step() is not None:
        raise checkpoints.CheckpointError(
            f"{workdir} already holds checkpoints (steps {list(manager.all_steps())}); "
            "convert into an empty --workdir"
        )
    checkpoints.save(manager, 0, ema=nnx.state(model, nnx.Param), config=config)
    manager.wait_until_finished()
    manager.close()
    logging.info("converted %s -> %s (step 0)", source, checkpoints.checkpoint_dir(workdir))


def convert_autoencoder(config, workdir: str) -> None:
    """LDM / Stable Diffusion / diffusers autoencoder file -> config.autoencoder.pretrained_path."""
    from uvit_jax.convert.autoencoder import convert_file

    if not config.convert.source or not config.autoencoder.pretrained_path:
        raise ValueError(
            "--mode convert_autoencoder needs --config.convert.source=<autoencoder file> and "
            "--config.autoencoder.pretrained_path=<output folder>"
        )
    del workdir
    convert_file(config.convert.source, config.autoencoder.pretrained_path)


# mode -> "module:function"; imported only when run, so `main.py --mode convert` never loads
# TensorFlow (clu) and `--mode train` never loads torch.
MODES: dict[str, str] = {
    "train": "uvit_jax.train.loop:train_and_evaluate",
    "extract": "input_pipeline.extract:run_extraction",
    "convert": "uvit_jax.jobs:convert",
    "convert_autoencoder": "uvit_jax.jobs:convert_autoencoder",
    "convert_inception": "uvit_jax.evaluation.job:convert_inception",
    "fid_stats": "uvit_jax.evaluation.job:fid_stats",
    "eval": "uvit_jax.evaluation.job:evaluate",
    "sample": "uvit_jax.sampling.job:sample_job",
}


def run(mode: str, config, workdir: str) -> None:
    """Runs job `mode`; a mode this version does not have fails with the list of those it has."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is not available; modes: {', '.join(sorted(MODES))}")
    initialize_distributed()  # before any device use; a no-op for one process
    logging.info(
        "%s on %d devices (%s), workdir %s",
        mode,
        jax.device_count(),
        jax.devices()[0].device_kind,
        os.path.abspath(workdir),
    )
    module, function = MODES[mode].split(":")
    getattr(importlib.import_module(module), function)(config, workdir)
