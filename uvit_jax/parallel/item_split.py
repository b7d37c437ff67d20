"""Replicated work split over the devices that split the batch, usable without knowing the mesh.

Data parallelism keeps the parameters whole on every device, so an optimizer's per-matrix work
(Muon's Newton-Schulz iterations) would run n times, once per device. `split_items` gives each
device its share of a stack of independent items instead, and XLA gathers the results.
Outside `jax.set_mesh` (notebooks, one device) it is fn(x).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from uvit_jax.parallel.activations import BATCH_AXES
from uvit_jax.parallel.batch_sums import batch_shards


def split_items(fn: Callable[[jax.Array], jax.Array], x: jax.Array) -> jax.Array:
    """fn(x) for x [K, ...], K items that fn treats independently (batched over axis 0).

    Inside `jax.set_mesh` of a mesh with the batch axes ("data", "fsdp") of n > 1 devices,
    x is zero-padded to a multiple of n items and split over those axes, so that each device
    computes K / n of them; the result, [K, ...], is gathered wherever it is used.
    """
    mesh = jax.sharding.get_abstract_mesh()
    n = batch_shards(mesh)
    if n == 1 or set(BATCH_AXES) & set(mesh.manual_axes):  # in shard_map: work on the shard
        return fn(x)
    k = x.shape[0]
    padded = jnp.pad(x, [(0, -k % n)] + [(0, 0)] * (x.ndim - 1))
    out = fn(jax.lax.with_sharding_constraint(padded, P(BATCH_AXES)))
    return out[:k]
