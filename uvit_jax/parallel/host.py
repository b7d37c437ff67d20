"""One line naming the host a number was measured on (no jax here).

Throughput on CPUs of the same name differs by ~2x between hosts (microcode, cache, the
hypervisor's thread scheduling), so every benchmark row and the training job's expected wall
time carry the CPU model, the vector extensions that decide XLA's and PyTorch's kernels, the
cores this process may use and the load average from other processes.
"""

from __future__ import annotations

import os
import platform

# The instruction-set extensions that change which matmul kernels run, widest last.
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16")


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, else the machine's count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def cpu_model(cpuinfo: str | None = None) -> tuple[str, tuple[str, ...], str]:
    """(model name, the `ISA_FLAGS` it has, its cache line: "1024 KB") from /proc/cpuinfo's
    first processor (or the text `cpuinfo`); where it has no model name (macOS, or no such file),
    the platform's processor name, else "unknown CPU"."""
    system = cpuinfo is None
    if system:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        if not line.strip():
            if fields:
                break  # the first processor only
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    return (
        fields.get("model name") or (platform.processor() if system else "") or "unknown CPU",
        tuple(f for f in ISA_FLAGS if f in flags),
        fields.get("cache size", ""),
    )


def describe_host(cpuinfo: str | None = None) -> str:
    """E.g. "AMD EPYC (avx2 fma avx512f avx512_bf16, cache 1024 KB), 2 usable cores, load
    average 0.44 1.30 1.48" (1, 5 and 15 minutes)."""
    model, flags, cache = cpu_model(cpuinfo)
    extras = ([" ".join(flags)] if flags else []) + ([f"cache {cache}"] if cache else [])
    name = f"{model} ({', '.join(extras)})" if extras else model
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{name}, {usable_cores()} usable cores, load average {load}"
