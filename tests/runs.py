"""Shared pieces of the tests that train: a small config, and the training command line."""

import os
import pathlib
import sys

import jax

from configs.fashion_mnist_uvit import get_config

REPO = pathlib.Path(__file__).resolve().parents[1]
FMNIST = pathlib.Path("/usr/share/datasets/fashion-mnist")


def small_config():
    """The default's runlocal variant, wide enough (D=64) for FSDP to split some weights."""
    c = get_config("runlocal")
    c.model.update(embed_dim=64, depth=2, num_heads=2)
    c.train.update(batch_size=16)
    c.train.evals.sample_grid.every = 0
    c.data.num_workers = 0
    return c


def train_cmd(workdir, data_dir, *overrides) -> list[str]:
    """`python main.py` training the runlocal default on an extracted dataset."""
    return [
        sys.executable, str(REPO / "main.py"),
        "--config", str(REPO / "configs/fashion_mnist_uvit.py") + ":runlocal",
        "--workdir", str(workdir),
        f"--config.data.latent_dir={data_dir}",
        "--config.data.num_workers=0",
        "--config.train.evals.sample_grid.every=0",
        *overrides,
    ]  # fmt: skip


def subprocess_env() -> dict[str, str]:
    """The environment for a subprocess: a user's devices, the tests' compilation cache."""
    env = dict(os.environ)
    # Not the tests' 8 devices: main.py picks its own CPU split, a notebook has one device.
    env.pop("XLA_FLAGS", None)
    env["JAX_COMPILATION_CACHE_DIR"] = str(jax.config.jax_compilation_cache_dir)
    return env


def run_two_jax_processes(script: str, tmp_path, args_of, *, devices: int = 2, timeout=120):
    """Runs `script` as 2 `jax.distributed` processes over localhost (gloo collectives).

    The script gets argv [port, rank, *args_of(rank)]; a failing or hung process fails the test
    with the end of its output.
    """
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    path = pathlib.Path(tmp_path) / "worker.py"
    path.write_text(script)
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    procs = [
        subprocess.Popen(
            [sys.executable, str(path), str(port), str(rank), *args_of(rank)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    for p in procs:
        out, _ = p.communicate(timeout=timeout)
        assert p.returncode == 0, out.decode()[-3000:]


def poison_step(monkeypatch, at: int) -> None:
    """Makes the batch of training step `at` NaN (as a corrupt record or an overflow would)."""
    import numpy as np

    from uvit_jax.jobs import train as train_job

    calls = {"n": 0}
    real = train_job._model_inputs

    def poisoned(batch):
        out = real(batch)
        if calls["n"] == at:
            out = dict(out, x=np.full_like(out["x"], np.nan))
        calls["n"] += 1
        return out

    monkeypatch.setattr(train_job, "_model_inputs", poisoned)


FAULT_STEPS, FAULT_KEEP = 6, 2


def fault_config(data_dir, **train):
    """The tests' smallest training run: one device, D=32, a checkpoint every step."""
    c = small_config()
    c.model.update(embed_dim=32)
    c.data.latent_dir = data_dir
    c.mesh.update(data=1, fsdp=1)
    steps = dict(num_steps=FAULT_STEPS, log_every=3, ckpt_every=1, keep_ckpts=FAULT_KEEP)
    c.train.update(dict(steps, **train))
    return c
