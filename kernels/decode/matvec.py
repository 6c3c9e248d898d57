"""A few rows times a projection's weight, in one launch with the small work before and after it.

At batch 1 a decode layer of the dense model ran ~13 kernels on XLA: the five weight products and, between them,
a LayerNorm's statistics and its scaling, the merge of the attention kernel's chunks, GELU and the residual adds,
each a kernel of 1.5-2.5 µs that reads a few kilobytes. `row_matvec` folds that work into the products:

- prologue `norm`: a LayerNorm of each row (two-pass statistics, computed by every program from the whole row,
  which costs a few kilobytes of reads against the program's share of the weight);
- prologue `merge`: the input is the attention kernel's unmerged chunks (`attention.write_attend(...,
  merged=False)`), merged one head at a time as the loop over the contraction reaches it;
- epilogue `gelu` (exact, erf) or `residual` (added in the compute dtype, as `x + project(...)` does).

Weights come as the layer stack [layers, N, K] (the output dimension major: the serving layout of
`jaxdeep/serve/layout.py`, where the logical transpose costs nothing) and the layer index, so XLA never copies a
layer's slice out for the call. Several weights on the same input (q, k and v) run in one launch. Products are
float32 over the compute dtype's values: inputs, weights, and each prologue's output are rounded to it first, as
the XLA path rounds them.

One program per slab of outputs (`block_rows`: 64 KiB of weight), for every row (rows loop inside, so the weight
is read once for all of them). A program loads its slab in one go: a loop over the contraction waits on each
piece in turn (the Triton backend does not pipeline these loads), which left the kernels at 0.4-2.7 TB/s on an H200.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.decode import runtime
from kernels.decode.attention import merge_chunks

SLAB_BYTES = 65536  # weight bytes per program, loaded at once
MAX_ROWS = 8  # rows are unrolled inside the kernel; more are better served by a matrix product

_SQRT_HALF = 0.7071067811865476


def erf(x: jax.Array) -> jax.Array:
    """erf from exp alone (the Triton backend has no erf): Numerical Recipes' Chebyshev fit of erfc, fractional
    error below 1.2e-7 everywhere."""
    z = jnp.abs(x)
    t = 1.0 / (1.0 + 0.5 * z)
    coefficients = (
        -1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
        0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277,
    )  # fmt: skip
    poly = jnp.float32(coefficients[-1])
    for c in coefficients[-2::-1]:
        poly = poly * t + c
    erfc = t * jnp.exp(-z * z + poly)
    return jnp.where(x >= 0, 1.0 - erfc, erfc - 1.0)


def gelu(x: jax.Array) -> jax.Array:
    """Exact GELU, x·Φ(x), in float32."""
    return 0.5 * x * (1.0 + erf(x * _SQRT_HALF))


def _round(x, dtype):
    return x.astype(dtype).astype(jnp.float32)


def layer_norm_rows(x_bk, scale_k, bias_k, eps: float) -> jax.Array:
    """LayerNorm of each row in float32 (two-pass variance), as the model's `LayerNorm`."""
    x = x_bk.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + eps) * scale_k.astype(jnp.float32) + bias_k.astype(jnp.float32)


def row_matvec_reference(
    x, weights, layer, *, norm=None, merge=None, residual=None, activation=None, dtype=jnp.bfloat16
) -> tuple[jax.Array, ...]:
    """Pure-JAX `row_matvec`: for each weight [layers, N, K], rows [b, N] in `dtype`. `x` [b, K], or None with
    `merge` = (o [c, b, n, h], m [c, b, n], l [c, b, n]); `norm` = (scale [layers, K], bias [layers, K], eps);
    `residual` [b, N]; `activation` None or "gelu"."""
    if merge is not None:
        o, m, total = merge
        inputs = merge_chunks(o, m, total).reshape(o.shape[1], -1)
    else:
        inputs = x.astype(jnp.float32)
    if norm is not None:
        scale, bias, eps = norm
        inputs = layer_norm_rows(inputs, scale[layer], bias[layer], eps)
    inputs = _round(inputs, dtype)
    outs = []
    for w in weights:
        y = _round(inputs @ _round(w[layer], dtype).T, dtype)
        if activation == "gelu":
            y = _round(gelu(y), dtype)
        if residual is not None:
            y = residual.astype(jnp.float32) + y
        outs.append(y.astype(dtype))
    return tuple(outs)


def block_rows(k: int, n_min: int) -> int:
    """Outputs per program for a contraction of k: as many as make SLAB_BYTES of bf16 weight (at least 1, at most
    the smallest weight's N)."""
    return max(1, min(n_min, SLAB_BYTES // (2 * k)))


def check(x_shape, weight_shapes, *, merge_shape=None) -> str | None:
    """Why the kernel cannot take these shapes (x [b, K], weights [layers, N, K]; `merge_shape` the chunks'
    [c, b, n, h] when x is None), or None."""
    if merge_shape is not None:
        c, b, n, h = merge_shape
        k = n * h
        if c & (c - 1) or h & (h - 1) or n & (n - 1):
            return f"attention chunks {c}, heads {n} and head_dim {h} must be powers of two"
    else:
        b, k = x_shape
        if k & (k - 1):
            return f"contraction {k} is not a power of two"
    if not 0 < b <= MAX_ROWS:
        return f"{b} rows: the kernel takes 1 to {MAX_ROWS}"
    for shape in weight_shapes:
        if len(shape) != 3 or shape[2] != k:
            return f"weight {shape} is not [layers, N, {k}]"
    bn = block_rows(k, min(shape[1] for shape in weight_shapes))
    if bn & (bn - 1) or any(shape[1] % bn for shape in weight_shapes):
        return f"outputs {[shape[1] for shape in weight_shapes]} are not multiples of {bn}, a power of two"
    return None


def _row_matvec_kernel(*refs, n_rows, n_weights, starts, block_n, has_norm, has_merge, has_residual, activation, eps,
                       dtype):  # fmt: skip
    refs = list(refs)
    layer_ref = refs.pop(0)
    if has_merge:
        o_ref, m_ref, l_ref = refs.pop(0), refs.pop(0), refs.pop(0)
    else:
        x_ref = refs.pop(0)
    if has_norm:
        scale_ref, bias_ref = refs.pop(0), refs.pop(0)
    res_ref = refs.pop(0) if has_residual else None
    w_refs, y_refs = refs[:n_weights], refs[n_weights:]
    layer = layer_ref[0]
    j = pl.program_id(0)

    def inputs(r):
        """Row r's whole input, prologue applied, rounded to the compute dtype, in float32 ([n, h] when merging)."""
        if has_merge:
            m, total = m_ref[:, r, :], l_ref[:, r, :]  # [c, n]
            w = jnp.exp(m - jnp.max(m, axis=0)[None, :])
            x = jnp.sum(w[:, :, None] * o_ref[:, r, :, :], axis=0) / jnp.sum(w * total, axis=0)[:, None]
        else:
            x = x_ref[r, :].astype(jnp.float32)
        if has_norm:
            mean = jnp.mean(x)
            centred = x - mean
            x = centred * lax.rsqrt(jnp.mean(centred * centred) + eps)
            x = x * scale_ref[layer, :].astype(jnp.float32) + bias_ref[layer, :].astype(jnp.float32)
        return _round(x, dtype)

    def product(w_ref, y_ref, first):
        rows = pl.ds(first, block_n)
        w = _round(w_ref[layer, rows], dtype)  # the program's whole slab in one load: many bytes in flight
        for r in range(n_rows):
            x = inputs(r)
            if has_merge:
                y = jnp.sum(jnp.sum(w * x[None], axis=2), axis=1)
            else:
                y = jnp.sum(w * x[None, :], axis=1)
            y = _round(y, dtype)
            if activation == "gelu":
                y = _round(gelu(y), dtype)
            if has_residual:
                y = res_ref[r, rows].astype(jnp.float32) + y
            y_ref[r, rows] = y.astype(y_ref.dtype)

    for i in range(n_weights):
        lo, hi = starts[i], starts[i + 1]

        @pl.when((j >= lo) & (j < hi))
        def _(i=i, lo=lo):
            product(w_refs[i], y_refs[i], (j - lo) * block_n)


def row_matvec(
    x,
    weights,
    layer,
    *,
    norm=None,
    merge=None,
    residual=None,
    activation=None,
    dtype=jnp.bfloat16,
    interpret: bool = False,
    poison: bool = False,
    num_warps: int = 8,
) -> tuple[jax.Array, ...]:
    """`row_matvec_reference` in one launch (arguments as there; `layer` a Python int or an int32 scalar)."""
    if activation not in (None, "gelu"):
        raise ValueError(f"row_matvec: activation must be None or 'gelu', got {activation!r}")
    if residual is not None and len(weights) != 1:
        raise ValueError("row_matvec: a residual needs a single weight")
    merge_shape = merge[0].shape if merge is not None else None
    reason = check(None if x is None else x.shape, [w.shape for w in weights], merge_shape=merge_shape)
    if reason:
        raise ValueError(f"row_matvec: {reason}")
    if merge is not None:
        _, b, n, h = merge_shape
        k = n * h
        sources = tuple(a.astype(jnp.float32) for a in merge)
        weights = [w.reshape(*w.shape[:2], n, h) for w in weights]  # heads and head_dim apart, as the chunks
    else:
        (b, k), sources = x.shape, (x,)
    if residual is not None and residual.shape != (b, weights[0].shape[1]):
        raise ValueError(f"row_matvec: residual {residual.shape} is not [{b}, {weights[0].shape[1]}]")
    block_n = block_rows(k, min(w.shape[1] for w in weights))
    starts = tuple(itertools.accumulate((w.shape[1] // block_n for w in weights), initial=0))
    kernel = functools.partial(
        _row_matvec_kernel,
        n_rows=b,
        n_weights=len(weights),
        starts=starts,
        block_n=block_n,
        has_norm=norm is not None,
        has_merge=merge is not None,
        has_residual=residual is not None,
        activation=activation,
        eps=float(norm[2]) if norm is not None else 0.0,
        dtype=dtype,
    )
    inputs = (
        jnp.reshape(jnp.asarray(layer, jnp.int32), (1,)),
        *sources,
        *(norm[:2] if norm is not None else ()),
        *((residual,) if residual is not None else ()),
        *weights,
    )
    return runtime.call(
        kernel,
        grid=(starts[-1],),
        inputs=inputs,
        out_shapes=tuple(jax.ShapeDtypeStruct((b, w.shape[1]), dtype) for w in weights),
        num_warps=num_warps,
        interpret=interpret,
        poison=poison,
    )
