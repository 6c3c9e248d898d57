"""Expert routing: affinity scores, (group-limited) top-k selection, the selection bias, balance statistics."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeep.config import DeepSeekConfig
from jaxdeep.model.layers import StackableAxes, normal_param
from jaxdeep.model.matmul import decode_kernel, in_serving_layout, single_row_product
from jaxdeep.sharding import active_spec
from kernels import decode as decode_kernels


class RoutingBias(StackableAxes, nnx.Variable):
    """The per-expert selection bias of aux-loss-free balancing: model state, not a trainable parameter.

    It carries logical axis names like `Param` (the `layers` axis is added when layers are stacked).
    """


class Routing(NamedTuple):
    experts_tk: jax.Array  # int32 [tokens, K]: chosen experts
    weights_tk: jax.Array  # float32 [tokens, K]: their weights (each scales its expert's SwiGLU output)
    scores_te: jax.Array  # float32 [tokens, E]: affinities (sigmoid or softmax), before any bias


class Router(nnx.Module):
    """HF `mlp.gate`: `weight` [embed, experts] and, for noaux_tc, `e_score_correction_bias` [experts]."""

    def __init__(self, d_model: int, ds: DeepSeekConfig, rngs: nnx.Rngs, std: float, param_dtype):
        self.weight = normal_param(rngs, (d_model, ds.n_routed_experts), ("embed", "router"), std, param_dtype)
        if ds.topk_method == "noaux_tc":
            zeros = jnp.zeros((ds.n_routed_experts,), jnp.float32)
            self.e_score_correction_bias = RoutingBias(zeros, logical_axes=("router",))
        self.ds = ds

    def __call__(self, x_td: jax.Array) -> Routing:
        return self.choose(self.logits(x_td))

    def logits(self, x_td: jax.Array) -> jax.Array:
        """float32 [tokens, E]: routing runs in float32 whatever the compute dtype (near-ties decide which experts
        run)."""
        return _float32_logits(x_td, self.weight[...])

    def choose(self, logits_te: jax.Array) -> Routing:
        bias = self.e_score_correction_bias[...] if self.ds.topk_method == "noaux_tc" else None
        return route(logits_te, bias, self.ds)


@jax.checkpoint  # the backward keeps x in the compute dtype, not its float32 copy
def _float32_logits(x_td: jax.Array, weight_de: jax.Array) -> jax.Array:
    x_td, weight_de = x_td.astype(jnp.float32), weight_de.astype(jnp.float32)
    if x_td.shape[0] == 1 and in_serving_layout("projections"):  # decode of one token: the weight is [experts]-major
        return single_row_product("td,de->te", x_td, weight_de)
    return jnp.einsum("td,de->te", x_td, weight_de)


def route(logits_te: jax.Array, bias_e: jax.Array | None, ds: DeepSeekConfig) -> Routing:
    """Choose `num_experts_per_tok` experts per token. The bias shifts only the choice, never the weights."""
    if _on_decode_kernel(logits_te, ds):  # a few tokens' greedy choice in one launch, not a softmax and a sort
        experts_tk, weights_tk, scores_te = decode_kernels.route(
            logits_te, bias_e, ds.num_experts_per_tok, ds.scoring_func, impl=decode_kernel()
        )
        return _weighted(experts_tk, weights_tk, scores_te, ds)
    if ds.scoring_func == "sigmoid":
        scores_te = jax.nn.sigmoid(logits_te)
    else:
        scores_te = jax.nn.softmax(logits_te, axis=-1)
    choice_te = jax.lax.stop_gradient(scores_te)
    if bias_e is not None:
        choice_te = choice_te + jax.lax.stop_gradient(bias_e).astype(jnp.float32)
    n_tokens, n_experts = choice_te.shape
    if _grouped(ds):
        choice_tgx = choice_te.reshape(n_tokens, ds.n_group, n_experts // ds.n_group)
        if ds.topk_method == "noaux_tc":
            group_scores_tg = jax.lax.top_k(choice_tgx, 2)[0].sum(-1)
        else:
            group_scores_tg = choice_tgx.max(-1)
        _, groups_tk = jax.lax.top_k(group_scores_tg, ds.topk_group)
        keep_tg = jax.nn.one_hot(groups_tk, ds.n_group, dtype=jnp.bool_).any(axis=1)
        fill = -jnp.inf if ds.group_mask_fill == "neg_inf" else 0.0
        choice_te = jnp.where(keep_tg[:, :, None], choice_tgx, fill).reshape(n_tokens, n_experts)
    _, experts_tk = jax.lax.top_k(choice_te, ds.num_experts_per_tok)
    weights_tk = jnp.take_along_axis(scores_te, experts_tk, axis=-1)
    return _weighted(experts_tk, weights_tk, scores_te, ds)


def _grouped(ds: DeepSeekConfig) -> bool:
    """Whether selection is group-limited: the experts of the best `topk_group` groups only."""
    return ds.n_group > 1 and ds.topk_method != "greedy"


def _weighted(experts_tk, weights_tk, scores_te, ds: DeepSeekConfig) -> Routing:
    if ds.norm_topk_prob:
        weights_tk = weights_tk / (weights_tk.sum(-1, keepdims=True) + 1e-20)
    return Routing(experts_tk.astype(jnp.int32), weights_tk * ds.routed_scaling_factor, scores_te)


DECODE_KERNEL_TOKENS = 64  # the most tokens whose choice runs on `kernels.decode.route` (one program each)


def _on_decode_kernel(logits_te: jax.Array, ds: DeepSeekConfig) -> bool:
    """Whether serving's decode kernels choose these tokens' experts: a decode step's few tokens on one device,
    with greedy selection (no expert groups), inside `matmul.decode_kernels`."""
    return (
        decode_kernel() in ("pallas", "interpret")
        and logits_te.shape[0] <= DECODE_KERNEL_TOKENS
        and not _grouped(ds)
        and active_spec(("batch",)) is None
        and decode_kernels.routing.check(logits_te, ds.num_experts_per_tok, ds.scoring_func) is None
    )


def expert_counts(experts_tk: jax.Array, n_experts: int) -> jax.Array:
    """Tokens routed to each expert (float32 [E])."""
    return jnp.zeros((n_experts,), jnp.float32).at[experts_tk.reshape(-1)].add(1.0)


def sequence_balance_loss(scores_bte: jax.Array, experts_btk: jax.Array) -> jax.Array:
    """DeepSeek-V3's sequence-wise balance loss (before alpha), averaged over sequences.

    Per sequence: sum_i f_i · P_i with f_i = E/(K·T) · (tokens choosing expert i) and P_i the mean over
    tokens of the affinities normalised to sum to 1 per token.
    """
    b, t, n_experts = scores_bte.shape
    k = experts_btk.shape[-1]
    rows = jnp.broadcast_to(jnp.arange(b)[:, None, None], experts_btk.shape)
    counts_be = jnp.zeros((b, n_experts), jnp.float32).at[rows, experts_btk].add(1.0)
    f_be = counts_be * n_experts / (k * t)
    p_be = (scores_bte / scores_bte.sum(-1, keepdims=True)).mean(axis=1)
    return (f_be * p_be).sum(-1).mean()
