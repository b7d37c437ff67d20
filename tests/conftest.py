"""Test-wide set-up: 8 simulated CPU devices and JAX's persistent compilation cache.

XLA reads XLA_FLAGS once, when the backend starts, so this must run before any test module
imports jax (pytest imports conftest.py first).
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
from uvit_jax.parallel.xla_flags import add_cpu_flags  # noqa: E402

add_cpu_flags()  # the CPU flags main.py sets: tests run what users run
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# TensorFlow (clu's event writer, tfds) and triton (which torchvision, pytorch-fid, torch-fidelity,
# diffusers and transformers' models load) ship clashing native libraries: importing triton
# after tensorflow segfaults, while triton first makes every order work. Tests import both, in
# an order that depends on which tests run, so triton (0.2 s; it does not import torch) goes
# first here, and torch is imported only by the tests that use it.
try:
    import triton  # noqa: F401
except ImportError:  # no triton (a CPU-only torch, or no torch): nothing to clash with
    pass

import jax  # noqa: E402
import pytest  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("UVIT_JAX_TEST_CACHE", "~/.cache/uvit_jax/jax_test_cache"))
jax.config.update("jax_compilation_cache_dir", str(_CACHE.expanduser()))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

GOLDEN = pathlib.Path(__file__).resolve().parent / "golden"


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects
def pytest_collection_modifyitems(items):
    """A `slow` test is also `integration`, so that `-m "not integration"` (which replaces the
    default `-m 'not slow'`) stays the quick unit tier."""
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("integration"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    """`tests/golden/`: outputs of the official U-ViT PyTorch code for fixed random weights."""
    return GOLDEN


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory) -> str:
    """256 real Fashion-MNIST training images, extracted once for the whole session."""
    from runs import FMNIST, small_config

    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Debian's dataset-fashion-mnist is not installed ({FMNIST})")
    from input_pipeline.extract import run_extraction
    from input_pipeline.sources import FashionMnistFilesSource, Subset

    out = tmp_path_factory.mktemp("fmnist") / "data"
    c = small_config()
    c.data.latent_dir = str(out)
    return run_extraction(c, None, source=Subset(FashionMnistFilesSource(FMNIST, "train"), 256))


@pytest.fixture
def one_device(monkeypatch):
    """The train job's mesh on the first device alone."""
    from uvit_jax.jobs import train as train_job
    from uvit_jax.parallel.mesh import make_mesh

    monkeypatch.setattr(train_job, "make_mesh", lambda cfg: make_mesh(cfg, jax.devices()[:1]))
