"""Frozen networks over the mesh: weights replicated on every device, each batch split over the
batch axes.

The autoencoder, the CLIP text encoder and the FID Inception all run this way:

    net = FrozenNetwork(model, mesh)
    out = net.apply(fn, x)            # global batch [B, ...] -> global output, batch sharded
    rows = net.apply_local(fn, rows)  # this process's numpy rows [n, ...] -> its output rows

`fn(model, x)` is a pure function of the merged network (e.g. `AutoencoderKL.decode`). The
jitted program is cached on (fn, graphdef, sharding), so networks of one architecture share
their compilations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from uvit_jax.parallel.activations import BATCH_AXES
from uvit_jax.parallel.mesh import batch_shard_count, batch_sharding, replicated

# fn(model, x [B, ...]) -> an array or a pytree of arrays, each with the batch leading.
NetworkFn = Callable[[nnx.Module, jax.Array], Any]


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every array of `tree` copied onto every device of `mesh`.

    Built shard by shard from one host copy, so it also holds when the mesh spans several
    processes (each passes the same values).
    """
    sharding = replicated(mesh)

    def put(x: jax.Array) -> jax.Array:
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(put, tree)


def run_process_local(
    fn: Callable[[jax.Array], Any], x: np.ndarray, mesh: Mesh | None, *, pad_to: int | None = None
) -> Any:
    """Runs a batch-parallel `fn` on this process's rows `x` [n, ...]; returns its rows, as numpy.

    `fn` returns an array or a pytree of arrays, each with the batch leading. With a mesh, `x`
    is padded (repeating its last row; zeros when n = 0) to `pad_to` (default n) rounded up to a
    multiple of this process's batch shards, assembled into a global array sharded over the
    batch axes, and every output is cut back to this process's n rows. In multi-process runs
    every process must pass the same padded size (the same `pad_to`, or the same n), since `fn`
    is one collective program; a fixed `pad_to` also keeps the compiled shapes fixed. Without a
    mesh, `fn(x)`.
    """
    x = np.asarray(x)
    n = x.shape[0]
    if mesh is None:
        return jax.tree.map(np.asarray, fn(x))
    if pad_to is not None and n > pad_to:
        raise ValueError(f"a batch of {n} rows exceeds pad_to={pad_to}")
    local_shards = max(1, batch_shard_count(mesh) // jax.process_count())
    padded = -(-max(n, pad_to or 0, 1) // local_shards) * local_shards
    if padded != n:
        if n:
            fill = np.repeat(x[-1:], padded - n, axis=0)
        else:
            fill = np.zeros((padded, *x.shape[1:]), x.dtype)
        x = np.concatenate([x, fill])
    out = fn(jax.make_array_from_process_local_data(batch_sharding(mesh), x))
    if jax.process_count() > 1:
        out = jax.tree.map(
            lambda o: multihost_utils.global_array_to_host_local_array(o, mesh, P(BATCH_AXES)),
            out,
        )
    return jax.tree.map(lambda o: np.asarray(o)[:n], out)


@functools.partial(jax.jit, static_argnums=(0, 1, 4))
def _apply(fn: NetworkFn, graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array, sharding):
    # Pin input and output to the batch sharding: numpy inputs arrive on one device, and the
    # output should stay where the next step (a writer, the FID network) expects it.
    if sharding is None:
        return fn(nnx.merge(graphdef, state), x)
    x = jax.lax.with_sharding_constraint(x, sharding)
    out = fn(nnx.merge(graphdef, state), x)
    return jax.tree.map(lambda o: jax.lax.with_sharding_constraint(o, sharding), out)


class FrozenNetwork:
    """A network that only runs inference, jitted, optionally data-parallel over a mesh.

    With a mesh (axes "data" and "fsdp"), the weights are replicated on every device and each
    batch is sharded over both axes; without one, everything stays on the default device.
    """

    def __init__(self, model: nnx.Module, mesh: Mesh | None = None):
        self.mesh = mesh
        self.graphdef, state = nnx.split(model)
        if mesh is None:
            self.state, self.batch_sharding = state, None
        else:
            batch_shard_count(mesh)  # checks the batch axes
            self.state, self.batch_sharding = replicate(state, mesh), batch_sharding(mesh)

    def apply(self, fn: NetworkFn, x: jax.Array | np.ndarray) -> Any:
        """fn(network, x) on a global batch x [B, ...] (B divisible by the batch shards)."""
        return _apply(fn, self.graphdef, self.state, x, self.batch_sharding)

    def apply_local(self, fn: NetworkFn, x: np.ndarray, *, pad_to: int | None = None) -> Any:
        """fn(network, rows) on this process's rows x [n, ...]: numpy out, n rows (any n).

        See `run_process_local` for the padding and what every process must pass.
        """
        return run_process_local(functools.partial(self.apply, fn), x, self.mesh, pad_to=pad_to)
