"""Device layout: topology descriptions (tiers of interconnect) and named-mesh construction.

Imports jax, numpy and yaml only, never `jaxdeep`.
"""

from meshes.builder import (
    AXES,
    FILL,
    MeshLayoutWarning,
    axis_strides,
    axis_tier_split,
    axis_tiers,
    build_mesh,
    default_devices,
    describe_mesh,
    resolve_axis_sizes,
)
from meshes.errors import MeshError, TopologyError
from meshes.topology import Tier, Topology, load_topology, preset_names, topology_from_dict

__all__ = [
    "AXES",
    "FILL",
    "MeshError",
    "MeshLayoutWarning",
    "Tier",
    "Topology",
    "TopologyError",
    "axis_strides",
    "axis_tier_split",
    "axis_tiers",
    "build_mesh",
    "default_devices",
    "describe_mesh",
    "load_topology",
    "preset_names",
    "resolve_axis_sizes",
    "topology_from_dict",
]
