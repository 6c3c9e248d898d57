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

One program per `block_n` outputs of every row (rows loop inside, so the weight is read once for all of them),
looping over the contraction in `block_k` pieces.
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

BLOCK_N = 16  # outputs per program
BLOCK_K = 512  # contraction elements per loop step
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


def check(x_shape, weight_shapes, *, merge_shape=None, block_n: int = BLOCK_N, block_k: int = BLOCK_K) -> str | None:
    """Why the kernel cannot take these shapes (x [b, K], weights [layers, N, K]; `merge_shape` the chunks'
    [c, b, n, h] when x is None), or None."""
    if merge_shape is not None:
        c, b, n, h = merge_shape
        k, step = n * h, h
        if c & (c - 1) or h & (h - 1):
            return f"attention chunks {c} and head_dim {h} must be powers of two"
    else:
        b, k = x_shape
        step = min(block_k, k)
        if k & (k - 1):
            return f"contraction {k} is not a power of two"
    if not 0 < b <= MAX_ROWS:
        return f"{b} rows: the kernel takes 1 to {MAX_ROWS}"
    for shape in weight_shapes:
        if len(shape) != 3 or shape[2] != k:
            return f"weight {shape} is not [layers, N, {k}]"
    bn = min(block_n, *(shape[1] for shape in weight_shapes))
    if bn & (bn - 1) or any(shape[1] % bn for shape in weight_shapes):
        return f"outputs {[shape[1] for shape in weight_shapes]} are not multiples of {bn}, a power of two"
    if k % step:
        return f"contraction {k} is not a multiple of {step}"
    return None


def _row_matvec_kernel(*refs, n_rows, n_weights, starts, block_n, block_k, steps, has_norm, has_merge, has_residual,
                       activation, eps, dtype):  # fmt: skip
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

    if has_norm:  # each row's statistics, from the whole row
        stats = []
        for r in range(n_rows):
            row = x_ref[r, :].astype(jnp.float32)
            mean = jnp.mean(row)
            stats.append((mean, lax.rsqrt(jnp.mean(jnp.square(row - mean)) + eps)))

    def inputs(step, r):
        """Row r's inputs at contraction piece `step`, prologue applied, in float32."""
        if has_merge:  # piece `step` is head `step`
            m, total = m_ref[:, r, step], l_ref[:, r, step]
            w = jnp.exp(m - jnp.max(m))
            x = jnp.sum(w[:, None] * o_ref[:, r, step, :], axis=0) / jnp.sum(w * total)
        else:
            x = x_ref[r, pl.ds(step * block_k, block_k)].astype(jnp.float32)
        if has_norm:
            at = pl.ds(step * block_k, block_k)
            mean, rstd = stats[r]
            x = (x - mean) * rstd * scale_ref[layer, at].astype(jnp.float32) + bias_ref[layer, at].astype(jnp.float32)
        return _round(x, dtype)

    def product(w_ref, y_ref, first):
        rows = pl.ds(first, block_n)

        def body(step, accs):
            w = _round(w_ref[layer, rows, pl.ds(step * block_k, block_k)], dtype)  # [block_n, block_k]
            return tuple(acc + jnp.sum(w * inputs(step, r)[None, :], axis=1) for r, acc in enumerate(accs))

        accs = lax.fori_loop(0, steps, body, tuple(jnp.zeros((block_n,), jnp.float32) for _ in range(n_rows)))
        for r, acc in enumerate(accs):
            y = _round(acc, dtype)
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
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    num_warps: int = 4,
    num_stages: int = 3,
) -> tuple[jax.Array, ...]:
    """`row_matvec_reference` in one launch (arguments as there; `layer` a Python int or an int32 scalar)."""
    if activation not in (None, "gelu"):
        raise ValueError(f"row_matvec: activation must be None or 'gelu', got {activation!r}")
    if residual is not None and len(weights) != 1:
        raise ValueError("row_matvec: a residual needs a single weight")
    merge_shape = merge[0].shape if merge is not None else None
    reason = check(None if x is None else x.shape, [w.shape for w in weights], merge_shape=merge_shape,
                   block_n=block_n, block_k=block_k)  # fmt: skip
    if reason:
        raise ValueError(f"row_matvec: {reason}")
    if merge is not None:
        _, b, n, h = merge_shape
        k, block_k, steps = n * h, h, n
        sources = tuple(a.astype(jnp.float32) for a in merge)
    else:
        b, k = x.shape
        block_k = min(block_k, k)
        steps, sources = k // block_k, (x,)
    if residual is not None and residual.shape != (b, weights[0].shape[1]):
        raise ValueError(f"row_matvec: residual {residual.shape} is not [{b}, {weights[0].shape[1]}]")
    block_n = min(block_n, *(w.shape[1] for w in weights))
    counts = [w.shape[1] // block_n for w in weights]
    starts = tuple(itertools.accumulate(counts, initial=0))
    kernel = functools.partial(
        _row_matvec_kernel,
        n_rows=b,
        n_weights=len(weights),
        starts=starts,
        block_n=block_n,
        block_k=block_k,
        steps=steps,
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
        num_stages=num_stages,
        interpret=interpret,
        poison=poison,
    )
