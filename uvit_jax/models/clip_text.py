"""The CLIP text encoder (Hugging Face `CLIPTextModel`) in Flax NNX.

U-ViT's text-to-image model conditions on the last hidden state (after the final LayerNorm) of
CLIP ViT-L/14's text encoder: 77 tokens in, [77, 768] float32 out per caption. Parameter paths
mirror the Hugging Face state-dict names (`encoder/layers/3/self_attn/q_proj/kernel` <->
`text_model.encoder.layers.3.self_attn.q_proj.weight`) so that `uvit_jax.convert.clip_text`
maps them mechanically.

Architecture: token + learned position embeddings; pre-LN residual blocks (causal multi-head
self-attention, then a 2-layer MLP, quick-GELU in CLIP); a final LayerNorm. No padding mask is
applied: the official U-ViT code calls `CLIPTextModel(input_ids=tokens)` without one, so padding
(end-of-text) tokens attend causally like any other token.

Precision: parameters are float32; the linear layers run in `dtype` (bf16 for speed); embeddings,
LayerNorm, the activation, the softmax and the residual stream stay float32, and so does the output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

HIDDEN_ACTS = ("quick_gelu", "gelu")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Hugging Face's CLIPTextConfig defaults for these two fields: a config.json that leaves them out
# means them, so reading it the same way keeps us in step with `CLIPTextModel.from_pretrained`.
_HF_DEFAULTS = {"hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
)
_MODEL_TYPES = ("clip", "clip_text_model")
# Hugging Face's init (normal, std 0.02 / 0.01 for positions); only random test models use it.
_init = nnx.initializers.normal(0.02)


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The architecture of a CLIP text encoder (the fields of HF's `CLIPTextConfig` it needs)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        self.validate(source="CLIPTextConfig")

    def validate(self, *, source: str) -> None:
        """Raises ValueError naming `source` and the field when a value cannot be built."""
        _check_fields(dataclasses.asdict(self), source=source, prefix="")

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any], *, source: str) -> CLIPTextConfig:
        """Reads a Hugging Face config.json: a `CLIPModel` one (nested `text_config`) or a flat
        `CLIPTextModel` one.

        Args:
          d: the parsed JSON.
          source: names the file in error messages (e.g. the config.json path).

        Raises:
          ValueError: naming `source` and the field that is missing, of the wrong type or not
            supported (e.g. another model type, or a hidden_act other than quick_gelu/gelu).
        """
        if not isinstance(d, Mapping):
            raise ValueError(f"{source}: expected a JSON object, found {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type is not None and model_type not in _MODEL_TYPES:
            raise ValueError(
                f"{source}: model_type={model_type!r} is not a CLIP text encoder; expected one "
                f"of {_MODEL_TYPES}"
            )
        prefix = ""
        # CLIPModel files nest the text encoder; very old ones call the section text_config_dict.
        for section in ("text_config", "text_config_dict"):
            if isinstance(d.get(section), Mapping):
                d, prefix = d[section], f"{section}."
                break
        else:
            if model_type == "clip":
                raise ValueError(f"{source}: the field text_config is missing (a CLIPModel config)")
        missing = [name for name in _INT_FIELDS if name not in d]
        if missing:
            raise ValueError(f"{source}: missing field(s) {', '.join(prefix + m for m in missing)}")
        values = {name: d[name] for name in _INT_FIELDS}
        for name, default in _HF_DEFAULTS.items():
            values[name] = d.get(name, default)
        _check_fields(values, source=source, prefix=prefix)
        values["layer_norm_eps"] = float(values["layer_norm_eps"])
        return cls(**values)


def _check_fields(values: Mapping[str, Any], *, source: str, prefix: str) -> None:
    for name in _INT_FIELDS:
        value = values[name]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{source}: {prefix}{name}={value!r}; expected a positive integer")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(
            f"{source}: {prefix}hidden_size={values['hidden_size']} is not divisible by "
            f"{prefix}num_attention_heads={values['num_attention_heads']}"
        )
    if values["hidden_act"] not in HIDDEN_ACTS:
        raise ValueError(
            f"{source}: {prefix}hidden_act={values['hidden_act']!r} is not supported; expected "
            f"one of {HIDDEN_ACTS}"
        )
    eps = values["layer_norm_eps"]
    if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps > 0:
        raise ValueError(f"{source}: {prefix}layer_norm_eps={eps!r}; expected a positive number")


# openai/clip-vit-large-patch14's text encoder: what U-ViT's MS-COCO models condition on.
CLIP_VIT_L14 = CLIPTextConfig(49408, 768, 3072, 12, 12, 77, "quick_gelu", 1e-5)


def resolve_dtype(dtype: Any) -> Any:
    """The compute dtype for "float32" / "bfloat16" or those jnp dtypes; ValueError otherwise."""
    if isinstance(dtype, str):
        if dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"text encoder dtype={dtype!r}; expected one of {sorted(COMPUTE_DTYPES)}"
            )
        return COMPUTE_DTYPES[dtype]
    for value in COMPUTE_DTYPES.values():
        if jnp.dtype(dtype) == jnp.dtype(value):
            return value
    raise ValueError(f"text encoder dtype={dtype!r}; expected one of {sorted(COMPUTE_DTYPES)}")


def _activation(name: str, x: Array) -> Array:
    if name == "quick_gelu":  # CLIP's original approximation of GELU
        return x * jax.nn.sigmoid(1.702 * x)
    return jax.nn.gelu(x, approximate=False)


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs):
        d = config.hidden_size
        self.token_embedding = nnx.Embed(
            config.vocab_size, d, dtype=jnp.float32, embedding_init=_init, rngs=rngs
        )
        self.position_embedding = nnx.Embed(
            config.max_position_embeddings,
            d,
            dtype=jnp.float32,
            embedding_init=nnx.initializers.normal(0.01),
            rngs=rngs,
        )

    def __call__(self, input_ids: Array) -> Array:
        """input_ids [B, L] int -> float32 [B, L, D]; positions 0..L-1."""
        positions = self.position_embedding.embedding[: input_ids.shape[1]]
        return self.token_embedding(input_ids) + positions[None]


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with separate q/k/v/out projections (HF layout)."""

    def __init__(self, config: CLIPTextConfig, *, dtype: Any, rngs: nnx.Rngs):
        d = config.hidden_size
        self.num_heads = config.num_attention_heads
        linear = lambda: nnx.Linear(d, d, dtype=dtype, kernel_init=_init, rngs=rngs)
        self.q_proj = linear()
        self.k_proj = linear()
        self.v_proj = linear()
        self.out_proj = linear()

    def __call__(self, x: Array) -> Array:
        b, n, d = x.shape
        heads = (b, n, self.num_heads, d // self.num_heads)
        q = self.q_proj(x).reshape(heads)
        k = self.k_proj(x).reshape(heads)
        v = self.v_proj(x).reshape(heads)
        # Scale head_dim**-0.5 is the default. XLA's implementation takes the logits and softmax
        # in float32 for 16-bit inputs; at 77 tokens attention is a small share of the cost, so
        # a fused kernel would buy little, and XLA runs the same on CPU, GPU and TPU.
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
        return self.out_proj(out.reshape(b, n, d))


class CLIPMLP(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.hidden_act = config.hidden_act
        d, hidden = config.hidden_size, config.intermediate_size
        self.fc1 = nnx.Linear(d, hidden, dtype=dtype, kernel_init=_init, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, d, dtype=dtype, kernel_init=_init, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        h = self.fc1(x)
        h = _activation(self.hidden_act, h.astype(jnp.float32)).astype(h.dtype)
        return self.fc2(h)


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)); the residual stream is float32."""

    def __init__(self, config: CLIPTextConfig, *, dtype: Any, rngs: nnx.Rngs):
        d, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1 = nnx.LayerNorm(d, epsilon=eps, dtype=jnp.float32, rngs=rngs)
        self.self_attn = CLIPAttention(config, dtype=dtype, rngs=rngs)
        self.layer_norm2 = nnx.LayerNorm(d, epsilon=eps, dtype=jnp.float32, rngs=rngs)
        self.mlp = CLIPMLP(config, dtype=dtype, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x)).astype(jnp.float32)
        return x + self.mlp(self.layer_norm2(x)).astype(jnp.float32)


class CLIPEncoder(nnx.Module):
    def __init__(self, config: CLIPTextConfig, *, dtype: Any, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_hidden_layers)
            ]
        )

    def __call__(self, x: Array) -> Array:
        for layer in self.layers:
            x = layer(x)
        return x


class CLIPTextTransformer(nnx.Module):
    """HF `CLIPTextModel` up to `last_hidden_state` (no pooling, no projection).

    Args:
      config: the architecture (`CLIP_VIT_L14` for U-ViT's MS-COCO models).
      dtype: compute dtype of the linear layers, float32 or bfloat16 (or "float32"/"bfloat16").
        Parameters are float32 either way.
      rngs: initialisation randomness (random weights are for tests; real ones come from
        `uvit_jax.convert.clip_text`).
    """

    def __init__(self, config: CLIPTextConfig, *, dtype: Any = jnp.float32, rngs: nnx.Rngs):
        config.validate(source="CLIPTextTransformer config")
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs)
        self.encoder = CLIPEncoder(config, dtype=self.dtype, rngs=rngs)
        self.final_layer_norm = nnx.LayerNorm(
            config.hidden_size, epsilon=config.layer_norm_eps, dtype=jnp.float32, rngs=rngs
        )

    def __call__(self, input_ids: Array) -> Array:
        """input_ids: int [B, L], 1 <= L <= max_position_embeddings -> float32 [B, L, hidden].

        Token ids must lie in [0, vocab_size): out-of-range ids cannot be checked under jit
        (`TextEncoder` checks them on the host).
        """
        shape = tuple(input_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"CLIPTextTransformer: input_ids must be [batch, length], got {shape}")
        if not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(
                f"CLIPTextTransformer: input_ids must be integer token ids, got {input_ids.dtype}"
            )
        max_len = self.config.max_position_embeddings
        if not 1 <= shape[1] <= max_len:
            raise ValueError(
                f"CLIPTextTransformer: sequence length {shape[1]} is outside [1, "
                f"max_position_embeddings={max_len}]"
            )
        x = self.embeddings(input_ids)
        x = self.encoder(x)
        return self.final_layer_norm(x).astype(jnp.float32)
