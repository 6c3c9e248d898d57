"""DeepSeekMoE: shared experts that every token uses plus fine-grained routed experts (dropless)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeep import sharding
from jaxdeep.config import ModelConfig
from jaxdeep.model.deepseek.dispatch import DOWN, GATE_UP, TOKENS, routed_experts
from jaxdeep.model.deepseek.norm import DTYPES
from jaxdeep.model.deepseek.router import Router, Routing, expert_counts, sequence_balance_loss
from jaxdeep.model.kernel_choice import DEFAULT_KERNELS, KernelChoice
from jaxdeep.model.layers import normal_param, scaled_init_std
from jaxdeep.model.matmul import activated_project, in_serving_layout, project_shared, silu_gate
from jaxdeep.sharding import constrain


class SwiGluMlp(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense layers' MLP and the shared experts (HF `gate_proj`, ...)."""

    def __init__(self, cfg: ModelConfig, hidden: int, rngs: nnx.Rngs, kernels: KernelChoice = DEFAULT_KERNELS):
        pdt, std = DTYPES[cfg.param_dtype], cfg.init_std
        self.gate_proj = normal_param(rngs, (cfg.d_model, hidden), ("embed", "mlp"), std, pdt)
        self.up_proj = normal_param(rngs, (cfg.d_model, hidden), ("embed", "mlp"), std, pdt)
        out_std = scaled_init_std(std, cfg.n_layers)
        self.down_proj = normal_param(rngs, (hidden, cfg.d_model), ("mlp", "embed"), out_std, pdt)
        self.dtype = DTYPES[cfg.dtype]
        self.kernels = kernels

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = self.dtype
        weights = (self.gate_proj[...].astype(dt), self.up_proj[...].astype(dt))
        gate_btf, up_btf = project_shared("btd,df->btf", x_btd, weights, self.kernels)
        hidden = ("batch", "act_seq", "act_mlp")
        gate_btf, up_btf = constrain(gate_btf, hidden), constrain(up_btf, hidden)
        down = self.down_proj[...].astype(dt)
        return activated_project("btf,fd->btd", silu_gate, (gate_btf, up_btf), down, self.kernels)


class RoutedExperts(nnx.Module):
    """Weights of all routed experts, stacked on a leading `expert` axis (HF `mlp.experts.{i}.*`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        ds, pdt, std = cfg.deepseek, DTYPES[cfg.param_dtype], cfg.init_std
        e, d, f = ds.n_routed_experts, cfg.d_model, ds.moe_intermediate_size
        self.gate_up_proj = normal_param(rngs, (e, d, 2, f), GATE_UP, std, pdt)
        self.down_proj = normal_param(rngs, (e, f, d), DOWN, scaled_init_std(std, cfg.n_layers), pdt)


class MoeStats(NamedTuple):
    counts_e: jax.Array  # float32 [E]: token copies routed to each expert in this call
    balance_loss: jax.Array  # float32 []: sequence-wise balance loss (before alpha); 0 when alpha = 0
    dropped: jax.Array  # token copies routed but not computed by an expert (0: dispatch is dropless)


class MoE(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kernels: KernelChoice = DEFAULT_KERNELS):
        ds = cfg.deepseek
        self.gate = Router(cfg.d_model, ds, rngs, cfg.init_std, DTYPES[cfg.param_dtype])
        self.experts = RoutedExperts(cfg, rngs)
        if ds.n_shared_experts:
            self.shared_experts = SwiGluMlp(cfg, ds.n_shared_experts * ds.moe_intermediate_size, rngs, kernels)
        self.cfg = cfg
        self.kernels = kernels

    def __call__(self, x_btd: jax.Array, routing: Routing | None = None) -> tuple[jax.Array, MoeStats]:
        """The layer's output for tokens x; `routing`, when given, is `self.gate`'s of x, computed by the caller."""
        ds, dt = self.cfg.deepseek, DTYPES[self.cfg.dtype]
        b, t, d = x_btd.shape
        if routing is None:
            routing = self.gate(x_btd.reshape(b * t, d))
        experts_btk = routing.experts_tk.reshape(b, t, -1)
        weights_btk = routing.weights_tk.reshape(b, t, -1)
        gate_up = self.experts.gate_up_proj[...].astype(dt)
        down = self.experts.down_proj[...].astype(dt)
        # Serving may append the shared experts to the stack (`serve.layout.with_shared_experts`): one token then
        # runs them as chosen experts of weight 1, in the routed experts' gather.
        stacked = ds.n_shared_experts and gate_up.shape[0] == ds.n_routed_experts + ds.n_shared_experts
        if stacked and b * t == 1 and in_serving_layout("experts") and sharding.active_spec(TOKENS) is None:
            shared = jnp.arange(ds.n_routed_experts, gate_up.shape[0], dtype=experts_btk.dtype)
            chosen_btk = jnp.concatenate([experts_btk, shared[None, None]], axis=-1)
            scales_btk = jnp.concatenate([weights_btk, jnp.ones((1, 1, ds.n_shared_experts), weights_btk.dtype)], -1)
            y_btd, _ = routed_experts(x_btd, chosen_btk, scales_btk, gate_up, down, self.kernels)
            y_btd, computed = y_btd.astype(dt), jnp.int32(routing.experts_tk.size)
        else:
            y_btd, computed = routed_experts(x_btd, experts_btk, weights_btk, gate_up, down, self.kernels)
            y_btd = y_btd.astype(dt)
            if ds.n_shared_experts:
                y_btd = y_btd + self.shared_experts(x_btd)
        counts = expert_counts(routing.experts_tk, ds.n_routed_experts)
        if ds.aux_loss_alpha > 0:
            balance = sequence_balance_loss(routing.scores_te.reshape(b, t, -1), experts_btk)
        else:
            balance = jnp.zeros((), jnp.float32)
        dropped = jnp.float32(routing.experts_tk.size) - computed.astype(jnp.float32)
        return constrain(y_btd, ("batch", "act_seq", "act_embed")), MoeStats(counts, balance, dropped)
