"""Decoder blocks: pre-RMSNorm MLA attention, then a dense SwiGLU MLP or a DeepSeekMoE layer."""

from __future__ import annotations

import jax
from flax import nnx

from jaxdeep.config import ModelConfig
from jaxdeep.model.deepseek.mla import MultiHeadLatentAttention
from jaxdeep.model.deepseek.moe import MoE, MoeStats, SwiGluMlp
from jaxdeep.model.deepseek.norm import DTYPES, RESIDUAL, RMSNorm
from jaxdeep.model.deepseek.router import Router, Routing
from jaxdeep.model.kernel_choice import DEFAULT_KERNELS, KernelChoice
from jaxdeep.sharding import constrain


class DecoderBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, moe: bool, kernels: KernelChoice = DEFAULT_KERNELS):
        pdt = DTYPES[cfg.param_dtype]
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt, kernels.norm)
        self.self_attn = MultiHeadLatentAttention(cfg, rngs, kernels)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, pdt, kernels.norm)
        self.mlp = MoE(cfg, rngs, kernels) if moe else SwiGluMlp(cfg, cfg.d_ff, rngs, kernels)
        self.moe = moe

    def __call__(self, x_btd: jax.Array, cos_th: jax.Array, sin_th: jax.Array) -> tuple[jax.Array, MoeStats | None]:
        x_btd = constrain(x_btd + self.self_attn(self.input_layernorm(x_btd), cos_th, sin_th), RESIDUAL)
        if self.moe:
            h_btd, routing = _normalise_and_route(self.post_attention_layernorm, self.mlp.gate, x_btd)
            y_btd, stats = self.mlp(h_btd, routing)
        else:
            y_btd, stats = self.mlp(self.post_attention_layernorm(x_btd)), None
        return constrain(x_btd + y_btd, RESIDUAL), stats


def _normalise_and_route(norm: RMSNorm, router: Router, x_btd: jax.Array) -> tuple[jax.Array, Routing]:
    """norm(x) and the router's choice on it. The router's weight gradient needs its input, norm(x): the norm and
    the logits form one checkpoint, so the backward recomputes norm(x) from x, which the norm keeps anyway, instead
    of keeping a copy of it (under FP8 the experts keep theirs in FP8). The experts are chosen outside it, once,
    from the forward's logits. The modules are only read inside the checkpoint, so a block also runs inside plain
    JAX transforms."""
    b, t, d = x_btd.shape

    def normalised_logits(x_btd):
        h_btd = norm(x_btd)
        return h_btd, router.logits(h_btd.reshape(b * t, d))

    h_btd, logits_te = jax.checkpoint(normalised_logits)(x_btd)
    return h_btd, router.choose(logits_te)


def stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs, count: int, moe: bool, kernels: KernelChoice = DEFAULT_KERNELS):
    """`count` blocks stacked on a leading `layers` axis (run with a scan: one compiled block)."""

    @nnx.split_rngs(splits=count)
    @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=count, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs: nnx.Rngs) -> DecoderBlock:
        return DecoderBlock(cfg, rngs, moe, kernels)

    return make(rngs)
