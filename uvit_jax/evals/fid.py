"""`type: fid`: FID & co of fresh EMA samples during training, against `config.eval.ref_stats`.

`config.eval.train_num_samples` samples drawn as `--mode eval` draws them (sampler, guidance,
decode, quantisation, Inception), from seed 0 at every run, so successive values differ only
by the weights. The Inception weights and the reference are read when the evaluator is built,
before the train step compiles. Results are not resumable (a killed run redraws them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flax import nnx

from uvit_jax.evals import TrainContext
from uvit_jax.evaluation.evaluator import (
    caption_sampler,
    check_sample_count,
    make_evaluator,
    metrics_of_samples,
)
from uvit_jax.sampling.prompts import CaptionSampler


class TrainingFid:
    """Returns {"fid", "num_samples", ...}: the metrics `--mode eval` computes."""

    def __init__(self, context: TrainContext, section: Any) -> None:
        del section
        check_sample_count(context.config, "train_num_samples")
        self._context = context
        self._evaluator = make_evaluator(context.config, context.mesh)
        self._captions: CaptionSampler | None = None
        self._captions_read = False

    def run(self, step: int, graphdef: nnx.GraphDef, ema: nnx.State) -> Mapping[str, float]:
        config = self._context.config
        if not self._captions_read:  # text models: the dataset is extracted by now
            self._captions = caption_sampler(config, self._context.data_dir, seed=0)
            self._captions_read = True
        return metrics_of_samples(
            config,
            graphdef,
            ema,
            self._context.mesh,
            self._evaluator,
            int(config.eval.train_num_samples),
            captions=self._captions,
        )
