"""Captions -> CLIP text contexts, as U-ViT's MS-COCO models consume them.

`TextEncoder` pairs Hugging Face's `CLIPTokenizer` (the only part taken from transformers,
imported lazily: `pip install -e ".[text]"`) with the Flax `CLIPTextTransformer`, jitted once per
batch shape. Tokens are padded with the end-of-text token to `max_length` (77) and truncated to
it; no attention mask is passed, as in the official `FrozenCLIPEmbedder` (the model's causal mask
still applies), so a context is the full [77, 768] last hidden state of CLIP ViT-L/14.

With a mesh, parameters are replicated (123M for ViT-L/14) and each batch is sharded over the
batch axes ("data", "fsdp") by `uvit_jax.parallel.frozen.FrozenNetwork`; numpy goes in and
comes out per process.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from uvit_jax.convert.clip_text import load_clip_text, read_clip_text_config
from uvit_jax.errors import ConfigError, MissingFile
from uvit_jax.models.clip_text import CLIPTextConfig, CLIPTextTransformer
from uvit_jax.parallel.frozen import FrozenNetwork
from uvit_jax.parallel.mesh import batch_shard_count

# Either is enough for CLIPTokenizer.from_pretrained (tokenizer.json, else vocab + merges).
_TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def _clip_tokenizer_class():
    try:
        from transformers import CLIPTokenizer
    except ImportError as e:
        raise ImportError(
            'the CLIP tokenizer needs Hugging Face transformers: pip install -e ".[text]"'
        ) from e
    return CLIPTokenizer


class TextEncoder:
    """CLIP tokenizer + jitted Flax text encoder: captions -> float32 [n, max_length, hidden].

    Args:
      directory: a Hugging Face CLIP folder (CLIPModel such as openai/clip-vit-large-patch14, or
        CLIPTextModel): config.json, the weights, and the tokenizer files.
      max_length: tokens per caption (start + text + end + padding), at most the model's
        max_position_embeddings (77).
      dtype: compute dtype of the encoder's matmuls, "float32" or "bfloat16".
      batch_size: captions per jitted call; batches are padded to it so one compilation serves
        every call. With a mesh it is this process's share of the batch.
      mesh: optional mesh with the axes ("data", "fsdp"); in multi-process runs every process
        must encode the same number of captions per call (the calls are collective).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        max_length: int = 77,
        dtype: str = "float32",
        batch_size: int = 64,
        mesh: jax.sharding.Mesh | None = None,
    ):
        self._directory = os.path.abspath(os.fspath(directory))
        tokenizer_class = _clip_tokenizer_class()  # fail before the weights are read
        config = read_clip_text_config(self._directory)
        if not 2 <= max_length <= config.max_position_embeddings:
            raise ValueError(
                f"TextEncoder: max_length={max_length} must lie in [2, max_position_embeddings="
                f"{config.max_position_embeddings}] of {self._directory}/config.json (room for "
                "the start and end tokens)"
            )
        if batch_size < 1:
            raise ValueError(f"TextEncoder: batch_size={batch_size}; expected >= 1")
        if not any(
            all(os.path.isfile(os.path.join(self._directory, f)) for f in group)
            for group in _TOKENIZER_FILES
        ):
            raise MissingFile(
                f"{self._directory}: no CLIP tokenizer files; expected tokenizer.json, or "
                "vocab.json and merges.txt"
            )
        if mesh is not None:
            batch_shard_count(mesh)  # checks the batch axes before the weights are read
        self._model, self._config = load_clip_text(self._directory, dtype=dtype)
        self._tokenizer = tokenizer_class.from_pretrained(self._directory)
        self._max_length = int(max_length)
        self._batch_size = int(batch_size)
        self._network = FrozenNetwork(self._model, mesh)

    @property
    def config(self) -> CLIPTextConfig:
        return self._config

    @property
    def model(self) -> CLIPTextTransformer:
        return self._model

    @property
    def hidden_size(self) -> int:
        """D of a context [max_length, D] (768 for CLIP ViT-L/14)."""
        return self._config.hidden_size

    @property
    def max_length(self) -> int:
        """L of a context [L, D]: tokens per caption (77)."""
        return self._max_length

    @property
    def description(self) -> str:
        """Which encoder made the contexts (the folder's absolute path), for dataset metadata."""
        return self._directory

    def tokenize(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> int32 [n, max_length]: start token, text, end token, end-token padding.

        Captions longer than max_length tokens are truncated (the end token is kept).

        Raises:
          TypeError: `texts` is a single string or holds a non-string.
          ValueError: the tokenizer produced ids outside the model's vocabulary.
        """
        texts = _caption_list(texts)
        if not texts:
            return np.zeros((0, self._max_length), np.int32)
        ids = self._tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self._max_length,
            return_tensors="np",
        )["input_ids"]
        ids = np.asarray(ids, np.int32)
        # An id past the embedding table would read NaN under jit; catch a tokenizer/model
        # mismatch (e.g. an extended vocabulary) here instead.
        if ids.min() < 0 or ids.max() >= self._config.vocab_size:
            raise ValueError(
                f"{self._directory}: the tokenizer produced id {int(ids.max())} (min "
                f"{int(ids.min())}) outside the model's vocab_size={self._config.vocab_size}"
            )
        return ids

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """Captions -> float32 [n, max_length, hidden_size]: CLIP's last hidden state.

        Any n, 0 included; batches are padded to `batch_size` (one compilation).
        """
        ids = self.tokenize(texts)
        n, bs = ids.shape[0], self._batch_size
        out = np.empty((n, self._max_length, self.hidden_size), np.float32)
        for start in range(0, n, bs):
            chunk = ids[start : start + bs]
            m = chunk.shape[0]
            if m < bs:  # repeat a real row: padding rows are computed and dropped
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - m, axis=0)])
            hidden = self._network.apply_local(CLIPTextTransformer.__call__, chunk)
            out[start : start + m] = hidden[:m]
        return out

    def empty_context(self) -> np.ndarray:
        """The context of the empty caption, float32 [max_length, hidden_size] (for CFG)."""
        return self.encode([""])[0]


def text_encoder_from_config(config: Any) -> TextEncoder:
    """The CLIP encoder of `config.text_encoder` with `model.num_clip_token` tokens.

    Cached per (folder, length, dtype, batch size): extraction, `--mode sample` and a notebook
    drawing prompt after prompt read the 123M weights once per process.
    """
    if not config.text_encoder.path:
        raise ConfigError(
            "config.text_encoder.path is empty: text-to-image extraction and prompts need the "
            "CLIP text encoder's Hugging Face folder (e.g. openai/clip-vit-large-patch14)"
        )
    return _cached_text_encoder(
        os.path.abspath(config.text_encoder.path),
        int(config.model.num_clip_token),
        str(config.text_encoder.dtype),
        int(config.text_encoder.batch_size),
    )


@functools.lru_cache(maxsize=2)
def _cached_text_encoder(path: str, max_length: int, dtype: str, batch_size: int) -> TextEncoder:
    return TextEncoder(path, max_length=max_length, dtype=dtype, batch_size=batch_size)


def _caption_list(texts: Sequence[str]) -> list[str]:
    # A str is a Sequence[str] too: encoding its characters one by one is never what was meant.
    if isinstance(texts, str | bytes):
        raise TypeError("TextEncoder: pass a sequence of captions, not a single string")
    texts = list(texts)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"TextEncoder: caption {i} is a {type(t).__name__}, not a str")
    return texts
