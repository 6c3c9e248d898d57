"""Launching the FP8 Triton kernels: launch configurations and wrappers, through `kernels.triton_runtime`.

- runner "triton": `jax_triton.triton_call` (GPU; traceable under jit); `poison=True` runs the `*_poisoned`
  twin on NaN-filled, aliased outputs so unwritten elements show.
- runner "interpret": Triton's interpreter on the host (CPU tests); outputs always start NaN-filled.

Only arrays (operands, scales, schedules) are passed at run time; every shape, stride and block size is a
compile-time constant. The GEMM wrappers describe each operand by the strides through which the kernel reads
it, so a transposed operand costs no copy; the FP8 tensor cores want both operands K-major (reduction axis
contiguous), and the linear-layer helpers below arrange every GEMM that way (kernels/fp8/README.md).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels import triton_runtime
from kernels.gmm.launch import next_power_of_2, num_sms, schedule

TILE = 128  # scaling granularity along every reduction axis (BLOCK_K of the GEMMs)
E4M3 = jnp.float8_e4m3fn
F32 = jnp.float32
DEFAULT_NUM_SMS = 132  # H100 SXM; the interpreter's persistent grid when no GPU reports its count


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """How a block-scaled GEMM is launched (BLOCK_K is fixed at 128: one pair of scales per step)."""

    block_m: int = 128
    block_n: int = 128
    group_m: int = 8  # row tiles per band (L2 reuse)
    num_warps: int = 8
    num_stages: int = 4
    programs: int | None = None  # grouped GEMM only: persistent grid size; None: one program per SM


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """How a quantiser is launched: `block_r` rows per program for 1 x 128 tiles (128 for the 2-D ones, which
    ignore it); `block_c` columns per program of `requantize_cols` (a divisor of 128, so one row scale covers
    them)."""

    block_r: int = 32
    num_warps: int = 4
    block_c: int = TILE


# The GEMM: the best of `bench_fp8.py --tune` at 8192^3 on an H200 (experiments/benchmarks/RESULTS.md): 64 x 128
# tiles (x 128 along K), 4 warps, 4 stages, bands of 16 row tiles: 789 TFLOP/s against 688 for 128 x 128 with 8
# warps. The grouped GEMM keeps 128 x 128 x 128, 8 warps, 4 stages (not tuned).
DEFAULT_GEMM = GemmConfig(block_m=64, group_m=16, num_warps=4)
DEFAULT_GMM = GemmConfig()
DEFAULT_QUANT = QuantConfig()
DEFAULT_QUANT_2D = QuantConfig(block_r=TILE, num_warps=8)
# Measured on an H200 at 16384 x 2048 and 16384 x 8192 (experiments/benchmarks/RESULTS.md): both layouts of dy
# with 4 warps 1.13-1.15x faster than with 8; the re-tiling in 128 x 32 slabs with one warp 1.5x faster than
# whole 128 x 128 tiles with 8 (small programs hold few registers, so more of them keep loads in flight).
DEFAULT_QUANT_BOTH = QuantConfig(block_r=TILE, num_warps=4)
DEFAULT_REQUANT = QuantConfig(block_r=TILE, num_warps=1, block_c=32)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _fit(block: int, extent: int) -> int:
    """Shrink a block for a small dimension (tl.dot needs at least 16)."""
    return int(min(block, max(16, next_power_of_2(extent))))


def _run(name, inputs, out_shapes, grid, warps, stages, meta, runner, poison):
    return triton_runtime.run("kernels.fp8", runner, name, inputs, out_shapes, grid, warps, stages, meta, poison)


def _shape(shape, dtype) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


# ----------------------------------------------------------------------------------------------------
# Quantisers
# ----------------------------------------------------------------------------------------------------
def _check_block_c(name: str, cfg: QuantConfig) -> None:
    if cfg.block_c <= 0 or TILE % cfg.block_c:
        raise ValueError(f"{name}: block_c must be a positive divisor of {TILE}, got {cfg.block_c}")


def quantize_rows(x, *, runner="triton", poison=False, config: QuantConfig | None = None):
    """x [..., C] -> (q E4M3 [..., C], scales float32 [..., ceil(C/128)]): `quantize.quantize_tiles`."""
    cfg = config or DEFAULT_QUANT
    if x.ndim < 1 or x.size == 0:
        raise ValueError(f"quantize_rows needs a non-empty array with at least one axis, got shape {x.shape}")
    c = x.shape[-1]
    r = x.size // c
    block_r = _fit(cfg.block_r, r)
    outs = [_shape((r, c), E4M3), _shape((r, _cdiv(c, TILE)), F32)]
    grid = (_cdiv(r, block_r) * _cdiv(c, TILE),)
    meta = dict(R=r, C=c, BLOCK_R=block_r)
    q, s = _run("quantize_rows", [x.reshape(r, c)], outs, grid, cfg.num_warps, 1, meta, runner, poison)
    return q.reshape(x.shape), s.reshape(*x.shape[:-1], -1)


def quantize_rows_and_cols(x, *, runner="triton", poison=False, config: QuantConfig | None = None):
    """x [R, C] -> (q [R, C], s [R, ceil(C/128)], qt [C, R], st [C, ceil(R/128)]) from one read of x:
    (q, s) = quantize_tiles(x) and (qt, st) = quantize_tiles(x.T), bit for bit."""
    cfg = config or DEFAULT_QUANT_BOTH
    r, c = x.shape
    outs = [
        _shape((r, c), E4M3), _shape((r, _cdiv(c, TILE)), F32),
        _shape((c, r), E4M3), _shape((c, _cdiv(r, TILE)), F32),
    ]  # fmt: skip
    grid = (_cdiv(r, TILE) * _cdiv(c, TILE),)
    return tuple(_run("quantize_rows_and_cols", [x], outs, grid, cfg.num_warps, 1, dict(R=r, C=c), runner, poison))


def requantize_cols(xq, xs, *, runner="triton", poison=False, config: QuantConfig | None = None):
    """FP8 xq [R, C] with 1 x 128 tile scales xs -> quantize_tiles(dequantize_tiles(xq, xs).T), bit for bit."""
    r, c = xq.shape
    outs = [_shape((c, r), E4M3), _shape((c, _cdiv(r, TILE)), F32)]
    return tuple(_slabs("requantize_cols", [xq, xs], (r, c), outs, runner, poison, config))


def requantize_rounded_cols(xq, xs, dtype=jnp.bfloat16, *, runner="triton", poison=False, config=None):
    """FP8 xq [R, C] with 1 x 128 tile scales xs -> its values re-tiled along R and dequantised, in `dtype` [R, C]:
    dequantize_tiles(*quantize_tiles(dequantize_tiles(xq, xs).T)).T."""
    return _slabs("requantize_rounded_cols", [xq, xs], xq.shape, [_shape(xq.shape, dtype)], runner, poison, config)[0]


def quantize_cols(x, *, runner="triton", poison=False, config: QuantConfig | None = None):
    """x [R, C] -> quantize_tiles(x.T): (qt E4M3 [C, R], st float32 [C, ceil(R/128)]), bit for bit; launched as
    `requantize_cols` (128 rows x `block_c` columns per program)."""
    _check_2d("quantize_cols", x)
    r, c = x.shape
    outs = [_shape((c, r), E4M3), _shape((c, _cdiv(r, TILE)), F32)]
    return tuple(_slabs("quantize_cols", [x], (r, c), outs, runner, poison, config))


def quantize_rounded_cols(x, dtype=jnp.bfloat16, *, runner="triton", poison=False, config=None):
    """x [R, C] -> dequantize_tiles(*quantize_tiles(x.T)).T in `dtype` [R, C]."""
    _check_2d("quantize_rounded_cols", x)
    return _slabs("quantize_rounded_cols", [x], x.shape, [_shape(x.shape, dtype)], runner, poison, config)[0]


def _check_2d(name, x):
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"{name} needs a non-empty [R, C] array, got shape {x.shape}")


def _slabs(name, inputs, shape, outs, runner, poison, config):
    """Launch a column re-tiler: 128 rows x `block_c` columns per program."""
    cfg = config or DEFAULT_REQUANT
    _check_block_c(name, cfg)
    r, c = shape
    grid = (_cdiv(r, TILE) * _cdiv(c, cfg.block_c),)
    meta = dict(R=r, C=c, BLOCK_C=cfg.block_c)
    return _run(name, inputs, outs, grid, cfg.num_warps, 1, meta, runner, poison)


def quantize_blocks(w, *, transposed=False, runner="triton", poison=False, config: QuantConfig | None = None):
    """w [K, N] -> (q [K, N], scales [ceil(K/128), ceil(N/128)]): `quantize.quantize_blocks`; with
    `transposed`, also q^T [N, K] (the same bits) as a third output."""
    cfg = config or DEFAULT_QUANT_2D
    k, n = w.shape
    outs = [_shape((k, n), E4M3), _shape((_cdiv(k, TILE), _cdiv(n, TILE)), F32)]
    if transposed:
        outs.append(_shape((n, k), E4M3))
    name = "quantize_blocks_t" if transposed else "quantize_blocks"
    grid = (_cdiv(k, TILE) * _cdiv(n, TILE),)
    return tuple(_run(name, [w], outs, grid, cfg.num_warps, 1, dict(K=k, N=n), runner, poison))


# ----------------------------------------------------------------------------------------------------
# Block-scaled GEMM
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Operand:
    """A GEMM operand as the kernel reads it: `data` with element (i, j) at offset i * strides[0] + j * strides[1],
    `scales` with the scale of (row-or-column, chunk) at the offset given by `scale_strides`."""

    data: jax.Array
    strides: tuple[int, int]
    scales: jax.Array
    scale_strides: tuple[int, int]


def _scaled_mm(a: Operand, b: Operand, m, k, n, b_scale_n, out_dtype, runner, poison, config):
    """out [M, N] = sum over 128-chunks c of dot(a_c, b_c) * a_scale[m, c] * b_scale[c, n // b_scale_n].

    a: (m, k) at a.strides; its scale (m, c) at a.scale_strides. b: (k, n) at b.strides; its scale
    (c, n // b_scale_n) at b.scale_strides."""
    cfg = config or DEFAULT_GEMM
    block_m, block_n = _fit(cfg.block_m, m), _fit(cfg.block_n, n)
    meta = dict(
        M=m, N=n, K=k,
        S_AM=a.strides[0], S_AK=a.strides[1], S_ASM=a.scale_strides[0], S_ASK=a.scale_strides[1],
        S_BK=b.strides[0], S_BN=b.strides[1], S_BSK=b.scale_strides[0], S_BSN=b.scale_strides[1],
        B_SCALE_N=b_scale_n, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=cfg.group_m,
    )  # fmt: skip
    grid = (_cdiv(m, block_m) * _cdiv(n, block_n),)
    inputs = [a.data, a.scales, b.data, b.scales]
    out = [_shape((m, n), out_dtype)]
    return _run("scaled_mm", inputs, out, grid, cfg.num_warps, cfg.num_stages, meta, runner, poison)[0]


def scaled_matmul(xq, xs, wq, ws, out_dtype=F32, *, block_n=TILE, runner="triton", poison=False, config=None):
    """`reference.scaled_matmul` (block_k = 128): xq [M, K] @ wq [K, N], wq read as stored (N-major: on Hopper
    Triton transposes it through registers; `scaled_matmul_nt` takes the fast K-major layout)."""
    (m, k), n = xq.shape, wq.shape[1]
    nb = ws.shape[1]
    a = Operand(xq, (k, 1), xs, (xs.shape[1], 1))
    b = Operand(wq, (n, 1), ws, (nb, 1))
    return _scaled_mm(a, b, m, k, n, block_n, out_dtype, runner, poison, config)


def scaled_matmul_nt(xq, xs, wq_t, ws, out_dtype=F32, *, block_n=TILE, runner="triton", poison=False, config=None):
    """The same product with the weight given transposed, wq_t [N, K] (K-major): both operands K-major."""
    (m, k), n = xq.shape, wq_t.shape[0]
    a = Operand(xq, (k, 1), xs, (xs.shape[1], 1))
    b = Operand(wq_t, (1, k), ws, (ws.shape[1], 1))
    return _scaled_mm(a, b, m, k, n, block_n, out_dtype, runner, poison, config)


# The three GEMMs of the FP8 linear layer, each with both operands K-major as stored.
def fprop(xq, xs, wq_t, ws, out_dtype, *, runner="triton", poison=False, config=None):
    """y [M, N] = xq [M, K] @ w, the weight given transposed (wq_t [N, K], from quantize_blocks(transposed))."""
    return scaled_matmul_nt(xq, xs, wq_t, ws, out_dtype, runner=runner, poison=poison, config=config)


def dgrad(dyq, dys, wq, ws, out_dtype, *, runner="triton", poison=False, config=None):
    """dx [M, K] = dyq [M, N] @ wq[K, N]^T: element (n, k) of the second operand is wq[k, n] (N contiguous:
    K-major for this GEMM, which reduces over N); its scale (chunk of n, block of k) is ws[k // 128, n // 128]."""
    (m, n), k = dyq.shape, wq.shape[0]
    a = Operand(dyq, (n, 1), dys, (dys.shape[1], 1))
    b = Operand(wq, (1, n), ws, (1, ws.shape[1]))
    return _scaled_mm(a, b, m, n, k, TILE, out_dtype, runner, poison, config)


def wgrad(xtq, xts, dytq, dyts, out_dtype, *, runner="triton", poison=False, config=None):
    """dw [K, N] = xtq [K, M] @ dytq [N, M]^T, reducing over the tokens M; both operands are tiled 128 x 1 along
    M (scales xts [K, ceil(M/128)], dyts [N, ceil(M/128)]), so the second operand has one scale per column."""
    (k, m), n = xtq.shape, dytq.shape[0]
    a = Operand(xtq, (m, 1), xts, (xts.shape[1], 1))
    b = Operand(dytq, (1, m), dyts, (1, dyts.shape[1]))
    return _scaled_mm(a, b, k, m, n, 1, out_dtype, runner, poison, config)


# ----------------------------------------------------------------------------------------------------
# Grouped block-scaled GEMM (forward)
# ----------------------------------------------------------------------------------------------------
def scaled_gmm(
    lhs, lhs_scales, rhs, rhs_scales, group_sizes, out_dtype=F32, *, rhs_transposed=False, runner="triton",
    poison=False, config: GemmConfig | None = None,
):  # fmt: skip
    """out [T, N] = lhs [T, K] @ rhs[g] per group (rows sorted by group; rows past sum(group_sizes) are zero).

    lhs_scales [T, ceil(K/128)] (1 x 128 tiles), rhs [E, K, N] with per-expert block scales rhs_scales
    [E, ceil(K/128), ceil(N/128)]. With `rhs_transposed`, rhs is given as [E, N, K] (K-major, the fast layout
    for the FP8 tensor cores) and rhs_scales as [E, ceil(N/128), ceil(K/128)].
    """
    cfg = config or DEFAULT_GMM
    t, k = lhs.shape
    e = rhs.shape[0]
    n = rhs.shape[1] if rhs_transposed else rhs.shape[2]
    kc, nb = _cdiv(k, TILE), _cdiv(n, TILE)
    if rhs_transposed:
        strides, scale_strides = (n * k, 1, k), (nb * kc, 1, kc)
    else:
        strides, scale_strides = (k * n, n, 1), (kc * nb, nb, 1)
    rows_per_group = t / max(e, 1)
    block_m = _fit(cfg.block_m if rows_per_group >= 256 else 64, t)  # small groups waste less of a 64-row tile
    block_n = _fit(cfg.block_n, n)
    offsets, tile_starts = schedule(group_sizes, t, block_m)
    max_items = (_cdiv(t, block_m) + e + 1) * _cdiv(n, block_n)  # each group adds at most one partial tile
    programs = max(1, min(cfg.programs or (num_sms() if runner == "triton" else DEFAULT_NUM_SMS), max_items))
    meta = dict(
        M=t, K=k, N=n, E=e,
        S_RE=strides[0], S_RK=strides[1], S_RN=strides[2],
        S_RSE=scale_strides[0], S_RSK=scale_strides[1], S_RSN=scale_strides[2],
        NUM_PROGRAMS=programs, BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=cfg.group_m,
        BLOCK_E=next_power_of_2(e + 1),
    )  # fmt: skip
    inputs = [lhs, lhs_scales, rhs, rhs_scales, offsets, tile_starts]
    out = [_shape((t, n), out_dtype)]
    return _run("scaled_gmm", inputs, out, (programs,), cfg.num_warps, cfg.num_stages, meta, runner, poison)[0]
