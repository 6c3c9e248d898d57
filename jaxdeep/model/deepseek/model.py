"""The DeepSeek-V3 model: embedding, dense then MoE decoder blocks (each stack scanned), final norm, head,
and optional multi-token-prediction modules."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeep.config import ModelConfig
from jaxdeep.model.deepseek.blocks import stacked_blocks
from jaxdeep.model.deepseek.mtp import stacked_mtp
from jaxdeep.model.deepseek.norm import DTYPES, RESIDUAL, RMSNorm
from jaxdeep.model.deepseek.rope import rope_tables
from jaxdeep.model.kernel_choice import DEFAULT_KERNELS, KernelChoice, check_kernels
from jaxdeep.model.layers import normal_param, run_layers
from jaxdeep.model.matmul import remat_policy
from jaxdeep.sharding import constrain


class ModelOutput(NamedTuple):
    logits_btv: jax.Array  # float32 next-token logits
    mtp_logits_dbtv: jax.Array | None  # float32 [D, b, t, v]: depth k predicts token i+k+1 (last k positions unused)
    expert_counts: dict[str, jax.Array]  # stack name ("moe_blocks", "mtp") -> float32 [layers, E]
    balance_loss: jax.Array  # sequence-wise balance loss summed over MoE layers (before alpha)
    dropped_tokens: jax.Array  # token copies routed but not computed, over all MoE layers (0: dropless)


class DeepSeekModel(nnx.Module):
    """`kernels` (a `KernelChoice`, from config `kernels` and `precision`) chooses the norm and grouped-matmul
    kernels and how the projections and the routed experts' grouped matmuls run: its `matmul` ("bf16" or "fp8",
    config `precision.matmul`) with `fp8` (config `kernels.fp8`) on which FP8 kernels; the embedding, the output
    head, the norms and the router stay in higher precision."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kernels: KernelChoice = DEFAULT_KERNELS):
        ds, pdt = cfg.deepseek, DTYPES[cfg.param_dtype]
        self.cfg = cfg
        self.kernels = check_kernels(kernels)
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg.init_std, pdt)
        n_dense = ds.first_k_dense_replace
        n_moe = cfg.n_layers - n_dense
        if n_dense:
            self.dense_blocks = stacked_blocks(cfg, rngs, n_dense, False, kernels)
        if n_moe:
            self.moe_blocks = stacked_blocks(cfg, rngs, n_moe, True, kernels)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt, kernels.norm)
        if not cfg.tie_embeddings:
            self.head = normal_param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, pdt)
        if ds.num_nextn_predict_layers:
            self.mtp = stacked_mtp(cfg, rngs, kernels)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        """Token ids [batch, seq] -> float32 logits [batch, seq, vocab] (MTP modules are not run)."""
        return self.forward(tokens_bt, with_mtp=False).logits_btv

    def _embed(self, tokens_bt: jax.Array) -> jax.Array:
        # Gather from a table whose embed dim is whole (an fsdp-split table would replicate the lookup).
        table_vd = constrain(self.embed[...], ("vocab", None))
        return constrain(jnp.take(table_vd, tokens_bt, axis=0).astype(DTYPES[self.cfg.dtype]), RESIDUAL)

    def _logits(self, h_btd: jax.Array) -> jax.Array:
        head_dv = self.embed[...].T if self.cfg.tie_embeddings else self.head[...]
        logits_btv = jnp.einsum("btd,dv->btv", h_btd, head_dv.astype(DTYPES[self.cfg.dtype]))
        return constrain(logits_btv, ("batch", "act_seq", "act_vocab")).astype(jnp.float32)

    def _scan(self, stack, x_btd, cos_th, sin_th, extra_xs=None, step=None):
        """Run stacked modules in sequence; returns the final carry and the stacked per-layer outputs."""
        graphdef, state = nnx.split(stack)

        def body(carry, xs):
            layer_state, extra = xs
            module = nnx.merge(graphdef, layer_state)
            return step(module, carry, extra) if step else module(carry, cos_th, sin_th)

        policy = None if self.cfg.remat == "none" else remat_policy(self.cfg.remat, self.kernels.matmul)
        return run_layers(body, x_btd, (state, extra_xs), scan=self.cfg.scan_layers, policy=policy)

    def forward(self, tokens_bt: jax.Array, with_mtp: bool = True) -> ModelOutput:
        cfg, ds = self.cfg, self.cfg.deepseek
        seq = tokens_bt.shape[1]
        cos_th, sin_th = rope_tables(seq, ds.qk_rope_head_dim, cfg.rope_theta, ds.rope_scaling)
        x_btd = self._embed(tokens_bt)
        counts: dict[str, jax.Array] = {}
        balance = dropped = jnp.zeros((), jnp.float32)
        if ds.first_k_dense_replace:
            x_btd, _ = self._scan(self.dense_blocks, x_btd, cos_th, sin_th)
        if cfg.n_layers > ds.first_k_dense_replace:
            x_btd, stats = self._scan(self.moe_blocks, x_btd, cos_th, sin_th)
            counts["moe_blocks"] = stats.counts_e
            balance, dropped = balance + stats.balance_loss.sum(), dropped + stats.dropped.sum()
        h_btd = self.final_norm(x_btd)
        logits_btv = self._logits(h_btd)
        mtp_logits = None
        if with_mtp and ds.num_nextn_predict_layers:
            depth = ds.num_nextn_predict_layers
            # Depth k reads token i+k at position i; the last k positions wrap around and are masked in the loss.
            shifted_dbt = jnp.stack([jnp.roll(tokens_bt, -k, axis=1) for k in range(1, depth + 1)])

            def mtp_step(module, h_btd, tokens_bt):
                h_btd, stats = module(h_btd, self._embed(tokens_bt), cos_th, sin_th)
                return h_btd, (self._logits(h_btd), stats)

            _, (mtp_logits, stats) = self._scan(self.mtp, h_btd, cos_th, sin_th, shifted_dbt, mtp_step)
            counts["mtp"] = stats.counts_e
            balance, dropped = balance + stats.balance_loss.sum(), dropped + stats.dropped.sum()
        return ModelOutput(logits_btv, mtp_logits, counts, balance, dropped)
