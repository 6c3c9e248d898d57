"""Elementwise functions whose backward keeps only their inputs, in FP8: DeepSeek-V3's cache of the SwiGLU input.

`fp8_cached(fn)(*xs)` returns `fn(*xs)` unchanged. For the backward it keeps each input quantised in 1 x 128
tiles along its last axis (`quantize_tiles`: one byte per value plus a float32 scale per 128 values) instead of
what autodiff of `fn` would keep (its intermediates, in the compute dtype or float32), and recomputes `fn`'s
vector-Jacobian product in float32 at the dequantised inputs. The gradient thus sees each input with E4M3's
rounding (at most 2^-4 relative per value, plus the subnormal floor; README.md, "Error bounds"), as the FP8
GEMMs' operands do; the forward is exact. DeepSeek-V3 caches the SwiGLU operator's input this way ("Low-Precision
Storage and Communication") and recomputes its output in the backward.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from kernels.fp8.quantize import dequantize_tiles, quantize_tiles

__all__ = ["fp8_cached"]


def fp8_cached(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`fn` (elementwise over floating inputs of rank >= 1) with its inputs kept in FP8 for the backward."""

    @functools.wraps(fn)
    def call(*xs: jax.Array) -> jax.Array:
        for i, x in enumerate(xs):
            if not jnp.issubdtype(x.dtype, jnp.floating) or x.ndim < 1:
                raise ValueError(f"fp8_cached: input {i} must be a floating array of rank >= 1, got {x.dtype}{x.shape}")
        dtypes = tuple(x.dtype for x in xs)

        @jax.custom_vjp
        def cached(*xs):
            return fn(*xs)

        def forward(*xs):
            return fn(*xs), tuple(quantize_tiles(x) for x in xs)

        def backward(saved, dy):
            xs32 = tuple(dequantize_tiles(q, scales) for q, scales in saved)
            _, vjp = jax.vjp(lambda *a: fn(*a).astype(jnp.float32), *xs32)
            return tuple(g.astype(dt) for g, dt in zip(vjp(dy.astype(jnp.float32)), dtypes, strict=True))

        cached.defvjp(forward, backward)
        return cached(*xs)

    return call
