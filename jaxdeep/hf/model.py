"""A DeepSeek model held as sharded parameter trees, callable as `model(input_ids)` -> logits."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxdeep.config import MESH_AXES, ModelConfig, default_rules
from jaxdeep.model.deepseek import DeepSeekModel, ModelOutput, RoutingBias
from jaxdeep.model.kernel_choice import DEFAULT_KERNELS, KernelChoice
from jaxdeep.model.layers import logical_axes_of
from jaxdeep.sharding import Rules, tree_shardings, use_rules


def single_device_mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)


class ModelStructure:
    """Graph, abstract state and shardings of a DeepSeek model config on a mesh (no weights)."""

    def __init__(self, cfg: ModelConfig, mesh: Mesh, rules: Rules, kernels: KernelChoice = DEFAULT_KERNELS):
        abstract = nnx.eval_shape(lambda: DeepSeekModel(cfg, nnx.Rngs(0), kernels))
        self.graphdef, self.abstract_params, self.abstract_model_state = nnx.split(abstract, nnx.Param, RoutingBias)
        self.cfg, self.mesh, self.rules = cfg, mesh, rules
        self.param_shardings = tree_shardings(logical_axes_of(self.abstract_params), rules, mesh)
        self.model_state_shardings = tree_shardings(logical_axes_of(self.abstract_model_state), rules, mesh)

    def shapes(self) -> tuple[dict, dict]:
        """Pure-dict trees of ShapeDtypeStructs: (params, model_state)."""
        return nnx.to_pure_dict(self.abstract_params), nnx.to_pure_dict(self.abstract_model_state)

    def merge(self, params: dict, model_state: dict) -> DeepSeekModel:
        p_state = jax.tree.map(lambda v: v, self.abstract_params)
        nnx.replace_by_pure_dict(p_state, params)
        s_state = jax.tree.map(lambda v: v, self.abstract_model_state)
        nnx.replace_by_pure_dict(s_state, model_state)
        return nnx.merge(self.graphdef, p_state, s_state)


class HFModel:
    """DeepSeek weights placed on a mesh. `model(input_ids)` gives float32 logits [batch, seq, vocab]."""

    def __init__(
        self,
        config: ModelConfig,
        params: dict[str, Any],
        model_state: dict[str, Any],
        mesh: Mesh | None = None,
        rules: Rules | None = None,
    ):
        self.config = config
        self.mesh = mesh or single_device_mesh()
        self.rules = dict(rules or default_rules())
        self.structure = ModelStructure(config, self.mesh, self.rules)
        # Arrays already in place stay where they are; anything else (e.g. host arrays) moves to its sharding. A
        # parameter group may be missing (`load(skip=...)`).
        shardings, state_shardings = self.structure.param_shardings, self.structure.model_state_shardings
        self.params = jax.device_put(params, {k: shardings[k] for k in params})
        self.model_state = jax.device_put(model_state, {k: state_shardings[k] for k in model_state})

        def forward(params, model_state, tokens_bt, with_mtp: bool) -> ModelOutput:
            with use_rules(self.rules, self.mesh):
                return self.structure.merge(params, model_state).forward(tokens_bt, with_mtp=with_mtp)

        self._forward = jax.jit(forward, static_argnames="with_mtp")

    def __call__(self, input_ids) -> jax.Array:
        return self.output(input_ids, with_mtp=False).logits_btv

    def output(self, input_ids, with_mtp: bool = True) -> ModelOutput:
        """Logits plus MTP logits, expert loads and the balance loss."""
        tokens_bt = jnp.asarray(input_ids, jnp.int32)
        if tokens_bt.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {tokens_bt.shape}")
        return self._forward(self.params, self.model_state, tokens_bt, with_mtp=with_mtp)
