"""Placing a host batch onto a device mesh as one global jax.Array, in single- and multi-process runs."""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import NamedSharding


def _mesh_axes(entry: object) -> tuple[str, ...]:
    """Mesh axes one PartitionSpec entry shards over (None: replicated)."""
    if entry is None:
        return ()
    if isinstance(entry, str):
        return (entry,)
    if isinstance(entry, tuple | list):
        return tuple(entry)
    return ()  # e.g. PartitionSpec.UNCONSTRAINED: nothing to check here


def to_global_array(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """Global array of `batch` laid out by `sharding`.

    Every process passes the same full global batch (the iterator is deterministic, and token batches are
    small), and each builds only the shards its own devices hold.
    """
    if not isinstance(sharding, NamedSharding):
        raise TypeError(f"sharding must be a jax.sharding.NamedSharding, got {type(sharding).__name__}")
    batch = np.asarray(batch)
    spec = sharding.spec
    if len(spec) > batch.ndim:
        raise ValueError(f"sharding spec {spec} has {len(spec)} entries; the batch has shape {batch.shape}")
    mesh_sizes = dict(sharding.mesh.shape)
    for dim, entry in enumerate(spec):
        axes = _mesh_axes(entry)
        unknown = [axis for axis in axes if axis not in mesh_sizes]
        if unknown:
            raise ValueError(f"sharding spec {spec} names mesh axes {unknown} not in the mesh {mesh_sizes}")
        shards = math.prod(mesh_sizes[axis] for axis in axes)
        if batch.shape[dim] % shards:
            what = "batch size" if dim == 0 else f"batch dimension {dim} of size"
            fix = f"set batch_size to a multiple of {shards}" if dim == 0 else "replicate that dimension"
            raise ValueError(
                f"{what} {batch.shape[dim]} is not divisible by {shards}, the product of mesh axes "
                f"{axes} ({', '.join(f'{a}={mesh_sizes[a]}' for a in axes)}) it is sharded over; {fix}"
            )
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index], dtype=batch.dtype)
