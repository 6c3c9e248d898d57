"""The train state (step, params, optimizer state, RNG) and its shardings on a mesh."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import meshes
from jaxdeep.config import ConfigError, ExperimentConfig
from jaxdeep.model import RoutingBias, build_model, logical_axes_of
from jaxdeep.optim import CompressedReduction, build_compression
from jaxdeep.sharding import logical_to_spec, tree_shardings
from jaxdeep.train.optimizer import make_optimizer

# {"step", "params", "opt_state", "rng"}, plus "model_state" (non-trainable model variables such as the MoE
# selection biases) for models that have some: a plain pytree Orbax saves as is
TrainState = dict[str, Any]


@dataclass
class ModelSetup:
    """Everything derived from the config and mesh that the steps need: built once per run."""

    cfg: ExperimentConfig
    mesh: Mesh
    graphdef: nnx.GraphDef
    abstract_state: nnx.State  # shapes and metadata of the model's parameters
    optimizer: optax.GradientTransformation
    state_shardings: TrainState
    abstract_train_state: TrainState  # ShapeDtypeStructs with shardings, for restores
    compression: CompressedReduction | None = None  # compressed cross-replica reduction; None = dense (GSPMD)
    base_optimizer: optax.GradientTransformation | None = None  # what runs after the compression (AdamW chain)
    abstract_model_state: nnx.State | None = None  # non-trainable model variables (MoE selection biases); None = none

    def apply(self, params, tokens_bt: jax.Array, model_state=None) -> jax.Array:
        return self.merge(params, model_state)(tokens_bt)

    def merge(self, params, model_state=None) -> nnx.Module:
        """The model with these parameters (and model state, for models that have some)."""
        state = jax.tree.map(lambda v: v, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        if self.abstract_model_state is None:
            return nnx.merge(self.graphdef, state)
        extra = jax.tree.map(lambda v: v, self.abstract_model_state)
        nnx.replace_by_pure_dict(extra, model_state)
        return nnx.merge(self.graphdef, state, extra)


def batch_sharding(setup: ModelSetup) -> NamedSharding:
    """Token batches [batch, seq+1] are split over the mesh axes of the logical `batch` name."""
    return NamedSharding(setup.mesh, logical_to_spec(("batch", None), setup.cfg.sharding.rules, setup.mesh))


def build_setup(cfg: ExperimentConfig, mesh: Mesh, topology: meshes.Topology | None = None) -> ModelSetup:
    """`topology` (a meshes.Topology) places the compressed exchange's tiers; None = from mesh.topology."""
    abstract_model = nnx.eval_shape(lambda: build_model(cfg, nnx.Rngs(0)))
    abstract_model_state = None
    if cfg.model.kind == "deepseek":
        if mesh.shape["pipeline"] > 1:
            raise ConfigError("model.kind=deepseek: mesh.pipeline > 1 is not supported yet; set mesh.pipeline=1")
        graphdef, abstract_state, abstract_model_state = nnx.split(abstract_model, nnx.Param, RoutingBias)
    else:
        graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
    logical = logical_axes_of(abstract_state)
    decay_mask = jax.tree.map(lambda axes: "norm" not in axes, logical, is_leaf=lambda x: isinstance(x, tuple))
    optimizer = make_optimizer(cfg.optim, cfg.train.steps, decay_mask)

    param_shardings = tree_shardings(logical, cfg.sharding.rules, mesh)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_params = nnx.to_pure_dict(abstract_state)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
    # Optimizer moments are sharded like the parameters they follow; scalars (counts) are replicated.
    opt_shardings = optax.tree_map_params(
        optimizer,
        lambda _, sharding: sharding,
        abstract_opt,
        param_shardings,
        transform_non_params=lambda _: replicated,
    )
    base_optimizer = optimizer
    compression = build_compression(cfg, mesh, abstract_params, param_shardings, topology)
    if compression is not None:
        # Compression runs first and keeps the per-replica error feedback: opt_state = (its state, AdamW's).
        optimizer = optax.chain(compression.transform, base_optimizer)
        abstract_opt = jax.eval_shape(optimizer.init, abstract_params)
        opt_shardings = (compression.state_shardings, opt_shardings)
    state_shardings = {
        "step": replicated,
        "params": param_shardings,
        "opt_state": opt_shardings,
        "rng": replicated,
    }
    abstract_tree = {
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "params": abstract_params,
        "opt_state": abstract_opt,
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    if abstract_model_state is not None:
        state_shardings["model_state"] = tree_shardings(logical_axes_of(abstract_model_state), cfg.sharding.rules, mesh)
        abstract_tree["model_state"] = nnx.to_pure_dict(abstract_model_state)
    abstract_train_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_tree, state_shardings
    )
    return ModelSetup(
        cfg,
        mesh,
        graphdef,
        abstract_state,
        optimizer,
        state_shardings,
        abstract_train_state,
        compression=compression,
        base_optimizer=base_optimizer,
        abstract_model_state=abstract_model_state,
    )


def init_train_state(setup: ModelSetup) -> TrainState:
    """Initialise directly into the sharded layout (no full copy on one device)."""
    return jax.jit(make_init(setup), out_shardings=setup.state_shardings)()


def make_init(setup: ModelSetup) -> Callable[[], TrainState]:
    """The function (of no arguments) that builds a fresh train state: jit it with `setup.state_shardings`."""
    cfg = setup.cfg

    def init() -> TrainState:
        model = build_model(cfg, nnx.Rngs(params=cfg.train.seed))
        params = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": setup.optimizer.init(params),
            "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)).astype(jnp.uint32),
        }
        if setup.abstract_model_state is not None:
            state["model_state"] = nnx.to_pure_dict(nnx.split(model, RoutingBias, ...)[1])
        return state

    return init
