"""From the experiment config to the compressed reduction the train step uses."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.sharding import Mesh

import meshes
from jaxdeep.config import ConfigError, ExperimentConfig, OptimConfig
from jaxdeep.optim.plan import make_plan, replica_axes_of
from jaxdeep.optim.reduction import CompressedReduction, compressed_reduction
from jaxdeep.optim.topk import TopkOptions


def topk_options(optim: OptimConfig, seed: int = 0) -> TopkOptions:
    """optim.topk's options; with precondition "rms" the replicas also take Adam's b2 and eps and the global-norm
    clip from `optim`, since the optimizer after the exchange no longer applies them."""
    topk = optim.topk
    fields = {f.name: getattr(topk, f.name) for f in dataclasses.fields(topk)}
    return TopkOptions(**fields, b2=optim.b2, eps=optim.eps, clip_norm=optim.clip_norm, seed=seed)


def topology_of(cfg: ExperimentConfig, mesh: Mesh) -> meshes.Topology:
    """The topology named by mesh.topology, for the mesh's devices."""
    if cfg.mesh.topology == "auto":
        return meshes.Topology.auto(list(mesh.devices.flat))
    return meshes.load_topology(cfg.mesh.topology)


def build_compression(
    cfg: ExperimentConfig,
    mesh: Mesh,
    abstract_params: Any,
    param_shardings: Any,
    topology: meshes.Topology | None = None,
) -> CompressedReduction | None:
    """None when optim.compression is none; otherwise the plan and transformation for this mesh."""
    mode = cfg.optim.compression
    if mode == "none":
        return None
    if mesh.shape.get("pipeline", 1) > 1:
        raise ConfigError(f"optim.compression={mode}: not available with mesh.pipeline > 1; set one of them off")
    specs = [s.spec for s in jax.tree.leaves(param_shardings)]
    replica_axes = replica_axes_of(mesh, cfg.sharding.rules.get("batch", []), specs)
    if not replica_axes:
        raise ConfigError(
            f"optim.compression={mode}: no axis to compress over; it needs a data-parallel mesh axis of size > 1 "
            "that splits the batch and no parameter (mesh.data, or mesh.expert for a dense model); "
            "raise mesh.data or set optim.compression=none"
        )
    topology = topology_of(cfg, mesh) if topology is None else topology
    plan = make_plan(mode, mesh, topology, replica_axes)
    return compressed_reduction(plan, topk_options(cfg.optim, cfg.train.seed), abstract_params, param_shardings)
