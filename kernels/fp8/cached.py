"""Elementwise functions whose backward keeps only their inputs, in FP8: DeepSeek-V3's cache of the SwiGLU input.

`fp8_cached(fn)(*xs)` returns `fn(*xs)` unchanged. For the backward it keeps each input quantised in 1 x 128
tiles along its last axis (`quantize_tiles`: one byte per value plus a float32 scale per 128 values) instead of
what autodiff of `fn` would keep (its intermediates, in the compute dtype or float32), and recomputes `fn`'s
vector-Jacobian product in float32 at the dequantised inputs. The gradient thus sees each input with E4M3's
rounding (at most 2^-4 relative per value, plus the subnormal floor; README.md, "Error bounds"), as the FP8
GEMMs' operands do; the forward is exact. DeepSeek-V3 caches the SwiGLU operator's input this way ("Low-Precision
Storage and Communication") and recomputes its output in the backward.

`fp8_cached(fn)(*xs, row_scale=s)` returns `fn(*xs) * s[..., None]`: a routed expert's SwiGLU times the token's
routing weight, so that the expert's output comes out weighted and the combine keeps nothing for its backward.
`fn(*xs)` is computed in the inputs' dtype, the product in float32 and rounded back to that dtype (two roundings
in bf16). `s` is kept as it is (one value per row) and gets its gradient.

`fp8_cached_linear(fn, xs, w)` is `fp8_linear(fp8_cached(fn)(*xs), w)` for the activation and the projection after
it (GELU or SwiGLU, then the MLP's down projection): the linear layer alone would also keep its own FP8 copy of
fn's output for its weight gradient; here the backward recomputes that output from the cached inputs instead, as
DeepSeek-V3 does, so the MLP keeps one byte less per hidden unit and token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels.fp8.linear import ReferenceOps
from kernels.fp8.quantize import dequantize_tiles, quantize_tiles

__all__ = ["fp8_cached", "fp8_cached_linear", "times_rows"]


def times_rows(y: jax.Array, row_scale: jax.Array | None) -> jax.Array:
    """y * row_scale[..., None], multiplied in float32 and rounded to y's dtype; y itself when row_scale is None."""
    if row_scale is None:
        return y
    return (y.astype(jnp.float32) * row_scale[..., None].astype(jnp.float32)).astype(y.dtype)


def check_inputs(name: str, xs, row_scale) -> None:
    for i, x in enumerate(xs):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
            raise ValueError(f"{name}: input {i} must be a floating array of rank >= 1, got {x.dtype}{x.shape}")
    if row_scale is not None and (
        not jnp.issubdtype(row_scale.dtype, jnp.floating) or row_scale.shape != xs[0].shape[:-1]
    ):
        raise ValueError(
            f"{name}: row_scale must be floating with the inputs' leading shape {xs[0].shape[:-1]}, "
            f"got {row_scale.dtype}{row_scale.shape}"
        )


def dequantized_vjp(fn, quantized, scale):
    """(fn(*xs) * scale in float32, its vjp) at the dequantised cached inputs."""
    xs32 = tuple(dequantize_tiles(q, scales) for q, scales in quantized)
    scale32 = None if scale is None else scale.astype(jnp.float32)
    return jax.vjp(lambda a, s: times_rows(fn(*a), s).astype(jnp.float32), xs32, scale32)


def input_grads(vjp, da, dtypes, scale):
    dxs, dscale = vjp(da.astype(jnp.float32))
    dxs = tuple(g.astype(dt) for g, dt in zip(dxs, dtypes, strict=True))
    return dxs, None if scale is None else dscale.astype(scale.dtype)


def fp8_cached(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`fn` (elementwise over floating inputs of rank >= 1) with its inputs kept in FP8 for the backward, and its
    output optionally scaled per row by `row_scale` (kept as it is)."""

    @functools.wraps(fn)
    def call(*xs: jax.Array, row_scale: jax.Array | None = None) -> jax.Array:
        check_inputs("fp8_cached", xs, row_scale)
        dtypes = tuple(x.dtype for x in xs)
        apply = lambda xs, scale: times_rows(fn(*xs), scale)  # noqa: E731

        @jax.custom_vjp
        def cached(xs, scale):
            return apply(xs, scale)

        def forward(xs, scale):
            return apply(xs, scale), (tuple(quantize_tiles(x) for x in xs), scale)

        def backward(saved, dy):
            quantized, scale = saved
            _, vjp = dequantized_vjp(fn, quantized, scale)
            return input_grads(vjp, dy, dtypes, scale)

        cached.defvjp(forward, backward)
        return cached(tuple(xs), row_scale)

    return call


def fp8_cached_linear(
    fn: Callable[..., jax.Array],
    xs: tuple[jax.Array, ...],
    w: jax.Array,
    *,
    row_scale: jax.Array | None = None,
    out_dtype=None,
    ops=None,
) -> jax.Array:
    """`fp8_linear(fp8_cached(fn)(*xs, row_scale=row_scale), w)` (xs [..., K], w [K, N] -> [..., N]) with the
    same forward, keeping for the backward only the cached inputs (and the FP8 weight), not the FP8 copy of
    fn's output that the linear layer would keep: DeepSeek-V3 recomputes the SwiGLU output in the backward.

    The backward recomputes a = fn(*xs) * row_scale in float32 at the dequantised inputs, rounds it to the
    forward's dtype and quantises it along the tokens for the weight gradient (`backward_from_input`); the
    input gradient is the linear layer's FP8 Dgrad, then fn's vector-Jacobian product as in `fp8_cached`.
    The weight gradient thus sees fn's output computed from E4M3-rounded inputs and rounded once in 128 x 1
    tiles, where `fp8_linear` rounds the exact output in 1 x 128 tiles and then again in 128 x 1 tiles.
    `ops`: as `linear.fp8_linear` (the reference's quantisers and GEMMs when None).
    """
    xs = tuple(xs)
    check_inputs("fp8_cached_linear", xs, row_scale)
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"fp8_cached_linear expects a floating weight [K, N], got {w.dtype}{w.shape}")
    if any(x.shape != xs[0].shape for x in xs) or xs[0].shape[-1] != w.shape[0]:
        raise ValueError(
            f"fp8_cached_linear needs inputs of one shape [..., K] with K = w.shape[0] = {w.shape[0]}, "
            f"got {[x.shape for x in xs]}"
        )
    lead, k = xs[0].shape[:-1], w.shape[0]
    a_dtype = jax.eval_shape(lambda *a: times_rows(fn(*a), row_scale), *xs).dtype
    dtypes = (tuple(x.dtype for x in xs), jnp.dtype(a_dtype), jnp.dtype(w.dtype))
    out_dtype = jnp.dtype(a_dtype if out_dtype is None else out_dtype)
    xs2d = tuple(x.reshape(-1, k) for x in xs)
    scale = None if row_scale is None else row_scale.reshape(-1)
    y = _cached_linear(fn, ops or ReferenceOps(), dtypes, out_dtype, xs2d, scale, w)
    return y.reshape(*lead, w.shape[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _cached_linear(fn, ops, dtypes, out_dtype, xs, scale, w):
    return ops.forward(times_rows(fn(*xs), scale), w, out_dtype)[0]


def _cached_linear_forward(fn, ops, dtypes, out_dtype, xs, scale, w):
    y, (_, _, wq, w_scales) = ops.forward(times_rows(fn(*xs), scale), w, out_dtype)
    return y, (tuple(quantize_tiles(x) for x in xs), scale, wq, w_scales)


def _cached_linear_backward(fn, ops, dtypes, out_dtype, saved, dy):
    x_dtypes, a_dtype, w_dtype = dtypes
    quantized, scale, wq, w_scales = saved
    a32, vjp = dequantized_vjp(fn, quantized, scale)
    da, dw = ops.backward_from_input(a32.astype(a_dtype), wq, w_scales, dy, a_dtype)
    dxs, dscale = input_grads(vjp, da, x_dtypes, scale)
    return dxs, dscale, dw.astype(w_dtype)


_cached_linear.defvjp(_cached_linear_forward, _cached_linear_backward)
