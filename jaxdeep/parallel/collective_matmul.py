"""Collective matmul: tensor-parallel communication hidden behind the matmul it feeds or follows.

A column-parallel matmul needs the whole sequence of its input, so plain tensor parallelism all-gathers the
(sequence-split) activations first and multiplies after; a row-parallel matmul produces partial sums that are
reduce-scattered after. Here both collectives are broken into `n - 1` ring steps of `ppermute` over the tensor
axis, each overlapping the matmul of the chunk already at hand (Wang et al., "Overlap communication with dependent
computation via decomposition", ASPLOS 2023):

    all-gather + matmul:   step s multiplies the chunk that came from device (i + s) mod n while the next one
                           travels one hop along the ring;
    matmul + reduce-scatter: step s multiplies the rows destined for device (i + s + 1) mod n, adds the partial
                           sum that just arrived, and passes it on; after n - 1 hops each device holds its rows.

The ring functions run per shard (inside `jax.shard_map`, manual over the tensor axis); `column_parallel` and
`row_parallel` wrap them for model code that names dimensions logically, and fall back to a plain einsum where the
layout gives nothing to overlap (no tensor axis, or a weight split over several mesh axes at once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxdeep import sharding
from jaxdeep.sharding import LogicalAxes


def _ring_left(n: int) -> list[tuple[int, int]]:
    # Every device sends to its left neighbour, so it receives what its right neighbour held.
    return [(j, (j - 1) % n) for j in range(n)]


def ring_allgather_apply(x: jax.Array, fn: Callable, axis_name: str, dim: int):
    """`fn(all_gather(x, axis_name, axis=dim, tiled=True))` for an `fn` that maps chunks of `dim` independently.

    Per shard, inside a shard_map manual over `axis_name`. `fn` returns an array or a tuple of arrays whose
    `dim` is the chunk's `dim` (e.g. a matmul over another dimension); outputs are assembled along `dim`.
    """
    n = jax.lax.axis_size(axis_name)
    if n == 1:
        return fn(x)
    index = jax.lax.axis_index(axis_name)
    chunk = x.shape[dim]
    outputs = None
    current = x
    for step in range(n):
        if step < n - 1:
            # Issued before the matmul below, which does not depend on it: the transfer overlaps the compute.
            incoming = jax.lax.ppermute(current, axis_name, _ring_left(n))
        part = fn(current)
        parts = part if isinstance(part, tuple) else (part,)
        if outputs is None:
            outputs = [jnp.zeros(p.shape[:dim] + (chunk * n,) + p.shape[dim + 1 :], p.dtype) for p in parts]
        source = (index + step) % n
        outputs = [
            jax.lax.dynamic_update_slice_in_dim(out, p, source * chunk, axis=dim)
            for out, p in zip(outputs, parts, strict=True)
        ]
        if step < n - 1:
            current = incoming
    return tuple(outputs) if isinstance(part, tuple) else outputs[0]


def ring_reducescatter_apply(h: jax.Array, fn: Callable, axis_name: str, dim: int) -> jax.Array:
    """`psum_scatter(fn(h), axis_name, scatter_dimension=dim, tiled=True)` for an `fn` that maps chunks of `dim`
    independently (e.g. a row-parallel matmul over another dimension). Per shard, manual over `axis_name`."""
    n = jax.lax.axis_size(axis_name)
    if n == 1:
        return fn(h)
    index = jax.lax.axis_index(axis_name)
    chunk = h.shape[dim] // n

    def partial_product(step: int) -> jax.Array:
        rows = (index + step + 1) % n  # the device these rows end up on
        return fn(jax.lax.dynamic_slice_in_dim(h, rows * chunk, chunk, axis=dim))

    accumulated = partial_product(0)
    for step in range(1, n):
        arrived = jax.lax.ppermute(accumulated, axis_name, _ring_left(n))
        accumulated = arrived + partial_product(step)  # the product is independent of the transfer: overlap
    return accumulated


# ----------------------------------------------------------------------------- model-facing wrappers


def _einsums(subscripts: str, x: jax.Array, weights: Sequence[jax.Array]) -> tuple[jax.Array, ...]:
    return tuple(jnp.einsum(subscripts, x, w) for w in weights)


def _tensor_axis(logical: str) -> tuple[jax.sharding.Mesh, str] | None:
    """The single mesh axis (size > 1) that `logical` is split over under the active rules, with its mesh."""
    active = sharding.active_spec((logical,))
    if active is None:
        return None
    mesh, spec = active
    axis = spec[0]
    if not isinstance(axis, str) or mesh.shape[axis] == 1:
        return None
    return mesh, axis


def _manual_spec(axes: LogicalAxes, axis: str) -> PartitionSpec | None:
    """The part of the logical layout that mentions `axis` (the only manual axis); None when a dimension is split
    over `axis` together with other mesh axes, which a shard_map manual over `axis` alone cannot express."""
    active = sharding.active_spec(axes)
    assert active is not None
    entries = []
    for entry in active[1]:
        if isinstance(entry, tuple) and axis in entry:
            return None
        entries.append(axis if entry == axis else None)
    return PartitionSpec(*entries)


def _layout(split: str, specs: Sequence[LogicalAxes], enabled: bool) -> tuple[jax.sharding.Mesh, str, list] | None:
    """(mesh, tensor axis, manual specs) when the collective matmul applies, else None (use a plain einsum)."""
    found = _tensor_axis(split) if enabled else None
    if found is None:
        return None
    mesh, axis = found
    manual = [_manual_spec(axes, axis) for axes in specs]
    return None if any(spec is None for spec in manual) else (mesh, axis, manual)


def column_parallel(
    subscripts: str,
    x_btd: jax.Array,
    weights: Sequence[jax.Array],
    weight_axes: LogicalAxes,
    out_axes: LogicalAxes,
    split: str,
    enabled: bool,
    products: Callable | None = None,
) -> tuple[jax.Array, ...]:
    """`einsum(subscripts, x, w)` for each weight: x [batch, seq, embed], weights split over the tensor axis (the
    mesh axis of logical `split`) on an output dimension, outputs [batch, seq, ...] with the whole sequence.
    `products(subscripts, x, weights)` replaces the einsums when given (the FP8 projections).

    With `enabled`, x enters sequence-split and its all-gather runs as a ring overlapping the per-chunk matmuls
    (all weights share one ring, so q, k and v gather their input once)."""
    products = products or _einsums
    layout = _layout(split, [weight_axes, out_axes], enabled)
    if layout is None:
        return tuple(products(subscripts, x_btd, weights))
    mesh, axis, (w_spec, out_spec) = layout

    def per_shard(x, *ws):
        return ring_allgather_apply(x, lambda xc: tuple(products(subscripts, xc, ws)), axis, dim=1)

    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(PartitionSpec(None, axis, None), *(w_spec,) * len(weights)),
        out_specs=(out_spec,) * len(weights),
        axis_names={axis},
        check_vma=False,
    )(x_btd, *weights)


def row_parallel(
    subscripts: str,
    h: jax.Array,
    weight: jax.Array,
    h_axes: LogicalAxes,
    weight_axes: LogicalAxes,
    split: str,
    enabled: bool,
    product: Callable = jnp.einsum,
) -> jax.Array:
    """`product(subscripts, h, w)` (an einsum) -> [batch, seq, embed] with the contracted dimension split over the
    tensor axis (the mesh axis of logical `split`). With `enabled`, the output comes back sequence-split and the
    reduce-scatter runs as a ring overlapping the per-chunk matmuls."""
    layout = _layout(split, [h_axes, weight_axes], enabled)
    if layout is None:
        return product(subscripts, h, weight)
    mesh, axis, (h_spec, w_spec) = layout

    def per_shard(h, w):
        return ring_reducescatter_apply(h, lambda hc: product(subscripts, hc, w), axis, dim=1)

    return jax.shard_map(
        per_shard,
        mesh=mesh,
        in_specs=(h_spec, w_spec),
        out_specs=PartitionSpec(None, axis, None),
        axis_names={axis},
        check_vma=False,
    )(h, weight)
