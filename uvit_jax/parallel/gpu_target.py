"""A GPU described for XLA's compiler without the GPU: NVIDIA H100 SXM as a GpuTargetConfig.

With the CUDA plugin installed (`pip install "jax[cuda12]==<jax version>"`) and the CPU as JAX's
platform, `jax.experimental.topologies.get_topology_desc(platform="cuda", topology="1x1xN",
target_config=h100_target_config())` returns N compile-only H100s: programs compile for them
(memory assignment, fusions, collectives) with no GPU present. XLA compiles without autotuning
then (default kernel tilings), and its compiled GPU programs carry no cost analysis.

The figures are the H100 SXM5 80GB's (CUDA's device query: 132 SMs, compute capability 9.0,
228 KiB shared memory per SM, 50 MiB L2, 1.98 GHz boost clock, 3.35 TB/s HBM3).
"""

from __future__ import annotations

# name -> value of `stream_executor.GpuDeviceInfoProto`, in its text format.
H100_SXM: dict[str, int | float | str] = {
    "threads_per_block_limit": 1024,
    "threads_per_warp": 32,
    "shared_memory_per_block": 48 * 1024,
    "shared_memory_per_core": 228 * 1024,
    "shared_memory_per_block_optin": 227 * 1024,
    "threads_per_core_limit": 2048,
    "core_count": 132,
    "fpus_per_core": 128,
    "block_dim_limit_x": 2**31 - 1,
    "block_dim_limit_y": 65535,
    "block_dim_limit_z": 65535,
    "memory_bandwidth": 3_352_320_000_000,
    "l2_cache_size": 50 * 2**20,
    "clock_rate_ghz": 1.98,
    "device_memory_size": 84_942_979_072,  # 79.1 GiB usable of the 80 GB
    "registers_per_core_limit": 65536,
    "registers_per_block_limit": 65536,
    "device_address_bits": 64,
    "name": "NVIDIA H100 80GB HBM3",
}


def _text(fields: dict[str, int | float | str]) -> str:
    return "\n".join(
        f"  {k}: {v!r}".replace("'", '"') if isinstance(v, str) else f"  {k}: {v}"
        for k, v in fields.items()
    )


def h100_target_config() -> str:
    """The H100 SXM as `xla.GpuTargetConfigProto` text (what the CUDA plugin's compile-only
    topology takes as `target_config`)."""
    return (
        "gpu_device_info {\n"
        + _text(H100_SXM)
        + "\n  cuda_compute_capability {\n    major: 9\n    minor: 0\n  }\n}\n"
        'platform_name: "CUDA"\n'
        'device_description_str: "NVIDIA H100 80GB HBM3"\n'
    )
