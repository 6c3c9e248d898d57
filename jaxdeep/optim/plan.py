"""Which mesh axes a compressed gradient reduction runs over, and which tier of the topology each part crosses.

Replicas are the devices that hold the same parameters but see different data: the mesh axes that split the
batch and split no parameter (`data`, and `expert` for a dense model). Their reduction is what compression
replaces; reductions over axes that also split parameters (`fsdp`) stay dense and are left to the partitioner.

Flat mode (`topk`) exchanges top-k pairs among all replicas at once. Hierarchical mode (`topk_hierarchical`) uses
`meshes.axis_tier_split` to cut the replica axes by tier: a replica axis that straddles tiers (e.g. `data=4` as 2
devices per host × 2 hosts) becomes one sub-axis per tier in an exchange mesh over the same devices. Sub-axes on
the slowest tier crossed get the sparse exchange; the faster ones a dense reduce-scatter / all-gather around it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from jax.sharding import Mesh, PartitionSpec

import meshes

Mode = Literal["topk", "topk_hierarchical"]


@dataclass(frozen=True)
class ReplicaPlan:
    mode: Mode
    mesh: Mesh  # the training mesh
    exchange_mesh: Mesh  # same devices in the same order; replica axes split per tier in hierarchical mode
    replica_axes: tuple[str, ...]  # training-mesh axes the gradient is averaged over, outermost first
    replica_spec: tuple[str, ...]  # exchange-mesh axes of a leading per-replica dimension, outermost first
    slow_axes: tuple[str, ...]  # exchange-mesh axes of the sparse exchange
    fast_axes: tuple[str, ...]  # exchange-mesh axes reduced densely around it (empty in flat mode)
    slow_tier: str  # tier the sparse exchange crosses
    fast_tier: str | None  # slowest tier the dense part crosses (None in flat mode)

    @property
    def n_replicas(self) -> int:
        return math.prod(self.exchange_mesh.shape[a] for a in self.replica_spec)

    @property
    def fast_size(self) -> int:
        return math.prod(self.exchange_mesh.shape[a] for a in self.fast_axes)

    def describe(self) -> str:
        sparse = " × ".join(f"{a}={self.exchange_mesh.shape[a]}" for a in self.slow_axes)
        text = f"{self.n_replicas} replicas; top-k exchange over {sparse} (tier {self.slow_tier!r})"
        if self.fast_axes:
            dense = " × ".join(f"{a}={self.exchange_mesh.shape[a]}" for a in self.fast_axes)
            text += f", dense reduction over {dense} (tier {self.fast_tier!r}) first"
        return text


def spec_axes(spec: PartitionSpec) -> tuple[str, ...]:
    """Mesh axes a PartitionSpec splits over, in order."""
    names: list[str] = []
    for entry in spec:
        if entry is None:
            continue
        names.extend(entry if isinstance(entry, tuple) else (entry,))
    return tuple(names)


def replica_axes_of(mesh: Mesh, batch_axes: Iterable[str], param_specs: Iterable[PartitionSpec]) -> tuple[str, ...]:
    """Axes of size > 1 that split the batch and no parameter, in mesh order."""
    used = {axis for spec in param_specs for axis in spec_axes(spec)}
    batch = set(batch_axes)
    return tuple(a for a in mesh.axis_names if a in batch and a not in used and mesh.shape[a] > 1)


def make_plan(mode: Mode, mesh: Mesh, topology: meshes.Topology, replica_axes: tuple[str, ...]) -> ReplicaPlan:
    if not replica_axes:
        raise ValueError("no replica axes: compression needs a data-parallel axis of size > 1")
    sizes = {axis: int(size) for axis, size in mesh.shape.items()}
    rank = {tier.name: i for i, tier in enumerate(topology.tiers)}
    if mode == "topk":
        tiers = meshes.axis_tiers(sizes, topology)
        slow_tier = max((tiers[a] for a in replica_axes), key=rank.__getitem__)
        return ReplicaPlan(mode, mesh, mesh, replica_axes, replica_axes, replica_axes, (), slow_tier, None)
    if mode != "topk_hierarchical":
        raise ValueError(f"unknown compression mode {mode!r}")

    split = meshes.axis_tier_split(sizes, topology)
    names: list[str] = []  # exchange-mesh axes
    shape: list[int] = []
    tier_of: dict[str, str] = {}  # replica sub-axis -> tier
    for axis in mesh.axis_names:
        factors = split[axis] if axis in replica_axes else []
        if len(factors) <= 1:
            names.append(axis)
            shape.append(sizes[axis])
            if factors:
                tier_of[axis] = factors[0][0]
            continue
        # Devices are numbered row-major, so the slowest tier's factor is the outer one.
        for tier, factor in reversed(factors):
            names.append(f"{axis}_{tier}")
            shape.append(factor)
            tier_of[f"{axis}_{tier}"] = tier
    replica_spec = tuple(n for n in names if n in tier_of)
    slow_tier = max(tier_of.values(), key=rank.__getitem__)
    slow_axes = tuple(n for n in replica_spec if tier_of[n] == slow_tier)
    fast_axes = tuple(n for n in replica_spec if tier_of[n] != slow_tier)
    fast_tier = max((tier_of[n] for n in fast_axes), key=rank.__getitem__) if fast_axes else None
    exchange_mesh = mesh
    if tuple(names) != tuple(mesh.axis_names):
        devices = np.asarray(mesh.devices).reshape(shape)
        exchange_mesh = Mesh(devices, tuple(names), axis_types=(mesh.axis_types[0],) * len(names))
    return ReplicaPlan(
        mode, mesh, exchange_mesh, replica_axes, replica_spec, slow_axes, fast_axes, slow_tier, fast_tier
    )
