"""Sharding hints for activations, usable from model code without knowing the mesh.

Inside `jax.set_mesh(mesh)` with the axes ("data", "fsdp"), `constrain_batch` pins an
activation's leading (batch) dimension to both axes. Without it, XLA's propagation can pick
layouts that force "involuntary full rematerialization" of FSDP-gathered weights (XLA warns of
it when compiling: such a weight is gathered whole again, in memory and time).
Outside a mesh (notebooks, one device) it is the identity.
"""

from __future__ import annotations

import jax
from jax.sharding import PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def constrain_batch(x: jax.Array) -> jax.Array:
    """x: [B, ...] -> the same array, batch dimension sharded over ("data", "fsdp")."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    if set(BATCH_AXES) & set(mesh.manual_axes):  # inside shard_map: x is already a shard
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))
