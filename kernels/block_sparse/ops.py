"""The Triton block-sparse matmul as a `jax.custom_vjp`: forward and both gradients are Triton kernels.

`triton_block_sparse_matmul(a, layout, values)`: a [M, K] @ B, B [K, N] block-sparse (see `layout.py`).
`runner`: "triton" (jax-triton, GPU) or "interpret" (Triton's interpreter on the host, for tests).

Backward, for the cotangent dout [M, N] (cast to the operands' dtype first, as the kernels multiply operands of
one dtype with float32 accumulation):
- da = dout @ B^T: the product kernel over B's by-row index set, blocks read transposed through their strides;
- dvalues[p] = a[:, block row of p]^T @ dout[:, block column of p]: one BS x BS tile per present block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.block_sparse import launch
from kernels.block_sparse.layout import BlockLayout

__all__ = ["RUNNERS", "SUPPORTED_DTYPES", "check_arguments", "triton_block_sparse_matmul"]

RUNNERS = ("triton", "interpret")
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def check_arguments(a, layout, values) -> jnp.dtype:
    """ValueError unless a [M, K] x (layout, values) describe a product; returns the operands' common dtype."""
    if not isinstance(layout, BlockLayout):
        raise ValueError(f"layout must be a BlockLayout, got {type(layout).__name__}")
    if a.ndim != 2:
        raise ValueError(f"a must be 2-D [M, K], got shape {a.shape}")
    if a.shape[1] != layout.shape[0]:
        raise ValueError(f"a {a.shape} and B {layout.shape} disagree: need a.shape[1] == K = {layout.shape[0]}")
    if values.shape != layout.values_shape:
        raise ValueError(f"values must have shape {layout.values_shape} for this layout, got {values.shape}")
    dtype = jnp.result_type(a.dtype, values.dtype)
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"supported operand dtypes are {[str(d) for d in SUPPORTED_DTYPES]}, got {dtype}")
    return dtype


def triton_block_sparse_matmul(a, layout: BlockLayout, values, *, runner="triton", preferred_element_type=None):
    """a [M, K] @ B [K, N] -> [M, N], differentiable in a and values.

    The operands are promoted to one dtype (bfloat16, float16 or float32); the output has
    `preferred_element_type`, or that dtype.
    """
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    dtype = check_arguments(a, layout, values)
    out_dtype = jnp.dtype(preferred_element_type or dtype)
    if a.shape[0] == 0:
        return jnp.zeros((0, layout.shape[1]), out_dtype)
    return _bsmm(a.astype(dtype), values.astype(dtype), layout, runner, out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bsmm(a, values, layout, runner, out_dtype):
    return launch.bsmm(a, layout, values, out_dtype=out_dtype, runner=runner)


def _bsmm_fwd(a, values, layout, runner, out_dtype):
    return launch.bsmm(a, layout, values, out_dtype=out_dtype, runner=runner), (a, values, layout)


def _bsmm_bwd(runner, out_dtype, residuals, dout):
    del out_dtype
    a, values, layout = residuals
    dout = dout.astype(a.dtype)
    da = launch.bsmm_da(dout, layout, values, out_dtype=a.dtype, runner=runner)
    dvalues = launch.bsmm_dvalues(a, dout, layout, out_dtype=values.dtype, runner=runner)
    return da, dvalues, None


_bsmm.defvjp(_bsmm_fwd, _bsmm_bwd)
