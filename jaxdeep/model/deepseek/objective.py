"""Training objective and aux-loss-free balancing for DeepSeek models.

loss = CE(next token) + lambda · mean_k CE_k(MTP depth k) + alpha · sequence-wise balance loss.
After each step the selection bias of every MoE layer moves by gamma toward balance: down for experts
loaded above the layer's mean, up for those below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxdeep.config import DeepSeekConfig
from jaxdeep.model.deepseek.model import DeepSeekModel


def training_loss(model: DeepSeekModel, tokens_bs: jax.Array) -> tuple[jax.Array, dict]:
    """(total loss, aux) for a [batch, seq+1] token block; aux holds the loss parts and expert counts."""
    ds: DeepSeekConfig = model.cfg.deepseek
    inputs, targets = tokens_bs[:, :-1], tokens_bs[:, 1:]
    out = model.forward(inputs, with_mtp=ds.num_nextn_predict_layers > 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits_btv, targets).mean()
    total = ce
    mtp = jnp.zeros((), jnp.float32)
    if ds.num_nextn_predict_layers:
        seq = inputs.shape[1]
        depth_losses = []
        for k in range(1, ds.num_nextn_predict_layers + 1):
            # Depth k at position i predicts token i+k+1: positions seq-k.. have no target.
            logits = out.mtp_logits_dbtv[k - 1][:, : seq - k]
            depth_losses.append(optax.softmax_cross_entropy_with_integer_labels(logits, tokens_bs[:, k + 1 :]).mean())
        mtp = jnp.stack(depth_losses).mean()
        total = total + ds.mtp_loss_weight * mtp
    total = total + ds.aux_loss_alpha * out.balance_loss
    aux = {
        "ce": ce,
        "mtp": mtp,
        "balance": out.balance_loss,
        "dropped": out.dropped_tokens,
        "expert_counts": out.expert_counts,
    }
    return total, aux


def update_routing_bias(model_state: dict, expert_counts: dict, speed: float) -> dict:
    """bias += speed · sign(mean load - load), per MoE layer; `model_state` is {stack: {... bias [L, E]}}."""

    def update(path, bias_le):
        counts_le = expert_counts[path[0].key]
        return bias_le + speed * jnp.sign(counts_le.mean(-1, keepdims=True) - counts_le)

    return jax.tree_util.tree_map_with_path(update, model_state)


def load_metrics(aux: dict, model_state: dict | None) -> dict[str, jax.Array]:
    """Expert-load statistics of one step: the worst layer's max/mean and min/mean load, dropped token
    copies, and the range of the selection biases."""
    metrics = {"mtp_loss": aux["mtp"], "moe_balance_loss": aux["balance"], "moe_dropped_tokens": aux["dropped"]}
    if aux["expert_counts"]:
        counts = jnp.concatenate(list(aux["expert_counts"].values()), axis=0)  # [moe layers, E]
        mean = counts.mean(-1)
        metrics["moe_max_load"] = (counts.max(-1) / mean).max()
        metrics["moe_min_load"] = (counts.min(-1) / mean).min()
    biases = jax.tree.leaves(model_state or {})
    if biases:
        metrics["moe_bias_min"] = jnp.min(jnp.stack([b.min() for b in biases]))
        metrics["moe_bias_max"] = jnp.max(jnp.stack([b.max() for b in biases]))
    return metrics
