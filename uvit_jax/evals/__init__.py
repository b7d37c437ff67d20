"""Evaluators that run during training, chosen by config (big_vision's `config.evals`).

`config.train.evals` maps a name to a section: `type` (a key of EVALS), `every` (steps between
runs; 0: never) and the type's own fields. The training job builds each one once, before the
train step compiles (so a missing Inception file or reference fails first), and calls
`run(step, graphdef, ema)` every `every` steps after the checkpoint of that step; the scalars
it returns go to the dashboards as `train_<name>/<key>`.

sample_grid.py  sample_grid  a grid of EMA samples: PNG in <workdir>/samples/ and TensorBoard
fid.py          fid          FID & co of fresh EMA samples against the eval reference

Both draw with `config.sample`, but with classifier-free guidance only: autoguidance's guide is
a checkpoint, and the run being trained is still writing (and deleting) its own, so a training
run with an evaluator on and `config.sample.guidance = "autoguidance"` is refused
(`check_guidance`); sample with autoguidance after training (`--mode sample`, `eval`, `sweep`).

A new evaluator is one file holding a class with the constructor and `run` of `TrainEval`,
plus its line in EVALS.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any, Protocol

from clu import metric_writers
from flax import nnx
from jax.sharding import Mesh

from uvit_jax.errors import ConfigError

# type -> "module:class"; imported only when a config uses it (FID loads Inception and torch-free
# readers only then).
EVALS: dict[str, str] = {
    "sample_grid": "uvit_jax.evals.sample_grid:SampleGrid",
    "fid": "uvit_jax.evals.fid:TrainingFid",
}


@dataclasses.dataclass(frozen=True)
class TrainContext:
    """What an evaluator may use besides the weights it is given at each run.

    data_dir: the training dataset's directory; it may still be extracting when the evaluator
      is built, so read it in `run`, not in the constructor.
    writer: the run's metric writer (TensorBoard, and W&B when configured).
    """

    config: Any
    mesh: Mesh
    workdir: str
    data_dir: str
    writer: metric_writers.MetricWriter


class TrainEval(Protocol):
    """One evaluator: built once per run, then called at its interval."""

    def __init__(self, context: TrainContext, section: Any) -> None: ...

    def run(self, step: int, graphdef: nnx.GraphDef, ema: nnx.State) -> Mapping[str, float]:
        """Evaluates the EMA weights after `step`; returns scalars for the dashboards."""
        ...


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """An evaluator with its name and interval."""

    name: str
    every: int
    evaluator: TrainEval

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0


def check_sections(evals: Mapping[str, Any]) -> None:
    """Raises ConfigError naming the field of the first section that cannot work."""
    for name, section in evals.items():
        where = f"config.train.evals.{name}"
        kind = section.get("type") if hasattr(section, "get") else None
        if kind not in EVALS:
            raise ConfigError(f"{where}.type={kind!r}: expected one of {', '.join(sorted(EVALS))}")
        every = section.get("every")
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ConfigError(f"{where}.every={every!r}: expected an integer >= 0 (0: never)")


def check_guidance(config: Any) -> None:
    """Raises ConfigError when an evaluator is on (every > 0) and `config.sample` asks for
    autoguidance with a nonzero scale: the evaluators guide by CFG only (module docstring)."""
    sample = config.sample
    if sample.get("guidance", "cfg") != "autoguidance" or float(sample.cfg_scale) == 0:
        return
    on = [f"config.train.evals.{n}" for n, s in config.train.get("evals", {}).items() if s.every]
    if on:
        raise ConfigError(
            f"config.sample.guidance='autoguidance': the training evaluators ({', '.join(on)}) "
            "guide by CFG only; train with guidance='cfg' (or their every=0) and use "
            "autoguidance in --mode sample, eval or sweep"
        )


def evaluator_class(kind: str) -> type:
    """The class registered as `kind` in EVALS."""
    module, name = EVALS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def make_evals(context: TrainContext) -> list[Scheduled]:
    """Every evaluator of `config.train.evals` whose interval is not 0, built in config order."""
    sections = context.config.train.evals
    check_sections(sections)
    return [
        Scheduled(name, int(s.every), evaluator_class(s.type)(context, s))
        for name, s in sections.items()
        if s.every
    ]
