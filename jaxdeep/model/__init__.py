"""Models built from config; parameters carry logical axis names only."""

from jaxdeep.model.layers import Param, logical_axes_of
from jaxdeep.model.transformer import Transformer, count_params, flops_per_token

__all__ = ["Param", "Transformer", "count_params", "flops_per_token", "logical_axes_of"]
