"""The device mesh and how every array is laid out on it (sharding as data, not model code).

Axes: "data" (pure data parallelism) and "fsdp" (data parallelism whose parameters, gradients
and optimizer state are split across the axis). The batch is split over both axes.

Multi-slice TPU jobs (devices with a `slice_index`) get a hybrid mesh: "data" spans the slices,
whose only link is the data-centre network (DCN), and "fsdp", whose gathers and reductions run
every layer, stays within a slice on the chips' interconnect (ICI).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from uvit_jax.errors import ConfigError
from uvit_jax.parallel.activations import BATCH_AXES
from uvit_jax.parallel.xla_flags import DEVICE_COUNT_FLAG

# Tensors below this many elements are replicated: splitting them saves nothing and costs
# a collective each.
MIN_SHARDED_SIZE = 2**14


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
    """A ("data", "fsdp") mesh; one size may be -1 to take the devices left.

    Raises:
      ValueError: the sizes do not multiply to the device count (names the fields).
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = {"data": int(mesh_config["data"]), "fsdp": int(mesh_config["fsdp"])}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ConfigError("config.mesh: at most one of data/fsdp may be -1")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if n % fixed:
            raise ConfigError(
                f"config.mesh: {n} devices are not divisible by the fixed axis size {fixed}"
            )
        sizes[free[0]] = n // fixed
    if sizes["data"] * sizes["fsdp"] != n:
        raise ConfigError(
            f"config.mesh.data={sizes['data']} x config.mesh.fsdp={sizes['fsdp']} != {n} devices"
        )
    slices = num_slices(devices)
    if slices > 1:
        return _hybrid_mesh(sizes["data"], sizes["fsdp"], slices, devices)
    return jax.make_mesh(
        (sizes["data"], sizes["fsdp"]),
        BATCH_AXES,
        axis_types=(AxisType.Auto, AxisType.Auto),
        devices=devices,
    )


def num_slices(devices) -> int:
    """How many TPU slices `devices` span (1 for devices without a `slice_index`)."""
    return len({getattr(d, "slice_index", 0) for d in devices})


def _hybrid_mesh(data: int, fsdp: int, slices: int, devices) -> Mesh:
    """The ("data", "fsdp") mesh of a multi-slice job: data = slices x data within a slice."""
    from jax.experimental import mesh_utils

    if data % slices:
        raise ConfigError(
            f"config.mesh.data={data} must be a multiple of the {slices} slices: the data axis "
            f"spans the slices (config.mesh.fsdp={fsdp} stays within one slice)"
        )
    grid = mesh_utils.create_hybrid_device_mesh(
        (data // slices, fsdp), (slices, 1), devices, allow_split_physical_axes=True
    )
    return Mesh(grid, BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def batch_size_per_shard(mesh: Mesh, global_batch: int, *, field: str) -> int:
    """Checks that `global_batch` splits evenly over the batch axes; returns the per-device size."""
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if global_batch % n:
        # main.py splits a CPU host into devices (uvit_jax/parallel/xla_flags.py): say how to
        # choose their number, since the user never asked for them.
        hint = ""
        if mesh.devices.flat[0].platform == "cpu":
            hint = f"; XLA_FLAGS={DEVICE_COUNT_FLAG}=N sets the CPU devices"
        raise ConfigError(
            f"{field}={global_batch} is not divisible by the data-parallel size {n} "
            f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}){hint}"
        )
    return global_batch // n


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
    """Splits the largest dimension divisible by the fsdp size; replicates small tensors."""
    if fsdp_size == 1 or math.prod(shape) < MIN_SHARDED_SIZE:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_tree, mesh: Mesh):
    """NamedShardings for a pytree of (abstract) arrays: parameters, optimizer state, EMA.

    The rule reads shapes only, so Adam's moments are laid out like their parameters.
    """
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(
        lambda x: NamedSharding(mesh, fsdp_spec(tuple(np.shape(x)), fsdp)), abstract_tree
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over ("data", "fsdp"); the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's slice of the batch -> global arrays sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def batch_shard_count(mesh: Mesh | jax.sharding.AbstractMesh) -> int:
    """How many ways the batch is split (the product of the batch axes' sizes).

    Raises:
      ValueError: the mesh lacks one of the batch axes ("data", "fsdp").
    """
    missing = [a for a in BATCH_AXES if a not in mesh.axis_names]
    if missing:
        raise ValueError(f"mesh axes {mesh.axis_names} lack the batch axes {missing}")
    return math.prod(mesh.shape[a] for a in BATCH_AXES)
