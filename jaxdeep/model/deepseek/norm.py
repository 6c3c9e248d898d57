"""RMSNorm for the DeepSeek model, through the `kernels.norms` dispatcher."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxdeep import sharding
from jaxdeep.model.layers import constant_param
from jaxdeep.sharding import LogicalAxes
from kernels import norms

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RESIDUAL = ("batch", "act_seq", "act_embed")
LATENT = ("batch", "act_seq", None)

# DeepSeek's latent norms (q_a_layernorm, kv_a_layernorm) always use this epsilon, whatever rms_norm_eps is.
LATENT_NORM_EPS = 1e-6


class RMSNorm(nnx.Module):
    """x / sqrt(mean(x²) + eps) * scale over the last axis, statistics in float32.

    `impl` is the `kernels.norm` switch. A kernel is opaque to the SPMD partitioner, so a non-reference
    implementation runs per shard; `act_axes` names the activation's dims (its last one is never split).
    """

    def __init__(self, dim: int, eps: float, param_dtype, impl: str = "reference", act_axes: LogicalAxes = RESIDUAL):
        self.scale = constant_param((dim,), ("norm",), 1.0, param_dtype)
        self.eps = eps
        self.impl = impl
        self.act_axes = act_axes

    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.scale[...]
        norm = functools.partial(norms.rms_norm, eps=self.eps, impl=self.impl)
        if self.impl == "reference":
            return norm(x, scale)
        spec = sharding.active_spec(self.act_axes)
        if spec is None:
            return norm(x, scale)
        mesh, x_spec = spec
        return jax.shard_map(norm, mesh=mesh, in_specs=(x_spec, PartitionSpec()), out_specs=x_spec, check_vma=False)(
            x, scale
        )
