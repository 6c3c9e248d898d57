"""Building blocks shared by the models: parameters with logical axis names, norms, rotary positions."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxdeep import sharding
from jaxdeep.sharding import LogicalAxes
from kernels import norms


class StackableAxes:
    """For nnx variables carrying logical axis names in their `logical_axes` metadata.

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


class Param(StackableAxes, nnx.Param):
    """A parameter that carries logical axis names in its `logical_axes` metadata (see `StackableAxes`)."""


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
    """LayerNorm over the last axis of a residual-stream activation [batch, seq, embed].

    `impl` is the `kernels.norm` switch: "reference" (pure JAX), "fused" (the fused GPU kernel, an error
    where it cannot run) or "auto". Statistics are fp32 either way, with the two-pass variance.
    """

    def __init__(self, dim: int, eps: float, param_dtype, impl: str = "reference"):
        self.scale = constant_param((dim,), ("norm",), 1.0, param_dtype)
        self.bias = constant_param((dim,), ("norm",), 0.0, param_dtype)
        self.eps = eps
        self.impl = impl

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        scale, bias = self.scale[...], self.bias[...]
        norm = functools.partial(norms.layer_norm, eps=self.eps, impl=self.impl)
        if self.impl == "reference":
            return norm(x_btd, scale, bias)
        # A kernel is opaque to the SPMD partitioner: run it per shard. Rows are independent and the
        # normalised (embed) axis is never split in the residual stream, so no communication is needed.
        spec = sharding.active_spec(("batch", "act_seq", "act_embed"))
        if spec is None:
            return norm(x_btd, scale, bias)
        mesh, x_spec = spec
        return jax.shard_map(
            norm, mesh=mesh, in_specs=(x_spec, PartitionSpec(), PartitionSpec()), out_specs=x_spec, check_vma=False
        )(x_btd, scale, bias)


def rotary_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos and sin [..., head_dim / 2] of `rotary` at `positions` [...]."""
    half = head_dim // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions[..., None].astype(jnp.float32) * freqs
    return jnp.cos(angles), jnp.sin(angles)


def rotary(x_btnh: jax.Array, positions_bt: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding (rotate-half form) on the last axis."""
    cos, sin = rotary_tables(positions_bt, x_btnh.shape[-1], theta)
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    x1, x2 = jnp.split(x_btnh.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)


def run_layers(body, carry, xs, *, scan: bool, policy=None):
    """`jax.lax.scan(body, carry, xs)` over stacked layers: one loop body when `scan`, else unrolled into straight
    code (config `model.scan_layers`). Unrolled, XLA gives each layer's saved activations their own buffers
    instead of copying them into and out of the loop's stacked arrays. With a remat `policy` the body is a
    `jax.checkpoint`; unrolled, it must prevent CSE, or XLA could merge the backward's recomputation with the
    forward and keep the activations after all (inside a loop it cannot, and CSE is left free)."""
    if policy is not None:
        body = jax.checkpoint(body, policy=policy, prevent_cse=not scan)
    return jax.lax.scan(body, carry, xs, unroll=1 if scan else True)


def scaled_init_std(std: float, n_layers: int) -> float:
    """Output projections of residual branches start smaller so the residual stream grows ~O(1)."""
    return std / math.sqrt(2 * n_layers)
