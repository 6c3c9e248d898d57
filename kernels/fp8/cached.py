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
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels.fp8.quantize import dequantize_tiles, quantize_tiles

__all__ = ["fp8_cached", "times_rows"]


def times_rows(y: jax.Array, row_scale: jax.Array | None) -> jax.Array:
    """y * row_scale[..., None], multiplied in float32 and rounded to y's dtype; y itself when row_scale is None."""
    if row_scale is None:
        return y
    return (y.astype(jnp.float32) * row_scale[..., None].astype(jnp.float32)).astype(y.dtype)


def fp8_cached(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`fn` (elementwise over floating inputs of rank >= 1) with its inputs kept in FP8 for the backward, and its
    output optionally scaled per row by `row_scale` (kept as it is)."""

    @functools.wraps(fn)
    def call(*xs: jax.Array, row_scale: jax.Array | None = None) -> jax.Array:
        for i, x in enumerate(xs):
            if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
                raise ValueError(f"fp8_cached: input {i} must be a floating array of rank >= 1, got {x.dtype}{x.shape}")
        if row_scale is not None and (
            not jnp.issubdtype(row_scale.dtype, jnp.floating) or row_scale.shape != xs[0].shape[:-1]
        ):
            raise ValueError(
                f"fp8_cached: row_scale must be floating with the inputs' leading shape {xs[0].shape[:-1]}, "
                f"got {row_scale.dtype}{row_scale.shape}"
            )
        dtypes = tuple(x.dtype for x in xs)
        apply = lambda xs, scale: times_rows(fn(*xs), scale)  # noqa: E731

        @jax.custom_vjp
        def cached(xs, scale):
            return apply(xs, scale)

        def forward(xs, scale):
            return apply(xs, scale), (tuple(quantize_tiles(x) for x in xs), scale)

        def backward(saved, dy):
            quantized, scale = saved
            xs32 = tuple(dequantize_tiles(q, scales) for q, scales in quantized)
            scale32 = None if scale is None else scale.astype(jnp.float32)
            _, vjp = jax.vjp(lambda a, s: apply(a, s).astype(jnp.float32), xs32, scale32)
            dxs, dscale = vjp(dy.astype(jnp.float32))
            dxs = tuple(g.astype(dt) for g, dt in zip(dxs, dtypes, strict=True))
            return dxs, None if scale is None else dscale.astype(scale.dtype)

        cached.defvjp(forward, backward)
        return cached(tuple(xs), row_scale)

    return call
