"""FP8 (E4M3) training with DeepSeek-V3's fine-grained scaling: quantisers, block-scaled GEMM, linear layer.

- `quantize_tiles` / `dequantize_tiles`: 1 x 128 tiles along the last axis (activations, gradients);
- `quantize_blocks` / `dequantize_blocks`: 128 x 128 blocks (weights);
- `scaled_matmul(xq, x_scales, wq, w_scales, out_dtype)`: the block-scaled GEMM, float32 accumulation promoted
  every 128 reduction elements;
- `fp8_linear(x, w)`: `x @ w` with the FP8 recipe in forward and backward (a `jax.custom_vjp`).

`impl`:
- "reference": the pure-JAX definitions (`kernels.fp8.reference`, `kernels.fp8.linear`);
- "auto": the fastest implementation that can run here; today that is the reference everywhere (no FP8 GPU
  kernel yet).

See README.md for the recipe, the error bounds and where this deviates from DeepSeek-V3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.fp8 import linear, reference
from kernels.fp8.quantize import E4M3, E4M3_MAX, dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles

__all__ = [
    "E4M3",
    "E4M3_MAX",
    "IMPLS",
    "dequantize_blocks",
    "dequantize_tiles",
    "fp8_linear",
    "quantize_blocks",
    "quantize_tiles",
    "scaled_matmul",
]

IMPLS = ("auto", "reference")


def _gemm(impl: str):
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return reference.scaled_matmul  # "auto" and "reference" alike until a GPU kernel exists


def scaled_matmul(
    xq: jax.Array,
    x_scales: jax.Array,
    wq: jax.Array,
    w_scales: jax.Array,
    out_dtype=jnp.float32,
    *,
    block_k: int = 128,
    block_n: int = 128,
    impl: str = "auto",
) -> jax.Array:
    """Block-scaled FP8 GEMM: xq [M, K] with 1 x block_k tile scales @ wq [K, N] with block_k x block_n scales."""
    return _gemm(impl)(xq, x_scales, wq, w_scales, out_dtype, block_k=block_k, block_n=block_n)


def fp8_linear(x: jax.Array, w: jax.Array, *, out_dtype=None, impl: str = "auto") -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] with FP8 forward and backward; out_dtype defaults to x's dtype."""
    return linear.fp8_linear(x, w, out_dtype=out_dtype, gemm=_gemm(impl))
