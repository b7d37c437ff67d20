"""KL-f8 autoencoder: parity with the official LDM code (golden file) and diffusers, conversion.

All models here share the golden file's reduced architecture and scale factor, so their graphdefs
are equal and the module-level jitted functions compile once per dtype / sharding.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from numerics import relative_error

from uvit_jax.convert import autoencoder as conv
from uvit_jax.convert.state_dict import ConversionError, load_state_dict
from uvit_jax.latent_codec import JittedAutoencoder, make_autoencoder
from uvit_jax.models import autoencoder as ae

NCHW_TO_NHWC = (0, 2, 3, 1)


@pytest.fixture(scope="module")
def golden(golden_dir):
    path = golden_dir / "autoencoder_kl_ldm.npz"
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    cfg = json.loads(str(data["config"]))
    return path, data, cfg


@pytest.fixture(scope="module")
def ddconfig(golden):
    return ae.DDConfig.from_dict(golden[2]["ddconfig"])


@pytest.fixture(scope="module")
def golden_model(golden, ddconfig):
    path, _, cfg = golden
    # Read straight from the golden .npz: its weights sit under the prefix "param/".
    return conv.load_autoencoder(
        path, ddconfig=ddconfig, embed_dim=cfg["embed_dim"], scale_factor=cfg["scale_factor"]
    )


@pytest.fixture(scope="module")
def golden_io(golden):
    _, data, _ = golden
    return {k: data[k].transpose(NCHW_TO_NHWC) for k in ("x", "moments", "z", "decoded")}


@pytest.fixture(scope="module")
def f32_outputs(golden_model, golden_io):
    runner = JittedAutoencoder(golden_model)
    moments = np.asarray(runner.encode_moments(golden_io["x"]))
    decoded = np.asarray(runner.decode(golden_io["z"]))
    return moments, decoded


def _params(model) -> dict:
    return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def _assert_same_params(a, b):
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for k in pa:
        np.testing.assert_array_equal(pa[k], pb[k], err_msg="/".join(map(str, k)))


def test_golden_ldm_moments_and_decode(golden_io, f32_outputs):
    moments, decoded = f32_outputs
    assert moments.shape == golden_io["moments"].shape and moments.dtype == np.float32
    assert relative_error(moments, golden_io["moments"]) < 1e-5
    assert relative_error(decoded, golden_io["decoded"]) < 1e-5


def test_param_paths_mirror_ldm_names(golden_model):
    paths = {"/".join(map(str, p)) for p in _params(golden_model)}
    assert "encoder/down/0/block/0/norm1/scale" in paths
    assert "encoder/mid/attn_1/q/kernel" in paths
    assert "decoder/up/1/upsample/conv/kernel" in paths
    assert "decoder/up/0/block/0/nin_shortcut/kernel" in paths


def test_sd_kl_f8_default_size():
    model = ae.abstract_autoencoder_kl(
        ae.SD_KL_F8, ae.SD_EMBED_DIM, scale_factor=0.18215, dtype=jnp.float32
    )
    n = sum(int(np.prod(v.shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert n == 83_653_863  # Stable Diffusion's VAE
    assert len(conv.expected_ldm_shapes(model)) == 248
    assert ae.moments_shape(model, (256, 256, 3)) == (32, 32, 8)


def test_bf16_close_to_float32(golden_model, golden_io, f32_outputs):
    bf16 = conv.with_params(
        ae.abstract_autoencoder_kl(
            golden_model.ddconfig,
            golden_model.embed_dim,
            scale_factor=golden_model.scale_factor,
            dtype=jnp.bfloat16,
        ),
        _params(golden_model),
    )
    runner = JittedAutoencoder(bf16)
    moments = np.asarray(runner.encode_moments(golden_io["x"]))
    decoded = np.asarray(runner.decode(golden_io["z"]))
    assert moments.dtype == np.float32 and decoded.dtype == np.float32
    assert relative_error(moments, f32_outputs[0]) < 2e-2
    assert relative_error(decoded, f32_outputs[1]) < 2e-2


def test_sharded_over_mesh_with_padding(golden_model, golden_io, f32_outputs):
    mesh = jax.make_mesh((8, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    runner = JittedAutoencoder(golden_model, mesh)
    x = np.concatenate([golden_io["x"], golden_io["x"][:1]])  # 3 rows: padded to 8 inside
    moments = runner.encode_moments_local(x)
    assert moments.shape == (3, *f32_outputs[0].shape[1:])
    np.testing.assert_allclose(moments[:2], f32_outputs[0], rtol=0, atol=1e-5)
    np.testing.assert_allclose(moments[2], f32_outputs[0][0], rtol=0, atol=1e-5)
    z = np.concatenate([golden_io["z"]] * 4)  # 8 rows: one per device
    global_z = jax.device_put(z, runner.batch_sharding)
    decoded = runner.decode(global_z)
    assert {s.data.shape[0] for s in decoded.addressable_shards} == {1}  # one row per device
    np.testing.assert_allclose(np.asarray(decoded)[6:], f32_outputs[1], rtol=0, atol=1e-5)


def _with_prefix(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize(
    "name, prefix",
    [("sd.npz", "first_stage_model."), ("sd.ckpt", "first_stage_model."), ("uvit.pth", "")],
)
def test_ldm_files_prefix_detected_loss_keys_ignored(
    golden, golden_model, tmp_path, caplog, name, prefix
):
    path, _, cfg = golden
    state = load_state_dict(path, prefix="param/")
    ckpt = _with_prefix(state, prefix)
    ckpt[prefix + "loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)
    ckpt[prefix + "loss.logvar"] = np.zeros((), np.float32)
    if prefix:  # the rest of a Stable Diffusion checkpoint
        ckpt["model.diffusion_model.input_blocks.0.0.weight"] = np.zeros((3,), np.float32)
    file = tmp_path / name
    if name.endswith(".npz"):
        np.savez(file, **ckpt)
    else:
        torch = pytest.importorskip("torch", reason="reading .ckpt/.pth needs PyTorch")
        tensors = {k: torch.from_numpy(v) for k, v in ckpt.items()}
        torch.save({"state_dict": tensors} if name.endswith(".ckpt") else tensors, file)
    with caplog.at_level("INFO"):
        model = conv.load_autoencoder(
            file,
            ddconfig=golden_model.ddconfig,
            embed_dim=cfg["embed_dim"],
            scale_factor=cfg["scale_factor"],
        )
    assert "ignoring 2 loss/discriminator keys" in caplog.text
    _assert_same_params(model, golden_model)


@pytest.fixture(scope="module")
def diffusers_vae():
    torch = pytest.importorskip("torch", reason="diffusers parity needs PyTorch (test extra)")
    diffusers = pytest.importorskip("diffusers", reason="diffusers parity needs diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
    ).eval()
    with torch.no_grad():  # perturb every parameter: unit norms / zero biases hide bad mappings
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return torch, vae


def test_diffusers_parity(diffusers_vae, golden, ddconfig, golden_io, tmp_path):
    torch, vae = diffusers_vae
    from safetensors.torch import save_file

    file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(file))
    scale = golden[2]["scale_factor"]
    model = make_autoencoder(
        {"kind": "kl_f8", "pretrained_path": str(file), "scale_factor": scale, "dtype": "float32"},
        ddconfig=ddconfig,
        embed_dim=4,
    )
    runner = JittedAutoencoder(model)
    x, z = golden_io["x"], golden_io["z"]
    with torch.no_grad():
        xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
        ref_moments = vae.quant_conv(vae.encoder(xt)).numpy().transpose(NCHW_TO_NHWC)
        dist = vae.encode(xt).latent_dist
        ref_decoded = vae.decode(torch.from_numpy(z.transpose(0, 3, 1, 2).copy())).sample
    moments = np.asarray(runner.encode_moments(x))
    assert relative_error(moments, ref_moments) < 1e-5
    mean, logvar = np.split(moments, 2, axis=-1)
    assert relative_error(mean, dist.mean.numpy().transpose(NCHW_TO_NHWC)) < 1e-5
    assert relative_error(logvar, dist.logvar.numpy().transpose(NCHW_TO_NHWC)) < 1e-5
    # diffusers' decode takes unscaled latents; ours divides by the scale factor first.
    decoded = np.asarray(runner.decode(z * scale))
    assert relative_error(decoded, ref_decoded.numpy().transpose(NCHW_TO_NHWC)) < 1e-5


def test_diffusers_legacy_attention_names(diffusers_vae, ddconfig):
    _, vae = diffusers_vae
    state = {k: v.numpy() for k, v in vae.state_dict().items()}
    legacy_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in state.items():
        for new, old in legacy_names.items():
            k = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}.")
        legacy[k] = v
    assert any(".query." in k for k in legacy)
    model = ae.abstract_autoencoder_kl(ddconfig, 4, scale_factor=1.0, dtype=jnp.float32)
    new = conv.params_from_state_dict(state, model, source="new")
    old = conv.params_from_state_dict(legacy, model, source="old")
    assert new.keys() == old.keys()
    for k in new:
        np.testing.assert_array_equal(new[k], old[k])


def test_converted_checkpoint_round_trip(golden, golden_model, tmp_path):
    path, _, cfg = golden
    folder = tmp_path / "ae_converted"
    conv.convert_file(path, folder, ddconfig=golden_model.ddconfig, embed_dim=cfg["embed_dim"])
    cfg_ae = {"kind": "kl_f8", "pretrained_path": str(folder), "scale_factor": cfg["scale_factor"]}
    model = make_autoencoder(cfg_ae)  # architecture read from the folder
    assert model.ddconfig == golden_model.ddconfig and model.embed_dim == golden_model.embed_dim
    _assert_same_params(model, golden_model)
    with pytest.raises(ConversionError, match="embed_dim=8 differ"):
        make_autoencoder(cfg_ae, embed_dim=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="not a converted autoencoder folder"):
        make_autoencoder({**cfg_ae, "pretrained_path": str(tmp_path / "empty")})


def test_conversion_errors_name_keys(golden, golden_model):
    path, _, _ = golden
    state = load_state_dict(path, prefix="param/")
    model = ae.abstract_autoencoder_kl(
        golden_model.ddconfig, golden_model.embed_dim, scale_factor=1.0, dtype=jnp.float32
    )
    missing = {k: v for k, v in state.items() if k != "decoder.mid.attn_1.q.bias"}
    with pytest.raises(ConversionError, match=r"missing keys \(1\): decoder.mid.attn_1.q.bias"):
        conv.params_from_state_dict(missing, model, source="f.pth")
    extra = {**state, "encoder.mid.attn_2.q.weight": np.zeros(1)}
    with pytest.raises(ConversionError, match=r"unexpected keys \(1\): encoder.mid.attn_2.q"):
        conv.params_from_state_dict(extra, model, source="f.pth")
    bad = {**state, "quant_conv.weight": np.zeros((8, 8, 3, 3), np.float32)}
    with pytest.raises(ConversionError, match=r"'quant_conv.weight' has shape \(8, 8, 3, 3\)"):
        conv.params_from_state_dict(bad, model, source="f.pth")
    with pytest.raises(ConversionError, match="no autoencoder found"):
        conv.params_from_state_dict({"model.x": np.zeros(1)}, model, source="f.pth")
    two = {**_with_prefix(state, "a."), **_with_prefix(state, "b.")}
    with pytest.raises(ConversionError, match="several autoencoders"):
        conv.params_from_state_dict(two, model, source="f.pth")
    with pytest.raises(ConversionError, match="neither LDM naming"):
        conv.params_from_state_dict({"encoder.conv_in.weight": np.zeros(1)}, model, source="f")


def test_config_and_input_errors(golden_model, tmp_path):
    with pytest.raises(ValueError, match="autoencoder.kind='vq'"):
        make_autoencoder({"kind": "vq"})
    with pytest.raises(ValueError, match="autoencoder.dtype='fp8'"):
        make_autoencoder({"kind": "kl_f8", "dtype": "fp8"})
    with pytest.raises(FileNotFoundError, match="autoencoder.pretrained_path"):
        make_autoencoder({"kind": "kl_f8", "pretrained_path": str(tmp_path / "nope.pth")})
    with pytest.raises(ValueError, match="kind='identity'"):
        make_autoencoder({"kind": "identity", "pretrained_path": "x.pth"})
    with pytest.raises(ValueError, match=r"unknown ddconfig keys \['chmult'\]"):
        ae.DDConfig.from_dict({"chmult": [1, 2]})
    with pytest.raises(ValueError, match="not divisible by the 32 GroupNorm groups"):
        ae.DDConfig(ch=48, ch_mult=(1,)).validate()
    with pytest.raises(ValueError, match=r"expected NHWC \[B, H, W, 3\] input"):
        golden_model.encode_moments(jnp.zeros((1, 3, 32, 32)))
    with pytest.raises(ValueError, match="multiples of 2"):
        golden_model.encode_moments(jnp.zeros((1, 31, 32, 3)))
    with pytest.raises(ValueError, match=r"decode: expected NHWC \[B, H, W, 4\]"):
        golden_model.decode(jnp.zeros((1, 16, 16, 8)))


def test_sample_latent_formula():
    mean = jnp.array([[0.5, -1.0]])
    logvar = jnp.array([[100.0, -2.0]])  # clipped to 20 before use
    key = jax.random.key(3)
    z = ae.sample_latent(jnp.concatenate([mean, logvar], -1), key, 0.18215)
    noise = jax.random.normal(key, mean.shape)
    want = 0.18215 * (mean + jnp.exp(0.5 * jnp.array([20.0, -2.0])) * noise)
    np.testing.assert_allclose(z, want, rtol=1e-6)


def test_identity_autoencoder_round_trip():
    model = make_autoencoder({"kind": "identity", "scale_factor": 0.5}, image_channels=1)
    x = jax.random.uniform(jax.random.key(0), (2, 32, 32, 1), minval=-1, maxval=1)
    moments = model.encode_moments(x)
    np.testing.assert_array_equal(moments, x)
    assert ae.moments_shape(model, (32, 32, 1)) == (32, 32, 1)
    z = model.sample_latent(moments, jax.random.key(1))
    np.testing.assert_allclose(z, 0.5 * x)
    np.testing.assert_allclose(model.decode(z), x, rtol=1e-6)
    out = JittedAutoencoder(model).decode(z)
    np.testing.assert_allclose(out, x, rtol=1e-6)
    mesh = jax.make_mesh((8, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    np.testing.assert_array_equal(JittedAutoencoder(model, mesh).encode_moments_local(x), x)
