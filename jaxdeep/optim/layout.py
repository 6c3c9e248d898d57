"""Static plan of one exchange: which gradient leaves go dense, which are compressed together, and how many
entries each replica sends at a given ratio. Shared by the transform and the byte accounting, so the numbers in
the metrics are the sizes the collectives really have."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from jaxdeep.optim.selection import k_for_ratio

Selection = Literal["per_tensor", "global"]


@dataclass(frozen=True)
class Bucket:
    """Leaves compressed as one flat vector: top-k runs over all their entries at once."""

    leaves: tuple[int, ...]  # positions in the flattened gradient pytree
    size: int  # entries per replica (local shard sizes of the leaves, summed)
    chunk: int  # entries each replica selects from: size split over the fast-tier group (padded up)

    def sent(self, ratio: float) -> int:
        """(index, value) pairs each replica sends at `ratio`."""
        return k_for_ratio(ratio, self.chunk)


@dataclass(frozen=True)
class ExchangeLayout:
    buckets: tuple[Bucket, ...]
    dense_groups: tuple[tuple[int, ...], ...]  # leaves below the size floor, reduced with one psum per group
    dense_size: int  # entries in the dense leaves, summed
    fast_size: int  # replicas reduced densely before the sparse exchange (1 = flat exchange)


def plan_layout(
    leaf_sizes: Sequence[int],
    selection: Selection,
    min_size: int,
    fast_size: int = 1,
    leaf_groups: Sequence[Hashable] | None = None,
) -> ExchangeLayout:
    """`leaf_sizes`: entries of each gradient leaf on one device, in flattened-pytree order.

    `leaf_groups`: a key per leaf, equal for leaves split over the same mesh axes. Leaves are only ever
    concatenated within a group: a top-k over a tensor-split leaf and a replicated one together would pick
    different entries of the replicated leaf on each tensor shard, and its copies would drift apart.
    """
    if selection not in ("per_tensor", "global"):
        raise ValueError(f"unknown selection {selection!r}; choose 'per_tensor' or 'global'")
    groups = list(leaf_groups) if leaf_groups is not None else [None] * len(leaf_sizes)

    def by_group(leaves: list[int]) -> list[tuple[int, ...]]:
        keys = list(dict.fromkeys(groups[i] for i in leaves))
        return [tuple(i for i in leaves if groups[i] == key) for key in keys]

    compressed = [i for i, size in enumerate(leaf_sizes) if size >= max(min_size, 1)]
    dense = [i for i in range(len(leaf_sizes)) if i not in set(compressed)]
    together = [(i,) for i in compressed] if selection == "per_tensor" else by_group(compressed)
    buckets = []
    for leaves in together:
        size = sum(leaf_sizes[i] for i in leaves)
        buckets.append(Bucket(leaves, size, math.ceil(size / fast_size)))
    return ExchangeLayout(tuple(buckets), tuple(by_group(dense)), sum(leaf_sizes[i] for i in dense), fast_size)


def stage_ratios(ratio: float, warmup_steps: int, start_ratio: float, stages: int) -> tuple[float, ...]:
    """Density of each sparsity warm-up stage, then the final `ratio`: geometric from `start_ratio`, as DGC does."""
    if warmup_steps <= 0:
        return (ratio,)
    return tuple(start_ratio * (ratio / start_ratio) ** (s / stages) for s in range(stages)) + (ratio,)


def stage_of(step: jax.Array, warmup_steps: int, stages: int) -> jax.Array:
    """Warm-up stage of a step index: the warm-up cut into `stages` equal slices, then the final stage."""
    if warmup_steps <= 0:
        return jnp.zeros_like(step)
    return jnp.minimum(step * stages // warmup_steps, stages)
