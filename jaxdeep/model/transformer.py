"""Model v0: a dense decoder-only transformer (pre-LayerNorm, GELU MLP, rotary positions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeep.config import ModelConfig
from jaxdeep.model.layers import LayerNorm, normal_param, rotary, scaled_init_std
from jaxdeep.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_matmuls": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
        pdt = DTYPES[cfg.param_dtype]
        self.wq = normal_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, pdt)
        self.wk = normal_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, pdt)
        self.wv = normal_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, pdt)
        out_std = scaled_init_std(cfg.init_std, cfg.n_layers)
        self.wo = normal_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, pdt)
        self.cfg = cfg

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        heads = ("batch", "act_seq", "act_heads", None)
        q_btnh = constrain(jnp.einsum("btd,dnh->btnh", x_btd, self.wq[...].astype(dt)), heads)
        k_btnh = constrain(jnp.einsum("btd,dnh->btnh", x_btd, self.wk[...].astype(dt)), heads)
        v_btnh = constrain(jnp.einsum("btd,dnh->btnh", x_btd, self.wv[...].astype(dt)), heads)
        q_btnh = rotary(q_btnh, positions_bt, cfg.rope_theta)
        k_btnh = rotary(k_btnh, positions_bt, cfg.rope_theta)
        impl = None if cfg.attention == "auto" else cfg.attention
        o_btnh = jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, is_causal=True, implementation=impl)
        o_btnh = constrain(o_btnh, heads)
        return jnp.einsum("btnh,nhd->btd", o_btnh, self.wo[...].astype(dt))


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pdt = DTYPES[cfg.param_dtype]
        self.w_in = normal_param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg.init_std, pdt)
        out_std = scaled_init_std(cfg.init_std, cfg.n_layers)
        self.w_out = normal_param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), out_std, pdt)
        self.dtype = DTYPES[cfg.dtype]

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        h_btf = jnp.einsum("btd,df->btf", x_btd, self.w_in[...].astype(self.dtype))
        h_btf = constrain(jax.nn.gelu(h_btf, approximate=False), ("batch", "act_seq", "act_mlp"))
        return jnp.einsum("btf,fd->btd", h_btf, self.w_out[...].astype(self.dtype))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, norm_impl: str = "reference"):
        pdt = DTYPES[cfg.param_dtype]
        self.attn_norm = LayerNorm(cfg.d_model, cfg.norm_eps, pdt, norm_impl)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = LayerNorm(cfg.d_model, cfg.norm_eps, pdt, norm_impl)
        self.mlp = Mlp(cfg, rngs)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
        residual = ("batch", "act_seq", "act_embed")
        x_btd = constrain(x_btd + self.attn(self.attn_norm(x_btd), positions_bt), residual)
        return constrain(x_btd + self.mlp(self.mlp_norm(x_btd)), residual)


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, norm_impl: str = "reference"):
        pdt = DTYPES[cfg.param_dtype]
        self.cfg = cfg
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt)

        # Blocks are stacked along a leading `layers` axis and run with a scan: one compiled block,
        # whatever the depth.
        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(
            in_axes=(0,),
            out_axes=0,
            axis_size=cfg.n_layers,
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs, norm_impl)

        self.blocks = make_blocks(rngs)
        self.final_norm = LayerNorm(cfg.d_model, cfg.norm_eps, pdt, norm_impl)
        if not cfg.tie_embeddings:
            self.head = normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        """Token ids [batch, seq] -> fp32 logits [batch, seq, vocab]."""
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        positions_bt = jnp.broadcast_to(jnp.arange(tokens_bt.shape[1]), tokens_bt.shape)
        # Gather from a table whose embed dim is whole: a gather out of an fsdp-split table would make the
        # partitioner replicate the whole lookup.
        table_vd = constrain(self.embed[...], ("vocab", None))
        x_btd = jnp.take(table_vd, tokens_bt, axis=0).astype(dt)
        x_btd = constrain(x_btd, ("batch", "act_seq", "act_embed"))

        block_def, block_state = nnx.split(self.blocks)

        def body(x_btd, state):
            return nnx.merge(block_def, state)(x_btd, positions_bt), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
        x_btd, _ = jax.lax.scan(body, x_btd, block_state)

        x_btd = self.final_norm(x_btd)
        head_dv = self.embed[...].T if cfg.tie_embeddings else self.head[...]
        logits_btv = jnp.einsum("btd,dv->btv", x_btd, head_dv.astype(dt))
        return constrain(logits_btv, ("batch", "act_seq", "act_vocab")).astype(jnp.float32)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by kind, from the config alone (used for the FLOP formula)."""
    d, f, nh = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim
    per_block = 4 * d * nh + 2 * d * f + 4 * d
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
    blocks = cfg.n_layers * per_block
    return {"embedding": embed, "head": head, "blocks": blocks, "total": embed + head + blocks + 2 * d}


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 × (matmul parameters incl. the output head) + 12·L·(heads·head_dim)·seq.

    The attention term counts the full seq×seq score and value products, as PaLM's MFU does
    (causal masking halves the useful work, which this formula deliberately does not credit)."""
    d, f, nh = cfg.d_model, cfg.d_ff, cfg.n_heads * cfg.head_dim
    matmul_params = cfg.n_layers * (4 * d * nh + 2 * d * f) + d * cfg.vocab_size
    return 6.0 * matmul_params + 12.0 * cfg.n_layers * nh * seq_len
