"""Sums over a batch split across devices, added up once.

A train step sums, over its examples, the loss and the gradients. Under plain `jax.jit` the
compiler adds each device's partial sums where the program asks for a total: once per
micro-batch when the batch is accumulated in micro-batches, one all-reduce of every gradient
array each time. Where only the batch is split (the mesh's "fsdp" axis has size 1, so every
device holds all the parameters), `sum_over_batch_shards` instead runs the summing function on
each device's own examples, micro-batches included, and adds the devices' totals in a single
all-reduce of one flat buffer at the end. The sums are the same up to float rounding (the
order of the additions differs); their cost is one collective per step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax.flatten_util import ravel_pytree
from jax.sharding import PartitionSpec as P

from uvit_jax.parallel.activations import BATCH_AXES
from uvit_jax.parallel.mesh import batch_shard_count

PyTree = Any


def batch_shards(mesh: jax.sharding.AbstractMesh) -> int:
    """How many ways `mesh` splits the batch (1 for an empty mesh, as outside `jax.set_mesh`)."""
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return 1
    return batch_shard_count(mesh)


def batch_split_only(mesh: jax.sharding.AbstractMesh) -> bool:
    """Whether `mesh` splits the batch over more than one device and nothing else (its "fsdp"
    axis, which would split the parameters, has size 1)."""
    return batch_shards(mesh) > 1 and mesh.shape["fsdp"] == 1


def sum_over_batch_shards(
    fn: Callable[[PyTree, PyTree], PyTree], batch_axis: int = 0
) -> Callable[[PyTree, PyTree], PyTree]:
    """sums(shared, examples) -> fn's sums over all the examples, for `fn(shared, examples)`
    that returns sums over the examples it is given (any pytree of arrays).

    shared: arrays every device holds whole (the parameters); examples: arrays whose axis
    `batch_axis` is the batch, split over the mesh's batch axes. Inside `jax.set_mesh` of a
    mesh that splits the batch only (`batch_split_only`), fn runs on each device's share and
    one all-reduce adds the results; otherwise fn runs on the global arrays as they are.
    """

    def sums(shared: PyTree, examples: PyTree) -> PyTree:
        mesh = jax.sharding.get_abstract_mesh()
        if not batch_split_only(mesh):
            return fn(shared, examples)
        spec = P(*([None] * batch_axis), BATCH_AXES)

        def per_device(shared, examples):
            # One buffer: XLA:CPU's all-reduce meets the other devices once per operand, so
            # the 95 gradient arrays of the default model, reduced as they are, cost 95
            # meetings (about 4 ms of a 34 ms step at batch 16 on 2 cores).
            flat, unflatten = ravel_pytree(fn(shared, examples))
            return unflatten(jax.lax.psum(flat, BATCH_AXES))

        # check_vma=False: fn differentiates with respect to `shared` inside; with the check,
        # JAX would add each gradient over the devices at once (the transpose of using a
        # replicated value on split data), one all-reduce per array and per micro-batch.
        return jax.shard_map(per_device, in_specs=(P(), spec), out_specs=P(), check_vma=False)(
            shared, examples
        )

    return sums
