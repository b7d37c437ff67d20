"""What conditions a U-ViT, decided once from its config: nothing, a class label or a text context.

The train step, the sampler and the jobs read it from here rather than from `config.model.kind`
and `num_classes`. Models trained with condition dropout (`config.diffusion.p_uncond > 0`) also
learn the unconditional case that classifier-free guidance needs: class models reserve their
last label as the null class (U-ViT's ImageNet models: class 1000 of 1001), text models use the
CLIP context of the empty caption.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from uvit_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Conditioning:
    """The condition a model takes, and its null condition.

    kind: "none" (unconditional), "class" (labels [B] int32) or "text" (contexts [B, L, D]).
    num_classes: class models: the real classes, [0, num_classes) (the null class excluded).
    null_class: class models trained with dropout: the label meaning "no class" (the last).
    context_shape: text models: [L, D] of one context (U-ViT's MS-COCO: CLIP's 77 x 768).
    has_null: trained with condition dropout (p_uncond > 0), so guidance has a null to use.
    """

    kind: str
    num_classes: int = 0
    null_class: int | None = None
    context_shape: tuple[int, ...] = ()
    has_null: bool = False

    @classmethod
    def from_config(cls, config: Any) -> Conditioning:
        """Reads `config.model.{kind, num_classes, num_clip_token, clip_dim}` and
        `config.diffusion.p_uncond`."""
        model = config.model
        has_null = float(config.diffusion.p_uncond) > 0
        if model.kind == "uvit_t2i":
            shape = (int(model.num_clip_token), int(model.clip_dim))
            return cls("text", context_shape=shape, has_null=has_null)
        if model.kind != "uvit":
            raise ConfigError(
                f"config.model.kind: expected 'uvit' or 'uvit_t2i', got {model.kind!r}"
            )
        labels = int(model.num_classes)
        if labels <= 0:
            return cls("none", has_null=has_null)
        if not has_null:
            return cls("class", num_classes=labels)
        return cls("class", num_classes=labels - 1, null_class=labels - 1, has_null=True)

    def labels(self, count: int, first: int = 0) -> np.ndarray | None:
        """Labels of samples first, ..., first + count - 1: every real class in turn (sample j
        gets class j mod K), so a grid has a column per class and any prefix of an evaluation
        is within one sample of balanced. int32 [count]; None unless a class model."""
        if self.kind != "class":
            return None
        return ((first + np.arange(count)) % self.num_classes).astype(np.int32)
