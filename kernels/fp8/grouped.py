"""FP8 grouped matmul for mixture-of-experts layers, with DeepSeek-V3's recipe: `fp8_gmm(lhs, rhs, group_sizes)`.

The rows of `lhs` [T, K] come sorted by group; the rows of group e (the next `group_sizes[e]` rows) are
multiplied by `rhs[e]` [K, N]. Rows past `sum(group_sizes)` give zeros (as `kernels.gmm.gmm`). The three GEMMs
follow `linear.py` with one weight per group:

- forward  (Fprop): y = Q_tile(x) @ Q_block(w_e), x in 1 x 128 tiles along K, each w_e in 128 x 128 blocks;
- backward (Dgrad): dx = Q_tile(dy) @ Q_block(w_e)^T, dy in 1 x 128 tiles along N; the forward's FP8 weight is
  reused transposed (square blocks: re-quantising w_e^T gives exactly the transposed values and scales);
- backward (Wgrad): dw_e = Q(x_e)^T @ Q(dy_e), the reduction over the group's tokens, both operands in 128 x 1
  tiles along the tokens; x comes from the saved 1 x 128 FP8 tiles, dequantised and quantised again (as in
  `linear.py`, a second rounding of x).

Token tiles of the Wgrad are cut every 128 rows of the whole buffer, not per group: group boundaries fall
anywhere (they are data), so a 128-token tile may hold the last rows of one expert and the first rows of the
next and then has one scale for both. That scale is the tile's amax / 448, at least as large as each expert's
own part would need: every value is still represented with E4M3's 3 mantissa bits relative to a scale that
covers it (no overflow); only the subnormal floor (2^-10 x scale, see README.md) is shared, a loss only for an
expert whose values in the tile are ~15 binades under its neighbour's. Aligning tiles to groups would need
each group padded to a multiple of 128 rows, a data-dependent layout; the shared scale is the sound shortcut.

How the products are computed: each operand is dequantised to float32 (`q * scale`: the E4M3 value has 4
significant bits, the float32 scale 24, so this one product rounds at most once, by 2^-24 relative) and the
grouped product runs as `jax.lax.ragged_dot` in float32 at HIGHEST precision with a float32 result. That is
float32 accumulation over the whole reduction, which the "promotion every 128 elements" of the block-scaled
GEMM (`reference.scaled_matmul`) only approximates on hardware with a narrower accumulator; the two agree to
float32 rounding (~1e-7 relative), far under E4M3's 2^-4.

`impl` (as `kernels.fp8.fp8_linear`: "auto" takes the Triton kernels on a CUDA GPU with jax-triton): with the
kernels, Fprop and Dgrad run on the grouped block-scaled GEMM `launch.scaled_gmm`, which keeps the FP8 operands
and applies the scales per 128-chunk (the same products; sums in another order). Both read the weight K-major:
Fprop a transposed copy [E, N, K], Dgrad the saved wq [E, K, N] as stored (it reduces over N). The Wgrad runs
on kernels.gmm's weight-gradient kernel in bf16 over the same FP8-rounded operands (the bf16 copy rounds each
value once more, by at most 2^-8 relative; an FP8 kernel reducing over each group's tokens measured slower, see
README.md, deviation 7). Triton quantisers write those operands in one pass each, after the Dgrad (so they never
occupy memory during it): `requantize_rounded_cols` from the saved FP8 x, `quantize_rounded_cols` from a
recomputed x and from dy (whose 1 x 128 FP8 tiles for the Dgrad come from `quantize_rows`).

Saved for the backward: the FP8 activation and its tile scales, the FP8 weights and their block scales, and
the group sizes; never the high-precision activation. `fp8_cached_gmm(fn, xs, rhs, group_sizes)` is
`fp8_gmm(fp8_cached(fn)(*xs), rhs, group_sizes)` as one layer (the routed experts' SwiGLU and down projection):
it saves the FP8 inputs of fn instead of the FP8 activation, and its backward recomputes fn's output from them
for the Wgrad (`cached.fp8_cached_linear` is the same for one weight; README.md, deviation 8).
Gradients come back in the operands' dtypes. Works under `jax.vmap` with shared or per-element operands (each
grouped product maps over the batch), and inside `jax.shard_map` with weights shared across devices whose tokens
differ (the weight gradient is then summed over those devices, as autodiff of a plain grouped matmul would).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache, partial

import jax
import jax.numpy as jnp

from kernels.fp8 import _runner, cached, launch
from kernels.fp8.cached import times_rows
from kernels.fp8.quantize import dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles
from kernels.gmm import launch as gmm_launch
from kernels.gmm.batching import mapped
from kernels.gmm.ops import check_shapes
from kernels.triton_runtime import varying_like

__all__ = ["fp8_cached_gmm", "fp8_gmm", "quantize_expert_blocks", "dequantize_expert_blocks"]

F32 = jnp.float32
HIGHEST = jax.lax.Precision.HIGHEST

# Wgrad: contract the (ragged) token axis of lhs [T, K] with dy [T, N]; the result gets a group axis [E, K, N].
_TOKEN_CONTRACTION = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[]
)


def quantize_expert_blocks(w_ekn: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-group weights [E, K, N] -> (FP8 [E, K, N], float32 scales [E, ceil(K/128), ceil(N/128)])."""
    return jax.vmap(quantize_blocks)(w_ekn)


def dequantize_expert_blocks(q_ekn: jax.Array, scales: jax.Array) -> jax.Array:
    return jax.vmap(dequantize_blocks)(q_ekn, scales)


@mapped
def _rows_by_group(a_tk: jax.Array, b_ekn: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """[T, K] rows sorted by group x [E, K, N] -> [T, N], exact float32 operands, float32 accumulation."""
    return jax.lax.ragged_dot(a_tk, b_ekn, group_sizes, precision=HIGHEST, preferred_element_type=F32)


@mapped
def _tokens_by_group(a_tk: jax.Array, b_tn: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """sum over each group's rows of a^T b: [T, K] and [T, N] -> [E, K, N]."""
    return jax.lax.ragged_dot_general(
        a_tk, b_tn, group_sizes, _TOKEN_CONTRACTION, precision=HIGHEST, preferred_element_type=F32
    )


@cache
def _scaled_by_group(runner: str, out_dtype):
    """`launch.scaled_gmm` on `runner` with K-major weights, vmappable (`lax.map`: a kernel call has no batching
    rule): aq [T, R] (1 x 128 tile scales) x bq_t[e] [C, R] (block scales [E, C/128, R/128]) -> [T, C] in
    `out_dtype`, rounded from the float32 sums by the kernel (to nearest on a GPU; a float32 result and a cast
    would write and read it twice more)."""
    return mapped(partial(launch.scaled_gmm, out_dtype=out_dtype, rhs_transposed=True, runner=runner))


def fp8_gmm(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, out_dtype=None, impl: str = "auto") -> jax.Array:
    """[T, K] rows sorted by group x [E, K, N] per-group weights -> [T, N] in FP8 (E4M3) with fine-grained scales.

    Differentiable in lhs and rhs; `out_dtype` defaults to lhs's dtype. `impl`: see the module docstring.
    """
    check_shapes("fp8_gmm", lhs, rhs, group_sizes)
    for name, a in (("lhs", lhs), ("rhs", rhs)):
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"fp8_gmm needs floating {name}, got {a.dtype}")
    dtypes = (jnp.dtype(lhs.dtype), jnp.dtype(rhs.dtype), jnp.dtype(lhs.dtype if out_dtype is None else out_dtype))
    runner = _runner(impl)
    if 0 in (*lhs.shape, *rhs.shape):
        runner = None  # nothing to multiply: the reference gives the zeros
    lhs, rhs = varying_like((lhs, rhs))  # inside shard_map: see triton_runtime.varying_like
    return _fp8_gmm(lhs, rhs, group_sizes.astype(jnp.int32), dtypes, runner)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fp8_gmm(lhs, rhs, group_sizes, dtypes, runner):
    return _forward(lhs, rhs, group_sizes, dtypes, runner)[0]


def _fprop(lhs, rhs, group_sizes, out_dtype, runner):
    """The forward product; returns y and the FP8 operands (xq, x_scales, wq, w_scales)."""
    xq, x_scales = quantize_tiles(lhs)  # 1 x 128 tiles along K
    wq, w_scales = quantize_expert_blocks(rhs)  # 128 x 128 blocks per expert
    if runner is None:
        y = _rows_by_group(dequantize_tiles(xq, x_scales), dequantize_expert_blocks(wq, w_scales), group_sizes)
    else:  # the kernel wants each expert's weight K-major: [E, N, K], its block scales transposed alike
        w_t = (wq.transpose(0, 2, 1), w_scales.transpose(0, 2, 1))
        y = _scaled_by_group(runner, jnp.dtype(out_dtype))(xq, x_scales, *w_t, group_sizes)
    return y.astype(out_dtype), (xq, x_scales, wq, w_scales)


def _forward(lhs, rhs, group_sizes, dtypes, runner):
    y, fp8_operands = _fprop(lhs, rhs, group_sizes, dtypes[2], runner)
    return y, (*fp8_operands, group_sizes)


def _backward(dtypes, runner, residuals, dy):
    x_dtype, w_dtype, _ = dtypes
    xq, x_scales, wq, w_scales, group_sizes = residuals
    if runner is None:  # x re-tiled along the tokens by `_reference_grads`: a second rounding
        dx, dw = _reference_grads(dequantize_tiles(xq, x_scales), wq, w_scales, group_sizes, dy)
    else:
        retile = launch.requantize_rounded_cols
        dx, dw = _kernel_grads(retile, (xq, x_scales), wq, w_scales, group_sizes, dy, x_dtype, runner)
    return dx.astype(x_dtype), dw.astype(w_dtype), None


def _reference_grads(x, wq, w_scales, group_sizes, dy):
    """(dx, float32 dw) of the grouped product in pure JAX, from dy, the forward's FP8 weight, and its input x
    [T, K] in high precision, which the Wgrad quantises in 128 x 1 tiles along the tokens."""
    dy = dy.astype(F32)
    # Dgrad: reduce over N, the forward's FP8 weight transposed (what 128 x 128 blocks of w_e^T would give).
    dyq, dy_scales = quantize_tiles(dy)  # 1 x 128 tiles along N
    w_t_hat = dequantize_expert_blocks(wq, w_scales).transpose(0, 2, 1)
    dx = _rows_by_group(dequantize_tiles(dyq, dy_scales), w_t_hat, group_sizes)
    # Wgrad: reduce over each group's tokens, both operands in 128 x 1 tiles along the tokens of the whole buffer.
    xt_hat = dequantize_tiles(*quantize_tiles(x.T)).T  # [T, K], scales per 128 tokens per column
    dyt_hat = dequantize_tiles(*quantize_tiles(dy.T)).T  # [T, N]
    return dx, _tokens_by_group(xt_hat, dyt_hat, group_sizes)


def _kernel_grads(retile, x_parts, wq, w_scales, group_sizes, dy, dx_dtype, runner: str):
    """`_reference_grads` on the kernels, with the same quantised values (bit for bit): `retile(*x_parts)` gives
    the forward's input quantised in 128 x 1 tiles along the tokens and dequantised to bf16 [T, K]
    (`launch.requantize_rounded_cols` from its FP8 1 x 128 tiles, `launch.quantize_rounded_cols` from high
    precision), and dy likewise after its 1 x 128 tiles for the Dgrad. Dgrad runs on `scaled_gmm` (wq [E, K, N]
    as stored is K-major for a reduction over N); Wgrad on kernels.gmm's bf16 weight-gradient kernel (deviation 7)."""

    def grads(*args):
        *x_args, wq, w_scales, group_sizes, dy = args
        dyq, dy_scales = launch.quantize_rows(dy, runner=runner)
        dx = launch.scaled_gmm(
            dyq, dy_scales, wq, w_scales, group_sizes, out_dtype=dx_dtype, rhs_transposed=True, runner=runner
        )
        # The Wgrad's bf16 operands are made after the Dgrad, so they never live during it (dy is read twice).
        dx, dy, *x_args = jax.lax.optimization_barrier((dx, dy, *x_args))
        x_cols = retile(*x_args, runner=runner)
        dy_cols = launch.quantize_rounded_cols(dy, runner=runner)
        groups = group_sizes.shape[0]
        return dx, gmm_launch.gmm_drhs(x_cols, dy_cols, group_sizes, groups, out_dtype=F32, runner=runner)

    return mapped(grads)(*x_parts, wq, w_scales, group_sizes, dy)


_fp8_gmm.defvjp(_forward, _backward)


def fp8_cached_gmm(
    fn: Callable[..., jax.Array],
    xs: tuple[jax.Array, ...],
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    row_scale: jax.Array | None = None,
    out_dtype=None,
    impl: str = "auto",
) -> jax.Array:
    """`fp8_gmm(fp8_cached(fn)(*xs, row_scale=row_scale), rhs, group_sizes)` with the same forward, keeping for the
    backward only the cached inputs xs (each [T, K], in E4M3 1 x 128 tiles) and not the FP8 copy of fn's output:
    the backward recomputes that output from them (as `cached.fp8_cached_linear` does for one weight) and
    quantises it along the tokens for the weight gradient. The routed experts' SwiGLU and down projection."""
    xs = tuple(xs)
    cached.check_inputs("fp8_cached_gmm", xs, row_scale)
    if any(x.shape != xs[0].shape or x.ndim != 2 for x in xs):
        raise ValueError(f"fp8_cached_gmm needs inputs [T, K] of one shape, got {[x.shape for x in xs]}")
    a = jax.eval_shape(lambda *a: times_rows(fn(*a), row_scale), *xs)
    check_shapes("fp8_cached_gmm", a, rhs, group_sizes)
    if not jnp.issubdtype(rhs.dtype, jnp.floating):
        raise ValueError(f"fp8_cached_gmm needs a floating rhs, got {rhs.dtype}")
    runner = _runner(impl)
    if 0 in (*xs[0].shape, *rhs.shape):
        runner = None
    dtypes = (tuple(x.dtype for x in xs), jnp.dtype(a.dtype), jnp.dtype(rhs.dtype))
    out_dtype = jnp.dtype(a.dtype if out_dtype is None else out_dtype)
    n = len(xs)
    cast = varying_like((*xs, rhs, *(() if row_scale is None else (row_scale,))))  # as in fp8_gmm
    xs, rhs, row_scale = tuple(cast[:n]), cast[n], (cast[n + 1] if row_scale is not None else None)
    return _cached_gmm(fn, dtypes, out_dtype, runner, xs, row_scale, rhs, group_sizes.astype(jnp.int32))


@partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _cached_gmm(fn, dtypes, out_dtype, runner, xs, scale, rhs, group_sizes):
    return _fprop(times_rows(fn(*xs), scale), rhs, group_sizes, out_dtype, runner)[0]


def _cached_gmm_forward(fn, dtypes, out_dtype, runner, xs, scale, rhs, group_sizes):
    y, (_, _, wq, w_scales) = _fprop(times_rows(fn(*xs), scale), rhs, group_sizes, out_dtype, runner)
    return y, (tuple(quantize_tiles(x) for x in xs), scale, wq, w_scales, group_sizes)


def _cached_gmm_backward(fn, dtypes, out_dtype, runner, saved, dy):
    x_dtypes, a_dtype, w_dtype = dtypes
    quantized, scale, wq, w_scales, group_sizes = saved
    a32, vjp = cached.dequantized_vjp(fn, quantized, scale)
    a = a32.astype(a_dtype)
    if runner is None:
        da, dw = _reference_grads(a, wq, w_scales, group_sizes, dy)
    else:
        da, dw = _kernel_grads(launch.quantize_rounded_cols, (a,), wq, w_scales, group_sizes, dy, a_dtype, runner)
    dxs, dscale = cached.input_grads(vjp, da.astype(a_dtype), x_dtypes, scale)
    return dxs, dscale, dw.astype(w_dtype), None


_cached_gmm.defvjp(_cached_gmm_forward, _cached_gmm_backward)
