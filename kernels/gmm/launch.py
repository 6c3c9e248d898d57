"""Launching the grouped-matmul kernels: schedules, launch configurations and two runners.

- runner "triton": `jax_triton.triton_call` (GPU; traceable under jit).
- runner "interpret": Triton's interpreter on the host through `jax.pure_callback` (CPU; slow, for tests).
  It runs the same kernel source with the same arguments and launch parameters, and allocates every output
  filled with NaN, so an element the kernel does not write shows.

Only the operands and two small int32 schedule arrays (E + 2 entries each) are passed as arrays; every shape,
stride and block size is a compile-time constant (all are static under jit anyway).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels import triton_runtime

DEFAULT_NUM_SMS = 132  # H100 SXM; used when the device does not report its multiprocessor count


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """How one grouped-GEMM kernel is launched.

    Forward / input gradient: block_m tiles rows, block_n output columns, block_k the reduction.
    Weight gradient: block_m tiles K (rows of drhs[g]), block_n its columns, block_k the group's rows.
    """

    block_m: int = 128
    block_n: int = 128
    block_k: int = 64
    group_m: int = 8  # tiles per band along the first dimension (L2 reuse)
    num_warps: int = 8
    num_stages: int = 4
    programs: int | None = None  # persistent grid size; None: one program per SM


# 16-bit operands: the best of `bench_gmm.py --tune` on an H200 at E=64, T=65536, D=2048, F=1408 with equal and
# Zipf groups (experiments/benchmarks/RESULTS.md): 128 x 256 tiles, BLOCK_K 64, 8 warps, persistent grid. float32
# operands take half the reduction step so the same number of stages fits in shared memory (not tuned).
DEFAULT_CONFIGS = {
    "fwd": {2: GemmConfig(block_n=256, num_stages=3), 4: GemmConfig(block_k=32, num_stages=3)},
    "dlhs": {2: GemmConfig(block_n=256), 4: GemmConfig(block_k=32, num_stages=3)},
    "drhs": {2: GemmConfig(block_n=256), 4: GemmConfig(block_k=32, num_stages=3)},
}


def _fit(block: int, extent: int) -> int:
    """Shrink a block for a small dimension (tl.dot needs at least 16)."""
    return int(min(block, max(16, next_power_of_2(extent))))


def default_config(kind: str, m: int, k: int, n: int, groups: int, itemsize: int) -> GemmConfig:
    """Starting configuration for a kernel of `kind` ("fwd", "dlhs", "drhs") on an [m, k] x [k, n] problem."""
    cfg = DEFAULT_CONFIGS[kind][4 if itemsize >= 4 else 2]
    if kind == "drhs":  # tiles of [k, n], reducing over rows
        return dataclasses.replace(cfg, block_m=_fit(cfg.block_m, k), block_n=_fit(cfg.block_n, n))
    rows_per_group = m / max(groups, 1)
    block_m = cfg.block_m if rows_per_group >= 256 else 64  # small groups waste less of a 64-row tile
    return dataclasses.replace(
        cfg, block_m=_fit(block_m, m), block_n=_fit(cfg.block_n, n), block_k=_fit(cfg.block_k, k)
    )


def num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or DEFAULT_NUM_SMS)


def _programs(cfg: GemmConfig, runner: str, max_items: int) -> int:
    sms = cfg.programs or (num_sms() if runner == "triton" else DEFAULT_NUM_SMS)
    return max(1, min(sms, max_items))


# ----------------------------------------------------------------------------------------------------
# Schedules: group offsets and row-tile prefix sums, computed by XLA (E + 2 int32 each)
# ----------------------------------------------------------------------------------------------------
def schedule(group_sizes: jax.Array, m: int, block_m: int) -> tuple[jax.Array, jax.Array]:
    """(offsets [E + 2], tile_starts [E + 2]) for rows [M] split by `group_sizes`, padding as group E.

    Group g (g = E: the padding rows) owns rows [offsets[g], offsets[g + 1]); tile_starts[g] counts the row
    tiles of the groups before it, and tile_starts[E + 1] all of them. Sizes are clipped so the groups never
    reach past row M.
    """
    sizes = jnp.maximum(group_sizes.astype(jnp.int32), 0)
    ends = jnp.minimum(jnp.cumsum(sizes), m).astype(jnp.int32)
    zero, total = jnp.zeros((1,), jnp.int32), jnp.full((1,), m, jnp.int32)
    offsets = jnp.concatenate([zero, ends, total])
    tiles = (offsets[1:] - offsets[:-1] + block_m - 1) // block_m
    tile_starts = jnp.concatenate([zero, jnp.cumsum(tiles).astype(jnp.int32)])
    return offsets, tile_starts


# ----------------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------------
def _run(runner: str, name, inputs, out_shape, grid, cfg: GemmConfig, meta, poison: bool):
    warps, stages = cfg.num_warps, cfg.num_stages
    return triton_runtime.run("kernels.gmm", runner, name, inputs, [out_shape], grid, warps, stages, meta, poison)[0]


# ----------------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------------
def _strided_gmm(lhs, rhs, group_sizes, rhs_strides, k, n, out_dtype, kind, runner, poison, config):
    """lhs [M, K] x (rhs viewed through `rhs_strides` (e, k, n) as [E, K, N]) -> [M, N] of `out_dtype`."""
    m = lhs.shape[0]
    groups = rhs.shape[0]
    cfg = config or default_config(kind, m, k, n, groups, lhs.dtype.itemsize)
    offsets, tile_starts = schedule(group_sizes, m, cfg.block_m)
    n_tiles = -(-n // cfg.block_n)
    max_items = (-(-m // cfg.block_m) + groups + 1) * n_tiles  # each group adds at most one partial tile
    programs = _programs(cfg, runner, max_items)
    meta = dict(
        M=m, K=k, N=n, E=groups,
        STRIDE_LM=k, STRIDE_LK=1,
        STRIDE_RE=rhs_strides[0], STRIDE_RK=rhs_strides[1], STRIDE_RN=rhs_strides[2],
        NUM_PROGRAMS=programs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, BLOCK_E=next_power_of_2(groups + 1), IEEE=bool(lhs.dtype == jnp.float32),
    )  # fmt: skip
    out = jax.ShapeDtypeStruct((m, n), out_dtype)
    return _run(runner, "gmm_fwd", [lhs, rhs, offsets, tile_starts], out, (programs,), cfg, meta, poison)


def _rhs_view(rhs, transposed: bool) -> tuple[int, int, tuple[int, int, int]]:
    """(K, N, strides of (e, k, n)) for rhs read as [E, K, N]: stored so, or stored [E, N, K] when `transposed`."""
    _, a, b = rhs.shape
    return (b, a, (a * b, 1, b)) if transposed else (a, b, (a * b, b, 1))


def gmm_fwd(lhs, rhs, group_sizes, *, transpose_rhs=False, out_dtype=None, runner="triton", poison=False, config=None):
    """out [M, N] = lhs [M, K] @ rhs[g] per group for rhs [E, K, N], or @ rhs[g]^T for rhs [E, N, K] with
    `transpose_rhs` (read through its strides, nothing copied); rows past sum(group_sizes) are zero."""
    k, n, strides = _rhs_view(rhs, transpose_rhs)
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    return _strided_gmm(lhs, rhs, group_sizes, strides, k, n, out_dtype, "fwd", runner, poison, config)


def gmm_dlhs(
    dout, rhs, group_sizes, *, transpose_rhs=False, out_dtype=None, runner="triton", poison=False, config=None
):
    """dlhs [M, K] = dout [M, N] @ (rhs read as [E, K, N], see `gmm_fwd`)[g]^T per group: the forward kernel
    reading rhs through swapped strides."""
    k, n, (stride_e, stride_k, stride_n) = _rhs_view(rhs, transpose_rhs)
    out_dtype = jnp.dtype(out_dtype or dout.dtype)
    strides = (stride_e, stride_n, stride_k)
    return _strided_gmm(dout, rhs, group_sizes, strides, n, k, out_dtype, "dlhs", runner, poison, config)


def gmm_drhs(lhs, dout, group_sizes, groups, *, out_dtype=None, runner="triton", poison=False, config=None):
    """drhs [E, K, N] = lhs_g^T @ dout_g per group (zeros for an empty group); padding rows take no part."""
    m, k = lhs.shape
    n = dout.shape[1]
    cfg = config or default_config("drhs", m, k, n, groups, lhs.dtype.itemsize)
    offsets, _ = schedule(group_sizes, m, 1)
    per_group = -(-k // cfg.block_m) * -(-n // cfg.block_n)
    programs = _programs(cfg, runner, groups * per_group)
    meta = dict(
        M=m, K=k, N=n, E=groups, NUM_PROGRAMS=programs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, IEEE=bool(lhs.dtype == jnp.float32),
    )  # fmt: skip
    out = jax.ShapeDtypeStruct((groups, k, n), jnp.dtype(out_dtype or lhs.dtype))
    return _run(runner, "gmm_drhs", [lhs, dout, offsets], out, (programs,), cfg, meta, poison)
