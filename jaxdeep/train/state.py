"""The train state (step, params, optimizer state, RNG) and its shardings on a mesh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdeep.config import ExperimentConfig
from jaxdeep.model import Transformer, logical_axes_of
from jaxdeep.sharding import tree_shardings
from jaxdeep.train.optimizer import make_optimizer

TrainState = dict[str, Any]  # {"step", "params", "opt_state", "rng"}: a plain pytree Orbax saves as is


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

    def apply(self, params, tokens_bt: jax.Array) -> jax.Array:
        state = jax.tree.map(lambda v: v, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)(tokens_bt)


def build_setup(cfg: ExperimentConfig, mesh: Mesh) -> ModelSetup:
    abstract_model = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0), cfg.kernels.norm))
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
    state_shardings = {
        "step": replicated,
        "params": param_shardings,
        "opt_state": opt_shardings,
        "rng": replicated,
    }
    abstract_train_state = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        {
            "step": jax.ShapeDtypeStruct((), jnp.int32),
            "params": abstract_params,
            "opt_state": abstract_opt,
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
        },
        state_shardings,
    )
    return ModelSetup(cfg, mesh, graphdef, abstract_state, optimizer, state_shardings, abstract_train_state)


def init_train_state(setup: ModelSetup) -> TrainState:
    """Initialise directly into the sharded layout (no full copy on one device)."""
    cfg = setup.cfg

    def init() -> TrainState:
        model = Transformer(cfg.model, nnx.Rngs(params=cfg.train.seed), cfg.kernels.norm)
        params = nnx.to_pure_dict(nnx.split(model, nnx.Param)[1])
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": setup.optimizer.init(params),
            "rng": jax.random.key_data(jax.random.key(cfg.train.seed + 1)).astype(jnp.uint32),
        }

    return jax.jit(init, out_shardings=setup.state_shardings)()
