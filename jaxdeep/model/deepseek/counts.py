"""Parameter and FLOP counts of a DeepSeek config (total and active per token), for MFU."""

from __future__ import annotations

from jaxdeep.config import ModelConfig


def _attention_params(cfg: ModelConfig) -> int:
    ds, d, n = cfg.deepseek, cfg.d_model, cfg.n_heads
    qk = ds.qk_nope_head_dim + ds.qk_rope_head_dim
    if ds.q_lora_rank is None:
        query = d * n * qk
    else:
        query = d * ds.q_lora_rank + ds.q_lora_rank + ds.q_lora_rank * n * qk
    latent = d * (ds.kv_lora_rank + ds.qk_rope_head_dim) + ds.kv_lora_rank
    return query + latent + ds.kv_lora_rank * n * (ds.qk_nope_head_dim + ds.v_head_dim) + n * ds.v_head_dim * d


def _moe_params(cfg: ModelConfig, active: bool) -> int:
    ds, d = cfg.deepseek, cfg.d_model
    experts = ds.num_experts_per_tok if active else ds.n_routed_experts
    return d * ds.n_routed_experts + 3 * d * ds.moe_intermediate_size * (experts + ds.n_shared_experts)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Counts by kind; `active` is what one token uses (K routed experts per MoE layer, embedding excluded)."""
    ds, d = cfg.deepseek, cfg.d_model
    n_moe = cfg.n_layers - ds.first_k_dense_replace
    attention = _attention_params(cfg) + 2 * d  # + the block's two norms
    dense_block = attention + 3 * d * cfg.d_ff
    mtp_extra = 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj, final norm
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    blocks = ds.first_k_dense_replace * dense_block + n_moe * (attention + _moe_params(cfg, False))
    mtp = ds.num_nextn_predict_layers * (mtp_extra + attention + _moe_params(cfg, False))
    active_blocks = ds.first_k_dense_replace * dense_block + n_moe * (attention + _moe_params(cfg, True))
    active_mtp = ds.num_nextn_predict_layers * (mtp_extra + attention + _moe_params(cfg, True))
    return {
        "embedding": embed,
        "head": head,
        "blocks": blocks,
        "mtp": mtp,
        "total": embed + head + blocks + mtp + d,
        "active": d * cfg.vocab_size + active_blocks + active_mtp + d,  # the output head always runs
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 × active matmul parameters (output head included, once per MTP depth too)
    + 6·(layers + D)·heads·(qk_head_dim + v_head_dim)·seq for the full seq × seq score and value products.

    Norm weights and the (looked-up) embedding do no matmul work and are left out.
    """
    ds, d, n = cfg.deepseek, cfg.d_model, cfg.n_heads
    depth = ds.num_nextn_predict_layers
    n_moe = cfg.n_layers - ds.first_k_dense_replace
    attention = _attention_params(cfg) - ds.kv_lora_rank - (ds.q_lora_rank or 0)  # minus latent norm weights
    matmuls = ds.first_k_dense_replace * (attention + 3 * d * cfg.d_ff)
    matmuls += (n_moe + depth) * (attention + _moe_params(cfg, True))
    matmuls += depth * 2 * d * d + (1 + depth) * d * cfg.vocab_size
    qk = ds.qk_nope_head_dim + ds.qk_rope_head_dim
    return 6.0 * matmuls + 6.0 * (cfg.n_layers + depth) * n * (qk + ds.v_head_dim) * seq_len
