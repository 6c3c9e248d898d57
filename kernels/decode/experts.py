"""One token's chosen experts (MoE decode at batch 1): SwiGLU of each chosen expert and their weighted sum, in
two launches instead of three or more per expert.

Weights come in the serving layout, contracted dimension minor: gate/up [E, 2, F, D] (`gate_up[e, 0]` the gate
rows) and down [E, D, F]. `gate_up` computes h[j] = silu(gate[e_j] · x) * (up[e_j] · x) for each chosen expert
e_j; `down` computes y = sum_j w_j · (down[e_j] · h[j]). Each program streams a few weight rows with the
contracted dimension in power-of-two pieces, so rows of any length work.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.decode import runtime

ROWS = 2  # output rows per program
COLUMNS = 1024  # contracted elements per load


def reference(x_d, experts_k, weights_k, gate_up_e2fd, down_edf) -> jax.Array:
    """y [d] (float32) = sum_j weights[j] · down[e_j] · (silu(gate[e_j] · x) * up[e_j] · x), in float32."""
    x = x_d.astype(jnp.float32)
    h_k2f = jnp.einsum("kcfd,d->kcf", gate_up_e2fd[experts_k].astype(jnp.float32), x)
    h_kf = jax.nn.silu(h_k2f[:, 0]) * h_k2f[:, 1]
    y_kd = jnp.einsum("kdf,kf->kd", down_edf[experts_k].astype(jnp.float32), h_kf)
    return jnp.einsum("kd,k->d", y_kd, weights_k.astype(jnp.float32))


def _pieces(length: int, widest: int) -> list[tuple[int, int]]:
    """(start, width) pieces of power-of-two widths, none wider than `widest`, that tile [0, length) exactly:
    Triton's tensors have power-of-two shapes, and exact pieces need no masks."""
    pieces, start = [], 0
    while start < length:
        width = min(widest, 1 << ((length - start).bit_length() - 1))
        pieces.append((start, width))
        start += width
    return pieces


def _row_sums(w_ref, w_at: tuple, x_ref, x_at: tuple, row0, n_rows):
    """sum over the minor axis of w_ref[*w_at, row0 : row0 + ROWS, :] * x_ref[*x_at, :] (rows past n_rows read as
    zeros), float32. Refs are indexed once each (the Triton lowering takes one indexer per load)."""
    rows_valid = (row0 + jnp.arange(ROWS) < n_rows)[:, None]
    total = jnp.zeros((ROWS,), jnp.float32)
    for start, width in _pieces(x_ref.shape[-1], COLUMNS):  # static: every load can be in flight at once
        mask = jnp.broadcast_to(rows_valid, (ROWS, width))
        w = runtime.load(w_ref.at[(*w_at, pl.ds(row0, ROWS), pl.ds(start, width))], mask).astype(jnp.float32)
        x = x_ref[(*x_at, pl.ds(start, width))].astype(jnp.float32)
        total += jnp.sum(w * x[None, :], axis=1)
    return total


def _gate_up_kernel(experts_ref, x_ref, w_ref, h_ref):
    j, block = pl.program_id(0), pl.program_id(1)
    e, f = experts_ref[j], w_ref.shape[2]
    row0 = block * ROWS
    gate = _row_sums(w_ref, (e, jnp.int32(0)), x_ref, (), row0, f)  # array indices: the interpreter wants them
    up = _row_sums(w_ref, (e, jnp.int32(1)), x_ref, (), row0, f)
    h = gate * jax.nn.sigmoid(gate) * up
    runtime.store(h_ref.at[j, pl.ds(row0, ROWS)], h, row0 + jnp.arange(ROWS) < f)


def _down_kernel(experts_ref, weights_ref, h_ref, w_ref, y_ref, *, k):
    block = pl.program_id(0)
    d = w_ref.shape[1]
    row0 = block * ROWS
    y = jnp.zeros((ROWS,), jnp.float32)
    for j in range(k):
        y += weights_ref[j] * _row_sums(w_ref, (experts_ref[j],), h_ref, (j,), row0, d)
    runtime.store(y_ref.at[pl.ds(row0, ROWS)], y, row0 + jnp.arange(ROWS) < d)


def pallas(x_d, experts_k, weights_k, gate_up_e2fd, down_edf, interpret: bool = False, poison: bool = False):
    """`reference` as two kernels (Pallas, Triton backend; `interpret` runs them on the host)."""
    (k,), (_, _, f, d) = experts_k.shape, gate_up_e2fd.shape
    experts = experts_k.astype(jnp.int32)
    common = dict(num_warps=4, interpret=interpret, poison=poison)
    (h_kf,) = runtime.call(
        _gate_up_kernel,
        grid=(k, pl.cdiv(f, ROWS)),
        inputs=(experts, x_d, gate_up_e2fd),
        out_shapes=(jax.ShapeDtypeStruct((k, f), jnp.float32),),
        **common,
    )
    (y_d,) = runtime.call(
        functools.partial(_down_kernel, k=k),
        grid=(pl.cdiv(d, ROWS),),
        inputs=(experts, weights_k.astype(jnp.float32), h_kf, down_edf),
        out_shapes=(jax.ShapeDtypeStruct((d,), jnp.float32),),
        **common,
    )
    return y_d
