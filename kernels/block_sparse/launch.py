"""Launching the block-sparse kernels: launch configurations and the three ops (product, dA, dValues).

Runners (`kernels.triton_runtime`): "triton" (jax-triton, GPU, traceable under jit) and "interpret" (Triton's
interpreter on the host, CPU tests; outputs start NaN-filled so unwritten elements show). Only the operands and
the layout's int32 index arrays are passed as arrays; every shape, stride and block size is a compile-time
constant.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels import triton_runtime
from kernels.block_sparse.layout import BlockLayout


@dataclasses.dataclass(frozen=True)
class Config:
    """How one kernel is launched.

    Product / dA (`bsmm`): block_m rows per output tile (the tile is block_m x block size), block_k the
    reduction step inside a block (divides the block size), group_m row tiles per band (L2 reuse).
    dValues (`bsmm_dvalues`): the tile is one whole block; block_m is the step of the reduction over M.
    """

    block_m: int = 128
    block_k: int = 64
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 4


# 16-bit operands: the best of `bench_block_sparse.py --tune` at 8192^3, block size 128, densities 0.1 and 0.5 on an
# H200 (experiments/benchmarks/RESULTS.md): 256-row product tiles (4 stages of 256 x 64 + 64 x 128: 192 KiB of shared
# memory), 64-row reduction steps for dValues. Block size 64 keeps 128-row tiles (not tuned). float32 operands take
# half the step so the stages still fit.
DEFAULT_CONFIGS = {
    "fwd": {2: Config(block_m=256), 4: Config(block_k=32, num_stages=3)},
    "dvalues": {2: Config(block_m=64, num_warps=4, num_stages=3), 4: Config(block_m=32, num_stages=3)},
}


def _pow2_at_least_16(n: int) -> int:
    return max(16, 1 << max(0, (n - 1).bit_length()))


def default_config(kind: str, m: int, block_size: int, itemsize: int) -> Config:
    cfg = DEFAULT_CONFIGS[kind][4 if itemsize >= 4 else 2]
    block_m = cfg.block_m if block_size >= 128 or kind != "fwd" else min(cfg.block_m, 128)
    block_m = min(block_m, _pow2_at_least_16(m))  # no wider than the rows there are
    return dataclasses.replace(cfg, block_m=block_m, block_k=min(cfg.block_k, block_size))


def _check(cfg: Config, block_size: int, kind: str) -> None:
    if kind == "fwd" and (block_size % cfg.block_k or cfg.block_k < 16):
        raise ValueError(f"block_k {cfg.block_k} must be >= 16 and divide the block size {block_size}")
    if cfg.block_m < 16 or cfg.block_m & (cfg.block_m - 1):
        raise ValueError(f"block_m must be a power of two >= 16, got {cfg.block_m}")


def _run(runner, name, inputs, out_shape, grid, cfg: Config, meta, poison):
    return triton_runtime.run(
        "kernels.block_sparse", runner, name, inputs, [out_shape], grid, cfg.num_warps, cfg.num_stages, meta, poison
    )[0]


def _bsmm(a, values, offsets, idx, pos, n_blocks, v_strides, out_dtype, runner, poison, config):
    """a [M, Kd] x (block-sparse [Kd, n_blocks * bs]: entry e of the list lies in block row idx[e], its values at
    values[pos[e]] (values[e] when pos is None) read through `v_strides`) -> [M, n_blocks * bs]."""
    m, kd = a.shape
    bs = values.shape[1]
    if idx.shape[0] == 0:  # no block present (zero-size index arrays cannot be launched)
        return jnp.zeros((m, n_blocks * bs), out_dtype)
    cfg = config or default_config("fwd", m, bs, a.dtype.itemsize)
    _check(cfg, bs, "fwd")
    meta = dict(
        M=m, NB=n_blocks, BS=bs, STRIDE_AM=kd, STRIDE_AK=1,
        STRIDE_VP=bs * bs, STRIDE_VK=v_strides[0], STRIDE_VN=v_strides[1],
        BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        DIRECT=pos is None, IEEE=bool(a.dtype == jnp.float32),
    )  # fmt: skip
    grid = (-(-m // cfg.block_m) * n_blocks,)
    out = jax.ShapeDtypeStruct((m, n_blocks * bs), out_dtype)
    inputs = [a, values, offsets, idx, idx if pos is None else pos]  # POS is not read when DIRECT
    return _run(runner, "bsmm", inputs, out, grid, cfg, meta, poison)


def bsmm(a, layout: BlockLayout, values, *, out_dtype=None, runner="triton", poison=False, config=None):
    """out [M, N] = a [M, K] @ B, B [K, N] given by (layout, values)."""
    bs = layout.block_size
    return _bsmm(  # values are stored in the order of the by-column list: no positions
        a, values, layout.col_offsets, layout.block_rows, None, layout.block_shape[1], (bs, 1),
        jnp.dtype(out_dtype or a.dtype), runner, poison, config,
    )  # fmt: skip


def bsmm_da(dout, layout: BlockLayout, values, *, out_dtype=None, runner="triton", poison=False, config=None):
    """da [M, K] = dout [M, N] @ B^T: B's by-row index set, each block read transposed (swapped strides)."""
    bs = layout.block_size
    return _bsmm(
        dout, values, layout.row_offsets, layout.row_block_cols, layout.row_positions, layout.block_shape[0],
        (1, bs), jnp.dtype(out_dtype or dout.dtype), runner, poison, config,
    )  # fmt: skip


def bsmm_dvalues(a, dout, layout: BlockLayout, *, out_dtype=None, runner="triton", poison=False, config=None):
    """dvalues [nnz, bs, bs]: dvalues[p] = a[:, block row of p]^T @ dout[:, block column of p]."""
    m, k = a.shape
    n = dout.shape[1]
    bs = layout.block_size
    cfg = config or default_config("dvalues", m, bs, a.dtype.itemsize)
    _check(cfg, bs, "dvalues")
    if layout.nnz == 0:
        return jnp.zeros(layout.values_shape, jnp.dtype(out_dtype or a.dtype))
    meta = dict(M=m, K=k, N=n, BS=bs, BLOCK_M=cfg.block_m, IEEE=bool(a.dtype == jnp.float32))
    out = jax.ShapeDtypeStruct(layout.values_shape, jnp.dtype(out_dtype or a.dtype))
    inputs = [a, dout, layout.block_rows, layout.block_cols]
    return _run(runner, "bsmm_dvalues", inputs, out, (layout.nnz,), cfg, meta, poison)
