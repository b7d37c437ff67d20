"""The jobs `main.py --mode` runs; each is an importable function of (config, workdir)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import jax
from flax import nnx


def train(config, workdir: str) -> None:
    from uvit_jax.train.loop import train_and_evaluate

    train_and_evaluate(config, workdir)


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


def extract(config, workdir: str) -> None:
    from input_pipeline.extract import run_extraction

    run_extraction(config, workdir)


MODES: dict[str, Callable] = {"train": train, "convert": convert, "extract": extract}


def run(mode: str, config, workdir: str) -> None:
    """Runs job `mode`; a mode this version does not have fails with the list of those it has."""
    if mode not in MODES:
        raise ValueError(f"--mode={mode!r} is not available; modes: {', '.join(sorted(MODES))}")
    logging.info(
        "%s on %d devices (%s), workdir %s",
        mode,
        jax.device_count(),
        jax.devices()[0].device_kind,
        os.path.abspath(workdir),
    )
    MODES[mode](config, workdir)
