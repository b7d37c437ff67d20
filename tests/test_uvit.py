"""U-ViT against the official release: golden outputs, other shapes, sizes, precision, errors."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import relative_error

from configs.paper import PAPER, paper_config
from uvit_jax.convert.state_dict import ConversionError
from uvit_jax.convert.uvit import official_state_dict, uvit_from_official
from uvit_jax.models.uvit import abstract_uvit, build_uvit, count_params

GOLDEN = ["uvit_class_cond", "uvit_uncond_pixel", "uvit_t2i"]


def load_golden(golden_dir, name):
    d = np.load(golden_dir / f"{name}.npz")
    params = {k.removeprefix("param/"): d[k] for k in d.files if k.startswith("param/")}
    inputs = dict(
        x=d["x"].transpose(0, 2, 3, 1),
        t=d["t"],
        y=d["y"] if "y" in d.files else None,
        context=d["context"] if "context" in d.files else None,
    )
    return json.loads(str(d["config"])), params, inputs, d["out"].transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_outputs(golden_dir, name):
    config, params, inputs, out = load_golden(golden_dir, name)
    model = uvit_from_official(params, config)
    assert relative_error(model(**inputs), out) < 1e-5


@pytest.mark.parametrize("name", GOLDEN)
def test_export_inverts_import(golden_dir, name):
    config, params, _, _ = load_golden(golden_dir, name)
    exported = official_state_dict(uvit_from_official(params, config))
    assert exported.keys() == params.keys()
    for k, v in params.items():
        np.testing.assert_array_equal(exported[k], v, err_msg=k)


# ---- shapes the golden files do not cover, against the torch reference -------------------

HELD_BACK = {
    # U-ViT-H style: no final conv, head dim 72.
    "h_style": dict(
        img_size=8,
        patch_size=2,
        in_chans=4,
        embed_dim=144,
        depth=4,
        num_heads=2,
        num_classes=11,
        conv=False,
    ),
    "qkv_bias": dict(
        img_size=8,
        patch_size=2,
        in_chans=3,
        embed_dim=32,
        depth=2,
        num_heads=2,
        num_classes=-1,
        qkv_bias=True,
    ),
    "no_skip": dict(
        img_size=8,
        patch_size=4,
        in_chans=3,
        embed_dim=32,
        depth=4,
        num_heads=4,
        num_classes=5,
        skip=False,
    ),
    "deep_t2i_time_mlp": dict(
        img_size=8,
        patch_size=2,
        in_chans=4,
        embed_dim=32,
        depth=6,
        num_heads=2,
        clip_dim=16,
        num_clip_token=3,
        mlp_time_embed=True,
        kind="uvit_t2i",
    ),
}


def test_torch_reference_reproduces_golden(golden_dir):
    torch = pytest.importorskip("torch", reason="the torch reference needs PyTorch")
    import torch_uvit

    for name in GOLDEN:
        config, params, inputs, out = load_golden(golden_dir, name)
        args = {k: v for k, v in config.items() if k != "kind"}
        ref = torch_uvit.UViT(**args)
        ref.load_state_dict({k: torch.from_numpy(v) for k, v in params.items()})
        with torch.no_grad():
            got = ref(
                torch.from_numpy(inputs["x"].transpose(0, 3, 1, 2)),
                torch.from_numpy(inputs["t"]),
                y=None if inputs["y"] is None else torch.from_numpy(inputs["y"]).long(),
                context=None if inputs["context"] is None else torch.from_numpy(inputs["context"]),
            )
        assert relative_error(got.numpy().transpose(0, 2, 3, 1), out) < 1e-5, name


@pytest.mark.parametrize("case", sorted(HELD_BACK))
@pytest.mark.integration
def test_other_shapes_match_reference(case):
    torch = pytest.importorskip("torch", reason="the torch reference needs PyTorch")
    import torch_uvit

    config = HELD_BACK[case]
    torch.manual_seed(0)
    ref = torch_uvit.UViT(**{k: v for k, v in config.items() if k != "kind"})
    sd = torch_uvit.random_state_dict(ref, seed=1)
    ref.load_state_dict(sd)
    rng = np.random.default_rng(0)
    b, s, c = 3, config["img_size"], config["in_chans"]
    x = rng.standard_normal((b, c, s, s)).astype(np.float32)
    t = rng.uniform(0, 999, b).astype(np.float32)
    kw_t, kw_j = {}, {}
    if config.get("kind") == "uvit_t2i":
        ctx = rng.standard_normal((b, config["num_clip_token"], config["clip_dim"]))
        kw_t["context"] = torch.from_numpy(ctx.astype(np.float32))
        kw_j["context"] = ctx.astype(np.float32)
    elif config.get("num_classes", -1) > 0:
        y = rng.integers(0, config["num_classes"], b)
        kw_t["y"], kw_j["y"] = torch.from_numpy(y), y.astype(np.int32)
    with torch.no_grad():
        want = ref(torch.from_numpy(x), torch.from_numpy(t), **kw_t).numpy()
    model = uvit_from_official({k: v.numpy() for k, v in sd.items()}, config)
    got = model(x.transpose(0, 2, 3, 1), t, **kw_j)
    assert relative_error(got, want.transpose(0, 2, 3, 1)) < 1e-5


# ---- sizes, precision, attention ---------------------------------------------------------

OFFICIAL_COUNTS = {
    "cifar10_uvit_small": 44_255_328,
    "celeba64_uvit_small": 44_292_228,
    "imagenet64_uvit_mid": 130_940_292,
    "imagenet64_uvit_large": 286_827_652,
    "imagenet256_uvit_large": 286_763_172,
    "imagenet256_uvit_huge": 500_832_016,
    "imagenet512_uvit_large": 286_861_524,
    "imagenet512_uvit_huge": 500_942_656,
    "mscoco_uvit_small": 44_692_644,
    "mscoco_uvit_small:deep": 58_345_636,
}


@pytest.mark.integration
def test_every_paper_config_has_the_official_parameter_count():
    assert {n.split(":")[0] for n in OFFICIAL_COUNTS} == set(PAPER)
    for name, want in OFFICIAL_COUNTS.items():
        base, _, arg = name.partition(":")
        assert count_params(abstract_uvit(paper_config(base, arg).model)) == want, name


@pytest.mark.integration
def test_bf16_compute_stays_close_to_float32(golden_dir):
    for name in GOLDEN:
        config, params, inputs, out = load_golden(golden_dir, name)
        model = uvit_from_official(params, config, dtype=jnp.bfloat16)
        got = model(**inputs)
        assert got.dtype == jnp.float32
        assert relative_error(got, out) < 2e-2, name


def test_cudnn_request_falls_back_to_xla_off_gpu(golden_dir, caplog):
    config, params, inputs, out = load_golden(golden_dir, "uvit_class_cond")
    with caplog.at_level(logging.WARNING):
        model = uvit_from_official(params, config, attention="cudnn", dtype=jnp.bfloat16)
    if jax.default_backend() != "gpu":
        assert "using XLA attention" in caplog.text
        assert model.in_blocks[0].attn.impl == "xla"
    assert relative_error(model(**inputs), out) < 2e-2


@pytest.mark.parametrize("remat", ["full", "dots"])
@pytest.mark.integration
def test_remat_keeps_outputs_and_gradients(remat):
    cfg = dict(
        img_size=8, patch_size=2, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=4
    )
    plain, rematted = build_uvit(cfg), build_uvit(dict(cfg, remat=remat))
    x = jnp.ones((2, 8, 8, 3))
    t = jnp.array([10.0, 500.0])
    y = jnp.array([0, 3])

    def loss(model):
        return jnp.mean(model(x, t, y) ** 2)

    g1 = nnx.grad(loss)(plain)
    g2 = nnx.grad(loss)(rematted)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_initialisation_follows_the_official_scheme():
    model = build_uvit(
        dict(
            img_size=32,
            patch_size=2,
            in_chans=4,
            embed_dim=256,
            depth=2,
            num_heads=4,
            num_classes=10,
        )
    )
    qkv = np.asarray(model.in_blocks[0].attn.qkv.kernel[...])
    assert abs(qkv.std() - 0.02) < 1e-3
    np.testing.assert_array_equal(model.in_blocks[0].attn.proj.bias[...], 0)
    np.testing.assert_array_equal(model.norm.scale[...], 1)
    assert abs(np.asarray(model.label_emb.embedding[...]).std() - 1.0) < 0.05
    conv = np.asarray(model.patch_embed.proj.kernel[...])  # fan_in 16: U(-1/4, 1/4)
    assert conv.max() <= 0.25 and conv.min() >= -0.25 and conv.max() > 0.2


# ---- converter errors ---------------------------------------------------------------------


def test_missing_and_unexpected_keys_are_named(golden_dir):
    config, params, _, _ = load_golden(golden_dir, "uvit_class_cond")
    broken = dict(params)
    del broken["mid_block.attn.qkv.weight"]
    broken["mid_block.attn.qkv.bias"] = np.zeros(192, np.float32)
    broken["ema_decay"] = np.zeros(())
    with pytest.raises(ConversionError) as e:
        uvit_from_official(broken, config)
    msg = str(e.value)
    assert "missing keys (1): mid_block.attn.qkv.weight" in msg
    assert "unexpected keys (2): ema_decay, mid_block.attn.qkv.bias" in msg


def test_shape_mismatch_names_key_and_shapes(golden_dir):
    config, params, _, _ = load_golden(golden_dir, "uvit_class_cond")
    with pytest.raises(
        ConversionError,
        match=r"'label_emb.weight' has shape \(11, 64\), "
        r"expected \(1001, 64\)",
    ):
        uvit_from_official(params, dict(config, num_classes=1001))


def test_other_model_size_is_reported():
    # Only the layout matters: a U-ViT-L/2 at 256 has pos_embed [1, 258, 1024] and 10 in-blocks.
    params = {"pos_embed": np.zeros((1, 258, 1024), np.float32)}
    params.update({f"in_blocks.{i}.norm1.weight": np.zeros(1024, np.float32) for i in range(10)})
    with pytest.raises(ConversionError, match=r"U-ViT-L model .* asks for a U-ViT-H model"):
        uvit_from_official(params, paper_config("imagenet256_uvit_huge").model)
