"""A clu MetricWriter that sends what TensorBoard gets to a Weights & Biases run.

`dashboard.metric_writer` adds it beside TensorBoard's writer when
`config.logging.wandb.enabled` (process 0 only); wandb is imported here, lazily, and only then.

Steps: clu callers give each write its own step and do not keep them increasing (the trainer
writes `compile_seconds` at the start step, then the interval scalars, sample grid and FID of
one step in separate calls; a restarted or resumed run writes steps again; `--mode sweep` uses
the NFE, which goes up and down across samplers). wandb drops, with a warning, a `log(step=s)`
below the last step it logged. So every row also holds the caller's step under
`step_metric` ("train/step"; `define_metric` makes it the x-axis of every chart), and the
writer picks W&B's own row number (`_step`):
  - a step above the last row: that step itself (the usual case: `_step` == training step, so
    W&B's media slider shows training steps too);
  - the same step as the previous write: the same row (wandb merges the values);
  - any other step (lower, or equal to a row already passed): the next free row, where it is
    kept with its true step in `step_metric`.
Nothing is dropped, and charts plot each value at the caller's step.

What each write becomes:
  scalars     numbers (Python int / float / bool);
  images      [N, H, W, C] or [H, W, C], uint8 or float in [0, 1] (converted as TensorBoard
              does: x * 255.5, saturated): one wandb.Image, or a list of N;
  texts       the strings themselves (shown in the run's summary and tables);
  histograms  wandb.Histogram of the finite values (num_buckets, default 64 bins);
  hparams     the run's config (flat keys, as given);
  summaries, videos, audios: not sent (TensorBoard keeps them; this project writes none).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
from clu.metric_writers import interface

from uvit_jax.errors import ConfigError

INSTALL = 'pip install -e ".[wandb]"'
MODES = ("online", "offline", "disabled")


def import_wandb():
    """The wandb module, or a one-line ConfigError naming the field and the install command."""
    try:
        return importlib.import_module("wandb")
    except ImportError as e:
        raise ConfigError(
            f"config.logging.wandb.enabled=True needs the wandb package ({e}): {INSTALL}"
        ) from None


def _plain(value: Any) -> Any:
    """A numpy / jax scalar as the Python number wandb serialises exactly."""
    if isinstance(value, int | float | bool | str):
        return value
    array = np.asarray(value)
    return array.item() if array.size == 1 else array.tolist()


def _uint8_images(value: Any) -> np.ndarray:
    """[N, H, W, C] uint8, as TensorBoard's image summary turns floats in [0, 1] into bytes."""
    array = np.asarray(value)
    if array.ndim == 3:
        array = array[None]
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating):
            array = np.nan_to_num(array.astype(np.float64)) * 255.5
        array = np.clip(array, 0, 255).astype(np.uint8)
    return array


class WandbWriter(interface.MetricWriter):
    """Writes to one W&B run; `close()` finishes it."""

    def __init__(self, run, step_metric: str = "train/step"):
        self._run = run
        self._wandb = import_wandb()
        self._step_metric = step_metric
        self._row = int(getattr(run, "step", 0) or 0) - 1  # the last W&B row (_step) written
        self._row_step: int | None = None  # the caller's step of that row
        self._warned: set[str] = set()
        self._closed = False
        run.define_metric(step_metric)
        run.define_metric("*", step_metric=step_metric)

    @classmethod
    def from_config(
        cls, wandb_config, workdir: str, *, job_type: str = "train", step_metric: str = "train/step"
    ) -> WandbWriter:
        """A new (or, with `id` set, resumed) run as `config.logging.wandb` describes it."""
        wandb = import_wandb()
        mode = str(wandb_config.get("mode", "online"))
        if mode not in MODES:
            raise ConfigError(f"config.logging.wandb.mode={mode!r}: expected one of {MODES}")
        root = str(wandb_config.get("dir", "")) or os.fspath(workdir)
        if "://" in root:
            raise ConfigError(
                f"config.logging.wandb.dir: W&B needs a local folder for its files, and the "
                f"workdir {root} is not one; set config.logging.wandb.dir"
            )
        os.makedirs(root, exist_ok=True)
        run_id = str(wandb_config.get("id", "")) or None
        tags = wandb_config.get("tags", ())
        tags = [tags] if isinstance(tags, str) else [str(t) for t in tags]
        group = str(wandb_config.get("group", "")) or os.path.basename(
            os.path.normpath(os.path.abspath(workdir))
        )
        try:
            run = wandb.init(
                project=str(wandb_config.get("project", "")) or None,
                entity=str(wandb_config.get("entity", "")) or None,
                name=str(wandb_config.get("name", "")) or None,
                group=group,
                tags=tags or None,
                job_type=job_type,
                mode=mode,
                dir=root,
                id=run_id,
                resume="allow" if run_id else None,
                reinit="create_new",  # another writer's run (eval after train) stays open
            )
        except wandb.errors.Error as e:
            raise ConfigError(
                f"config.logging.wandb: wandb.init failed ({mode} mode): {e}".replace("\n", " ")
            ) from e
        return cls(run, step_metric=step_metric)

    @property
    def run(self):
        return self._run

    def _log(self, step: int, values: Mapping[str, Any]) -> None:
        if not values:
            return
        step = int(step)
        if step > self._row:
            self._row = step
        elif step != self._row_step:
            self._row += 1
        self._row_step = step
        self._run.log({**values, self._step_metric: step}, step=self._row)

    def _not_sent(self, kind: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logging.warning("W&B writer: %s are not sent to W&B (TensorBoard has them)", kind)

    def write_scalars(self, step: int, scalars: Mapping[str, Any]):
        self._log(step, {k: _plain(v) for k, v in scalars.items()})

    def write_images(self, step: int, images: Mapping[str, Any]):
        out = {}
        for key, value in images.items():
            batch = _uint8_images(value)
            pictures = [
                self._wandb.Image(image[..., 0] if image.shape[-1] == 1 else image)
                for image in batch
            ]
            out[key] = pictures[0] if len(pictures) == 1 else pictures
        self._log(step, out)

    def write_texts(self, step: int, texts: Mapping[str, str]):
        self._log(step, {k: str(v) for k, v in texts.items()})

    def write_histograms(
        self, step: int, arrays: Mapping[str, Any], num_buckets: Mapping[str, int] | None = None
    ):
        out = {}
        for key, value in arrays.items():
            values = np.asarray(value, np.float64).ravel()
            values = values[np.isfinite(values)]
            bins = int((num_buckets or {}).get(key, 64))
            out[key] = self._wandb.Histogram(np_histogram=np.histogram(values, bins=bins))
        self._log(step, out)

    def write_hparams(self, hparams: Mapping[str, Any]):
        self._run.config.update({k: _plain(v) for k, v in hparams.items()}, allow_val_change=True)

    def write_summaries(self, step, values, metadata=None):
        self._not_sent("tensor summaries")

    def write_videos(self, step, videos):
        self._not_sent("videos")

    def write_audios(self, step, audios, *, sample_rate):
        self._not_sent("audios")

    def flush(self):
        """Nothing to do: `log` hands each row to wandb's service process at once."""

    def close(self):
        if not self._closed:
            self._closed = True
            self._run.finish()
