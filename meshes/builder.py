"""Build a named device mesh from axis sizes, keeping the chattiest axes on the fastest interconnect.

Devices are laid out row-major over `AXES`: the last axis (`tensor`) varies fastest, so tensor neighbours are
consecutive devices, which sit in the same host; `data` varies slowest and spans hosts and racks. Devices are
numbered in (process_index, id) order, the same order a `Topology` uses for its groups.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh

from meshes.errors import MeshError
from meshes.topology import Topology

# Outermost (slowest-varying) to innermost (fastest-varying).
AXES: tuple[str, ...] = ("data", "pipeline", "fsdp", "expert", "tensor")

FILL = -1  # the axis size that takes all devices left over


class MeshLayoutWarning(UserWarning):
    """A mesh that works but puts a chatty axis on a slow tier."""


def _describe_product(sizes: Mapping[str, int]) -> tuple[str, int]:
    named = {axis: size for axis, size in sizes.items() if size != 1 and size != FILL}
    product = math.prod(named.values())
    if not named:
        return "(all 1)", product
    return " × ".join(f"{axis}={size}" for axis, size in named.items()), product


def resolve_axis_sizes(sizes: Mapping[str, int], n_devices: int) -> dict[str, int]:
    """All five axis sizes in `AXES` order: missing axes are 1, one axis may be -1 to take what is left."""
    if not isinstance(sizes, Mapping):
        raise MeshError(f"mesh: axis sizes must be a mapping such as {{'data': -1, 'tensor': 2}}, got {sizes!r}")
    if not isinstance(n_devices, int) or isinstance(n_devices, bool) or n_devices < 1:
        raise MeshError(f"mesh: the number of devices must be a positive integer, got {n_devices!r}")
    unknown = [str(axis) for axis in sizes if axis not in AXES]
    if unknown:
        raise MeshError(f"mesh: unknown axis {', '.join(map(repr, unknown))}; axes are {', '.join(AXES)}")
    resolved: dict[str, int] = {}
    for axis in AXES:
        size = sizes.get(axis, 1)
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or (size < 1 and size != FILL):
            raise MeshError(
                f"mesh: axis '{axis}' has size {size!r}; sizes must be positive integers, "
                f"or -1 on one axis to fill the remaining devices"
            )
        resolved[axis] = int(size)
    fill_axes = [axis for axis, size in resolved.items() if size == FILL]
    if len(fill_axes) > 1:
        raise MeshError(
            f"mesh: axes {' and '.join(map(repr, fill_axes))} are all -1; at most one axis may be -1 (fill)"
        )
    text, product = _describe_product(resolved)
    if fill_axes:
        if n_devices % product:
            raise MeshError(
                f"mesh: product of axis sizes {text} = {product} does not divide the {n_devices} "
                f"available devices, so '{fill_axes[0]}=-1' cannot fill them; pick sizes whose product "
                f"divides {n_devices}"
            )
        resolved[fill_axes[0]] = n_devices // product
    elif product != n_devices:
        raise MeshError(
            f"mesh: product of axis sizes {text} = {product} does not equal the {n_devices} available "
            "devices; set one axis to -1 to fill, or change the sizes"
        )
    return resolved


def axis_strides(sizes: Mapping[str, int], names: Sequence[str] = AXES) -> dict[str, int]:
    """Distance in device numbering between neighbours along each axis (row-major over `names`)."""
    strides: dict[str, int] = {}
    stride = 1
    for axis in reversed(names):
        strides[axis] = stride
        stride *= sizes[axis]
    return {axis: strides[axis] for axis in names}


def _check_topology_size(topology: Topology, n_devices: int) -> None:
    if topology.n_devices != n_devices:
        raise MeshError(
            f"mesh: topology {topology.name!r} ({topology.source}) describes {topology.n_devices} devices "
            f"but the mesh has {n_devices}; use a topology for this system, or 'auto' to describe the live "
            "devices"
        )


def _tiers_over(names: Sequence[str], sizes: Mapping[str, int], topology: Topology) -> dict[str, str | None]:
    # An axis with stride s and size n connects devices inside aligned blocks of s*n consecutive devices, and
    # its groups fill each block. They stay inside one tier group exactly when the group size is a multiple
    # of s*n (see tests/test_meshes.py for the brute-force check).
    strides = axis_strides(sizes, names)
    return {
        axis: None if sizes[axis] == 1 else topology.tier_for_block(strides[axis] * sizes[axis]).name for axis in names
    }


def axis_tiers(sizes: Mapping[str, int], topology: Topology) -> dict[str, str | None]:
    """The slowest tier each axis's collectives cross (None for size-1 axes), for the standard device order.

    `sizes` may leave axes out or use -1, as for `resolve_axis_sizes`, against the topology's device count.
    """
    resolved = resolve_axis_sizes(sizes, topology.n_devices)
    return _tiers_over(AXES, resolved, topology)


def axis_tier_split(sizes: Mapping[str, int], topology: Topology) -> dict[str, list[tuple[str, int]]]:
    """How each axis's size factors over the tiers, fastest first: [(tier name, factor), ...].

    E.g. data=64 outside tensor=8 on multi_rack gives [("infiniband", 32), ("ethernet", 2)]: groups of 32
    inside each rack, then 2 racks. This is the plan for a hierarchical collective. The product of the factors
    is the axis size; size-1 axes give []. Raises MeshError when an axis straddles a tier boundary unevenly.
    """
    resolved = resolve_axis_sizes(sizes, topology.n_devices)
    strides = axis_strides(resolved)
    split: dict[str, list[tuple[str, int]]] = {}
    for axis in AXES:
        stride, size = strides[axis], resolved[axis]
        span = stride * size
        factors: list[tuple[str, int]] = []
        members_before = 1
        for tier in topology.tiers:
            group = tier.devices_per_group
            if group % span == 0:
                members = size  # the whole axis fits in one group
            elif group < stride:
                members = 1  # neighbours along the axis are further apart than a group
            elif group % stride == 0 and span % group == 0:
                members = group // stride
            else:
                raise MeshError(
                    f"mesh: axis '{axis}' (size {size}, stride {stride}) splits unevenly over tier "
                    f"{tier.name!r} (groups of {group}); choose sizes so that each tier's group size and "
                    f"{span} divide one another"
                )
            if members > members_before:
                factors.append((tier.name, members // members_before))
            members_before = members
        split[axis] = factors
    return split


def default_devices() -> list[Any]:
    """All global devices in (process_index, id) order: the order topologies number devices in."""
    return sorted(jax.devices(), key=lambda d: (d.process_index, d.id))


def build_mesh(
    sizes: Mapping[str, int],
    topology: Topology | None = None,
    devices: Sequence[Any] | None = None,
    *,
    axis_types: tuple[AxisType, ...] | None = None,
) -> Mesh:
    """A mesh with all of `AXES` (size-1 axes included) over `devices` (default: all, in topology order).

    Every process of a multi-process run builds the same global mesh. `axis_types` defaults to Auto on every
    axis, so jit in/out shardings and sharding constraints drive the partitioner.
    """
    devices = default_devices() if devices is None else list(devices)
    if len({id(d) for d in devices}) != len(devices):
        raise MeshError("mesh: the device list repeats a device; give each device once")
    resolved = resolve_axis_sizes(sizes, len(devices))
    if topology is not None:
        _check_topology_size(topology, len(devices))
        tensor_tier = _tiers_over(AXES, resolved, topology)["tensor"]
        fastest = topology.fastest
        if tensor_tier is not None and tensor_tier != fastest.name:
            warnings.warn(
                f"mesh: tensor axis (size {resolved['tensor']}) crosses tier {tensor_tier!r}, slower than "
                f"the fastest tier {fastest.name!r} (groups of {fastest.devices_per_group}); its all-reduces "
                f"run every layer, so keep tensor within {fastest.devices_per_group} devices",
                MeshLayoutWarning,
                stacklevel=2,
            )
    grid = np.empty(len(devices), dtype=object)
    grid[:] = devices
    grid = grid.reshape(tuple(resolved[axis] for axis in AXES))
    if axis_types is None:
        axis_types = (AxisType.Auto,) * len(AXES)
    return Mesh(grid, AXES, axis_types=axis_types)


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]


def describe_mesh(mesh: Mesh, topology: Topology | None = None) -> str:
    """Human-readable layout: per axis its size, stride and tier crossed; then each device's coordinate.

    Without a topology, one is guessed from the mesh's devices (`Topology.auto`).
    """
    names = tuple(mesh.axis_names)
    sizes = {axis: int(size) for axis, size in dict(mesh.shape).items()}
    flat = list(mesh.devices.flat)
    if topology is None:
        topology = Topology.auto(flat)
    _check_topology_size(topology, len(flat))
    tiers = _tiers_over(names, sizes, topology)
    strides = axis_strides(sizes, names)

    lines = [
        f"mesh: {len(flat)} devices, {len({d.process_index for d in flat})} process(es), "
        f"topology {topology.name!r} ({topology.description or topology.source})",
        "tiers, fastest first: "
        + ", ".join(f"{t.name} (groups of {t.devices_per_group}, {t.bandwidth_gbps:g} GB/s)" for t in topology.tiers),
        "",
    ]
    rows = [["axis", "size", "stride", "tier crossed", "GB/s per device", "latency us"]]
    for axis in names:
        tier = tiers[axis]
        if tier is None:
            rows.append([axis, str(sizes[axis]), str(strides[axis]), "-", "-", "-"])
        else:
            found = topology.tier(tier)
            rows.append(
                [
                    axis,
                    str(sizes[axis]),
                    str(strides[axis]),
                    tier,
                    f"{found.bandwidth_gbps:g}",
                    f"{found.latency_us:g}",
                ]
            )
    lines += _table(rows)
    if flat != sorted(flat, key=lambda d: (d.process_index, d.id)):
        lines.append("note: devices are not in (process, id) order; the tier column assumes that order")
    lines.append("")
    rows = [["device", "process", "platform", *names]]
    for index in np.ndindex(*mesh.devices.shape):
        device = mesh.devices[index]
        rows.append([str(device.id), str(device.process_index), str(device.platform), *map(str, index)])
    lines += _table(rows)
    return "\n".join(lines)
