"""The Triton grouped matmul as a `jax.custom_vjp`: forward and both gradients are Triton kernels.

`triton_gmm(lhs, rhs, group_sizes)` has the semantics of `jax.lax.ragged_dot`: rows of `lhs` [M, K] sorted by
group, group g (the next `group_sizes[g]` rows) multiplied by `rhs[g]` [K, N], rows past `sum(group_sizes)`
zero. With `transpose_rhs` the weights come as `rhs` [E, N, K] and group g is multiplied by `rhs[g]^T`, read
through strides: weights stored with their contracted axis minor (the serving layout) need no copy.
`runner` picks how the kernels run: "triton" (jax-triton, GPU) or "interpret" (Triton's interpreter on the
host, for tests).

Backward, for the cotangent dout [M, N] (cast to the operands' dtype first, as the kernels multiply operands
of one dtype with float32 accumulation):
- dlhs = dout @ rhs[g]^T per group: the forward kernel with rhs read transposed through its strides;
- drhs[g] = lhs_g^T @ dout_g: a grouped GEMM reducing over each group's rows (zeros for an empty group); with
  `transpose_rhs`, dout_g^T @ lhs_g, the same kernel with its operands swapped.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.gmm import launch
from kernels.triton_runtime import varying_like

__all__ = ["SUPPORTED_DTYPES", "triton_gmm"]

RUNNERS = ("triton", "interpret")
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def triton_gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    runner: str = "triton",
    preferred_element_type=None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """[M, K] rows sorted by group x [E, K, N] per-group weights ([E, N, K] with `transpose_rhs`) -> [M, N],
    differentiable in lhs and rhs.

    The operands are promoted to one dtype (bfloat16, float16 or float32); the output has
    `preferred_element_type`, or that dtype.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    check_shapes("triton_gmm", lhs, rhs, group_sizes, transpose_rhs)
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")
    dtype = jnp.result_type(lhs.dtype, rhs.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"triton_gmm supports {[str(d) for d in SUPPORTED_DTYPES]} operands, got {dtype}")
    out_dtype = jnp.dtype(preferred_element_type or dtype)
    m, n = lhs.shape[0], rhs.shape[1 if transpose_rhs else 2]
    if 0 in (m, *rhs.shape):  # nothing to compute; the product of an empty reduction is zero
        return jnp.zeros((m, n), out_dtype)
    lhs, rhs = varying_like((lhs.astype(dtype), rhs.astype(dtype)))  # inside shard_map: see varying_like
    return _triton_gmm(lhs, rhs, group_sizes.astype(jnp.int32), runner, out_dtype, bool(transpose_rhs))


def check_shapes(name: str, lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, transpose_rhs=False) -> None:
    """ValueError unless lhs [m, k], rhs [g, k, n] ([g, n, k] with `transpose_rhs`) and group_sizes [g] fit."""
    rhs_dims = "[g, n, k]" if transpose_rhs else "[g, k, n]"
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(
            f"{name} expects lhs [m, k], rhs {rhs_dims}, group_sizes [g]; got {lhs.shape}, {rhs.shape}, "
            f"{group_sizes.shape}"
        )
    contracted = 2 if transpose_rhs else 1
    if lhs.shape[1] != rhs.shape[contracted] or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(
            f"{name} shapes disagree: lhs {lhs.shape}, rhs {rhs_dims} {rhs.shape}, group_sizes {group_sizes.shape} "
            f"(need lhs[1] == rhs[{contracted}] and rhs[0] == group_sizes[0])"
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _triton_gmm(lhs, rhs, group_sizes, runner, out_dtype, transpose_rhs):
    return launch.gmm_fwd(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype, runner=runner)


def _triton_gmm_fwd(lhs, rhs, group_sizes, runner, out_dtype, transpose_rhs):
    out = launch.gmm_fwd(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=out_dtype, runner=runner)
    return out, (lhs, rhs, group_sizes)


def _triton_gmm_bwd(runner, out_dtype, transpose_rhs, residuals, dout):
    del out_dtype
    lhs, rhs, group_sizes = residuals
    dout = dout.astype(lhs.dtype)
    dlhs = launch.gmm_dlhs(dout, rhs, group_sizes, transpose_rhs=transpose_rhs, out_dtype=lhs.dtype, runner=runner)
    # d rhs[g] is lhs_g^T dout_g [K, N], or its transpose dout_g^T lhs_g [N, K] for weights stored [E, N, K]
    a, b = (dout, lhs) if transpose_rhs else (lhs, dout)
    drhs = launch.gmm_drhs(a, b, group_sizes, rhs.shape[0], out_dtype=rhs.dtype, runner=runner)
    return dlhs, drhs, None


_triton_gmm.defvjp(_triton_gmm_fwd, _triton_gmm_bwd)
