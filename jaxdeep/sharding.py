"""Logical axis names -> mesh axes.

The model names dimensions only logically (`embed`, `heads`, `act_embed`, ...). One rules table, from the
config, says which mesh axes each logical name is split over. Data parallel, FSDP and tensor parallel all
come from this table; changing the layout never touches the model.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdeep.config import ConfigError

Rules = Mapping[str, Sequence[str]]
LogicalAxes = tuple[str | None, ...]


def logical_to_spec(axes: LogicalAxes, rules: Rules, mesh: Mesh | None = None) -> PartitionSpec:
    """Map logical names to a PartitionSpec. Mesh axes of size 1 are dropped (they split nothing),
    and a mesh axis already used by an earlier dimension is not used again."""
    used: set[str] = set()
    spec = []
    for name in axes:
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ConfigError(
                f"sharding.rules: logical axis {name!r} has no entry; add sharding.rules.{name}=[...] "
                f"(known: {', '.join(sorted(rules)) or 'none'})"
            )
        mesh_axes = [a for a in rules[name] if a not in used and (mesh is None or mesh.shape[a] > 1)]
        used.update(mesh_axes)
        spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else tuple(mesh_axes))
    return PartitionSpec(*spec)


def named_sharding(axes: LogicalAxes, rules: Rules, mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(axes, rules, mesh))


def tree_shardings(logical_tree, rules: Rules, mesh: Mesh):
    """A pytree of logical-axes tuples -> the same tree of NamedShardings."""
    return jax.tree.map(
        lambda axes: named_sharding(axes, rules, mesh), logical_tree, is_leaf=lambda x: isinstance(x, tuple)
    )


# The active (rules, mesh) while a step is traced, so model code can constrain activations by
# logical name without knowing the mesh.
_ACTIVE: contextvars.ContextVar[tuple[Rules, Mesh] | None] = contextvars.ContextVar("jaxdeep_rules", default=None)


@contextlib.contextmanager
def use_rules(rules: Rules, mesh: Mesh) -> Iterator[None]:
    token = _ACTIVE.set((rules, mesh))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: LogicalAxes) -> jax.Array:
    """Constrain an activation's sharding by logical names; a no-op outside `use_rules`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    rules, mesh = active
    return jax.lax.with_sharding_constraint(x, named_sharding(axes, rules, mesh))


def active_spec(axes: LogicalAxes) -> tuple[Mesh, PartitionSpec] | None:
    """(mesh, spec) for logical `axes` under `use_rules` on a mesh of several devices; else None."""
    active = _ACTIVE.get()
    if active is None or active[1].size == 1:  # `size`: a Mesh or, inside shard_map, an AbstractMesh
        return None
    rules, mesh = active
    return mesh, logical_to_spec(axes, rules, mesh)
