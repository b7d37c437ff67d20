"""XLA flags this project sets for CPU runs (imported before any device is used; no jax here).

`--xla_cpu_experimental_ynn_fusion_type=dot` lets XLA:CPU hand convolutions and matmuls to
YNNPACK, which runs the FID Inception and the train step faster than XLA's own kernels.
("eltwise" instead of "dot" also claims convolutions, but not those followed by the BatchNorm +
ReLU epilogue, and slows the train step down.) GPU and TPU backends ignore it.

`--xla_force_host_platform_device_count=2` (on hosts with 2 or more cores) splits the CPU into
two JAX devices, so the data-parallel mesh runs two halves of every batch at once. One CPU device
runs a small model's many small ops one after another and leaves the second core mostly waiting
(thread pool waits); four devices are no faster than two, and the FID Inception and the sampler
run as fast on two devices as on one. Only the CPU platform reads the flag; accelerator runs
keep their devices. The measurements behind both flags: docs/benchmarks.md (CPU flags).

With the TPU runtime installed (`libtpu`, from `jax[tpu]`, which the tests and `--mode compile`
use) on a host without a TPU, JAX would first try to start a TPU backend, print a screen of
errors about missing TPU hosts and only then fall back to the CPU. `add_cpu_flags` sets
JAX_PLATFORMS=cpu there instead (no TPU device files, no other accelerator plugin installed,
JAX_PLATFORMS not set by the user), so such a host runs exactly as one without libtpu.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import pkgutil
import sys

from uvit_jax.parallel.host import usable_cores

CPU_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=dot",)
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def cpu_devices(cores: int | None = None) -> int:
    """The CPU devices to split a host of `cores` usable cores into (default: this process's)."""
    return 2 if (usable_cores() if cores is None else cores) >= 2 else 1


def tpu_runtime_without_tpu() -> bool:
    """Whether libtpu is installed on a host with no TPU (no /dev/accel* or /dev/vfio/N device
    files) and no other JAX accelerator plugin (a `jax_plugins` module: CUDA, ROCm)."""
    if importlib.util.find_spec("libtpu") is None:
        return False
    if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
        return False
    plugins = importlib.util.find_spec("jax_plugins")
    if plugins is not None and any(pkgutil.iter_modules(plugins.submodule_search_locations)):
        return False
    return True


def add_cpu_flags(environ: dict[str, str] | None = None, cores: int | None = None) -> None:
    """Appends `CPU_FLAGS` and the device split (`cpu_devices(cores)`) to XLA_FLAGS, except any
    flag whose name is already set there (so a user's own value wins), and sets JAX_PLATFORMS=cpu
    where only an unused TPU runtime would answer otherwise (`tpu_runtime_without_tpu`). XLA
    reads XLA_FLAGS when the first backend starts: call this before any jax array is created."""
    env = os.environ if environ is None else environ
    if "JAX_PLATFORMS" not in env and tpu_runtime_without_tpu():
        env["JAX_PLATFORMS"] = "cpu"
        jax = sys.modules.get("jax") if environ is None else None
        if jax is not None:  # imported already, so it read JAX_PLATFORMS before this line
            jax.config.update("jax_platforms", "cpu")
    flags = env.get("XLA_FLAGS", "").split()
    names = {f.split("=")[0] for f in flags}
    wanted = list(CPU_FLAGS)
    devices = cpu_devices(cores)
    if devices > 1:
        wanted.append(f"{DEVICE_COUNT_FLAG}={devices}")
    flags += [f for f in wanted if f.split("=")[0] not in names]
    env["XLA_FLAGS"] = " ".join(flags)
