"""Text conditions for sampling text-to-image models: prompts or a dataset's captions.

A text-to-image U-ViT samples from CLIP contexts [B, 77, 768] and guides with the context of the
empty prompt. They come from one of two places:
  * `config.sample.prompts` (a list of strings), encoded with the CLIP text encoder of
    `config.text_encoder` (needs its weights folder and the `text` extra);
  * otherwise the extracted dataset's own captions (`config.data.latent_dir`): the first caption
    of each of the first images, and the dataset's stored empty context. This needs no text
    encoder, so training runs draw their sample grids without CLIP.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from uvit_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class TextConditions:
    """contexts: float32 [n, L, D]; null_context: float32 [L, D] (CLIP of ""); captions: [n]."""

    contexts: np.ndarray
    null_context: np.ndarray
    captions: tuple[str, ...]


def prompt_conditions(config: Any, prompts: Sequence[str], n: int) -> TextConditions:
    """`n` contexts of `prompts` (repeated in turn) from the config's CLIP text encoder."""
    from uvit_jax.text_encoder import text_encoder_from_config

    if not prompts:
        raise ValueError("no prompts given")
    encoder = text_encoder_from_config(config)
    unique = list(dict.fromkeys(prompts))
    encoded = dict(zip(unique, encoder.encode(unique), strict=True))
    captions = [prompts[i % len(prompts)] for i in range(n)]
    return TextConditions(
        contexts=np.stack([encoded[c] for c in captions]),
        null_context=encoder.empty_context(),
        captions=tuple(captions),
    )


def dataset_conditions(dataset_dir: str | os.PathLike, split: str, n: int) -> TextConditions:
    """`n` contexts from an extracted text dataset: the first caption of images 0, 1, ...

    Images repeat in turn when the dataset has fewer than `n`.
    """
    from input_pipeline import latent_dataset

    dataset = latent_dataset.open_dataset(dataset_dir, split)
    null_context = latent_dataset.read_empty_context(dataset)  # fails for datasets without text
    reader = latent_dataset.RecordReader(dataset)
    images = np.arange(min(n, dataset.num_examples), dtype=np.int64)
    firsts = reader.read(2 * images)["context_start"]  # record 2k: image k, unflipped
    read = reader.read_contexts(np.resize(firsts, n))
    return TextConditions(
        contexts=read["context"],
        null_context=null_context,
        captions=tuple(str(c) for c in read["caption"]),
    )


def text_conditions(config: Any, n: int, workdir: str | os.PathLike | None) -> TextConditions:
    """`config.sample.prompts` when set, else the captions of the config's dataset."""
    prompts = list(config.sample.get("prompts", ()) or ())
    if prompts:
        return prompt_conditions(config, prompts, n)
    from input_pipeline.extract import resolve_latent_dir

    try:
        directory = resolve_latent_dir(config, workdir)
    except ValueError as e:
        raise ConfigError(
            "text-to-image sampling needs prompts (config.sample.prompts) or an extracted "
            f"dataset to take captions from (config.data.latent_dir): {e}"
        ) from e
    return dataset_conditions(directory, config.data.split, n)


class CaptionSampler:
    """Contexts of shuffled captions of an extracted text dataset: FID of text-to-image models.

    U-ViT evaluates MS-COCO models on samples conditioned on random validation captions. Sample
    s uses context record `perm[s % C]`, with `perm` a permutation of all C caption records drawn
    from `seed`: no caption repeats before all are used, and every process and device count
    sees the same captions.
    """

    def __init__(self, directory: str | os.PathLike, seed: int, context_shape: Sequence[int]):
        from input_pipeline import latent_dataset

        dataset = latent_dataset.open_dataset(directory)
        if dataset.spec.context_shape != tuple(context_shape):
            raise latent_dataset.DatasetMismatchError(
                f"dataset {directory} holds text contexts of shape "
                f"{list(dataset.spec.context_shape) or 'none'}, the model needs "
                f"{list(context_shape)} (model.num_clip_token, model.clip_dim)"
            )
        self._reader = latent_dataset.RecordReader(dataset)
        self.null_context = latent_dataset.read_empty_context(dataset)
        self._perm = np.random.default_rng(seed).permutation(sum(dataset.context_lengths))

    def contexts(self, start: int, n: int) -> np.ndarray:
        """Contexts float32 [n, L, D] of samples start, ..., start + n - 1."""
        ids = self._perm[np.arange(start, start + n) % len(self._perm)]
        return self._reader.read_contexts(ids)["context"]
