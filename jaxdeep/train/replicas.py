"""Per-replica gradients and the compressed update, shared by the dense and the MoE train steps.

With `optim.compression` on, a step computes each replica's own gradient (nothing reduced across replicas), runs
the compression transform (the sparse cross-replica exchange, whose output is the mean gradient) and then the base
optimizer. `jaxdeep/optim/README.md` describes the exchange.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxdeep.sharding import use_rules
from jaxdeep.train.state import ModelSetup


def per_replica_value_and_grad(
    setup: ModelSetup, loss_fn: Callable[..., Any], params, tokens_bs: jax.Array, has_aux: bool = False
) -> tuple[Any, Any]:
    """`jax.value_and_grad(loss_fn)` of each replica's slice of the batch: values and gradients gain a leading
    replica dimension [replicas, ...], and nothing is reduced across replicas yet.

    `loss_fn(params, tokens)` sees one replica's [batch / replicas, seq+1] tokens. A vmap over the replicas with
    `spmd_axis_name`: the partitioner splits the replica dimension over the replica axes and, seeing no sum over
    it, inserts no cross-replica all-reduce; reductions over fsdp and tensor stay as on the dense path, and
    shard_maps inside the model (MoE expert dispatch) run per replica with the replica axes added to their specs.
    (A shard_map manual over the data axes only trips an XLA partitioner check once fsdp and tensor are both split.)
    """
    compression = setup.compression
    plan = compression.plan
    rules = {name: [a for a in axes if a not in plan.replica_axes] for name, axes in setup.cfg.sharding.rules.items()}
    tokens_rbs = tokens_bs.reshape(plan.n_replicas, -1, tokens_bs.shape[-1])
    # Each replica differentiates its own copy of the parameters (a broadcast split over the replica axes, so no
    # device holds more than before): a shard_map inside the model then sees per-replica weights, and its
    # transpose sums their gradients over its own axes only, never across replicas.
    params_r = jax.tree.map(lambda p: jnp.broadcast_to(p, (plan.n_replicas, *p.shape)), params)
    params_r = jax.lax.with_sharding_constraint(params_r, compression.grad_shardings)

    def one_replica(replica_params, tokens):
        return jax.value_and_grad(lambda p: loss_fn(p, tokens), has_aux=has_aux)(replica_params)

    with use_rules(rules, setup.mesh):
        values, grads = jax.vmap(one_replica, spmd_axis_name=plan.replica_axes)(params_r, tokens_rbs)
    return values, jax.lax.with_sharding_constraint(grads, compression.grad_shardings)


def optimizer_update(setup: ModelSetup, grads, opt_state, params) -> tuple[Any, Any, Any, dict]:
    """(updates, new optimizer state, the gradient the base optimizer saw, compression metrics).

    Dense: `grads` are the mean gradients and the metrics are empty. Compressed: `grads` are per-replica
    [replicas, *shape]; the chain's two parts run in turn, so the returned gradient is the exchanged mean."""
    compression = setup.compression
    if compression is None:
        updates, opt_state = setup.optimizer.update(grads, opt_state, params)
        return updates, opt_state, grads, {}
    comp_state, base_state = opt_state
    comm = compression.metrics(comp_state.count)
    grads, comp_state = compression.transform.update(grads, comp_state, params)
    updates, base_state = setup.base_optimizer.update(grads, base_state, params)
    return updates, (comp_state, base_state), grads, comm
