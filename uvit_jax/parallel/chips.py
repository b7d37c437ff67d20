"""What one accelerator chip holds and moves: the facts the roofline and MFU figures divide by.

Each rate is the vendor's published per-chip number (sources beside each row). "bf16 peak" is
dense bf16 matmul throughput; ICI bandwidth is the chip's bidirectional inter-chip interconnect
total; DCN is the data-centre network share of one chip (its host's NICs divided by the chips
on the host), the link between slices of a multi-slice job (for GPUs: NVLink within a host,
the host's network between hosts).
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip. Bytes, FLOP/s and bytes/s; None where no figure is published."""

    name: str  # the topology prefix ("v5p") or a GPU's short name ("h100")
    device_kinds: tuple[str, ...]  # `jax.Device.device_kind` prefixes of this chip
    peak_bf16_flops: float
    hbm_bytes: float | None = None
    hbm_bytes_per_s: float | None = None
    ici_bytes_per_s: float | None = None
    dcn_bytes_per_s: float | None = None
    source: str = ""


# fmt: off
CHIPS: dict[str, Chip] = {
    # TPU HBM: what the TPU compiler itself allows a program (libtpu 0.0.42.1 refuses one byte
    # more with RESOURCE_EXHAUSTED "exceeds available HBM"), a little under the published
    # 16 GB (v5e), 95 GB (v5p), 32 GB (v6e), 32 GiB (v4): the runtime keeps the rest.
    "v5e": Chip(
        "v5e", ("TPU v5 lite", "TPU v5e"), peak_bf16_flops=197e12, hbm_bytes=15.75 * GIB,
        hbm_bytes_per_s=819e9, ici_bytes_per_s=400e9,
        dcn_bytes_per_s=2 * 100e9 / 8 / 8,  # 2 x 100 Gbps NICs per host of 8 chips
        source="cloud.google.com/tpu/docs/v5e (system architecture table)"),
    "v5p": Chip(
        "v5p", ("TPU v5p", "TPU v5"), peak_bf16_flops=459e12, hbm_bytes=95.74 * GIB,
        hbm_bytes_per_s=2765e9, ici_bytes_per_s=4800e9 / 8,  # 4800 Gbps
        dcn_bytes_per_s=2 * 100e9 / 8 / 8,  # not published per chip: v5e's share, assumed
        source="cloud.google.com/tpu/docs/v5p (system architecture table); DCN assumed as v5e"),
    "v6e": Chip(
        "v6e", ("TPU v6 lite", "TPU v6e"), peak_bf16_flops=918e12, hbm_bytes=31.25 * GIB,
        hbm_bytes_per_s=1638e9, ici_bytes_per_s=800e9,
        dcn_bytes_per_s=2 * 100e9 / 8 / 8,  # not published per chip: v5e's share, assumed
        source="cloud.google.com/tpu/docs/v6e (system architecture table); DCN assumed as v5e"),
    "v4": Chip(
        "v4", ("TPU v4",), peak_bf16_flops=275e12, hbm_bytes=30.75 * GIB,
        hbm_bytes_per_s=1200e9,
        source="cloud.google.com/tpu/docs/v4 (ICI per chip not published there)"),
    "h100": Chip(
        "h100", ("NVIDIA H100",), peak_bf16_flops=989e12,
        hbm_bytes=84_942_979_072,  # what CUDA reports usable of the 80 GB (79.1 GiB)
        hbm_bytes_per_s=3.35e12, ici_bytes_per_s=900e9,  # NVLink 4, bidirectional
        dcn_bytes_per_s=400e9 / 8,  # one 400 Gb/s NIC per GPU (DGX H100), assumed
        source="NVIDIA H100 SXM5 datasheet (dense bf16, NVLink); DCN assumed"),
    "h200": Chip(
        "h200", ("NVIDIA H200",), peak_bf16_flops=989e12, hbm_bytes=141e9,
        hbm_bytes_per_s=4.8e12, source="NVIDIA H200 SXM datasheet (dense bf16)"),
    "a100": Chip(
        "a100", ("NVIDIA A100",), peak_bf16_flops=312e12, hbm_bytes=80e9,
        hbm_bytes_per_s=2.0e12, source="NVIDIA A100 80GB SXM datasheet (dense bf16)"),
}
# fmt: on


def chip_of_device_kind(device_kind: str) -> Chip | None:
    """The chip whose `device_kinds` prefix `device_kind` starts with (longest prefix wins)."""
    best = None
    for chip in CHIPS.values():
        for prefix in chip.device_kinds:
            if device_kind.startswith(prefix) and (best is None or len(prefix) > best[0]):
                best = (len(prefix), chip)
    return None if best is None else best[1]
