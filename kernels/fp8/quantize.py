"""Fine-grained FP8 (E4M3) quantisation: 1 x 128 tiles for activations, 128 x 128 blocks for weights.

Each tile (or block) gets one float32 scale, `scale = amax / 448`, where amax is the tile's largest |value| and
448 the largest finite float8_e4m3fn: the tile's largest element lands on ±448 and the others keep E4M3's 3
mantissa bits relative to their own magnitude. The stored values are `x * (1 / scale)` rounded to the nearest
float8_e4m3fn (ties to even: what `astype(jnp.float8_e4m3fn)` does), after clipping to ±448: float32 rounding
can give 448.00003 for the amax element, and E4M3 has no infinity, so anything at or past 464 (halfway to the
next step) would otherwise become NaN. Dequantising is `q * scale` in float32.

Both divisions are written as multiplications by a float32 reciprocal (`amax * float32(1/448)`, then
`x * float32(1/scale)`): XLA rewrites a division by a constant or by a broadcast value into exactly that, so
spelling it out makes the FP8 bits the same under jit, in eager mode, on every backend and in a numpy oracle
(a float32 value one ulp below an E4M3 rounding tie would otherwise round differently in different programs).

Scale guards: a tile of zeros has amax 0 and gets scale 1 (its values stay 0); a tile whose amax / 448 would
fall below the smallest normal float32 (amax < 5.3e-36) gets that smallest normal instead, so no scale is ever
zero or subnormal (which the hardware may flush to zero). NaN inputs stay NaN; an infinite input gives its
tile an infinite scale (the FP8 values: NaN there, 0 elsewhere), so the whole tile dequantises to NaN and any
GEMM output it touches is NaN: a non-finite activation never disappears silently.

Per-element error (derived in kernels/fp8/README.md): with s the tile's scale,
    |dequantize(quantize(x)) - x| <= 2**-4 * |x| + 2**-10 * s   (+ float32 rounding, below 2**-22 * |x|).

Shapes that are not multiples of the tile are padded with zeros internally (zeros change no amax); the last
tile along an axis simply covers fewer elements.

The functions are jitted (tile sizes static), so eager calls compile once per shape; inside a jitted program
they are inlined.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "E4M3",
    "E4M3_MAX",
    "dequantize_blocks",
    "dequantize_tiles",
    "quantize_blocks",
    "quantize_tiles",
]

E4M3 = jnp.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
F32 = jnp.float32
_TINY_F32 = float(jnp.finfo(F32).tiny)  # smallest normal float32
_INV_E4M3_MAX = float(np.float32(1.0 / E4M3_MAX))


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _scale_from_amax(amax: jax.Array) -> jax.Array:
    scale = jnp.maximum(amax * _INV_E4M3_MAX, _TINY_F32)
    return jnp.where(amax > 0, scale, jnp.ones_like(scale))


def _to_e4m3(x_over_scale: jax.Array) -> jax.Array:
    """Clip to ±448, then round to nearest even in E4M3.

    The barrier keeps the rounding: XLA's GPU compiler folds a chain of float conversions (f32 -> E4M3 -> f32,
    as quantise-then-dequantise writes it) into the outer types, which would drop the E4M3 rounding entirely.
    """
    return jax.lax.optimization_barrier(jnp.clip(x_over_scale, -E4M3_MAX, E4M3_MAX).astype(E4M3))


def _check_size(name: str, size: int) -> None:
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"{name} must be a positive integer, got {size!r}")


@partial(jax.jit, static_argnames="tile")
def quantize_tiles(x: jax.Array, tile: int = 128) -> tuple[jax.Array, jax.Array]:
    """x [..., K] -> (q float8_e4m3fn [..., K], scales float32 [..., ceil(K / tile)]), one scale per row per tile.

    The tiles run along the last axis, which must be the reduction axis of the GEMM that consumes `q`.
    """
    _check_size("tile", tile)
    if x.ndim < 1:
        raise ValueError(f"quantize_tiles needs at least one axis, got shape {x.shape}")
    k = x.shape[-1]
    n_tiles = math.ceil(k / tile)
    x32 = _pad_to(x.astype(F32), -1, tile)
    x_tiles = x32.reshape(*x.shape[:-1], n_tiles, tile)
    scales = _scale_from_amax(jnp.max(jnp.abs(x_tiles), axis=-1))
    q = _to_e4m3(x_tiles * (1.0 / scales)[..., None]).reshape(*x.shape[:-1], n_tiles * tile)
    return q[..., :k], scales


@partial(jax.jit, static_argnames="tile")
def dequantize_tiles(q: jax.Array, scales: jax.Array, tile: int = 128) -> jax.Array:
    """The float32 values that `quantize_tiles` stands for: q * scale of each element's tile."""
    _check_size("tile", tile)
    k = q.shape[-1]
    expected = (*q.shape[:-1], math.ceil(k / tile))
    if scales.shape != expected:
        raise ValueError(f"scales shape {scales.shape} does not match q {q.shape} with tile {tile}: need {expected}")
    per_element = jnp.repeat(scales.astype(F32), tile, axis=-1)[..., :k]
    return q.astype(F32) * per_element


@partial(jax.jit, static_argnames="block")
def quantize_blocks(w: jax.Array, block: int = 128) -> tuple[jax.Array, jax.Array]:
    """w [K, N] -> (q float8_e4m3fn [K, N], scales float32 [ceil(K / block), ceil(N / block)]).

    Square blocks make the quantisation symmetric: quantize_blocks(w.T) is exactly (q.T, scales.T).
    """
    _check_size("block", block)
    if w.ndim != 2:
        raise ValueError(f"quantize_blocks expects a matrix [K, N], got shape {w.shape}")
    k, n = w.shape
    kb, nb = math.ceil(k / block), math.ceil(n / block)
    w32 = _pad_to(_pad_to(w.astype(F32), 0, block), 1, block)
    w_blocks = w32.reshape(kb, block, nb, block)
    scales = _scale_from_amax(jnp.max(jnp.abs(w_blocks), axis=(1, 3)))
    q = _to_e4m3(w_blocks * (1.0 / scales)[:, None, :, None]).reshape(kb * block, nb * block)
    return q[:k, :n], scales


@partial(jax.jit, static_argnames="block")
def dequantize_blocks(q: jax.Array, scales: jax.Array, block: int = 128) -> jax.Array:
    """The float32 values that `quantize_blocks` stands for: q * scale of each element's block."""
    _check_size("block", block)
    if q.ndim != 2:
        raise ValueError(f"dequantize_blocks expects a matrix [K, N], got shape {q.shape}")
    k, n = q.shape
    expected = (math.ceil(k / block), math.ceil(n / block))
    if scales.shape != expected:
        raise ValueError(f"scales shape {scales.shape} does not match q {q.shape} with block {block}: need {expected}")
    per_element = jnp.repeat(jnp.repeat(scales.astype(F32), block, axis=0), block, axis=1)[:k, :n]
    return q.astype(F32) * per_element
