"""Triton kernels for FP8 (E4M3) training with fine-grained scales: quantisers and block-scaled GEMMs.

Quantisers (bit for bit `kernels.fp8.quantize`; scale = amax * float32(1/448), a zero tile gets 1, a scale
below the smallest normal float32 gets that; q = e4m3_rne(clip(x * float32(1 / scale), -448, 448)) with an
IEEE division). NaN stays NaN but takes no part in the amax: the reference's amax over a tile holding NaN
depends on how XLA vectorises the max (NaN on some backends, the largest other value on others), so such
tiles are the one place the two may differ, in the tile's other values only:
- `quantize_rows`: x [R, C] -> q [R, C], scales [R, ceil(C/128)] (1 x 128 tiles along the last axis);
- `quantize_rows_and_cols`: the same plus the transposed copy qt [C, R], scales [C, ceil(R/128)] quantised
  in 128 x 1 tiles along R, from one read of x (the output gradient of a linear layer: Dgrad wants it tiled
  along N, Wgrad along the tokens);
- `requantize_cols`: FP8 q [R, C] with 1 x 128 tile scales -> dequantised in float32 and quantised again in
  128 x 1 tiles along R, stored transposed [C, R] (the saved activation, re-tiled for the weight gradient);
- `quantize_cols`: x [R, C] -> its 128 x 1 tiles along R alone, stored transposed as `requantize_cols` stores
  them (an activation recomputed in the backward, quantised for the weight gradient);
- `quantize_blocks` / `quantize_blocks_t`: w [K, N] -> q [K, N], scales [ceil(K/128), ceil(N/128)], and with
  `_t` also q^T [N, K] (the forward GEMM wants the weight K-major, see below).
- `requantize_rounded_cols`, `quantize_rounded_cols`: as `requantize_cols` and `quantize_cols`, but the 128 x 1
  tiles along R are written dequantised in the output's dtype, in the input's layout [R, C] (the values a bf16
  GEMM over R multiplies: the MoE experts' weight gradient, kernels/fp8/README.md deviation 7).

GEMMs, promotion every 128 reduction elements (DeepSeek-V3): for each 128-chunk c of the reduction,
    acc += dot(a_c, b_c) * (a_scale[m, c] * b_scale[c, n // B_SCALE_N])
with both operands FP8 on the tensor cores and a float32 accumulator (`kernels.fp8.reference.scaled_matmul`):
- `scaled_mm`: a [M, K] with per-row chunk scales, b [K, N] with scales per chunk per B_SCALE_N columns
  (128: weight blocks; 1: per-column tiles, the weight gradient), both read through compile-time strides;
- `scaled_gmm`: the grouped version for MoE experts (rows of a sorted by group, b [E, K, N] with per-expert
  128 x 128 block scales), on the persistent schedule of `kernels.gmm` (see kernels/gmm/README.md).

Operand layout: on Hopper the FP8 `wgmma` takes both operands K-major (the reduction axis contiguous in shared
memory); Triton transposes any other layout through registers and then does not pipeline that load. The
strides are generic so every layout is correct, and the callers in `launch.py` pick K-major ones.

Every kernel has a `*_poisoned` twin taking one extra, pre-filled buffer per output (aliased to that output
by the caller), so tests can show an element the kernel fails to write.
"""

import os

import triton
import triton.language as tl

# Triton's interpreter (CPU tests only) converts float32 to float8 with wrong rounding and decodes the E4M3 NaN
# as a number, and its dot does not multiply FP8 exactly; there the kernels round in float32 arithmetic,
# patch NaN by hand and widen FP8 tiles to float32 before the dot (products of E4M3 values are exact there).
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True"))

# tl.sum, tl.max, tl.zeros and tl.cdiv are @triton.jit library functions, fixed as compiled or interpreted when
# triton is first imported; the interpreted copy of this module cannot call them once triton has been imported
# for the GPU. So reductions call tl.reduce with the library's own combiners, zeros are tl.full, and tile
# counts are integer division.
_SUM = tl.standard._sum_combine
_MAX = tl.standard._elementwise_max  # ignores NaN, on the GPU (max.f32) and in the interpreter (nanmax) alike

TILE: tl.constexpr = tl.constexpr(128)  # the scaling granularity along the reduction axis
_E4M3_MAX: tl.constexpr = tl.constexpr(448.0)
_INV_E4M3_MAX: tl.constexpr = tl.constexpr(0.002232142886519432)  # float32(1 / 448), exact as a float32
_TINY_F32: tl.constexpr = tl.constexpr(1.1754943508222875e-38)  # smallest normal float32


# ----------------------------------------------------------------------------------------------------
# Scalar helpers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _scale_from_amax(amax):
    """`quantize._scale_from_amax`: amax / 448 as a multiplication, at least the smallest normal; 1 for zeros."""
    scale = tl.maximum(amax * _INV_E4M3_MAX, _TINY_F32)
    return tl.where(amax > 0, scale, 1.0)


@triton.jit
def _reciprocal(scale):
    return tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)  # IEEE; `1.0 / s` is approximate


@triton.jit
def _round_e4m3_interpreted(v):
    """Round float32 v (|v| <= 448 or NaN) to the nearest-even E4M3 value, as float32 arithmetic."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = tl.maximum((bits >> 23) & 0xFF, 127 - 6)  # below 2^-6: E4M3 subnormals, spacing 2^-9
    magic = ((exponent + 20) << 23).to(tl.float32, bitcast=True)  # 2^(e + 20): its float32 ulp is 2^(e - 3)
    rounded = (tl.abs(v) + magic) - magic  # float32 addition rounds to nearest even at E4M3's spacing
    return (rounded.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)  # sign back


@triton.jit
def _to_e4m3(v):
    """clip(v, -448, 448) rounded to nearest even in E4M3; NaN stays NaN."""
    v = tl.where(v > _E4M3_MAX, _E4M3_MAX, v)  # comparisons are false for NaN, which passes through
    v = tl.where(v < -_E4M3_MAX, -_E4M3_MAX, v)
    if _INTERPRETED:
        q = _round_e4m3_interpreted(v).to(tl.float8e4nv)  # exact: the value is on the E4M3 grid
        sign = ((v.to(tl.int32, bitcast=True) >> 24) & 0x80).to(tl.uint8)
        q_bits = tl.where(v != v, sign | 0x7F, q.to(tl.uint8, bitcast=True))
        q = q_bits.to(tl.float8e4nv, bitcast=True)
    else:
        q = v.to(tl.float8e4nv, fp_downcast_rounding="rtne")
    return q


@triton.jit
def _round_bf16_interpreted(v):
    """float32 v rounded to the nearest-even bf16 value, kept in float32 (the interpreter's own conversion
    truncates); infinities and NaN stay."""
    bits = v.to(tl.int32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)  # carries into the upper half exactly when rounding up
    return (bits & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _widen(q):
    """FP8 -> float32 (exact)."""
    x = q.to(tl.float32)
    if _INTERPRETED:
        x = tl.where((q.to(tl.uint8, bitcast=True) & 0x7F) == 0x7F, float("nan"), x)
    return x


@triton.jit
def _dot_fp8(a, b):
    """float32 [BM, BN] = a [BM, BK] @ b [BK, BN] for FP8 tiles, a fresh accumulator (one 128-chunk)."""
    if _INTERPRETED:
        out = tl.dot(_widen(a), _widen(b), input_precision="ieee", out_dtype=tl.float32)
    else:
        out = tl.dot(a, b, out_dtype=tl.float32)
    return out


@triton.jit
def _promote(acc, partial, a_scale, b_scale, ONE_B_SCALE: tl.constexpr):
    """acc + partial * (a_scale[:, None] * b_scale): the chunk's partial sum scaled and added in float32. With one
    b_scale for the whole tile (a weight block) this is one multiply-add per element on the CUDA cores."""
    if ONE_B_SCALE:
        acc += partial * (a_scale * b_scale)[:, None]
    else:
        acc += partial * (a_scale[:, None] * b_scale[None, :])
    return acc


@triton.jit
def _quantize_along(x, axis: tl.constexpr):
    """(q, scales) of float32 tile x with one scale per line along `axis` (1: per row, 0: per column)."""
    scale = _scale_from_amax(tl.reduce(tl.abs(x), axis, _MAX))
    inv = tl.expand_dims(_reciprocal(scale), axis)
    return _to_e4m3(x * inv), scale


@triton.jit
def _band_order(local, tiles_a, TILES_B: tl.constexpr, GROUP_M: tl.constexpr):
    """Item `local` of a tiles_a x TILES_B grid -> (tile_a, tile_b), in bands of GROUP_M along a (tile_b inner), so
    programs running at the same time share operand tiles in L2 (`kernels.gmm`'s helper: the interpreted copy
    of this module cannot call another module's kernels)."""
    band_items = GROUP_M * TILES_B
    band = local // band_items
    first_a = band * GROUP_M
    band_height = tl.minimum(tiles_a - first_a, GROUP_M)
    in_band = local - band * band_items
    return first_a + in_band % band_height, in_band // band_height


# ----------------------------------------------------------------------------------------------------
# Quantisers
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(X, tile_r, tile_c, R: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr):
    """float32 [BLOCK_R, TILE] tile (tile_r, tile_c) of X [R, C], zeros outside; with its indices and masks."""
    rows = tile_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tile_c * TILE + tl.arange(0, TILE)
    row_ok, col_ok = rows < R, cols < C
    x = tl.load(X + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    return x.to(tl.float32), rows, cols, row_ok, col_ok


@triton.jit
def _store_rows(q, scale, Q, S, rows, cols, row_ok, col_ok, tile_c, C: tl.constexpr):
    """Row-tiled q [BLOCK_R, TILE] into Q [R, C], scales into S [R, ceil(C / TILE)]."""
    C_TILES: tl.constexpr = (C + TILE - 1) // TILE
    tl.store(Q + rows.to(tl.int64)[:, None] * C + cols[None, :], q, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(S + rows.to(tl.int64) * C_TILES + tile_c, scale, mask=row_ok)


@triton.jit
def _store_cols_t(q, scale, QT, ST, rows, cols, row_ok, col_ok, tile_r, R: tl.constexpr):
    """Column-tiled q [TILE, BLOCK_C] stored transposed into QT [C, R], scales into ST [C, ceil(R / TILE)]."""
    R_TILES: tl.constexpr = (R + TILE - 1) // TILE
    tl.store(QT + cols.to(tl.int64)[None, :] * R + rows[:, None], q, mask=row_ok[:, None] & col_ok[None, :])
    tl.store(ST + cols.to(tl.int64) * R_TILES + tile_r, scale, mask=col_ok)


@triton.jit
def _store_retiled(q, scale, QT, ST, rows, cols, row_ok, col_ok, tile_r, R: tl.constexpr, C: tl.constexpr,
                   ROUNDED: tl.constexpr):  # fmt: skip
    """Column-tiled q [TILE, BLOCK_C] with its scales: stored transposed as FP8 (`_store_cols_t`), or, ROUNDED, as
    its dequantised values in QT's dtype in the input's own layout [R, C] (ST unused)."""
    if ROUNDED:
        x = _widen(q) * scale[None, :]
        if _INTERPRETED and QT.dtype.element_ty == tl.bfloat16:
            x = _round_bf16_interpreted(x)
        mask = row_ok[:, None] & col_ok[None, :]
        tl.store(QT + rows.to(tl.int64)[:, None] * C + cols[None, :], x.to(QT.dtype.element_ty), mask=mask)
    else:
        _store_cols_t(q, scale, QT, ST, rows, cols, row_ok, col_ok, tile_r, R)


@triton.jit
def _quantize_rows_body(X, Q, S, R: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr):
    C_TILES: tl.constexpr = (C + TILE - 1) // TILE
    pid = tl.program_id(0)
    tile_r, tile_c = pid // C_TILES, pid % C_TILES
    x, rows, cols, row_ok, col_ok = _load_tile(X, tile_r, tile_c, R, C, BLOCK_R)
    q, scale = _quantize_along(x, 1)
    _store_rows(q, scale, Q, S, rows, cols, row_ok, col_ok, tile_c, C)


@triton.jit
def quantize_rows(X, Q, S, R: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr):
    _quantize_rows_body(X, Q, S, R, C, BLOCK_R)


@triton.jit
def quantize_rows_poisoned(X, Q_FILL, S_FILL, Q, S, R: tl.constexpr, C: tl.constexpr, BLOCK_R: tl.constexpr):
    _quantize_rows_body(X, Q, S, R, C, BLOCK_R)


@triton.jit
def _quantize_rows_and_cols_body(X, Q, S, QT, ST, R: tl.constexpr, C: tl.constexpr):
    C_TILES: tl.constexpr = (C + TILE - 1) // TILE
    pid = tl.program_id(0)
    tile_r, tile_c = pid // C_TILES, pid % C_TILES
    x, rows, cols, row_ok, col_ok = _load_tile(X, tile_r, tile_c, R, C, TILE)
    q, scale = _quantize_along(x, 1)
    _store_rows(q, scale, Q, S, rows, cols, row_ok, col_ok, tile_c, C)
    qt, scale_t = _quantize_along(x, 0)
    _store_cols_t(qt, scale_t, QT, ST, rows, cols, row_ok, col_ok, tile_r, R)


@triton.jit
def quantize_rows_and_cols(X, Q, S, QT, ST, R: tl.constexpr, C: tl.constexpr):
    _quantize_rows_and_cols_body(X, Q, S, QT, ST, R, C)


@triton.jit
def quantize_rows_and_cols_poisoned(
    X, Q_FILL, S_FILL, QT_FILL, ST_FILL, Q, S, QT, ST, R: tl.constexpr, C: tl.constexpr
):  # fmt: skip
    _quantize_rows_and_cols_body(X, Q, S, QT, ST, R, C)


@triton.jit
def _slab(R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's slab of TILE rows x BLOCK_C columns of an [R, C] array: (tile_r, block_c, rows, cols, row_ok,
    col_ok)."""
    C_BLOCKS: tl.constexpr = (C + BLOCK_C - 1) // BLOCK_C
    pid = tl.program_id(0)
    tile_r, block_c = pid // C_BLOCKS, pid % C_BLOCKS
    rows = tile_r * TILE + tl.arange(0, TILE)
    cols = block_c * BLOCK_C + tl.arange(0, BLOCK_C)
    return tile_r, block_c, rows, cols, rows < R, cols < C


@triton.jit
def _requantize_cols_body(
    XQ, XS, QT, ST, R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr, ROUNDED: tl.constexpr
):  # fmt: skip
    # A program re-tiles 128 rows x BLOCK_C columns: the columns are independent here, and narrower programs
    # hold fewer registers, so more of them keep loads in flight on each SM.
    C_TILES: tl.constexpr = (C + TILE - 1) // TILE
    tile_r, block_c, rows, cols, row_ok, col_ok = _slab(R, C, BLOCK_C)
    mask = row_ok[:, None] & col_ok[None, :]
    q = tl.load(XQ + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0)
    s = tl.load(XS + rows.to(tl.int64) * C_TILES + block_c * BLOCK_C // TILE, mask=row_ok, other=1.0)
    x = _widen(q) * s[:, None]  # `dequantize_tiles`: one float32 product per element
    qt, scale_t = _quantize_along(x, 0)
    _store_retiled(qt, scale_t, QT, ST, rows, cols, row_ok, col_ok, tile_r, R, C, ROUNDED)


@triton.jit
def requantize_cols(XQ, XS, QT, ST, R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    _requantize_cols_body(XQ, XS, QT, ST, R, C, BLOCK_C, False)


@triton.jit
def requantize_cols_poisoned(XQ, XS, QT_FILL, ST_FILL, QT, ST, R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    _requantize_cols_body(XQ, XS, QT, ST, R, C, BLOCK_C, False)


@triton.jit
def requantize_rounded_cols(XQ, XS, OUT, R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    _requantize_cols_body(XQ, XS, OUT, OUT, R, C, BLOCK_C, True)


@triton.jit
def requantize_rounded_cols_poisoned(XQ, XS, OUT_FILL, OUT, R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    _requantize_cols_body(XQ, XS, OUT, OUT, R, C, BLOCK_C, True)


@triton.jit
def _quantize_cols_body(X, QT, ST, R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr, ROUNDED: tl.constexpr):
    # 128 rows x BLOCK_C columns per program, as `requantize_cols`, from values in any float dtype.
    tile_r, _, rows, cols, row_ok, col_ok = _slab(R, C, BLOCK_C)
    x = tl.load(X + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    qt, scale_t = _quantize_along(x.to(tl.float32), 0)
    _store_retiled(qt, scale_t, QT, ST, rows, cols, row_ok, col_ok, tile_r, R, C, ROUNDED)


@triton.jit
def quantize_cols(X, QT, ST, R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    _quantize_cols_body(X, QT, ST, R, C, BLOCK_C, False)


@triton.jit
def quantize_cols_poisoned(X, QT_FILL, ST_FILL, QT, ST, R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    _quantize_cols_body(X, QT, ST, R, C, BLOCK_C, False)


@triton.jit
def quantize_rounded_cols(X, OUT, R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    _quantize_cols_body(X, OUT, OUT, R, C, BLOCK_C, True)


@triton.jit
def quantize_rounded_cols_poisoned(X, OUT_FILL, OUT, R: tl.constexpr, C: tl.constexpr, BLOCK_C: tl.constexpr):
    _quantize_cols_body(X, OUT, OUT, R, C, BLOCK_C, True)


@triton.jit
def _quantize_blocks_body(W, Q, S, QT, K: tl.constexpr, N: tl.constexpr, TRANSPOSED: tl.constexpr):
    N_TILES: tl.constexpr = (N + TILE - 1) // TILE
    pid = tl.program_id(0)
    tile_k, tile_n = pid // N_TILES, pid % N_TILES
    w, rows, cols, row_ok, col_ok = _load_tile(W, tile_k, tile_n, K, N, TILE)
    scale = _scale_from_amax(tl.reduce(tl.reduce(tl.abs(w), 1, _MAX), 0, _MAX))
    q = _to_e4m3(w * _reciprocal(scale))
    mask = row_ok[:, None] & col_ok[None, :]
    tl.store(Q + rows.to(tl.int64)[:, None] * N + cols[None, :], q, mask=mask)
    if TRANSPOSED:
        tl.store(QT + cols.to(tl.int64)[None, :] * K + rows[:, None], q, mask=mask)
    tl.store(S + pid, scale)


@triton.jit
def quantize_blocks(W, Q, S, K: tl.constexpr, N: tl.constexpr):
    _quantize_blocks_body(W, Q, S, Q, K, N, False)


@triton.jit
def quantize_blocks_poisoned(W, Q_FILL, S_FILL, Q, S, K: tl.constexpr, N: tl.constexpr):
    _quantize_blocks_body(W, Q, S, Q, K, N, False)


@triton.jit
def quantize_blocks_t(W, Q, S, QT, K: tl.constexpr, N: tl.constexpr):
    _quantize_blocks_body(W, Q, S, QT, K, N, True)


@triton.jit
def quantize_blocks_t_poisoned(W, Q_FILL, S_FILL, QT_FILL, Q, S, QT, K: tl.constexpr, N: tl.constexpr):
    _quantize_blocks_body(W, Q, S, QT, K, N, True)


# ----------------------------------------------------------------------------------------------------
# Block-scaled GEMM: out[M, N] = sum_c dot(a_c, b_c) * a_scale[:, c] * b_scale[c, :]
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _scaled_mm_body(
    A, AS, B, BS, OUT,
    M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
    S_AM: tl.constexpr, S_AK: tl.constexpr, S_ASM: tl.constexpr, S_ASK: tl.constexpr,
    S_BK: tl.constexpr, S_BN: tl.constexpr, S_BSK: tl.constexpr, S_BSN: tl.constexpr, B_SCALE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    M_TILES: tl.constexpr = (M + BLOCK_M - 1) // BLOCK_M
    N_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    K_CHUNKS: tl.constexpr = (K + TILE - 1) // TILE
    EVEN_K: tl.constexpr = (K // TILE) * TILE == K  # (int % constexpr is missing in the interpreter)
    ONE_B_SCALE: tl.constexpr = (B_SCALE_N // BLOCK_N) * BLOCK_N == B_SCALE_N  # a column tile in one scale block
    tile_m, tile_n = _band_order(tl.program_id(0), M_TILES, N_TILES, GROUP_M)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # Loads wrap rows and columns past the edge back into range (no mask, so they vectorise and pipeline);
    # those lanes are never stored.
    rows_in = (rows % M).to(tl.int64)
    cols_in = (cols % N).to(tl.int64)
    ks = tl.arange(0, TILE)
    a_ptrs = A + rows_in[:, None] * S_AM + ks[None, :] * S_AK
    b_ptrs = B + ks[:, None] * S_BK + cols_in[None, :] * S_BN
    as_ptrs = AS + rows_in * S_ASM
    if ONE_B_SCALE:
        bs_ptrs = BS + (tile_n * BLOCK_N // B_SCALE_N) * S_BSN
    else:
        bs_ptrs = BS + (cols_in // B_SCALE_N) * S_BSN
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for c in range(0, K_CHUNKS):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:  # the reference pads the last chunk with zeros
            k_ok = ks < K - c * TILE
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        a_scale = tl.load(as_ptrs + c * S_ASK)
        b_scale = tl.load(bs_ptrs + c * S_BSK)
        acc = _promote(acc, _dot_fp8(a, b), a_scale, b_scale, ONE_B_SCALE)
        a_ptrs += TILE * S_AK
        b_ptrs += TILE * S_BK
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * N + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=(rows < M)[:, None] & (cols < N)[None, :])


@triton.jit
def scaled_mm(
    A, AS, B, BS, OUT,
    M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
    S_AM: tl.constexpr, S_AK: tl.constexpr, S_ASM: tl.constexpr, S_ASK: tl.constexpr,
    S_BK: tl.constexpr, S_BN: tl.constexpr, S_BSK: tl.constexpr, S_BSN: tl.constexpr, B_SCALE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    _scaled_mm_body(
        A, AS, B, BS, OUT, M, N, K, S_AM, S_AK, S_ASM, S_ASK, S_BK, S_BN, S_BSK, S_BSN, B_SCALE_N,
        BLOCK_M, BLOCK_N, GROUP_M,
    )  # fmt: skip


@triton.jit
def scaled_mm_poisoned(
    A, AS, B, BS, OUT_FILL, OUT,
    M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
    S_AM: tl.constexpr, S_AK: tl.constexpr, S_ASM: tl.constexpr, S_ASK: tl.constexpr,
    S_BK: tl.constexpr, S_BN: tl.constexpr, S_BSK: tl.constexpr, S_BSN: tl.constexpr, B_SCALE_N: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    _scaled_mm_body(
        A, AS, B, BS, OUT, M, N, K, S_AM, S_AK, S_ASM, S_ASK, S_BK, S_BN, S_BSK, S_BSN, B_SCALE_N,
        BLOCK_M, BLOCK_N, GROUP_M,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Grouped block-scaled GEMM (MoE experts): out[T, N] = lhs[T, K] @ rhs[g(t)], rows sorted by group
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _scaled_gmm_body(
    LHS, LS, RHS, RS, OFFSETS, TILE_STARTS, OUT,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    S_RE: tl.constexpr, S_RK: tl.constexpr, S_RN: tl.constexpr,
    S_RSE: tl.constexpr, S_RSK: tl.constexpr, S_RSN: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    # The schedule of kernels.gmm (_gmm_fwd_body): group g owns rows [OFFSETS[g], OFFSETS[g + 1]), group E
    # the padding rows; TILE_STARTS holds the prefix sums of row tiles; NUM_PROGRAMS programs walk the items.
    N_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    K_CHUNKS: tl.constexpr = (K + TILE - 1) // TILE
    EVEN_K: tl.constexpr = (K // TILE) * TILE == K  # (int % constexpr is missing in the interpreter)
    ONE_B_SCALE: tl.constexpr = (TILE // BLOCK_N) * BLOCK_N == TILE  # a column tile in one weight block
    e_idx = tl.arange(0, BLOCK_E)
    e_ok = e_idx <= E
    item_starts = tl.load(TILE_STARTS + e_idx, mask=e_ok, other=0) * N_TILES
    num_items = tl.load(TILE_STARTS + E + 1) * N_TILES
    m_range = tl.arange(0, BLOCK_M)
    n_range = tl.arange(0, BLOCK_N)
    ks = tl.arange(0, TILE)
    for item in tl.range(tl.program_id(0), num_items, NUM_PROGRAMS):
        group = tl.reduce(((item_starts <= item) & e_ok).to(tl.int32), 0, _SUM) - 1
        first_tile = tl.load(TILE_STARTS + group)
        group_tiles = tl.load(TILE_STARTS + group + 1) - first_tile
        tile_m, tile_n = _band_order(item - first_tile * N_TILES, group_tiles, N_TILES, GROUP_M)
        row0 = tl.load(OFFSETS + group) + tile_m * BLOCK_M
        rows_left = tl.load(OFFSETS + group + 1) - row0  # rows of this group from row0 on (> 0)
        row_ok = m_range < rows_left
        rows_in = row0.to(tl.int64) + tl.where(row_ok, m_range, 0)  # rows past the group reread row0
        cols = tile_n * BLOCK_N + n_range
        col_ok = cols < N
        cols_in = cols % N
        is_expert = group < E
        k_iters = tl.where(is_expert, K_CHUNKS, 0)  # padding rows: no reduction, the tile stays zero
        expert = tl.where(is_expert, group, 0).to(tl.int64)
        a_ptrs = LHS + rows_in[:, None] * K + ks[None, :]
        b_ptrs = RHS + expert * S_RE + ks[:, None] * S_RK + cols_in[None, :] * S_RN
        as_ptrs = LS + rows_in * K_CHUNKS
        if ONE_B_SCALE:
            bs_ptrs = RS + expert * S_RSE + (tile_n * BLOCK_N // TILE) * S_RSN
        else:
            bs_ptrs = RS + expert * S_RSE + (cols_in // TILE) * S_RSN
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for c in range(0, k_iters):
            if EVEN_K:
                a = tl.load(a_ptrs)
                b = tl.load(b_ptrs)
            else:
                k_ok = ks < K - c * TILE
                a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
            a_scale = tl.load(as_ptrs + c)
            b_scale = tl.load(bs_ptrs + c * S_RSK)
            acc = _promote(acc, _dot_fp8(a, b), a_scale, b_scale, ONE_B_SCALE)
            a_ptrs += TILE
            b_ptrs += TILE * S_RK
        out_ptrs = OUT + row0.to(tl.int64) * N + m_range[:, None] * N + cols[None, :]
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def scaled_gmm(
    LHS, LS, RHS, RS, OFFSETS, TILE_STARTS, OUT,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    S_RE: tl.constexpr, S_RK: tl.constexpr, S_RN: tl.constexpr,
    S_RSE: tl.constexpr, S_RSK: tl.constexpr, S_RSN: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    _scaled_gmm_body(
        LHS, LS, RHS, RS, OFFSETS, TILE_STARTS, OUT, M, K, N, E, S_RE, S_RK, S_RN, S_RSE, S_RSK, S_RSN,
        NUM_PROGRAMS, BLOCK_M, BLOCK_N, GROUP_M, BLOCK_E,
    )  # fmt: skip


@triton.jit
def scaled_gmm_poisoned(
    LHS, LS, RHS, RS, OFFSETS, TILE_STARTS, OUT_FILL, OUT,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    S_RE: tl.constexpr, S_RK: tl.constexpr, S_RN: tl.constexpr,
    S_RSE: tl.constexpr, S_RSK: tl.constexpr, S_RSN: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr,
):  # fmt: skip
    _scaled_gmm_body(
        LHS, LS, RHS, RS, OFFSETS, TILE_STARTS, OUT, M, K, N, E, S_RE, S_RK, S_RN, S_RSE, S_RSK, S_RSN,
        NUM_PROGRAMS, BLOCK_M, BLOCK_N, GROUP_M, BLOCK_E,
    )  # fmt: skip
