"""FP8 linear layer `y = x @ w` with DeepSeek-V3's fine-grained recipe, as a `jax.custom_vjp`.

For x [M, K] (leading axes are flattened into M, the token axis) and w [K, N], with every GEMM block-scaled,
FP32-accumulated and promoted every 128 reduction elements (`reference.scaled_matmul`):

- forward  (Fprop): y  = Q_tile(x) @ Q_block(w)
  x in 1 x 128 tiles along K (the reduction axis), w in 128 x 128 blocks.
- backward (Dgrad): dx = Q_tile(dy) @ Q_block(w)^T
  dy in 1 x 128 tiles along N, the new reduction axis. The weight must be quantised in blocks along N now;
  because the blocks are square, re-quantising w^T in 128 x 128 blocks gives exactly the transposed FP8 weight
  and scales of the forward, so the forward's FP8 weight is reused transposed (no second rounding).
- backward (Wgrad): dw = Q(x)^T @ Q(dy)
  The reduction axis is now M, the tokens: x and dy are both quantised in 128 x 1 tiles along the tokens
  (per column of x and of dy, 128 tokens per scale), so this GEMM has per-chunk scales on both sides.

Memory and precision: the master weight keeps its dtype (the weight gradient comes back in it); the output
and dx come back in `out_dtype` / x's dtype; only the FP8 activation and its float32 tile scales are saved
for the backward (plus the FP8 weight and its block scales), never the high-precision activation. The
Wgrad's 128 x 1 activation tiles are therefore made from the saved 1 x 128 FP8 tiles: dequantised to float32
and quantised again along the tokens, as DeepSeek-V3 does ("converted from a 1x128 quantization tile to a
128x1 tile in the backward pass"); that second rounding adds its own error (README.md gives the bound).
dy is quantised twice from its own (high-precision) values, once per layout, each a single rounding.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp

from kernels.fp8 import reference
from kernels.fp8.quantize import dequantize_tiles, quantize_blocks, quantize_tiles

__all__ = ["ReferenceOps", "fp8_linear"]

F32 = jnp.float32
Gemm = Callable[..., jax.Array]  # the signature of reference.scaled_matmul


@dataclasses.dataclass(frozen=True)
class ReferenceOps:
    """The layer's quantisers and GEMMs in pure JAX, with a pluggable block-scaled GEMM.

    An implementation of the layer provides `forward(x, w, out_dtype) -> (y, residuals)`,
    `backward(residuals, dy, dx_dtype) -> (dx, dw)` and `backward_from_input(x, wq, w_scales, dy, dx_dtype)`
    with these semantics (kernels.fp8.ops.TritonOps: the Triton kernels). The Dgrad GEMM rounds its float32 sums
    to `dx_dtype` itself (x's dtype): a float32 dx and a separate cast would write and read the activation-sized
    gradient twice more.
    """

    gemm: Gemm = reference.scaled_matmul

    def forward(self, x, w, out_dtype):
        xq, x_scales = quantize_tiles(x)  # 1 x 128 tiles along K
        wq, w_scales = quantize_blocks(w)  # 128 x 128 blocks
        y = self.gemm(xq, x_scales, wq, w_scales, out_dtype)
        return y, (xq, x_scales, wq, w_scales)

    def backward(self, residuals, dy, dx_dtype=F32):
        xq, x_scales, wq, w_scales = residuals
        # The saved 1 x 128 tiles re-tiled along the tokens: [K, M], scales [K, ceil(M/128)].
        x_cols = quantize_tiles(dequantize_tiles(xq, x_scales).T)
        return self._grads(x_cols, wq, w_scales, dy, dx_dtype)

    def backward_from_input(self, x, wq, w_scales, dy, dx_dtype=F32):
        """`backward` for a layer whose input x [M, K] is at hand in high precision (recomputed in the backward,
        `cached.fp8_cached_linear`): the Wgrad's 128 x 1 tiles come from x itself, one rounding."""
        return self._grads(quantize_tiles(x.T), wq, w_scales, dy, dx_dtype)

    def _grads(self, x_cols, wq, w_scales, dy, dx_dtype):
        dy = dy.astype(F32)

        # Dgrad: reduce over N. quantize_blocks(w.T) == (wq.T, w_scales.T) exactly (square blocks).
        dyq, dy_scales = quantize_tiles(dy)  # 1 x 128 tiles along N
        dx = self.gemm(dyq, dy_scales, wq.T, w_scales.T, dx_dtype)

        # Wgrad: reduce over M (tokens). Both operands in 128 x 1 tiles along M.
        xtq, xt_scales = x_cols
        dytq, dyt_scales = quantize_tiles(dy.T)  # [N, M], scales [N, ceil(M/128)]
        dw = self.gemm(xtq, xt_scales, dytq.T, dyt_scales.T, F32, block_n=1)
        return dx, dw


def fp8_linear(
    x: jax.Array,
    w: jax.Array,
    *,
    out_dtype=None,
    gemm: Gemm = reference.scaled_matmul,
    ops=None,
) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] in FP8 (E4M3) with fine-grained scales; differentiable in x and w.

    `out_dtype` defaults to x's dtype. `gemm` is the block-scaled GEMM of the pure-JAX layer (the reference by
    default; a fast kernel with the same signature plugs in here); `ops` replaces the whole layer's quantisers
    and GEMMs (`ReferenceOps(gemm)` when None).
    """
    if w.ndim != 2:
        raise ValueError(f"fp8_linear expects a weight [K, N], got shape {w.shape}")
    if x.ndim < 1 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8_linear needs x [..., K] with K = w.shape[0] = {w.shape[0]}, got x shape {x.shape}")
    for name, a in (("x", x), ("w", w)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"fp8_linear needs floating {name}, got {a.dtype}")
    dtypes = (jnp.dtype(x.dtype), jnp.dtype(w.dtype), jnp.dtype(x.dtype if out_dtype is None else out_dtype))
    y = _fp8_linear_2d(x.reshape(-1, x.shape[-1]), w, dtypes, ops or ReferenceOps(gemm))
    return y.reshape(*x.shape[:-1], w.shape[1])


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _fp8_linear_2d(x, w, dtypes, ops):
    return _forward(x, w, dtypes, ops)[0]


def _forward(x, w, dtypes, ops):
    return ops.forward(x, w, dtypes[2])


def _backward(dtypes, ops, residuals, dy):
    x_dtype, w_dtype, _ = dtypes
    dx, dw = ops.backward(residuals, dy, x_dtype)
    return dx.astype(x_dtype), dw.astype(w_dtype)


_fp8_linear_2d.defvjp(_forward, _backward)
