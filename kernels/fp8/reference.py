"""Pure-JAX block-scaled FP8 GEMM: the definition that fast FP8 kernels must match.

`scaled_matmul(xq, x_scales, wq, w_scales)` computes, for out[m, n],

    out = sum over K-chunks c of  (sum_{k in c} xq[m, k] * wq[k, n])  *  (x_scales[m, c] * w_scales[c, n // block_n])

with chunks of `block_k` (128) consecutive reduction indices. Each FP8 x FP8 product is exact in float32
(4-bit significands give an 8-bit product; exponents stay inside float32's range); a chunk's products are summed
in float32, the chunk's partial sum is multiplied by the product of its two scales and added to a float32
accumulator, chunk after chunk in order. This is DeepSeek-V3's "promotion every 128 elements": on Hopper the
tensor cores accumulate a chunk, the CUDA cores scale it and add it to a float32 register. Here the in-chunk
sum is an honest float32 sum, which is more precise than the tensor cores' accumulator (the hardware keeps
about 14 bits there); see README.md.

The chunks run in a `lax.scan`, so memory stays at one [M, N] accumulator whatever K is. The function is jitted
(block sizes and output dtype static), so eager calls compile once per shape.

`scaled_gmm(lhs, lhs_scales, rhs, rhs_scales, group_sizes)` is the grouped version for MoE experts (the semantics
of `jax.lax.ragged_dot`): rows of lhs sorted by group, row t multiplied by rhs[g(t)] with that expert's block
scales, rows past sum(group_sizes) zero; the same chunk-by-chunk sum, each chunk a float32 `ragged_dot`.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

from kernels.gmm.ops import check_shapes

__all__ = ["scaled_gmm", "scaled_matmul"]

F32 = jnp.float32


@partial(jax.jit, static_argnames=("out_dtype", "block_k", "block_n"))
def scaled_matmul(
    xq: jax.Array,
    x_scales: jax.Array,
    wq: jax.Array,
    w_scales: jax.Array,
    out_dtype=F32,
    *,
    block_k: int = 128,
    block_n: int = 128,
) -> jax.Array:
    """xq [M, K] (scales [M, ceil(K/block_k)]) @ wq [K, N] (scales [ceil(K/block_k), ceil(N/block_n)]) -> [M, N].

    `xq` carries one scale per row per K-chunk (1 x block_k tiles); `wq` one scale per K-chunk per `block_n`
    columns: block_n=128 for 128 x 128 weight blocks, block_n=1 for an operand tiled along K per column (the
    weight gradient, where both operands are tiled along the token axis).
    """
    if xq.ndim != 2 or wq.ndim != 2:
        raise ValueError(f"scaled_matmul expects xq [M, K] and wq [K, N], got {xq.shape} and {wq.shape}")
    (m, k), (k_w, n) = xq.shape, wq.shape
    if k != k_w:
        raise ValueError(f"reduction sizes differ: xq {xq.shape}, wq {wq.shape}")
    for name, size in (("block_k", block_k), ("block_n", block_n)):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    chunks = math.ceil(k / block_k)
    n_blocks = math.ceil(n / block_n)
    if x_scales.shape != (m, chunks):
        raise ValueError(f"x_scales shape {x_scales.shape} must be {(m, chunks)} for xq {xq.shape}, block_k={block_k}")
    if w_scales.shape != (chunks, n_blocks):
        raise ValueError(
            f"w_scales shape {w_scales.shape} must be {(chunks, n_blocks)} for wq {wq.shape}, "
            f"block_k={block_k}, block_n={block_n}"
        )
    if chunks == 0:
        return jnp.zeros((m, n), out_dtype)

    # FP8 values are exact in float32; zero padding of the last chunk adds nothing to the sums.
    pad = chunks * block_k - k
    x_chunks = jnp.pad(xq.astype(F32), ((0, 0), (0, pad))).reshape(m, chunks, block_k).transpose(1, 0, 2)
    w_chunks = jnp.pad(wq.astype(F32), ((0, pad), (0, 0))).reshape(chunks, block_k, n)
    sx_chunks = x_scales.astype(F32).T  # [chunks, M]
    sw_chunks = jnp.repeat(w_scales.astype(F32), block_n, axis=1)[:, :n]  # [chunks, N]

    def add_chunk(acc, chunk):
        x_c, w_c, sx_c, sw_c = chunk
        partial = jnp.dot(x_c, w_c, precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32)
        return acc + partial * (sx_c[:, None] * sw_c[None, :]), None

    acc, _ = jax.lax.scan(add_chunk, jnp.zeros((m, n), F32), (x_chunks, w_chunks, sx_chunks, sw_chunks))
    return acc.astype(out_dtype)


@partial(jax.jit, static_argnames=("out_dtype",))
def scaled_gmm(
    lhs: jax.Array,
    lhs_scales: jax.Array,
    rhs: jax.Array,
    rhs_scales: jax.Array,
    group_sizes: jax.Array,
    out_dtype=F32,
) -> jax.Array:
    """lhs [T, K] (scales [T, ceil(K/128)]) @ rhs[g] (rhs [E, K, N], scales [E, ceil(K/128), ceil(N/128)]) -> [T, N].

    Group g owns the next group_sizes[g] rows of lhs; rows past the last group give zeros. For each 128-chunk c
    of K: out[t] += (lhs_c[t] @ rhs_c[g(t)]) * lhs_scales[t, c] * rhs_scales[g(t), c, n // 128].
    """
    block = 128
    check_shapes("scaled_gmm", lhs, rhs, group_sizes)
    (t, k), (e, _, n) = lhs.shape, rhs.shape
    chunks, n_blocks = math.ceil(k / block), math.ceil(n / block)
    if lhs_scales.shape != (t, chunks):
        raise ValueError(f"lhs_scales shape {lhs_scales.shape} must be {(t, chunks)} for lhs {lhs.shape}")
    if rhs_scales.shape != (e, chunks, n_blocks):
        raise ValueError(f"rhs_scales shape {rhs_scales.shape} must be {(e, chunks, n_blocks)} for rhs {rhs.shape}")
    if chunks == 0 or e == 0:
        return jnp.zeros((t, n), out_dtype)

    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.cumsum(sizes)
    row_group = jnp.searchsorted(ends, jnp.arange(t), side="right")  # g(t); E for the padding rows
    in_group = row_group < e
    row_group = jnp.minimum(row_group, e - 1)

    pad = chunks * block - k
    x_chunks = jnp.pad(lhs.astype(F32), ((0, 0), (0, pad))).reshape(t, chunks, block).transpose(1, 0, 2)
    w_chunks = jnp.pad(rhs.astype(F32), ((0, 0), (0, pad), (0, 0))).reshape(e, chunks, block, n).transpose(1, 0, 2, 3)
    sx_chunks = lhs_scales.astype(F32).T  # [chunks, T]
    sw_chunks = rhs_scales.astype(F32).transpose(1, 0, 2)  # [chunks, E, N / 128]

    def add_chunk(acc, chunk):
        x_c, w_c, sx_c, sw_c = chunk
        partial = jax.lax.ragged_dot(x_c, w_c, sizes, precision=jax.lax.Precision.HIGHEST, preferred_element_type=F32)
        sw_rows = jnp.repeat(sw_c[row_group], block, axis=1)[:, :n]  # [T, N]: each row's expert's scales
        term = partial * (sx_c[:, None] * sw_rows)
        return acc + jnp.where(in_group[:, None], term, 0.0), None  # padding rows stay zero

    acc, _ = jax.lax.scan(add_chunk, jnp.zeros((t, n), F32), (x_chunks, w_chunks, sx_chunks, sw_chunks))
    return acc.astype(out_dtype)
