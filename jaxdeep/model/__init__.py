"""Models built from config; parameters carry logical axis names only."""

from __future__ import annotations

from flax import nnx

from jaxdeep.config import ExperimentConfig, ModelConfig
from jaxdeep.model import transformer
from jaxdeep.model.deepseek import DeepSeekModel, RoutingBias
from jaxdeep.model.deepseek import counts as deepseek_counts
from jaxdeep.model.kernel_choice import KernelChoice
from jaxdeep.model.layers import Param, logical_axes_of
from jaxdeep.model.transformer import Transformer


def build_model(cfg: ExperimentConfig, rngs: nnx.Rngs) -> nnx.Module:
    """The model `cfg.model.kind` names, with the kernel choices of `cfg.kernels` and the matmul precision of
    `cfg.precision` (as one `KernelChoice`)."""
    kernels = KernelChoice.from_config(cfg)
    if cfg.model.kind == "deepseek":
        return DeepSeekModel(cfg.model, rngs, kernels)
    return Transformer(cfg.model, rngs, kernels)


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by kind, from the config alone (used for the FLOP formula)."""
    if cfg.kind == "deepseek":
        return deepseek_counts.count_params(cfg)
    return transformer.count_params(cfg)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token (see each model's `flops_per_token` for its formula)."""
    if cfg.kind == "deepseek":
        return deepseek_counts.flops_per_token(cfg, seq_len)
    return transformer.flops_per_token(cfg, seq_len)


__all__ = [
    "DeepSeekModel",
    "KernelChoice",
    "Param",
    "RoutingBias",
    "Transformer",
    "build_model",
    "count_params",
    "flops_per_token",
    "logical_axes_of",
]
