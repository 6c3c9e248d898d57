"""Hierarchical data-parallel reduction: when the `data` axis spans several tiers of the topology (e.g. GPUs of a
host on NVLink, hosts on InfiniBand), reduce-scatter inside the fast tier, all-reduce only the 1/n shard across
the slow tier, and all-gather back inside the fast tier. The slow links then carry 1/n of the gradient instead of
all of it (n = devices of the axis inside one fast group).

The plan comes from the topology: `meshes.axis_tier_split` factors the axis per tier, fastest first, and the
reduction runs in a `jax.shard_map` over a view of the mesh in which that axis is split into one sub-axis per
tier (same devices, same order), so each step is a native collective over exactly one tier's groups.

Per-replica gradients come from a vmap over the data shards with `spmd_axis_name` (the partitioner then inserts
no cross-replica all-reduce of its own); reductions over fsdp and tensor stay with the partitioner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
from jax.sharding import Mesh, PartitionSpec

import meshes
from jaxdeep.config import ExperimentConfig
from jaxdeep.sharding import Rules, use_rules


@dataclass(frozen=True)
class ReductionPlan:
    axis: str  # the mesh axis the gradient is averaged over
    levels: tuple[tuple[str, int], ...]  # (tier, factor) fastest first; the product is the axis size
    mesh: Mesh  # the training mesh
    split_mesh: Mesh  # same devices, `axis` replaced by one sub-axis per level

    @property
    def level_axes(self) -> tuple[str, ...]:
        """Sub-axis names, fastest first."""
        return tuple(f"{self.axis}_{tier}" for tier, _ in self.levels)

    @property
    def is_hierarchical(self) -> bool:
        return len(self.levels) > 1

    def describe(self) -> str:
        steps = " → ".join(f"{tier} ×{n}" for tier, n in self.levels)
        return f"gradient reduction over {self.axis}: {steps}"


def topology_of(cfg: ExperimentConfig, mesh: Mesh) -> meshes.Topology:
    name = cfg.mesh.topology
    return meshes.Topology.auto(list(mesh.devices.flat)) if name == "auto" else meshes.load_topology(name)


def reduction_plan(mesh: Mesh, topology: meshes.Topology, axis: str = "data") -> ReductionPlan:
    """Factor `axis` over the topology's tiers and build the matching view of the mesh."""
    sizes = {name: int(size) for name, size in mesh.shape.items()}
    levels = tuple(meshes.axis_tier_split(sizes, topology)[axis]) or (("local", 1),)
    names = list(mesh.axis_names)
    at = names.index(axis)
    # Device order inside the axis is slowest tier outermost, so the sub-axes go slowest first.
    sub_names = [f"{axis}_{tier}" for tier, _ in reversed(levels)]
    shape = list(mesh.devices.shape)
    devices = mesh.devices.reshape(*shape[:at], *(n for _, n in reversed(levels)), *shape[at + 1 :])
    split = Mesh(devices, (*names[:at], *sub_names, *names[at + 1 :]))
    return ReductionPlan(axis, levels, mesh, split)


def _scatter_dim(shape: Sequence[int], parts: int) -> int | None:
    """The largest dimension that splits into `parts` (None: none does, reduce the leaf whole)."""
    fits = [d for d, n in enumerate(shape) if n % parts == 0]
    return max(fits, key=lambda d: shape[d]) if fits else None


def hierarchical_psum(x: jax.Array, level_axes: Sequence[str]) -> jax.Array:
    """psum over all `level_axes` (fastest first), as reduce-scatters up the tiers, one all-reduce on the slowest
    and all-gathers back down. Per shard, inside a shard_map manual over `level_axes`."""
    *inner, outer = level_axes
    parts = math.prod(jax.lax.axis_size(a) for a in inner)
    dim = _scatter_dim(x.shape, parts) if inner else None
    if dim is None:
        return jax.lax.psum(x, tuple(level_axes))
    for axis in inner:
        x = jax.lax.psum_scatter(x, axis, scatter_dimension=dim, tiled=True)
    x = jax.lax.psum(x, outer)
    for axis in reversed(inner):
        x = jax.lax.all_gather(x, axis, axis=dim, tiled=True)
    return x


def hierarchical_mean(per_replica, plan: ReductionPlan):
    """Mean over the leading replica dimension [R, ...] of every leaf (R = size of `plan.axis`, split over it),
    reduced tier by tier. Global view in, replicated-over-`plan.axis` out."""
    level_axes = plan.level_axes
    n = math.prod(size for _, size in plan.levels)
    replica_spec = PartitionSpec(tuple(reversed(level_axes)))  # slowest sub-axis outermost, as the devices run

    def per_shard(tree):
        return jax.tree.map(lambda g: hierarchical_psum(g[0], level_axes) / n, tree)

    return jax.shard_map(
        per_shard,
        mesh=plan.split_mesh,
        in_specs=replica_spec,
        out_specs=PartitionSpec(),
        axis_names=set(level_axes),
        check_vma=False,
    )(per_replica)


def per_replica_value_and_grad(loss_fn: Callable, params, tokens_bs: jax.Array, plan: ReductionPlan, rules: Rules):
    """(per-replica losses [R], per-replica gradients [R, ...]) of `loss_fn(params, tokens)`, nothing reduced
    across replicas: a vmap over the data shards that the partitioner splits over `plan.axis`."""
    n = plan.mesh.shape[plan.axis]
    tokens_rbs = tokens_bs.reshape(n, -1, tokens_bs.shape[-1])
    inner_rules = {name: [a for a in axes if a != plan.axis] for name, axes in rules.items()}
    with use_rules(inner_rules, plan.mesh):
        return jax.vmap(lambda t: jax.value_and_grad(loss_fn)(params, t), spmd_axis_name=plan.axis)(tokens_rbs)


def make_hierarchical_loss_and_grads(loss_fn: Callable, plan: ReductionPlan, rules: Rules) -> Callable:
    """(params, tokens) -> (mean loss, mean gradients) with the data-parallel reduction done tier by tier."""

    def loss_and_grads(params, tokens_bs):
        loss_r, grads_r = per_replica_value_and_grad(loss_fn, params, tokens_bs, plan, rules)
        return loss_r.mean(), hierarchical_mean(grads_r, plan)

    return loss_and_grads


def plan_for(cfg: ExperimentConfig, mesh: Mesh) -> ReductionPlan | None:
    """The plan `parallel.grad_reduce` asks for on this mesh, or None for the partitioner's flat all-reduce."""
    mode = cfg.parallel.grad_reduce
    if mode == "flat" or mesh.shape["data"] == 1 or cfg.optim.compression != "none" or mesh.shape["pipeline"] > 1:
        return None
    plan = reduction_plan(mesh, topology_of(cfg, mesh))
    return plan if plan.is_hierarchical or mode == "hierarchical" else None
