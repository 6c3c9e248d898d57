"""The jitted train and eval steps, with explicit input and output shardings."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxdeep.parallel import hierarchical
from jaxdeep.sharding import logical_to_spec, use_rules
from jaxdeep.train import moe_step
from jaxdeep.train.pipeline_step import is_pipelined, make_pipeline_loss, make_pipeline_loss_and_grads
from jaxdeep.train.replicas import optimizer_update, per_replica_value_and_grad
from jaxdeep.train.state import ModelSetup, TrainState, batch_sharding


def cross_entropy(setup: ModelSetup, params, tokens_bs: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy of a [batch, seq+1] token block."""
    inputs, targets = tokens_bs[:, :-1], tokens_bs[:, 1:]
    logits = setup.apply(params, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


def per_replica_loss_and_grads(setup: ModelSetup, params, tokens_bs: jax.Array) -> tuple[jax.Array, dict]:
    """Mean loss, and each replica's own gradient [replicas, *shape] with nothing reduced across replicas yet."""
    loss_r, grads = per_replica_value_and_grad(setup, lambda p, t: cross_entropy(setup, p, t), params, tokens_bs)
    return loss_r.mean(), grads


def make_train_step(setup: ModelSetup) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    if setup.abstract_model_state is not None:  # MoE models: aux losses, expert-bias updates (moe_step.py)
        return moe_step.make_moe_train_step(setup)
    cfg = setup.cfg
    accum = cfg.optim.grad_accum_steps
    rules, mesh = cfg.sharding.rules, setup.mesh
    micro_sharding = NamedSharding(mesh, logical_to_spec((None, "batch", None), rules, mesh))
    compression = setup.compression  # None: dense, the partitioner all-reduces the gradients
    pipelined = make_pipeline_loss_and_grads(setup) if is_pipelined(setup) else None  # mesh.pipeline > 1
    tiers = hierarchical.plan_for(cfg, mesh)  # parallel.grad_reduce: the data-parallel reduction tier by tier
    if tiers is not None:
        tiered = hierarchical.make_hierarchical_loss_and_grads(lambda p, t: cross_entropy(setup, p, t), tiers, rules)

    def loss_and_grads(params, tokens_bs):
        if compression is not None:
            return per_replica_loss_and_grads(setup, params, tokens_bs)
        if pipelined is not None:
            return pipelined(params, tokens_bs)
        if tiers is not None:
            return tiered(params, tokens_bs)
        return jax.value_and_grad(lambda p: cross_entropy(setup, p, tokens_bs))(params)

    def step(state: TrainState, tokens_bs: jax.Array):
        with use_rules(rules, mesh):
            params = state["params"]
            if accum == 1:
                loss, grads = loss_and_grads(params, tokens_bs)
            else:
                # Microbatch k takes rows k, k+accum, ...: every microbatch stays spread over all data shards.
                micro_kbs = tokens_bs.reshape(-1, accum, tokens_bs.shape[-1]).swapaxes(0, 1)
                micro_kbs = jax.lax.with_sharding_constraint(micro_kbs, micro_sharding)

                def body(carry, tokens):
                    loss_sum, grad_sum = carry
                    loss, grads = loss_and_grads(params, tokens)
                    return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

                zeros = jax.tree.map(jnp.zeros_like, params)
                if compression is not None:
                    zeros = compression.zeros_per_replica(params)
                (loss, grads), _ = jax.lax.scan(body, (jnp.zeros((), jnp.float32), zeros), micro_kbs)
                loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
            updates, opt_state, grads, comm = optimizer_update(setup, grads, state["opt_state"], params)
            new_state = {
                "step": state["step"] + 1,
                "params": optax.apply_updates(params, updates),
                "opt_state": opt_state,
                "rng": state["rng"],
            }
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        metrics = {"loss": loss, "grad_norm": grad_norm, **comm}
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(setup.state_shardings, batch_sharding(setup)),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=0,
    )


def make_eval_step(setup: ModelSetup) -> Callable[[dict, jax.Array], jax.Array]:
    """step(params, tokens [batch, seq+1]) -> mean cross-entropy; models with model state take it third."""
    if setup.abstract_model_state is not None:
        return moe_step.make_moe_eval_step(setup)
    rules, mesh = setup.cfg.sharding.rules, setup.mesh
    loss = make_pipeline_loss(setup) if is_pipelined(setup) else lambda p, t: cross_entropy(setup, p, t)

    def step(params, tokens_bs):
        with use_rules(rules, mesh):
            return loss(params, tokens_bs)

    return jax.jit(
        step,
        in_shardings=(setup.state_shardings["params"], batch_sharding(setup)),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )


def make_forward(setup: ModelSetup) -> Callable[[dict, jax.Array], jax.Array]:
    """Logits of token ids [batch, seq] (used by tests and evaluation tools); models with model state take it
    as a third argument."""
    if setup.abstract_model_state is not None:
        return moe_step.make_moe_forward(setup)
    rules, mesh = setup.cfg.sharding.rules, setup.mesh
    tokens_sharding = NamedSharding(mesh, logical_to_spec(("batch", None), rules, mesh))

    def forward(params, tokens_bt):
        with use_rules(rules, mesh):
            return setup.apply(params, tokens_bt)

    return jax.jit(forward, in_shardings=(setup.state_shardings["params"], tokens_sharding))
