"""Train, eval and forward steps for models with MoE state (model.kind=deepseek).

Like the dense steps in `step.py`, plus: the loss has auxiliary parts (MTP, sequence-wise balance), the
routing statistics of the step update the non-trainable selection biases in `state["model_state"]`
(aux-loss-free balancing), and expert-load metrics join the step metrics. With `optim.compression` on, the
gradients are per replica (`replicas.py`) while the routing statistics stay totals over the whole batch.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxdeep.model.deepseek.objective import load_metrics, training_loss, update_routing_bias
from jaxdeep.sharding import logical_to_spec, use_rules
from jaxdeep.train.replicas import optimizer_update, per_replica_value_and_grad
from jaxdeep.train.state import ModelSetup, TrainState, batch_sharding

MEAN_PARTS = ("ce", "mtp", "balance")  # loss parts: means over the batch; the other aux entries are sums


def combine_replicas(aux_r: dict) -> dict:
    """Aux of the whole batch from per-replica aux [replicas, ...] (equal slices): loss parts are means over the
    replicas, expert counts and dropped copies sums, so the selection-bias update sees the global load."""
    reduce = {k: (lambda x: x.mean(0)) if k in MEAN_PARTS else (lambda x: x.sum(0)) for k in aux_r}
    return {k: jax.tree.map(reduce[k], v) for k, v in aux_r.items()}


def make_moe_train_step(setup: ModelSetup) -> Callable[[TrainState, jax.Array], tuple[TrainState, dict]]:
    cfg = setup.cfg
    accum = cfg.optim.grad_accum_steps
    rules, mesh = cfg.sharding.rules, setup.mesh
    micro_sharding = NamedSharding(mesh, logical_to_spec((None, "batch", None), rules, mesh))

    def loss_and_grads(params, model_state, tokens_bs):
        loss = lambda p, tokens: training_loss(setup.merge(p, model_state), tokens)  # noqa: E731
        if setup.compression is None:
            return jax.value_and_grad(lambda p: loss(p, tokens_bs), has_aux=True)(params)
        # Per-replica gradients for the compressed exchange; losses and routing statistics of the whole batch.
        (total_r, aux_r), grads = per_replica_value_and_grad(setup, loss, params, tokens_bs, has_aux=True)
        return (total_r.mean(), combine_replicas(aux_r)), grads

    def step(state: TrainState, tokens_bs: jax.Array):
        with use_rules(rules, mesh):
            params, model_state = state["params"], state["model_state"]
            if accum == 1:
                (total, aux), grads = loss_and_grads(params, model_state, tokens_bs)
            else:
                # Microbatch k takes rows k, k+accum, ...: every microbatch stays spread over all data shards.
                micro_kbs = tokens_bs.reshape(-1, accum, tokens_bs.shape[-1]).swapaxes(0, 1)
                micro_kbs = jax.lax.with_sharding_constraint(micro_kbs, micro_sharding)

                def body(carry, tokens):
                    (total, aux), grads = loss_and_grads(params, model_state, tokens)
                    return jax.tree.map(jnp.add, carry, (total, aux, grads)), None

                shapes = jax.eval_shape(loss_and_grads, params, model_state, micro_kbs[0])
                (zero_total, zero_aux), zero_grads = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
                (total, aux, grads), _ = jax.lax.scan(body, (zero_total, zero_aux, zero_grads), micro_kbs)
                # Expert counts and dropped copies stay sums over the whole batch; losses become means.
                total, grads = total / accum, jax.tree.map(lambda g: g / accum, grads)
                aux = {**aux, **{k: aux[k] / accum for k in MEAN_PARTS}}
            updates, opt_state, grads, comm = optimizer_update(setup, grads, state["opt_state"], params)
            speed = cfg.model.deepseek.bias_update_speed
            new_state = {
                "step": state["step"] + 1,
                "params": optax.apply_updates(params, updates),
                "opt_state": opt_state,
                "rng": state["rng"],
                "model_state": update_routing_bias(model_state, aux["expert_counts"], speed),
            }
        grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
        metrics = {"loss": aux["ce"], "total_loss": total, "grad_norm": grad_norm, **comm}
        metrics.update(load_metrics(aux, new_state["model_state"]))
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        step,
        in_shardings=(setup.state_shardings, batch_sharding(setup)),
        out_shardings=(setup.state_shardings, replicated),
        donate_argnums=0,
    )


def make_moe_eval_step(setup: ModelSetup) -> Callable[[dict, jax.Array, dict], jax.Array]:
    """step(params, tokens [batch, seq+1], model_state) -> mean next-token cross-entropy."""
    rules, mesh = setup.cfg.sharding.rules, setup.mesh

    def step(params, tokens_bs, model_state):
        with use_rules(rules, mesh):
            logits = setup.apply(params, tokens_bs[:, :-1], model_state)
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_bs[:, 1:]).mean()

    shardings = setup.state_shardings
    return jax.jit(
        step,
        in_shardings=(shardings["params"], batch_sharding(setup), shardings["model_state"]),
        out_shardings=NamedSharding(mesh, PartitionSpec()),
    )


def make_moe_forward(setup: ModelSetup) -> Callable[[dict, jax.Array, dict], jax.Array]:
    """forward(params, tokens [batch, seq], model_state) -> logits."""
    rules, mesh = setup.cfg.sharding.rules, setup.mesh

    def forward(params, tokens_bt, model_state):
        with use_rules(rules, mesh):
            return setup.apply(params, tokens_bt, model_state)

    shardings = setup.state_shardings
    return jax.jit(forward, in_shardings=(shardings["params"], batch_sharding(setup), shardings["model_state"]))
