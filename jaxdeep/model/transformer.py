"""Model v0: a dense decoder-only transformer (pre-LayerNorm, GELU MLP, rotary positions)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeep.config import ModelConfig
from jaxdeep.model.attention import causal_attention
from jaxdeep.model.kernel_choice import DEFAULT_KERNELS, KernelChoice, check_kernels
from jaxdeep.model.layers import LayerNorm, normal_param, rotary, run_layers, scaled_init_std
from jaxdeep.model.matmul import activated_project, project, project_shared, remat_policy
from jaxdeep.parallel.collective_matmul import column_parallel, row_parallel
from jaxdeep.sharding import constrain

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kernels: KernelChoice = DEFAULT_KERNELS):
        d, n, h = cfg.d_model, cfg.n_heads, cfg.head_dim
        pdt = DTYPES[cfg.param_dtype]
        self.wq = normal_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, pdt)
        self.wk = normal_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, pdt)
        self.wv = normal_param(rngs, (d, n, h), ("embed", "heads", "head_dim"), cfg.init_std, pdt)
        out_std = scaled_init_std(cfg.init_std, cfg.n_layers)
        self.wo = normal_param(rngs, (n, h, d), ("heads", "head_dim", "embed"), out_std, pdt)
        self.cfg = cfg
        self.kernels = kernels

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
        cfg, dt = self.cfg, DTYPES[self.cfg.dtype]
        heads = ("batch", "act_seq", "act_heads", None)
        overlap = "attention" in cfg.collective_matmul
        products = functools.partial(project_shared, kernels=self.kernels)
        product = functools.partial(project, kernels=self.kernels)
        weights = (self.wq[...].astype(dt), self.wk[...].astype(dt), self.wv[...].astype(dt))
        qkv = column_parallel(
            "btd,dnh->btnh", x_btd, weights, ("embed", "heads", "head_dim"), heads, "heads", overlap, products
        )
        q_btnh, k_btnh, v_btnh = (constrain(y, heads) for y in qkv)
        q_btnh = rotary(q_btnh, positions_bt, cfg.rope_theta)
        k_btnh = rotary(k_btnh, positions_bt, cfg.rope_theta)
        o_btnh = causal_attention(q_btnh, k_btnh, v_btnh, implementation=cfg.attention)
        o_btnh = constrain(o_btnh, heads)
        wo = self.wo[...].astype(dt)
        return row_parallel(
            "btnh,nhd->btd", o_btnh, wo, heads, ("heads", "head_dim", "embed"), "heads", overlap, product
        )


def exact_gelu(h: jax.Array) -> jax.Array:
    """GELU in its erf form (as the fused norm kernels and GPT-NeoX)."""
    return jax.nn.gelu(h, approximate=False)


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kernels: KernelChoice = DEFAULT_KERNELS):
        pdt = DTYPES[cfg.param_dtype]
        self.w_in = normal_param(rngs, (cfg.d_model, cfg.d_ff), ("embed", "mlp"), cfg.init_std, pdt)
        out_std = scaled_init_std(cfg.init_std, cfg.n_layers)
        self.w_out = normal_param(rngs, (cfg.d_ff, cfg.d_model), ("mlp", "embed"), out_std, pdt)
        self.dtype = DTYPES[cfg.dtype]
        self.overlap = "mlp" in cfg.collective_matmul
        self.kernels = kernels

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        hidden = ("batch", "act_seq", "act_mlp")
        w_in, w_out = self.w_in[...].astype(self.dtype), self.w_out[...].astype(self.dtype)
        products = functools.partial(project_shared, kernels=self.kernels)
        (h_btf,) = column_parallel(
            "btd,df->btf", x_btd, (w_in,), ("embed", "mlp"), hidden, "mlp", self.overlap, products
        )
        h_btf = constrain(h_btf, hidden)

        def gelu_product(subscripts, h, w):  # GELU is elementwise, so it may run on the chunks of h too
            return activated_project(subscripts, exact_gelu, (h,), w, self.kernels)

        return row_parallel("btf,fd->btd", h_btf, w_out, hidden, ("mlp", "embed"), "mlp", self.overlap, gelu_product)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kernels: KernelChoice = DEFAULT_KERNELS):
        pdt = DTYPES[cfg.param_dtype]
        self.attn_norm = LayerNorm(cfg.d_model, cfg.norm_eps, pdt, kernels.norm)
        self.attn = Attention(cfg, rngs, kernels)
        self.mlp_norm = LayerNorm(cfg.d_model, cfg.norm_eps, pdt, kernels.norm)
        self.mlp = Mlp(cfg, rngs, kernels)
        # With collective matmuls the residual stream stays split over the sequence between them (sequence
        # parallelism): the all-gather then happens inside the next column-parallel matmul, overlapped.
        self.residual_seq = "act_seq_parallel" if cfg.collective_matmul else "act_seq"

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array) -> jax.Array:
        residual = ("batch", self.residual_seq, "act_embed")
        x_btd = constrain(x_btd + self.attn(self.attn_norm(x_btd), positions_bt), residual)
        return constrain(x_btd + self.mlp(self.mlp_norm(x_btd)), residual)


class Transformer(nnx.Module):
    """`kernels` (a `KernelChoice`, from config `kernels` and `precision`) chooses the norm kernels and how the
    blocks' projections run: its `matmul` ("bf16" or "fp8", config `precision.matmul`) with `fp8` (config
    `kernels.fp8`) on which FP8 kernels. The embedding and the output head stay in the compute dtype."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kernels: KernelChoice = DEFAULT_KERNELS):
        pdt = DTYPES[cfg.param_dtype]
        self.cfg = cfg
        self.kernels = check_kernels(kernels)
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
            return Block(cfg, rngs, kernels)

        self.blocks = make_blocks(rngs)
        self.final_norm = LayerNorm(cfg.d_model, cfg.norm_eps, pdt, kernels.norm)
        if not cfg.tie_embeddings:
            self.head = normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        """Token ids [batch, seq] -> fp32 logits [batch, seq, vocab]."""
        return self.output_logits(self.apply_blocks(self.embed_tokens(tokens_bt)))

    # The three parts below are also run separately, by the pipeline stages (jaxdeep/parallel/pipeline.py).

    def embed_tokens(self, tokens_bt: jax.Array) -> jax.Array:
        """Token ids [batch, seq] -> residual stream [batch, seq, embed] in the compute dtype."""
        # Gather from a table whose embed dim is whole: a gather out of an fsdp-split table would make the
        # partitioner replicate the whole lookup.
        table_vd = constrain(self.embed[...], ("vocab", None))
        x_btd = jnp.take(table_vd, tokens_bt, axis=0).astype(DTYPES[self.cfg.dtype])
        return constrain(x_btd, ("batch", "act_seq", "act_embed"))

    def apply_blocks(
        self, x_btd: jax.Array, layer_mask: jax.Array | None = None, skip_masked: bool = True
    ) -> jax.Array:
        """Run the stacked blocks in order. `layer_mask` [layers] (bool) drops the layers where it is False
        (pipeline stages pad their stacks to a common length): skipped by a branch, or with `skip_masked=False`
        run and discarded (for callers whose devices must all run the same collectives)."""
        positions_bt = jnp.broadcast_to(jnp.arange(x_btd.shape[1]), x_btd.shape[:2])
        block_def, block_state = nnx.split(self.blocks)

        def run(x_btd, state):
            return nnx.merge(block_def, state)(x_btd, positions_bt)

        if layer_mask is None:
            body, xs = (lambda x, state: (run(x, state), None)), block_state
        elif skip_masked and not self.cfg.collective_matmul:
            skip = lambda x, state: x
            body = lambda x, layer: (jax.lax.cond(layer[1], run, skip, x, layer[0]), None)
            xs = (block_state, layer_mask)
        else:
            # Ring permutes may not sit in a branch only some devices take (every device joins a permute), so
            # masked layers run and their output is dropped.
            body = lambda x, layer: (jnp.where(layer[1], run(x, layer[0]), x), None)
            xs = (block_state, layer_mask)
        policy = None if self.cfg.remat == "none" else remat_policy(self.cfg.remat, self.kernels.matmul)
        x_btd, _ = run_layers(body, x_btd, xs, scan=self.cfg.scan_layers, policy=policy)
        return x_btd

    def output_logits(self, x_btd: jax.Array) -> jax.Array:
        """Residual stream -> fp32 logits [batch, seq, vocab] (final norm, then the head)."""
        x_btd = self.final_norm(x_btd)
        head_dv = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        logits_btv = jnp.einsum("btd,dv->btv", x_btd, head_dv.astype(DTYPES[self.cfg.dtype]))
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
