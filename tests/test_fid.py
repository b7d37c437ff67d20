"""FID/IS arithmetic: both input protocols vs their frameworks, streaming statistics, distance
vs pytorch-fid, Inception Score, the metrics of a feature set, reference files."""

import jax
import numpy as np
import pytest
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from numerics import relative_error

from uvit_jax.evaluation.metrics import FeatureSet, evaluation_metrics
from uvit_jax.evaluation.preprocess import inception_input
from uvit_jax.evaluation.reference import (
    Reference,
    load_reference,
    load_reference_images,
    load_stats,
    save_reference,
    save_stats,
)
from uvit_jax.evaluation.statistics import (
    FeatureMoments,
    allgather_moments,
    frechet_distance,
    inception_score,
    merge_all,
)
from uvit_jax.images import quantize_samples

# ---- preprocessing ---------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (299, 299), (512, 400)])
def test_preprocess_matches_pytorch_fid(size):
    torch = pytest.importorskip("torch", reason="the reference resize is torch's F.interpolate")
    import torch.nn.functional as F

    images = np.random.default_rng(0).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255  # pytorch-fid: ToTensor
    ref = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
    ours = np.asarray(jax.jit(inception_input)(images))
    assert ours.shape == (2, 299, 299, 3) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), rtol=0, atol=2e-5)


@pytest.mark.parametrize("size", [(32, 32), (64, 48), (299, 299), (512, 400)])
def test_tf_graph_protocol_matches_tensorflow(size):
    tf = pytest.importorskip("tensorflow", reason="the reference is TF's ResizeBilinear op")
    images = np.random.default_rng(1).integers(0, 256, (2, *size, 3), dtype=np.uint8)
    # The 2015-12-05 graph: ResizeBilinear (TF 1.x semantics) on [0, 255], then (x - 128) / 128.
    resized = tf.compat.v1.image.resize_bilinear(
        images.astype(np.float32), (299, 299), align_corners=False, half_pixel_centers=False
    )
    ref = (resized.numpy() - 128.0) / 128.0
    ours = np.asarray(jax.jit(inception_input, static_argnums=1)(images, "tf_graph"))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-5)
    assert ours.min() >= -1.0 and ours.max() <= 127 / 128 + 1e-6


def test_unknown_protocol_is_named():
    with pytest.raises(ValueError, match=r"config.eval.protocol='tf'.*pytorch_fid.*tf_graph"):
        inception_input(np.zeros((1, 8, 8, 3), np.uint8), "tf")


def test_quantize_matches_uvit_save_image():
    torch = pytest.importorskip("torch", reason="the reference is torchvision's save_image maths")
    edges = np.array([-2.0, -1.0, -0.5, 0.0, 1 / 255, 0.5, 1.0, 3.0], np.float32)
    x = np.concatenate([edges, np.random.default_rng(0).uniform(-1.1, 1.1, 992)]).astype(np.float32)
    # U-ViT: unpreprocess (x+1)/2 clamped to [0, 1], then save_image's mul(255).add_(0.5) to uint8
    t = torch.from_numpy(x).add(1).mul(0.5).clamp(0, 1)
    ref = t.mul(255).add_(0.5).clamp_(0, 255).to(torch.uint8).numpy()
    ours = np.asarray(quantize_samples(x))
    assert ours.dtype == np.uint8
    np.testing.assert_array_equal(ours, ref)
    np.testing.assert_array_equal(ours[:4], [0, 0, 64, 128])


# ---- streaming statistics ----------------------------------------------------------------------


def _mesh8():
    return jax.make_mesh((8, 1), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_streaming_moments_over_8_devices_equal_numpy():
    mesh = _mesh8()
    sharding = NamedSharding(mesh, P(("data", "fsdp")))
    dim, per_device = 96, 20
    w = jax.random.normal(jax.random.key(0), (32, dim))

    @jax.jit
    def fake_features(key):
        # Rectified, far-from-zero-mean features like pool3's, so cancellation would show.
        x = jax.random.normal(key, (8 * per_device, 32))
        f = jax.nn.relu(x @ w) + 50.0
        return jax.lax.with_sharding_constraint(f, sharding)

    per_process = [FeatureMoments.empty(dim), FeatureMoments.empty(dim)]  # devices 0-3, 4-7
    gathered = []
    for step in range(3):
        feats = fake_features(jax.random.key(step + 1))
        assert len(feats.addressable_shards) == 8
        for shard in feats.addressable_shards:
            local = np.asarray(shard.data)
            proc = shard.index[0].start // (4 * per_device)
            per_process[proc] = per_process[proc].update(local)
        gathered.append(np.asarray(feats))
    everything = np.concatenate(gathered).astype(np.float64)
    mu_ref, sigma_ref = everything.mean(0), np.cov(everything, rowvar=False)

    # Each simulated process merges everyone's moments through an allgather that stacks the
    # processes' arrays (float64 as uint32 bits), as process_allgather does on 2 hosts.
    def stacking_allgather(rank):
        names = iter(("n", "mean", "m2"))

        def gather(x):
            name = next(names)
            theirs = per_process[1 - rank]
            value = {"n": np.asarray([float(theirs.n)]), "mean": theirs.mean, "m2": theirs.m2}
            other = np.ascontiguousarray(value[name], np.float64).view(np.uint32)
            assert x.dtype == np.uint32 and x.shape == other.shape
            return np.stack([x, other] if rank == 0 else [other, x])

        return gather

    for rank in range(2):
        combined = allgather_moments(per_process[rank], allgather=stacking_allgather(rank))
        mu, sigma = combined.mean_cov()
        assert combined.n == everything.shape[0]
        assert relative_error(mu, mu_ref) < 1e-10
        assert relative_error(sigma, sigma_ref) < 1e-10

    # The real collective on this single process, and a plain merge, agree too.
    total = merge_all(per_process)
    real = allgather_moments(total, allgather=multihost_utils.process_allgather)
    assert real.n == total.n
    np.testing.assert_array_equal(real.m2, total.m2)  # bit-exact: float64 sent as uint32 bits
    assert relative_error(total.mean_cov()[1], sigma_ref) < 1e-10


def test_moments_round_trip_and_refuse_too_few_samples():
    x = np.random.default_rng(0).normal(size=(10, 16))
    m = FeatureMoments.of(x)
    again = FeatureMoments.from_arrays(m.to_arrays())
    assert again.n == 10 and np.array_equal(again.m2, m.m2)
    with pytest.raises(ValueError, match="at least 16 samples, got 10.*singular"):
        m.mean_cov()
    mu, sigma = m.mean_cov(min_samples=2)
    assert relative_error(sigma, np.cov(x, rowvar=False)) < 1e-12
    with pytest.raises(ValueError, match="cannot merge"):
        m.merge(FeatureMoments.empty(8))


# ---- Frechet distance --------------------------------------------------------------------------


def _stats(rng, n, d):
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + rng.normal(size=d)
    return x.mean(0), np.cov(x, rowvar=False)


# pytorch-fid passes scipy's deprecated `disp=`; that is the reference's business, not ours.
_REFERENCE_WARNINGS = pytest.mark.filterwarnings("ignore:The `disp` argument:DeprecationWarning")


@pytest.fixture(scope="module")
def pytorch_fid_distance():
    fid_score = pytest.importorskip("pytorch_fid.fid_score", reason="reference is pytorch-fid")
    return fid_score.calculate_frechet_distance


@_REFERENCE_WARNINGS
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_distance_matches_pytorch_fid_on_spd_pairs(seed, pytorch_fid_distance):
    rng = np.random.default_rng(seed)
    mu1, s1 = _stats(rng, 500, 64)
    mu2, s2 = _stats(rng, 500, 64)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - pytorch_fid_distance(mu1, s1, mu2, s2)) < 1e-10 * abs(ours)


@_REFERENCE_WARNINGS
@pytest.mark.parametrize("case", ["rank_deficient", "spectrum_1e-12", "spectrum_1e-16"])
def test_distance_matches_pytorch_fid_near_singular(case, pytorch_fid_distance):
    rng = np.random.default_rng(3)
    d = 64
    if case == "rank_deficient":  # 40 samples in 64 dimensions: rank 39
        mu1, s1 = _stats(rng, 40, d)
        mu2, s2 = _stats(rng, 40, d)
    else:
        low = float(case.split("_")[1])
        spectrum = np.logspace(0, np.log10(low), d)
        q1, _ = np.linalg.qr(rng.normal(size=(d, d)))
        q2, _ = np.linalg.qr(rng.normal(size=(d, d)))
        s1, s2 = (q1 * spectrum) @ q1.T, (q2 * spectrum) @ q2.T
        s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
        mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert abs(ours - pytorch_fid_distance(mu1, s1, mu2, s2)) < 1e-7 * abs(ours)


def test_distance_properties_and_errors():
    rng = np.random.default_rng(4)
    mu, s = _stats(rng, 300, 32)
    assert abs(frechet_distance(mu, s, mu, s)) < 1e-9 * np.trace(s)
    # Gaussians differing only in the mean: the distance is the squared mean difference.
    assert frechet_distance(mu, s, mu + 1.0, s) == pytest.approx(32.0, rel=1e-9)
    with pytest.raises(ValueError, match="different shapes"):
        frechet_distance(mu, s, mu[:16], s[:16, :16])
    with pytest.raises(ValueError, match="sigma2 is not symmetric"):
        frechet_distance(mu, s, mu, s + np.triu(np.ones_like(s)))
    with pytest.raises(ValueError, match="Imaginary component"):
        frechet_distance(mu, s, mu, -s)  # a negative-definite "covariance"


# ---- Inception Score ---------------------------------------------------------------------------


def test_inception_score_known_values():
    n, classes = 1000, 1008
    confident = np.full((n, classes), -1e4)
    confident[np.arange(n), np.arange(n) % 10] = 0.0  # sure of one class, 10 classes balanced
    mean, std = inception_score(confident, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    uniform = np.zeros((n, classes))
    assert inception_score(uniform) == pytest.approx((1.0, 0.0))
    # Shift invariance of the softmax, and the splits are consecutive rows.
    logits = np.random.default_rng(0).normal(size=(200, classes)) * 3
    assert inception_score(logits + 7.0, 4) == pytest.approx(inception_score(logits, 4))
    parts = [inception_score(logits[i * 50 : (i + 1) * 50], 1)[0] for i in range(4)]
    assert inception_score(logits, 4) == pytest.approx((np.mean(parts), np.std(parts)))
    with pytest.raises(ValueError, match="splits=10"):
        inception_score(logits[:5])


def _outputs(rng, n, shift=0.0):
    """Fake `FeatureFn` outputs: rectified pool3-like vectors, spatial vectors, logits."""
    pool3 = np.maximum(rng.normal(size=(n, 2048)) + shift, 0).astype(np.float32)
    spatial = rng.normal(size=(n, 2023)).astype(np.float32) + shift
    return dict(pool3=pool3, spatial=spatial, logits=rng.normal(size=(n, 1008)).astype(np.float32))


@pytest.mark.integration
def test_evaluation_metrics_of_a_feature_set():
    from uvit_jax.evaluation.kid import kernel_inception_distance
    from uvit_jax.evaluation.manifold import precision_recall

    rng = np.random.default_rng(5)
    a, b = _outputs(rng, 60), _outputs(rng, 40)
    samples = FeatureSet.merge_all([FeatureSet.of(a), FeatureSet.of(b)])
    real = _outputs(rng, 80, shift=0.1)
    ref = Reference(
        "ref.npz",
        real["pool3"].mean(0),
        np.cov(real["pool3"], rowvar=False),
        real["spatial"].mean(0),
        np.cov(real["spatial"], rowvar=False),
        features=real["pool3"],
    )
    result = evaluation_metrics(samples, ref, min_samples=2, kid_subsets=5)
    pool = np.concatenate([a["pool3"], b["pool3"]]).astype(np.float64)
    spatial = np.concatenate([a["spatial"], b["spatial"]]).astype(np.float64)
    fid = frechet_distance(pool.mean(0), np.cov(pool, rowvar=False), ref.mu, ref.sigma)
    sfid = frechet_distance(spatial.mean(0), np.cov(spatial, rowvar=False), ref.mu_s, ref.sigma_s)
    # 100 vectors in 2048 dimensions: a rank-deficient covariance, whose square root amplifies
    # the rounding of a different summation order.
    assert result["fid"] == pytest.approx(fid, rel=1e-8)
    assert result["sfid"] == pytest.approx(sfid, rel=1e-8)
    assert result["num_samples"] == 100
    logits = np.concatenate([a["logits"], b["logits"]])
    assert result["inception_score"] == pytest.approx(inception_score(logits)[0], rel=1e-12)
    p, r = precision_recall(real["pool3"], pool.astype(np.float32))
    assert (result["precision"], result["recall"]) == (p, r)
    # KID subsets hold at most as many vectors as the smaller set (here the 80 real ones).
    kid = kernel_inception_distance(real["pool3"], pool, subsets=5, subset_size=80)
    assert result["kid_subset_size"] == 80 and result["kid"] == pytest.approx(kid[0], rel=1e-12)
    # A reference with moments only (pytorch-fid's files) gives FID alone.
    bare = evaluation_metrics(samples, Reference("ref.npz", ref.mu, ref.sigma), min_samples=2)
    assert set(bare) == {"fid", "num_samples", "inception_score", "inception_score_std"}
    with pytest.raises(ValueError, match="at least 200 samples"):
        evaluation_metrics(samples, ref, min_samples=200)


# ---- reference statistics files ----------------------------------------------------------------


def test_reference_files_round_trip_and_adm_format(tmp_path):
    rng = np.random.default_rng(6)
    mu, sigma = _stats(rng, 50, 8)
    path = save_stats(tmp_path / "stats", mu, sigma, num_samples=np.asarray(50))
    assert path.endswith("stats.npz")
    got_mu, got_sigma = load_stats(path, dim=8)
    assert np.array_equal(got_mu, mu) and np.array_equal(got_sigma, sigma)
    # An ADM reference batch: images plus mu/sigma and spatial statistics.
    images = rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    adm = tmp_path / "VIRTUAL_test_labeled.npz"
    np.savez(adm, arr_0=images, mu=mu.astype(np.float32), sigma=sigma, mu_s=mu, sigma_s=sigma)
    got_mu, _ = load_stats(adm, dim=8)
    assert got_mu.dtype == np.float64 and np.allclose(got_mu, mu, rtol=1e-6)
    assert np.array_equal(load_reference_images(adm), images)


def test_reference_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        load_stats(tmp_path / "absent.npz")
    with pytest.raises(FileNotFoundError, match="--mode fid_stats"):
        load_stats("")
    only_images = tmp_path / "images_only.npz"
    np.savez(only_images, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(KeyError, match=r"images_only.npz: missing key\(s\) mu, sigma.*arr_0"):
        load_stats(only_images)
    no_sigma = tmp_path / "no_sigma.npz"
    np.savez(no_sigma, mu=np.zeros(2048))
    with pytest.raises(KeyError, match=r"no_sigma.npz: missing key\(s\) sigma"):
        load_stats(no_sigma)
    small = tmp_path / "small.npz"
    np.savez(small, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(ValueError, match=r"small.npz: mu has shape \(64,\).*expected \(2048,\)"):
        load_stats(small)
    with pytest.raises(KeyError, match="no_sigma.npz: missing key arr_0"):
        load_reference_images(no_sigma)
    bad_spatial = tmp_path / "bad_spatial.npz"
    np.savez(
        bad_spatial, mu=np.zeros(2048), sigma=np.eye(2048), mu_s=np.zeros(7), sigma_s=np.eye(7)
    )
    with pytest.raises(ValueError, match=r"bad_spatial.npz: mu_s has shape \(7,\)"):
        load_reference(bad_spatial)


def test_our_reference_files_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    out = _outputs(rng, 30)
    protocol = {"input_protocol": "pytorch_fid", "inception_feature_sha256": "abc"}
    path = save_reference(tmp_path / "ours", FeatureSet.of(out), protocol)
    ref = load_reference(path)
    assert ref.num_images == 30 and ref.protocol == protocol
    np.testing.assert_array_equal(ref.features, out["pool3"])
    np.testing.assert_allclose(ref.mu_s, out["spatial"].astype(np.float64).mean(0), rtol=1e-10)
    np.testing.assert_allclose(ref.sigma, np.cov(out["pool3"], rowvar=False), rtol=1e-9, atol=1e-12)
    # A pytorch-fid file (mu, sigma only) loads with the optional parts absent.
    plain = save_stats(tmp_path / "plain", ref.mu, ref.sigma)
    bare = load_reference(plain)
    assert bare.mu_s is None and bare.features is None and bare.protocol is None


# ---- two real processes ------------------------------------------------------------------------

_TWO_PROCESS_SCRIPT = """
import sys
import jax
import numpy as np

jax.distributed.initialize(f"localhost:{sys.argv[1]}", num_processes=2, process_id=int(sys.argv[2]))
from uvit_jax.evaluation.metrics import feature_set

rank = jax.process_index()
rng = np.random.default_rng(rank)
# Unequal shares: 3 batches of 30 rows on process 0, 3 batches of 20 on process 1.
batches = [rng.normal(size=(30 - 10 * rank, 12)) + 5.0 for _ in range(3)]


def fake_features(x, pad_to):
    wide = np.tile(x, (1, 171)).astype(np.float32)
    return dict(pool3=wide[:, :2048], spatial=wide[:, :2023], logits=wide[:, :1008])


# A resumed job: this process's set of the first batch, continued, then gathered.
first = feature_set(batches[:1], fake_features)
total = feature_set(batches[1:], fake_features, pad_to=32, start=first).gather()
m = total.pool
np.savez(sys.argv[3], n=m.n, mean=m.mean[:12], m2=m.m2[:12, :12], logits=total.logits,
         features=total.pool_features, data=np.concatenate(batches).astype(np.float32))
"""


@pytest.mark.integration
def test_statistics_combine_across_two_processes(tmp_path):
    from runs import run_two_jax_processes

    outs = [tmp_path / f"rank{r}.npz" for r in range(2)]
    run_two_jax_processes(_TWO_PROCESS_SCRIPT, tmp_path, lambda r: [str(outs[r])])
    results = [np.load(o) for o in outs]
    everything = np.concatenate([r["data"] for r in results]).astype(np.float64)
    for r in results:
        assert int(r["n"]) == 150
        moments = FeatureMoments(int(r["n"]), r["mean"], r["m2"])
        mu, sigma = moments.mean_cov(min_samples=2)
        assert relative_error(mu, everything.mean(0)) < 1e-10
        assert relative_error(sigma, np.cov(everything, rowvar=False)) < 1e-10
        # logits and pool3 vectors of both processes, in process order (float32)
        np.testing.assert_allclose(r["logits"][:, :12], everything, rtol=1e-6)
        np.testing.assert_allclose(r["features"][:, :12], everything, rtol=1e-6)
