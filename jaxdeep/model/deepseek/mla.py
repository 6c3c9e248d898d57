"""Multi-head latent attention (DeepSeek-V2/V3).

Queries come from the hidden state directly or through a low-rank latent (`q_lora_rank`); keys and values
come from one shared latent of width `kv_lora_rank` (RMS-normalised) plus a single rotary key part of
width `qk_rope_head_dim` shared by all heads. Each head's query/key is [no-rope part; rope part].
Parameter names follow the Hugging Face checkpoints (`q_a_proj`, `kv_b_proj`, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeep.config import ModelConfig
from jaxdeep.model.attention import causal_attention
from jaxdeep.model.deepseek.norm import DTYPES, LATENT, LATENT_NORM_EPS, RMSNorm
from jaxdeep.model.deepseek.rope import apply_rope, softmax_scale
from jaxdeep.model.kernel_choice import DEFAULT_KERNELS, KernelChoice
from jaxdeep.model.layers import normal_param, scaled_init_std
from jaxdeep.model.matmul import project, project_shared
from jaxdeep.sharding import constrain

HEADS = ("batch", "act_seq", "act_heads", None)


class MultiHeadLatentAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kernels: KernelChoice = DEFAULT_KERNELS):
        ds, pdt, std = cfg.deepseek, DTYPES[cfg.param_dtype], cfg.init_std
        d, n = cfg.d_model, cfg.n_heads
        qk = ds.qk_nope_head_dim + ds.qk_rope_head_dim
        if ds.q_lora_rank is None:
            self.q_proj = normal_param(rngs, (d, n, qk), ("embed", "heads", "head_dim"), std, pdt)
        else:
            r = ds.q_lora_rank
            self.q_a_proj = normal_param(rngs, (d, r), ("embed", "q_lora"), std, pdt)
            self.q_a_layernorm = RMSNorm(r, LATENT_NORM_EPS, pdt, kernels.norm, LATENT)
            self.q_b_proj = normal_param(rngs, (r, n, qk), ("q_lora", "heads", "head_dim"), std, pdt)
        c = ds.kv_lora_rank
        self.kv_a_proj_with_mqa = normal_param(rngs, (d, c + ds.qk_rope_head_dim), ("embed", "kv_lora"), std, pdt)
        self.kv_a_layernorm = RMSNorm(c, LATENT_NORM_EPS, pdt, kernels.norm, LATENT)
        kv_width = ds.qk_nope_head_dim + ds.v_head_dim
        self.kv_b_proj = normal_param(rngs, (c, n, kv_width), ("kv_lora", "heads", "head_dim"), std, pdt)
        out_std = scaled_init_std(std, cfg.n_layers)
        self.o_proj = normal_param(rngs, (n, ds.v_head_dim, d), ("heads", "head_dim", "embed"), out_std, pdt)
        self.cfg = cfg
        self.scale = softmax_scale(qk, ds.rope_scaling)
        # Training path only: serving's absorbed decode (jaxdeep/serve) multiplies these weights itself.
        self.kernels = kernels

    def __call__(self, x_btd: jax.Array, cos_th: jax.Array, sin_th: jax.Array) -> jax.Array:
        cfg, ds, dt = self.cfg, self.cfg.deepseek, DTYPES[self.cfg.dtype]
        nope, rope, v_dim, c = ds.qk_nope_head_dim, ds.qk_rope_head_dim, ds.v_head_dim, ds.kv_lora_rank
        kernels = self.kernels
        kv_a_dc = self.kv_a_proj_with_mqa[...].astype(dt)
        if ds.q_lora_rank is None:
            q_btnh = project("btd,dnh->btnh", x_btd, self.q_proj[...].astype(dt), kernels)
            kv_a = project("btd,dc->btc", x_btd, kv_a_dc, kernels)
        else:
            # Both down projections read x: in FP8 they share one quantised copy of it.
            q_btr, kv_a = project_shared("btd,dc->btc", x_btd, (self.q_a_proj[...].astype(dt), kv_a_dc), kernels)
            q_btr = constrain(q_btr, LATENT)
            q_btnh = project("btr,rnh->btnh", self.q_a_layernorm(q_btr), self.q_b_proj[...].astype(dt), kernels)
        q_btnh = constrain(q_btnh, HEADS)
        q_nope, q_rope = q_btnh[..., :nope], q_btnh[..., nope:]

        kv_a = constrain(kv_a, LATENT)
        latent_btc, k_rope_bth = self.kv_a_layernorm(kv_a[..., :c]), kv_a[..., c:]
        kv_btnh = constrain(project("btc,cnh->btnh", latent_btc, self.kv_b_proj[...].astype(dt), kernels), HEADS)
        k_nope, v_btnh = kv_btnh[..., :nope], kv_btnh[..., nope:]

        q_rope = apply_rope(q_rope, cos_th, sin_th, ds.rope_interleave)
        k_rope = apply_rope(k_rope_bth[:, :, None, :], cos_th, sin_th, ds.rope_interleave)
        k_rope = jnp.broadcast_to(k_rope, (*k_nope.shape[:-1], rope))
        q_btnh = jnp.concatenate([q_nope, q_rope], axis=-1)
        k_btnh = jnp.concatenate([k_nope, k_rope], axis=-1)
        # dot_product_attention wants one head width for q, k and v: zero-pad the narrower side (zeros
        # change neither the scores nor the values) and drop the padding afterwards.
        width = max(nope + rope, v_dim)
        pad = lambda a: jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, width - a.shape[-1])))
        q_btnh, k_btnh, v_btnh = (constrain(pad(a), HEADS) for a in (q_btnh, k_btnh, v_btnh))  # one layout for all
        o_btnh = causal_attention(q_btnh, k_btnh, v_btnh, implementation=cfg.attention, scale=self.scale)
        o_btnh = constrain(o_btnh[..., :v_dim], HEADS)
        return project("btnh,nhd->btd", o_btnh, self.o_proj[...].astype(dt), kernels)
