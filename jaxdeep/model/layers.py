"""Building blocks shared by the models: parameters with logical axis names, norms, rotary positions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeep.sharding import LogicalAxes


class Param(nnx.Param):
    """A parameter that carries logical axis names in its `logical_axes` metadata.

    When layers are stacked with `nnx.vmap`, the new leading dimension is named after the vmap's
    `transform_metadata={nnx.PARTITION_NAME: ...}` (we use `layers`).
    """

    def add_axis(self, axis_index, axis_name):
        axes = list(self.get_metadata()["logical_axes"])
        axes.insert(axis_index, axis_name)
        self.set_metadata(logical_axes=tuple(axes))

    def remove_axis(self, axis_index, axis_name):
        axes = list(self.get_metadata()["logical_axes"])
        del axes[axis_index]
        self.set_metadata(logical_axes=tuple(axes))


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: LogicalAxes, std: float, dtype) -> Param:
    assert len(shape) == len(axes), (shape, axes)
    return Param(std * jax.random.normal(rngs.params(), shape, dtype), logical_axes=axes)


def constant_param(shape: tuple[int, ...], axes: LogicalAxes, value: float, dtype) -> Param:
    return Param(jnp.full(shape, value, dtype), logical_axes=axes)


def logical_axes_of(state: nnx.State):
    """The pure-dict tree of logical axis tuples of a split model state."""
    return nnx.to_pure_dict(
        jax.tree.map(
            lambda v: v.replace(v.get_metadata()["logical_axes"]),
            state,
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        )
    )


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = constant_param((dim,), ("norm",), 1.0, param_dtype)
        self.bias = constant_param((dim,), ("norm",), 0.0, param_dtype)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # Statistics in fp32 whatever the compute dtype; two-pass variance is stable for large means.
        x32 = x.astype(jnp.float32)
        mean = x32.mean(-1, keepdims=True)
        var = jnp.square(x32 - mean).mean(-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(x.dtype)


def rotary(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form) on the last axis."""
    half = x_btnh.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_bth = positions_bt[..., None].astype(jnp.float32) * freqs
    sin, cos = jnp.sin(angles_bth)[:, :, None, :], jnp.cos(angles_bth)[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def scaled_init_std(std: float, n_layers: int) -> float:
    """Output projections of residual branches start smaller so the residual stream grows ~O(1)."""
    return std / math.sqrt(2 * n_layers)
