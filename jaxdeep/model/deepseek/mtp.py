"""Multi-token prediction: D sequential modules, each predicting one token further ahead.

Depth k at position i combines the previous depth's hidden state h_i (depth 0: the main model's normed
output) with the embedding of token i+k, runs one MoE decoder block and its own final norm; the shared
output head turns the result into logits for token i+k+1. Embedding and head belong to the main model.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeep.config import ModelConfig
from jaxdeep.model.deepseek.blocks import DecoderBlock
from jaxdeep.model.deepseek.moe import MoeStats
from jaxdeep.model.deepseek.norm import DTYPES, RMSNorm
from jaxdeep.model.kernel_choice import DEFAULT_KERNELS, KernelChoice
from jaxdeep.model.layers import normal_param
from jaxdeep.model.matmul import project


class MtpModule(nnx.Module):
    """HF names: `enorm`, `hnorm`, `eh_proj`, the block's own names, `shared_head.norm` (here `norm`)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, kernels: KernelChoice = DEFAULT_KERNELS):
        pdt, d = DTYPES[cfg.param_dtype], cfg.d_model
        self.enorm = RMSNorm(d, cfg.norm_eps, pdt, kernels.norm)
        self.hnorm = RMSNorm(d, cfg.norm_eps, pdt, kernels.norm)
        self.eh_proj = normal_param(rngs, (2 * d, d), (None, "embed"), cfg.init_std, pdt)
        self.block = DecoderBlock(cfg, rngs, moe=True, kernels=kernels)
        self.norm = RMSNorm(d, cfg.norm_eps, pdt, kernels.norm)
        self.hidden_first = cfg.deepseek.mtp_hidden_states_first
        self.dtype = DTYPES[cfg.dtype]
        self.kernels = kernels

    def __call__(self, h_btd, emb_btd, cos_th, sin_th) -> tuple[jax.Array, MoeStats]:
        parts = [self.enorm(emb_btd), self.hnorm(h_btd)]
        if self.hidden_first:
            parts.reverse()
        eh_cd = self.eh_proj[...].astype(self.dtype)
        x_btd = project("btc,cd->btd", jnp.concatenate(parts, axis=-1), eh_cd, self.kernels)
        x_btd, stats = self.block(x_btd, cos_th, sin_th)
        return self.norm(x_btd), stats


def stacked_mtp(cfg: ModelConfig, rngs: nnx.Rngs, kernels: KernelChoice = DEFAULT_KERNELS) -> MtpModule:
    depth = cfg.deepseek.num_nextn_predict_layers

    @nnx.split_rngs(splits=depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=depth, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> MtpModule:
        return MtpModule(cfg, rngs, kernels)

    return make(rngs)
