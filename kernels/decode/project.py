"""A decode step's projections of a few rows, each in one launch with the work around it: the input's norm before
the product, the activation and the residual add after it.

y_i = epilogue(prologue(x) @ W_i.T) for x [b, K] and weights W_i [N_i, K], input dimension minor (the serving
layout of `jaxdeep.serve.layout`), all W_i in one launch: a dense layer's query, key and value share their
normed input. Weights and norm parameters may come as the model's stacks over layers ([L, N_i, K], [L, K]) with
the layer to use: the kernel reads its layer in place, where a slice handed to a kernel would be a copy.

At batch 1 XLA runs a layer norm's statistics, the activation and the residual add as kernels of their own, each
1-3 µs on an H200 whatever its size; here they ride along with the product, which streams the weight.

One program per `block_n` outputs of one weight: it takes its rows' norm statistics (the input is a few KB, read
from cache by every program), then walks K in blocks of `block_k`, multiplying the weight's tile by the normed
input, and applies the epilogue to its outputs. Norm statistics and products are float32; the normed input is
rounded to the input's dtype first, as the model's norm hands it to its matmul.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.decode import runtime

NORMS = ("layer", "rms")
ACTIVATIONS = ("gelu",)
MAX_ROWS = 16  # the rows of the tensor-core products ("dot"); "fma" holds a float32 tile per row
ROWS = 16
BLOCK_N = 8
BLOCK_K = 512
NUM_WARPS = 4


class Norm(NamedTuple):
    """The input's norm: "layer" ((x - mean) / std * scale + bias) or "rms" (x / rms * scale), statistics over K
    in float32. `bias` only for "layer" (None: no bias)."""

    kind: str
    scale: jax.Array
    bias: jax.Array | None
    eps: float


def _layer_of(a, layer, ndim: int):
    return a if a.ndim == ndim else a[layer]


def normalise(x_bk, norm: Norm, layer=None):
    """The norm in float32, rounded to the input's dtype."""
    x = x_bk.astype(jnp.float32)
    if norm.kind == "layer":
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    scale = _layer_of(norm.scale, layer, 1).astype(jnp.float32)
    z = x * lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + norm.eps) * scale
    if norm.bias is not None:
        z = z + _layer_of(norm.bias, layer, 1).astype(jnp.float32)
    return z.astype(x_bk.dtype)


def reference(x_bk, weights, norm: Norm | None = None, activation: str | None = None, residual_bn=None, layer=None):
    """The projections in plain JAX: a tuple of [b, N_i] in x's dtype."""
    x = x_bk if norm is None else normalise(x_bk, norm, layer)
    outs = []
    for w in weights:
        y = jnp.einsum("bk,nk->bn", x, _layer_of(w, layer, 2), preferred_element_type=jnp.float32)
        if activation == "gelu":
            y = jax.nn.gelu(y, approximate=False)
        if residual_bn is not None:
            y = y + residual_bn.astype(jnp.float32)
        outs.append(y.astype(x_bk.dtype))
    return tuple(outs)


def check(x_bk, weights, norm: Norm | None, activation: str | None, residual_bn, layer, block_n: int, block_k: int):
    """Why the kernel cannot take these inputs, or None."""
    if x_bk.ndim != 2:
        return f"x must be [rows, K], got shape {x_bk.shape}"
    b, k = x_bk.shape
    if not 0 < b <= MAX_ROWS:
        return f"{b} rows: the kernel takes 1 to {MAX_ROWS}"
    if not weights:
        return "no weights"
    stacked = weights[0].ndim == 3
    if stacked != (layer is not None):
        return "stacked weights [L, N, K] need a layer, and only they take one"
    for w in weights:
        if w.ndim != weights[0].ndim or w.ndim not in (2, 3) or w.shape[-1] != k:
            return f"weight of shape {w.shape} does not take inputs of {k} (all [N, K] or all [L, N, K])"
        if w.shape[-2] % block_n:
            return f"{w.shape[-2]} outputs are not a multiple of block_n {block_n}"
    if block_n & (block_n - 1) or block_k & (block_k - 1) or k % block_k:
        return f"block_n {block_n} and block_k {block_k} must be powers of two, block_k dividing K = {k}"
    if norm is not None:
        if norm.kind not in NORMS:
            return f"norm must be one of {NORMS}, got {norm.kind!r}"
        shape = weights[0].shape[:-2] + (k,)
        if norm.scale.shape != shape or (norm.bias is not None and norm.bias.shape != shape):
            return f"norm parameters must be {list(shape)}"
        if norm.kind == "rms" and norm.bias is not None:
            return "an RMS norm has no bias"
    if activation is not None and activation not in ACTIVATIONS:
        return f"activation must be None or one of {ACTIVATIONS}, got {activation!r}"
    if residual_bn is not None and (len(weights) != 1 or residual_bn.shape != (b, weights[0].shape[-2])):
        return f"a residual [{b}, N] goes with one weight of N outputs, got {residual_bn.shape}"
    return None


# Phi(z) = 1 - 0.5 erfc(|z| / sqrt 2) for z >= 0 (mirrored for z < 0), erfc by Abramowitz & Stegun 7.1.26
# (|error| < 1.5e-7): Triton has no erf of its own here, and bf16 outputs need far less.
_AS = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)
_AS_P = 0.3275911


def _gelu(z):
    a = jnp.abs(z) * (1.0 / math.sqrt(2.0))
    t = 1.0 / (1.0 + _AS_P * a)
    poly = t * (_AS[0] + t * (_AS[1] + t * (_AS[2] + t * (_AS[3] + t * _AS[4]))))
    tail = 0.5 * poly * jnp.exp(-a * a)  # Phi(-|z|)
    return z * jnp.where(z >= 0, 1.0 - tail, tail)


def _kernel(*refs, outputs, rows, k, block_n, block_k, norm, eps, bias, activation, residual, unroll, tile_sums):
    it = iter(refs)
    layer_ref, x_ref = next(it), next(it)
    w_refs = [next(it) for _ in outputs]
    scale_ref = next(it) if norm else None
    bias_ref = next(it) if bias else None
    residual_ref = next(it) if residual else None
    out_refs = list(it)
    layer = layer_ref[0]
    steps = k // block_k

    def x_block(r, i):
        return x_ref[r, pl.ds(i * block_k, block_k)].astype(jnp.float32)

    def total(r, f):  # sum over K of f(x block) for row r
        return sum(jnp.sum(f(x_block(r, i))) for i in range(steps))

    shift, rstd = [0.0] * rows, [1.0] * rows
    if norm:
        for r in range(rows):
            if norm == "layer":
                shift[r] = total(r, lambda x: x) / k
            rstd[r] = lax.rsqrt(total(r, lambda x, s=shift[r]: (x - s) * (x - s)) / k + eps)

    def normed(r, i):
        x = x_block(r, i)
        if not norm:
            return x
        span = pl.ds(i * block_k, block_k)
        z = (x - shift[r]) * rstd[r] * scale_ref[layer, span].astype(jnp.float32)
        if bias:
            z = z + bias_ref[layer, span].astype(jnp.float32)
        return z.astype(x_ref.dtype).astype(jnp.float32)

    pid = pl.program_id(0)
    first = 0
    for w_ref, out_ref, n in zip(w_refs, out_refs, outputs, strict=True):
        blocks = n // block_n

        @pl.when((pid >= first) & (pid < first + blocks))
        def _(w_ref=w_ref, out_ref=out_ref, first=first):
            n0 = pl.multiple_of((pid - first) * block_n, block_n)

            # tile_sums: products summed along K only at the end (one cross-thread reduction per output, a
            # float32 tile per row held throughout); otherwise each step reduces its tile.
            def step(i, acc):
                w = w_ref[layer, pl.ds(n0, block_n), pl.ds(i * block_k, block_k)].astype(jnp.float32)
                products = [w * normed(r, i)[None, :] for r in range(rows)]
                if not tile_sums:
                    products = [jnp.sum(p, axis=1) for p in products]
                return tuple(a + p for a, p in zip(acc, products, strict=True))

            shape = (block_n, block_k) if tile_sums else (block_n,)
            acc = tuple(jnp.zeros(shape, jnp.float32) for _ in range(rows))
            if unroll:
                for i in range(steps):
                    acc = step(i, acc)
            else:
                acc = lax.fori_loop(0, steps, step, acc)
            for r in range(rows):
                y = jnp.sum(acc[r], axis=1) if tile_sums else acc[r]
                if activation == "gelu":
                    y = _gelu(y)
                if residual:
                    y = y + residual_ref[r, pl.ds(n0, block_n)].astype(jnp.float32)
                out_ref[r, pl.ds(n0, block_n)] = y.astype(out_ref.dtype)

        first += blocks


def _dot_kernel(*refs, outputs, rows, k, block_n, block_k, norm, eps, bias, activation, residual):
    # The rows padded to ROWS with zeros, so that each step is a tensor-core product [block_n, block_k] x
    # [block_k, ROWS]: a loop Triton pipelines, its loads issued stages ahead.
    it = iter(refs)
    layer_ref, x_ref = next(it), next(it)
    w_refs = [next(it) for _ in outputs]
    scale_ref = next(it) if norm else None
    bias_ref = next(it) if bias else None
    residual_ref = next(it) if residual else None
    out_refs = list(it)
    layer = layer_ref[0]
    steps = k // block_k
    row_ids = jnp.arange(ROWS)[:, None]

    def padded(ref, start, size):  # ref[:rows, start:start + size] as float32 [ROWS, size], zeros below
        if rows == ROWS:
            return ref[:, pl.ds(start, size)].astype(jnp.float32)
        tile = jnp.zeros((ROWS, size), jnp.float32)
        for r in range(rows):
            tile = jnp.where(row_ids == r, ref[r, pl.ds(start, size)].astype(jnp.float32)[None, :], tile)
        return tile

    def x_tile(i):
        return padded(x_ref, i * block_k, block_k)

    shift = rstd = None
    if norm:
        shift = jnp.zeros((ROWS,), jnp.float32)
        if norm == "layer":
            shift = sum(jnp.sum(x_tile(i), axis=1) for i in range(steps)) / k
        centred = (x_tile(i) - shift[:, None] for i in range(steps))
        rstd = lax.rsqrt(sum(jnp.sum(c * c, axis=1) for c in centred) / k + eps)

    def normed(i):  # [ROWS, block_k] in the input's dtype
        x = x_tile(i)
        if norm:
            span = pl.ds(i * block_k, block_k)
            x = (x - shift[:, None]) * rstd[:, None] * scale_ref[layer, span].astype(jnp.float32)[None, :]
            if bias:
                x = x + bias_ref[layer, span].astype(jnp.float32)[None, :]
        return x.astype(x_ref.dtype)

    pid = pl.program_id(0)
    first = 0
    for w_ref, out_ref, n in zip(w_refs, out_refs, outputs, strict=True):
        blocks = n // block_n

        @pl.when((pid >= first) & (pid < first + blocks))
        def _(w_ref=w_ref, out_ref=out_ref, first=first):
            n0 = pl.multiple_of((pid - first) * block_n, block_n)

            def step(i, acc):
                w = w_ref[layer, pl.ds(n0, block_n), pl.ds(i * block_k, block_k)]
                dims = (((1,), (1,)), ((), ()))
                return acc + lax.dot_general(w, normed(i), dims, preferred_element_type=jnp.float32)

            y = lax.fori_loop(0, steps, step, jnp.zeros((block_n, ROWS), jnp.float32)).T  # [ROWS, block_n]
            if activation == "gelu":
                y = _gelu(y)
            if residual:
                y = y + padded(residual_ref, n0, block_n)
            for r in range(rows):
                row = jnp.where(row_ids == r, y, 0.0)  # the padding rows hold the norm's bias
                out_ref[r, pl.ds(n0, block_n)] = jnp.sum(row, axis=0).astype(out_ref.dtype)

        first += blocks


def project(
    x_bk,
    weights,
    norm: Norm | None = None,
    activation: str | None = None,
    residual_bn=None,
    layer=None,
    *,
    interpret: bool = False,
    poison: bool = False,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    num_warps: int = NUM_WARPS,
    num_stages: int = 1,
    unroll: bool = True,
    tile_sums: bool = True,
    products: str = "fma",
    name: str = "project",
):
    """`reference` as one kernel launch. `unroll` lays the K loop out straight (every tile's load issued ahead);
    otherwise a loop, which Triton pipelines over `num_stages`."""
    weights = tuple(weights)
    if reason := check(x_bk, weights, norm, activation, residual_bn, layer, block_n, block_k):
        raise ValueError(f"project: {reason}")
    if layer is None:  # one layer of its own: a stack of one (a reshape, not a copy)
        weights, layer = tuple(w[None] for w in weights), 0
        if norm is not None:
            norm = norm._replace(scale=norm.scale[None], bias=None if norm.bias is None else norm.bias[None])
    b, k = x_bk.shape
    outputs = tuple(w.shape[1] for w in weights)
    extra = ()
    if norm is not None:
        extra = (norm.scale,) + (() if norm.bias is None else (norm.bias,))
    if residual_bn is not None:
        extra = (*extra, residual_bn)
    options = dict(
        outputs=outputs, rows=b, k=k, block_n=block_n, block_k=block_k,
        norm=norm.kind if norm is not None else None, eps=norm.eps if norm is not None else 0.0,
        bias=norm is not None and norm.bias is not None, activation=activation,
        residual=residual_bn is not None,
    )  # fmt: skip
    if products == "dot":
        kernel = functools.partial(_dot_kernel, **options)
    else:
        kernel = functools.partial(_kernel, **options, unroll=unroll, tile_sums=tile_sums)
    layer = jnp.reshape(layer, (1,)).astype(jnp.int32)
    return runtime.call(
        kernel,
        grid=(sum(n // block_n for n in outputs),),
        inputs=(layer, x_bk, *weights, *extra),
        out_shapes=tuple(jax.ShapeDtypeStruct((b, n), x_bk.dtype) for n in outputs),
        num_warps=num_warps,
        num_stages=num_stages,
        interpret=interpret,
        poison=poison,
        name=name,
    )
