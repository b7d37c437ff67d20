"""The Flax CLIP text encoder against transformers' `CLIPTextModel`, its importer and TextEncoder.

The reference is the tiny random CLIP text model of `tiny_clip.py`, in Hugging Face layout.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import save_file
from tiny_clip import text_config, write_tiny_clip

from uvit_jax.convert.clip_text import clip_text_from_state_dict, load_clip_text
from uvit_jax.convert.state_dict import ConversionError, load_state_dict
from uvit_jax.models.clip_text import CLIP_VIT_L14, CLIPTextConfig
from uvit_jax.parallel.mesh import make_mesh
from uvit_jax.text_encoder import TextEncoder

LONG = "a photo of a cat on the table " * 12  # 84 words: truncated to 77 tokens
CAPTIONS = ["a photo of a cat", "", "The DOG on the table!", LONG, "x-ray  of\ta dog's 2 cats"]


def _rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def _hf_hidden(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids).long()).last_hidden_state.numpy()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A CLIPTextModel folder (transformers 5 saves bare keys) + the reference outputs."""
    directory = str(tmp_path_factory.mktemp("clip_text"))
    tokenizer, model = write_tiny_clip(directory)
    ids = tokenizer(
        CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="np"
    )["input_ids"].astype(np.int32)
    return {
        "dir": directory,
        "tokenizer": tokenizer,
        "torch": model,
        "ids": ids,
        "want": _hf_hidden(model, ids),
    }


@pytest.fixture(scope="module")
def encoder(tiny) -> TextEncoder:
    return TextEncoder(tiny["dir"], batch_size=4)


def test_matches_hf_text_model(tiny):
    model, config = load_clip_text(tiny["dir"])
    assert config == CLIPTextConfig(len(tiny["tokenizer"]), 32, 64, 2, 4, 77)
    ids = tiny["ids"]
    eos = tiny["tokenizer"].eos_token_id
    assert ids.shape == (len(CAPTIONS), 77)
    assert ids[3, -1] == eos and (ids[3] != eos).sum() == 76  # the long caption is truncated
    got = model(jax.numpy.asarray(ids))
    assert got.dtype == np.float32 and got.shape == (len(CAPTIONS), 77, 32)
    assert _rel_err(got, tiny["want"]) < 1e-5


def test_clip_model_folder_and_bf16(tiny, tmp_path):
    """A full CLIPModel folder (text_model.* next to a tiny vision tower) gives the same text
    encoder; bfloat16 compute stays within 1e-2."""
    tcfg = text_config(tiny["tokenizer"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = transformers.CLIPModel(
        transformers.CLIPConfig(
            text_config=tcfg.to_dict(),
            vision_config=dict(image_size=8, patch_size=4, **vision),
            projection_dim=8,
        )
    )
    clip.text_model.load_state_dict(tiny["torch"].state_dict())
    clip.save_pretrained(tmp_path)
    keys = load_state_dict(tmp_path / "model.safetensors")
    assert "text_model.embeddings.token_embedding.weight" in keys and "logit_scale" in keys
    model, config = load_clip_text(tmp_path)
    assert config.hidden_size == 32 and config.num_hidden_layers == 2
    ids = jax.numpy.asarray(tiny["ids"])
    assert _rel_err(model(ids), tiny["want"]) < 1e-5

    bf16, _ = load_clip_text(tmp_path, dtype="bfloat16")
    got = bf16(ids)
    assert got.dtype == np.float32
    assert _rel_err(got, tiny["want"]) < 1.5e-2  # measured 8.6e-3


def test_gelu_prefixed_state_dict_and_short_sequence(tiny):
    """Stable Diffusion's prefix, a position_ids buffer and foreign keys; hidden_act "gelu";
    a sequence shorter than max_position_embeddings."""
    torch.manual_seed(1)
    ref = transformers.CLIPTextModel(text_config(tiny["tokenizer"], hidden_act="gelu")).eval()
    prefix = "cond_stage_model.transformer.text_model."
    state = {prefix + k: v.numpy() for k, v in ref.state_dict().items()}
    state[prefix + "embeddings.position_ids"] = np.arange(77)[None]
    state["model.diffusion_model.out.0.weight"] = np.zeros(3, np.float32)
    config = CLIPTextConfig(len(tiny["tokenizer"]), 32, 64, 2, 4, 77, "gelu")
    model = clip_text_from_state_dict(state, config, source="sd.ckpt")
    ids = tiny["ids"][:, :10]
    assert _rel_err(model(jax.numpy.asarray(ids)), _hf_hidden(ref, ids)) < 1e-5


def test_sharded_checkpoint(tiny, tmp_path):
    state = load_state_dict(os.path.join(tiny["dir"], "model.safetensors"))
    names = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": names[:7],
        "model-00002-of-00002.safetensors": names[7:],
    }
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text(open(os.path.join(tiny["dir"], "config.json")).read())
    sharded, _ = load_clip_text(tmp_path)
    single, _ = load_clip_text(tiny["dir"])
    jax.tree.map(
        np.testing.assert_array_equal,
        nnx.state(sharded, nnx.Param),
        nnx.state(single, nnx.Param),
    )


def test_text_encoder_tokenize_and_encode(tiny, encoder):
    hf = tiny["tokenizer"](
        CAPTIONS, padding="max_length", truncation=True, max_length=77, return_tensors="np"
    )["input_ids"]
    ids = encoder.tokenize(CAPTIONS)
    assert ids.dtype == np.int32 and ids.shape == (len(CAPTIONS), 77)
    np.testing.assert_array_equal(ids, hf)
    eos, bos = tiny["tokenizer"].eos_token_id, tiny["tokenizer"].bos_token_id
    np.testing.assert_array_equal(ids[1], [bos] + [eos] * 76)  # "" is start, end, end padding
    assert encoder.hidden_size == 32 and encoder.max_length == 77
    assert encoder.description == os.path.abspath(tiny["dir"])

    assert encoder.encode([]).shape == (0, 77, 32)
    assert encoder.tokenize([]).shape == (0, 77)
    one = encoder.encode(CAPTIONS[:1])
    assert one.dtype == np.float32 and one.shape == (1, 77, 32)
    assert _rel_err(one, tiny["want"][:1]) < 1e-5
    many = CAPTIONS * 2  # 10 captions: batches of 4, 4 and 2 (padded to 4)
    got = encoder.encode(many)
    assert _rel_err(got, np.concatenate([tiny["want"]] * 2)) < 1e-5
    np.testing.assert_array_equal(encoder.empty_context(), got[1])
    with pytest.raises(TypeError, match="single string"):
        encoder.encode("a photo of a cat")


def test_text_encoder_on_a_mesh(tiny, encoder):
    mesh = make_mesh({"data": 8, "fsdp": 1})
    sharded = TextEncoder(tiny["dir"], batch_size=4, mesh=mesh)  # padded to 8 rows per call
    many = CAPTIONS * 2
    np.testing.assert_allclose(sharded.encode(many), encoder.encode(many), rtol=1e-5, atol=1e-5)


def test_errors(tiny, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json") as e:
        load_clip_text(empty)
    assert str(empty) in str(e.value)
    (empty / "config.json").write_text(open(os.path.join(tiny["dir"], "config.json")).read())
    with pytest.raises(FileNotFoundError, match="model.safetensors, pytorch_model.bin") as e:
        load_clip_text(empty)
    assert str(empty) in str(e.value)
    with pytest.raises(FileNotFoundError, match="tokenizer.json, or vocab.json and merges.txt"):
        TextEncoder(empty)

    state = {
        "text_model." + k: v.numpy()
        for k, v in tiny["torch"].state_dict().items()
        if k != "encoder.layers.1.mlp.fc2.weight"
    }
    config = CLIPTextConfig(len(tiny["tokenizer"]), 32, 64, 2, 4, 77)
    with pytest.raises(ConversionError, match=r"missing keys \(1\): text_model\.encoder\.layers"):
        clip_text_from_state_dict(state, config, source="x.bin")
    state["text_model.encoder.layers.1.mlp.fc2.weight"] = np.zeros((32, 63), np.float32)
    with pytest.raises(ConversionError, match=r"fc2\.weight.*\(32, 63\), expected \(32, 64\)"):
        clip_text_from_state_dict(state, config, source="x.bin")
    with pytest.raises(ConversionError, match="no CLIP text encoder"):
        clip_text_from_state_dict({"vision_model.x": np.zeros(1)}, config, source="x.bin")

    with pytest.raises(ValueError, match=r"max_length=78 .*max_position_embeddings=77"):
        TextEncoder(tiny["dir"], max_length=78)
    with pytest.raises(ValueError, match=r"c\.json: the field text_config is missing"):
        CLIPTextConfig.from_hf_dict({"model_type": "clip"}, source="c.json")
    with pytest.raises(ValueError, match=r"c\.json: missing field\(s\) text_config\.hidden_size"):
        CLIPTextConfig.from_hf_dict({"text_config": {"vocab_size": 3}}, source="c.json")
    with pytest.raises(ValueError, match=r"c\.json: hidden_act='relu' is not supported"):
        CLIPTextConfig.from_hf_dict(
            {**CLIP_VIT_L14.__dict__, "hidden_act": "relu"}, source="c.json"
        )
    with pytest.raises(ValueError, match="sequence length 78"):
        load_clip_text(tiny["dir"])[0](jax.numpy.zeros((1, 78), jax.numpy.int32))
