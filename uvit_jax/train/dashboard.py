"""What a training run shows: interval means of the step's metrics, flat hparams, the log line.

A logged loss of one step is the noise of one batch; the loop instead adds every step's metrics
up inside the jitted step (`accumulating`: no host sync and no extra dispatch per step) and at
each log point turns the sums into means over the steps since the previous one
(`interval_scalars`). `metric_writer` is what every job writes them with: TensorBoard, and
Weights & Biases beside it where `config.logging.wandb.enabled`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from clu import metric_writers

Array = jax.Array
Totals = dict[str, Array]
HParam = int | float | bool | str


def zero_totals(num_levels: int) -> Totals:
    """Sums over no steps: steps, loss, grad_norm (float32 scalars); loss_by_t_sum and
    loss_by_t_count ([num_levels] float32, as the train step returns them)."""
    scalar = jnp.zeros((), jnp.float32)
    levels = jnp.zeros((num_levels,), jnp.float32)
    return dict(
        steps=scalar, loss=scalar, grad_norm=scalar, loss_by_t_sum=levels, loss_by_t_count=levels
    )


def add_step(totals: Totals, metrics: Mapping[str, Array]) -> Totals:
    """`totals` plus one step's metrics (the train step's dict).

    A step whose loss or gradient is not finite adds nothing: it was not applied
    (train.on_nonfinite='skip'; `nonfinite_steps` counts it), and one NaN would hide the loss
    of every other step of its interval.
    """
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
    step = dict(
        steps=jnp.ones((), jnp.float32),
        loss=metrics["loss"],
        grad_norm=metrics["grad_norm"],
        loss_by_t_sum=metrics["loss_by_t_sum"],
        loss_by_t_count=metrics["loss_by_t_count"],
    )
    return {k: totals[k] + jnp.where(finite, v, jnp.zeros_like(v)) for k, v in step.items()}


def accumulating(step_fn: Callable) -> Callable:
    """step(state, batch, key) -> (state, metrics) as one program that also adds the metrics to
    running sums: (state, batch, key, totals) -> (state, metrics, totals + metrics).

    Fused rather than a second jitted call per step: on a CPU, that extra dispatch is a visible
    share of a small model's step (docs/benchmarks.md, CPU flags).
    """

    def step(state, batch, key, totals: Totals):
        state, metrics = step_fn(state, batch, key)
        return state, metrics, add_step(totals, metrics)

    return step


def interval_scalars(totals: Mapping[str, np.ndarray], level_names: Sequence[str]) -> dict:
    """Means over the interval's finite steps, from `totals` fetched to the host.

    loss and grad_norm: means over steps (absent if every step was non-finite);
    loss_by_t/<name>: the mean loss of the interval's examples at that noise level (absent if
    none was drawn there), `level_names` as `Formulation.bucket_names` gives them.
    """
    out = {}
    steps = float(totals["steps"])
    if steps:
        out.update(loss=float(totals["loss"]) / steps, grad_norm=float(totals["grad_norm"]) / steps)
    for name, total, count in zip(
        level_names, totals["loss_by_t_sum"], totals["loss_by_t_count"], strict=True
    ):
        if count:
            out[f"loss_by_t/{name}"] = float(total) / float(count)
    return out


def flat_hparams(config: Mapping, prefix: str = "") -> dict[str, HParam]:
    """The config as TensorBoard's hparams: {"model.embed_dim": 96, ...}.

    Nested mappings become dotted keys; ints, floats, bools and strings stay as they are, and
    anything else (tuples, None) becomes its str, so one hparam holds one config field.
    """
    out: dict[str, HParam] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_hparams(value, f"{name}."))
        elif isinstance(value, int | float | bool | str):
            out[name] = value
        else:
            out[name] = str(value)
    return out


def wandb_config(config: Mapping):
    """`config.logging.wandb`, or None where it is off (or the config predates the section)."""
    section = (config.get("logging") or {}).get("wandb") or {}
    return section if section.get("enabled", False) else None


def metric_writer(
    config: Mapping,
    workdir: str,
    *,
    logdir: str | None = None,
    console: bool = False,
    job_type: str = "train",
    step_metric: str = "train/step",
) -> metric_writers.MetricWriter:
    """The clu MetricWriter a job writes its dashboards with.

    Process 0: TensorBoard event files in `logdir` (default: the workdir), through
    `AsyncWriter(SummaryWriter)`, or with `console=True` clu's default writer (the same plus a
    log line per write: `create_default_writer`); and where `config.logging.wandb.enabled`, a
    `MultiWriter` of that and a W&B run (`wandb_writer.WandbWriter`: `job_type` names the job,
    `step_metric` the x-axis the callers' steps are in; its files under <workdir>/wandb unless
    `config.logging.wandb.dir` is set). Other processes: a writer that writes nothing.
    wandb is imported only when enabled; missing, it is a ConfigError naming the field and the
    pip command.
    """
    from clu import metric_writers

    if jax.process_index() != 0:
        return metric_writers.MultiWriter([])
    logdir = os.fspath(workdir) if logdir is None else os.fspath(logdir)
    section = wandb_config(config)
    wandb = None
    if section is not None:  # first: a failed W&B start leaves no writer thread behind
        from uvit_jax.train import wandb_writer

        wandb = wandb_writer.WandbWriter.from_config(
            section, os.fspath(workdir), job_type=job_type, step_metric=step_metric
        )
    if console:
        tensorboard = metric_writers.create_default_writer(logdir)
    else:
        tensorboard = metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))
    return tensorboard if wandb is None else metric_writers.MultiWriter([tensorboard, wandb])


def _duration(steps: int, steps_per_s: float) -> datetime.timedelta:
    """How long `steps` take at `steps_per_s`, to the second."""
    return datetime.timedelta(seconds=round(steps / max(steps_per_s, 1e-9)))


def progress_line(step: int, num_steps: int, loss: float, steps_per_s: float) -> str:
    """One log line: 'step 500/6000  loss 0.0712345  68.50 steps/s  ETA 0:01:20'."""
    eta = _duration(num_steps - step, steps_per_s)
    return f"step {step}/{num_steps}  loss {loss:.6g}  {steps_per_s:.2f} steps/s  ETA {eta}"


def expected_time_line(first: int, step: int, num_steps: int, steps_per_s: float) -> str:
    """The run's expected training time, from the steps/s measured over steps first..step:
    'expected training time 0:10:08 for steps 0-13000 (21.38 steps/s over steps 0-100 on this
    host); the steps left end in 0:10:03'. Checkpoints, evaluators and data waits to come
    count only as far as the first interval had them."""
    total = _duration(num_steps - first, steps_per_s)
    left = _duration(num_steps - step, steps_per_s)
    return (
        f"expected training time {total} for steps {first}-{num_steps} ({steps_per_s:.2f} "
        f"steps/s over steps {first}-{step} on this host); the steps left end in {left}"
    )
