"""The paper's design space (Sec. 3.1, Figure 2 a-e) as model fields: what makes each variant
that variant (parameters against a hand count, the forms of the skip fusions, AdaLN and the
position table, the conv shapes, FLOPs against a hand count), and the one place of the fields
(the config schema, unknown fields, the resume check)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from uvit_jax import checkpoints
from uvit_jax.config_defaults import ARCHITECTURE_FIELDS, FIELD_NAMES, default_config
from uvit_jax.errors import ConfigError
from uvit_jax.jobs import train as train_job
from uvit_jax.models.uvit import (
    Block,
    UViTConfig,
    abstract_uvit,
    build_uvit,
    count_params,
    sinusoidal_2d_embedding,
)
from uvit_jax.train.flops import forward_flops

# S = 8, P = 2: N = 16 patches; D = 32, MLP 128; depth 2: one in-, the mid- and one out-block.
TINY = dict(
    img_size=8,
    patch_size=2,
    in_chans=3,
    embed_dim=32,
    depth=2,
    num_heads=2,
    num_classes=5,
    dtype="float32",
)

VARIANTS = {
    "default": {},
    "add": dict(skip_fusion="add"),
    "add_linear_skip": dict(skip_fusion="add_linear_skip"),
    "linear_add": dict(skip_fusion="linear_add"),
    "adaln": dict(time_conditioning="adaln"),
    "before_projection": dict(conv_position="before_projection"),
    "conv_stack": dict(patch_embed="conv_stack"),
    "conv_stack_p4": dict(patch_embed="conv_stack", patch_size=4),
    "sinusoidal_2d": dict(pos_embed="sinusoidal_2d"),
}


def hand_params(cfg: dict) -> int:
    """The parameters of a class-conditional model, counted layer by layer."""
    s, p, c, d, k = cfg["img_size"], cfg["patch_size"], cfg["in_chans"], cfg["embed_dim"], 5
    n, m, blocks, outs = (s // p) ** 2, 4 * d, cfg["depth"] + 1, cfg["depth"] // 2
    adaln = cfg.get("time_conditioning") == "adaln"
    extras = 1 if adaln else 2  # the label (and the time)
    if cfg.get("patch_embed") == "conv_stack":
        widths = [c, *(d // 2 ** (i - 1) for i in range(p.bit_length() - 1, 0, -1))]
        patch = sum(9 * a * b + b for a, b in zip(widths, widths[1:], strict=False)) + d * d + d
    else:
        patch = p * p * c * d + d
    pos = 0 if cfg.get("pos_embed") == "sinusoidal_2d" else (extras + n) * d
    block = 2 * d + 3 * d * d + (d * d + d) + 2 * d + (d * m + m) + (m * d + d)
    block += 4 * d * d + 4 * d if adaln else 0
    fusion = cfg.get("skip_fusion", "concat_linear")
    fusion = {"concat_linear": 2 * d * d + d, "add": 0}.get(fusion, d * d + d)  # D -> D: + bias
    conv = 9 * d * d + d if cfg.get("conv_position") == "before_projection" else 9 * c * c + c
    head = 2 * d + (d * p * p * c + p * p * c)
    return patch + k * d + pos + blocks * block + outs * fusion + head + conv


def hand_flops(cfg: dict) -> int:
    """2 x multiply-adds of the forward's matmuls and convs, for one example."""
    s, p, c, d = cfg["img_size"], cfg["patch_size"], cfg["in_chans"], cfg["embed_dim"]
    n, m, blocks, outs = (s // p) ** 2, 4 * d, cfg["depth"] + 1, cfg["depth"] // 2
    adaln = cfg.get("time_conditioning") == "adaln"
    before = cfg.get("conv_position") == "before_projection"
    tokens = n + (1 if adaln else 2)
    macs = blocks * (4 * d * d + 2 * d * m) * tokens
    fusion = cfg.get("skip_fusion", "concat_linear")
    fusion = {"concat_linear": 2 * d * d, "add": 0}.get(fusion, d * d)
    macs += outs * fusion * tokens
    macs += (blocks * 4 * d * d) if adaln else 0  # the modulation: once per example
    if cfg.get("patch_embed") == "conv_stack":
        widths = [c, *(d // 2 ** (i - 1) for i in range(p.bit_length() - 1, 0, -1))]
        for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
            macs += (s // 2 ** (i + 1)) ** 2 * 9 * a * b
        macs += n * d * d
    else:
        macs += n * p * p * c * d
    macs += (n if before else tokens) * d * p * p * c  # decoder_pred
    macs += n * 9 * d * d if before else s * s * 9 * c * c
    attention = blocks * 2 * tokens * tokens * d  # QK^T and AV
    return 2 * (macs + attention)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_parameter_count_and_flops_are_the_hand_counts(name):
    cfg = {**TINY, **VARIANTS[name]}
    assert count_params(abstract_uvit(cfg)) == hand_params(cfg)
    assert forward_flops(cfg) == hand_flops(cfg)


def test_each_variant_changes_only_its_own_part():
    def paths(cfg):
        flat = nnx.to_flat_state(nnx.state(abstract_uvit(cfg), nnx.Param))
        return {"/".join(map(str, p)): v.shape for p, v in flat}

    base = paths(TINY)
    d, c = TINY["embed_dim"], TINY["in_chans"]
    assert base["out_blocks/0/skip_linear/kernel"] == (2 * d, d)
    add = paths({**TINY, "skip_fusion": "add"})
    assert not any("skip_linear" in p for p in add)  # h_m + h_s: no fusion weights
    assert set(base) - set(add) == {f"out_blocks/0/skip_linear/{w}" for w in ("kernel", "bias")}
    for fusion in ("add_linear_skip", "linear_add"):
        assert paths({**TINY, "skip_fusion": fusion})["out_blocks/0/skip_linear/kernel"] == (d, d)
    adaln = paths({**TINY, "time_conditioning": "adaln"})
    assert adaln["pos_embed"] == (1, 16 + 1, d)  # no time token: the label and the patches
    for blk in ("in_blocks/0", "mid_block", "out_blocks/0"):
        assert adaln[f"{blk}/adaln/kernel"] == (d, 4 * d)
    before = paths({**TINY, "conv_position": "before_projection"})
    assert base["final_layer/kernel"] == (3, 3, c, c)
    assert before["final_layer/kernel"] == (3, 3, d, d)
    assert "pos_embed" not in paths({**TINY, "pos_embed": "sinusoidal_2d"})


def test_skip_fusions_are_the_papers_forms():
    rng = np.random.default_rng(0)
    h_m, h_s = (jnp.asarray(rng.standard_normal((2, 5, 8)), jnp.float32) for _ in range(2))

    def join(fusion):
        blk = Block(8, 2, 4.0, False, fusion, adaln=False, dtype=jnp.float32, attention="xla",
                    rngs=nnx.Rngs(0))  # fmt: skip
        return blk, blk._join_skip(h_m, h_s)

    def linear(blk, x):
        return x @ blk.skip_linear.kernel[...] + blk.skip_linear.bias[...]

    blk, got = join("concat_linear")
    np.testing.assert_allclose(got, linear(blk, jnp.concatenate([h_m, h_s], -1)), rtol=1e-6)
    _, got = join("add")
    np.testing.assert_allclose(got, h_m + h_s, rtol=1e-6)
    blk, got = join("add_linear_skip")
    np.testing.assert_allclose(got, h_m + linear(blk, h_s), rtol=1e-5, atol=1e-6)
    blk, got = join("linear_add")
    np.testing.assert_allclose(got, linear(blk, h_m + h_s), rtol=1e-5, atol=1e-6)


def test_adaln_modulates_both_block_norms_as_one_plus_scale():
    """AdaLN(h) = (1 + y_s) LayerNorm(h) + y_b on norm1 and norm2: with a constant modulation
    (zero kernel, bias (s1, b1, s2, b2)) a block is the plain block with those norms' affine
    parameters scaled and shifted."""
    d = 8
    make = dict(dtype=jnp.float32, attention="xla", rngs=nnx.Rngs(0))
    ada = Block(d, 2, 4.0, False, None, adaln=True, **make)
    plain = Block(d, 2, 4.0, False, None, adaln=False, **make)
    np.testing.assert_array_equal(ada.adaln.kernel[...], 0)  # starts as the plain block
    np.testing.assert_array_equal(ada.adaln.bias[...], 0)
    rng = np.random.default_rng(1)
    s1, b1, s2, b2 = (jnp.asarray(rng.standard_normal(d), jnp.float32) for _ in range(4))
    ada.adaln.bias[...] = jnp.concatenate([s1, b1, s2, b2])
    nnx.update(plain, nnx.state(ada, nnx.Not(nnx.PathContains("adaln"))))
    for norm, s, b in ((plain.norm1, s1, b1), (plain.norm2, s2, b2)):
        norm.bias[...] = norm.bias[...] * (1 + s) + b
        norm.scale[...] = norm.scale[...] * (1 + s)
    x = jnp.asarray(rng.standard_normal((2, 5, d)), jnp.float32)
    t_emb = jnp.asarray(rng.standard_normal((2, d)), jnp.float32)
    np.testing.assert_allclose(ada(x, None, t_emb), plain(x), rtol=1e-5, atol=1e-5)


def test_adaln_model_sees_the_time_only_through_the_modulation():
    model = build_uvit({**TINY, "time_conditioning": "adaln", "mlp_time_embed": True})
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 8, 8, 3)), jnp.float32)
    y = jnp.array([0, 4])
    blocks = [*model.in_blocks, model.mid_block, *model.out_blocks]

    def outputs():
        return model(x, jnp.array([10.0, 10.0]), y), model(x, jnp.array([900.0, 900.0]), y)

    for blk in blocks:  # zero (as initialised): t has no way in
        blk.adaln.kernel[...] = jnp.zeros_like(blk.adaln.kernel[...])
    early, late = outputs()
    np.testing.assert_array_equal(early, late)
    blocks[0].adaln.kernel[...] = 0.1 * jnp.ones_like(blocks[0].adaln.kernel[...])
    early, late = outputs()
    assert not np.allclose(early, late)


def test_sinusoidal_2d_is_a_constant_of_the_closed_form():
    cfg = {**TINY, "pos_embed": "sinusoidal_2d"}
    model = build_uvit(cfg)
    assert all("pos_embed" not in map(str, p) for p, _ in nnx.to_flat_state(nnx.state(model)))
    d, n, quarter = 32, 4, 8
    freqs = 10000.0 ** (-np.arange(quarter) / quarter)

    def e(pos):  # the 1D sinusoid of width D/2, cos half first
        return np.concatenate([np.cos(pos * freqs), np.sin(pos * freqs)])

    want = np.stack([np.concatenate([e(i), e(j)]) for i in range(n) for j in range(n)])
    np.testing.assert_allclose(sinusoidal_2d_embedding(n, d), want, rtol=1e-5, atol=1e-5)
    table = np.asarray(model._position_embedding())[0]
    assert table.shape == (2 + n * n, d)
    np.testing.assert_array_equal(table[:2], 0)  # the label and time tokens
    np.testing.assert_allclose(table[2:], want, rtol=1e-5, atol=1e-5)


def test_conv_stack_is_stride_two_3x3_convs_then_a_1x1():
    model = build_uvit({**TINY, "patch_embed": "conv_stack", "patch_size": 4})
    pe = model.patch_embed
    assert [conv.kernel.shape for conv in pe.convs] == [(3, 3, 3, 16), (3, 3, 16, 32)]
    assert [conv.strides for conv in pe.convs] == [2, 2]
    assert pe.proj.kernel.shape == (1, 1, 32, 32)
    x = jnp.ones((1, 8, 8, 3))
    assert pe(x).shape == (1, 2, 2, 32)
    assert model(x, jnp.array([5.0]), jnp.array([1])).shape == (1, 8, 8, 3)
    with pytest.raises(ConfigError, match=r"patch_size=3 must be a power of two"):
        UViTConfig(img_size=9, patch_size=3, patch_embed="conv_stack")


@pytest.mark.integration
def test_variants_run_with_remat_and_keep_output_shapes():
    x = jnp.ones((2, 8, 8, 3))
    for name, fields in VARIANTS.items():
        model = build_uvit({**TINY, **fields, "remat": "full"})
        assert model(x, jnp.array([1.0, 2.0]), jnp.array([0, 1])).shape == x.shape, name


# ---- the one place of the fields ------------------------------------------------------------


def test_config_schema_is_the_fields_with_their_defaults():
    model = default_config().model
    assert set(model) == set(FIELD_NAMES)
    assert model.to_dict() == dataclasses.asdict(UViTConfig())
    assert {"skip_fusion", "time_conditioning", "conv_position", "patch_embed", "pos_embed"} <= (
        set(ARCHITECTURE_FIELDS)
    )
    assert set(FIELD_NAMES) - set(ARCHITECTURE_FIELDS) == {"dtype", "attention", "remat"}


def test_unknown_or_impossible_fields_are_refused_by_name():
    with pytest.raises(ConfigError, match=r"^config.model: unknown field\(s\) skp; the model's "
                                          r"fields: kind, img_size, .*skip_fusion"):  # fmt: skip
        build_uvit({**TINY, "skp": True})
    c = default_config()
    c.model.skp = True
    with pytest.raises(ConfigError, match=r"unknown field\(s\) skp"):
        forward_flops(c.model)
    with pytest.raises(ConfigError, match=r"model.skip_fusion='sum'; expected one of "
                                          r"\('concat_linear', 'add', "):  # fmt: skip
        build_uvit({**TINY, "skip_fusion": "sum"})


def test_resume_is_refused_with_another_design_choice_but_not_another_dtype():
    c = default_config()
    saved = {"model": {**c.model.to_dict(), "skip_fusion": "add"}}
    with pytest.raises(checkpoints.CheckpointError, match=r"model.skip_fusion: checkpoint 'add', "
                                                           r"config 'concat_linear'"):  # fmt: skip
        train_job.check_same_model(saved, c, "w")
    # A config saved before the field existed had its default.
    old = {"model": {k: v for k, v in c.model.items() if k != "pos_embed"}}
    train_job.check_same_model(old, c, "w")
    c.model.pos_embed = "sinusoidal_2d"
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoint 'learned_1d', config 'sin"):
        train_job.check_same_model(old, c, "w")
    c.model.update(pos_embed="learned_1d", dtype="float32", remat="full", attention="xla")
    train_job.check_same_model(old, c, "w")


def test_flops_of_the_default_are_the_usual_count():
    cfg = default_config().model  # U-ViT-S/2 at 32 x 32, unconditional: 257 tokens
    d, n, tokens = 512, 256, 257
    macs = 13 * (4 * d * d + 8 * d * d) * tokens + 6 * 2 * d * d * tokens
    macs += n * 12 * d + tokens * d * 12 + 32 * 32 * 9 * 9  # patches in and out, the final conv
    assert forward_flops(cfg) == 2 * macs + 13 * 4 * tokens * tokens * d


def test_a_variant_that_sets_a_seed_trains_that_seed_alone():
    from uvit_jax.jobs import ablate

    config = default_config()
    config.ablate.variants = ("base:", "base_s2: seed=2, model.depth=4")
    shared, extra = ablate.parse_variants(config)
    assert shared.seeds([0, 1]) == [0, 1] and extra.seeds([0, 1]) == [2]
    run = ablate.run_config(config, extra, extra.seeds([0, 1])[0], "/data")
    assert (run.seed, run.model.depth, run.data.latent_dir) == (2, 4, "/data")
