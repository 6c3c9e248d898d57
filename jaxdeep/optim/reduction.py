"""The compressed cross-replica reduction on global arrays, for the train step.

Per-replica gradients are global arrays with a leading replica dimension [R, *param_shape], split over the
replica axes (so each device holds its own replica's gradient shard, and nothing has been reduced yet). The
transformation runs `topk_compression` in a `jax.shard_map` over every axis of the exchange mesh: each device
selects within its own shard, and pairs travel only along the replica axes. Out comes the mean gradient, laid out
like the parameters. The error-feedback state keeps the leading replica dimension, so it is checkpointed and
restored like any other sharded array.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxdeep.optim.accounting import exchange_bytes
from jaxdeep.optim.plan import ReplicaPlan, spec_axes
from jaxdeep.optim.topk import TopkOptions, TopkState, layout_for, topk_compression


@dataclass
class CompressedReduction:
    plan: ReplicaPlan
    options: TopkOptions
    transform: optax.GradientTransformation  # per-replica gradients [R, *shape] -> mean gradients [*shape]
    grad_shardings: Any  # NamedShardings of per-replica gradients on the training mesh
    state_shardings: TopkState  # NamedShardings of the transform's state on the training mesh
    stage_metrics: tuple[dict[str, float], ...]  # byte accounting of each warm-up stage, then the final one

    def zeros_per_replica(self, params: Any) -> Any:
        """Per-replica gradient accumulators: zeros [R, *shape] like `params`."""
        n = self.plan.n_replicas
        return jax.tree.map(lambda p: jnp.zeros((n, *p.shape), p.dtype), params)

    def metrics(self, count: jax.Array) -> dict[str, jax.Array]:
        """Byte accounting of the step taken at `count` (the state's count before the update)."""
        stage = self.options.stage(count)
        return {
            name: jnp.asarray([row[name] for row in self.stage_metrics], jnp.float32)[stage]
            for name in self.stage_metrics[0]
        }


def _leading(axes: tuple[str, ...]) -> str | tuple[str, ...]:
    return axes[0] if len(axes) == 1 else axes


def local_size(shape: tuple[int, ...], spec: PartitionSpec, mesh_shape: dict[str, int]) -> int:
    """Entries of one device's shard of an array of `shape` split as `spec`."""
    return math.prod(shape) // math.prod(mesh_shape[a] for a in spec_axes(spec))


def byte_table(
    plan: ReplicaPlan, options: TopkOptions, leaf_sizes: list[int], itemsize: int, shard_axes: list[tuple[str, ...]]
) -> tuple[dict, ...]:
    layout = layout_for(leaf_sizes, options, plan.fast_size, shard_axes)
    return tuple(
        exchange_bytes(layout, ratio, itemsize, plan.n_replicas, plan.slow_tier, plan.fast_tier)
        for ratio in options.ratios
    )


def compressed_reduction(
    plan: ReplicaPlan, options: TopkOptions, abstract_params: Any, param_shardings: Any
) -> CompressedReduction:
    """`abstract_params`: shapes and dtypes of the parameters; `param_shardings`: their NamedShardings on
    `plan.mesh` (which must not use the replica axes)."""
    param_specs = jax.tree.map(lambda s: s.spec, param_shardings)
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    # The same specs name the same axes in the exchange mesh: only replica axes are split there.
    per_replica_specs = jax.tree.map(lambda spec: PartitionSpec(_leading(plan.replica_spec), *spec), param_specs)
    grad_shardings = jax.tree.map(
        lambda spec: NamedSharding(plan.mesh, PartitionSpec(_leading(plan.replica_axes), *spec)), param_specs
    )
    flat_specs = jax.tree.leaves(param_specs, is_leaf=is_spec)
    shard_axes = [spec_axes(spec) for spec in flat_specs]
    fields = {k: v for k, v in asdict(options).items() if k != "ratio"}
    inner = topk_compression(
        options.ratio,
        axes=plan.slow_axes,
        fast_axes=plan.fast_axes,
        shard_axes=shard_axes,
        **fields,
    )

    def optional(on: bool, tree: Any) -> Any:
        return tree if on else ()

    # State fields in TopkState order after `count`: per replica (a leading replica dimension), except the mean
    # estimate, which is the same on every replica and laid out like the parameters. Fields the options do not
    # keep are empty tuples.
    kept = options.kept_fields
    per_replica = (True, True, True, False, True)
    state_specs = TopkState(
        PartitionSpec(),
        *(optional(on, per_replica_specs if r else param_specs) for on, r in zip(kept, per_replica, strict=True)),
    )
    state_shardings = TopkState(
        NamedSharding(plan.mesh, PartitionSpec()),
        *(optional(on, grad_shardings if r else param_shardings) for on, r in zip(kept, per_replica, strict=True)),
    )

    def init(params: Any) -> TopkState:
        def zeros(replicas: bool) -> Any:
            lead = (plan.n_replicas,) if replicas else ()
            return jax.tree.map(lambda p: jnp.zeros((*lead, *p.shape), p.dtype), params)

        return TopkState(
            jnp.zeros((), jnp.int32), *(zeros(r) if on else () for on, r in zip(kept, per_replica, strict=True))
        )

    def local_update(grads: Any, state: TopkState) -> tuple[Any, TopkState]:
        # Inside the shard_map each device holds one replica: drop the leading dimension of size 1 and restore it.
        def squeeze(tree: Any, r: bool = True) -> Any:
            return jax.tree.map(lambda x: x[0], tree) if r else tree

        def expand(tree: Any, r: bool) -> Any:
            return jax.tree.map(lambda x: x[None], tree) if r else tree

        fields = zip(state[1:], per_replica, strict=True)
        mean, new = inner.update(squeeze(grads), TopkState(state.count, *(squeeze(f, r) for f, r in fields)))
        return mean, TopkState(new.count, *(expand(f, r) for f, r in zip(new[1:], per_replica, strict=True)))

    exchange = jax.shard_map(
        local_update,
        mesh=plan.exchange_mesh,
        in_specs=(per_replica_specs, state_specs),
        out_specs=(param_specs, state_specs),
    )

    def update(grads: Any, state: TopkState, params: Any = None) -> tuple[Any, TopkState]:
        del params
        return exchange(grads, state)

    mesh_shape = {a: int(s) for a, s in plan.mesh.shape.items()}
    abstract_leaves = jax.tree.leaves(abstract_params)
    sizes = [local_size(a.shape, spec, mesh_shape) for a, spec in zip(abstract_leaves, flat_specs, strict=True)]
    itemsize = max(jnp.dtype(a.dtype).itemsize for a in abstract_leaves)
    return CompressedReduction(
        plan,
        options,
        optax.GradientTransformation(init, update),
        grad_shardings,
        state_shardings,
        byte_table(plan, options, sizes, itemsize, shard_axes),
    )
