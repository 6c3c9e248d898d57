"""Triton kernels for the grouped matmul (MoE expert layers): a persistent forward and a transposed backward.

Rows of the left operand are sorted by group; group g owns rows [offsets[g], offsets[g + 1]). The caller
appends the padding rows [sum(group_sizes), M) as one more group, number E, whose tiles are written as zeros.

`gmm_fwd`: out[M, N] = lhs[M, K] @ rhs[g(row)] for rhs [E, K, N] read through strides, so the same kernel
computes the input gradient dout @ rhs[g]^T (K and N swap, and so do rhs's strides; nothing is copied).
Work items are (group, row tile, column tile). Row tiles start at each group's first row (not on a global
BLOCK_M grid), so a tile never mixes groups; TILE_STARTS[g] is the number of row tiles before group g
(prefix sums over E + 1 groups, padding included). A fixed grid of NUM_PROGRAMS programs (about one per SM)
walks the items round-robin; each program finds an item's group by counting the groups that start at or
before it (the prefix sums held in registers), so a skewed split of the rows still keeps every program busy.

`gmm_drhs`: drhs[g] = lhs_g^T @ dout_g for every group: items are (group, K tile, N tile), each reducing over
the group's rows; an empty group runs no iterations and writes zeros.

Inside a group, tiles are visited in bands of GROUP_M tiles along the first dimension (column tiles inner),
so programs running at the same time share operand tiles in L2.

Every kernel has a `*_poisoned` twin taking one extra, pre-filled buffer per output, aliased to that output by
the caller: tests fill it with NaN so that an element the kernel fails to write shows.
"""

import os

import triton
import triton.language as tl

# Triton's interpreter multiplies bfloat16 tiles as their raw 16-bit integers; there (CPU tests only) operands
# are widened to float32 first, which gives the products a bf16 MMA with float32 accumulation gives.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True"))

# tl.sum, tl.zeros and tl.cdiv are @triton.jit library functions, fixed as compiled or interpreted when triton
# is first imported; the interpreted copy of this module (CPU tests) cannot call them once triton has been
# imported for the GPU. So sums call tl.reduce with tl.sum's own combiner, zeros are tl.full, and tile counts
# are integer division.
_SUM = tl.standard._sum_combine


@triton.jit
def _band_order(local, tiles_a, TILES_B: tl.constexpr, GROUP_M: tl.constexpr):
    """Item `local` of a tiles_a x TILES_B grid -> (tile_a, tile_b), in bands of GROUP_M along a."""
    band_items = GROUP_M * TILES_B
    band = local // band_items
    first_a = band * GROUP_M
    band_height = tl.minimum(tiles_a - first_a, GROUP_M)
    in_band = local - band * band_items
    return first_a + in_band % band_height, in_band // band_height


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if _INTERPRETED:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:  # float32 operands at full precision (the default would round them to tf32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


# ----------------------------------------------------------------------------------------------------
# Forward (and input gradient): out[M, N] = lhs[M, K] @ rhs[g]
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _gmm_fwd_body(
    LHS, RHS, OFFSETS, TILE_STARTS, OUT,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    STRIDE_LM: tl.constexpr, STRIDE_LK: tl.constexpr,
    STRIDE_RE: tl.constexpr, STRIDE_RK: tl.constexpr, STRIDE_RN: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    N_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    K_TILES: tl.constexpr = (K + BLOCK_K - 1) // BLOCK_K
    EVEN_K: tl.constexpr = K % BLOCK_K == 0
    # Prefix sums of row tiles for groups 0..E (E: padding), scaled to work items; kept in registers.
    e_idx = tl.arange(0, BLOCK_E)
    e_ok = e_idx <= E
    item_starts = tl.load(TILE_STARTS + e_idx, mask=e_ok, other=0) * N_TILES
    num_items = tl.load(TILE_STARTS + E + 1) * N_TILES
    m_range = tl.arange(0, BLOCK_M)
    n_range = tl.arange(0, BLOCK_N)
    k_range = tl.arange(0, BLOCK_K)
    for item in tl.range(tl.program_id(0), num_items, NUM_PROGRAMS):
        group = tl.reduce(((item_starts <= item) & e_ok).to(tl.int32), 0, _SUM) - 1
        first_tile = tl.load(TILE_STARTS + group)
        group_tiles = tl.load(TILE_STARTS + group + 1) - first_tile
        tile_m, tile_n = _band_order(item - first_tile * N_TILES, group_tiles, N_TILES, GROUP_M)
        row0 = tl.load(OFFSETS + group) + tile_m * BLOCK_M
        rows_left = tl.load(OFFSETS + group + 1) - row0  # rows of this group from row0 on (> 0)
        row_ok = m_range < rows_left
        cols = tile_n * BLOCK_N + n_range
        col_ok = cols < N
        is_expert = group < E
        k_iters = tl.where(is_expert, K_TILES, 0)  # padding rows: no reduction, the tile stays zero
        expert = tl.where(is_expert, group, 0)
        a_ptrs = LHS + row0.to(tl.int64) * STRIDE_LM + m_range[:, None] * STRIDE_LM + k_range[None, :] * STRIDE_LK
        b_ptrs = RHS + expert.to(tl.int64) * STRIDE_RE + k_range[:, None] * STRIDE_RK + cols[None, :] * STRIDE_RN
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for k_tile in range(0, k_iters):
            if EVEN_K:
                a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                b = tl.load(b_ptrs, mask=col_ok[None, :], other=0.0)
            else:
                k_ok = k_range < K - k_tile * BLOCK_K
                a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, IEEE)
            a_ptrs += BLOCK_K * STRIDE_LK
            b_ptrs += BLOCK_K * STRIDE_RK
        out_ptrs = OUT + row0.to(tl.int64) * N + m_range[:, None] * N + cols[None, :]
        tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def gmm_fwd(
    LHS, RHS, OFFSETS, TILE_STARTS, OUT,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    STRIDE_LM: tl.constexpr, STRIDE_LK: tl.constexpr,
    STRIDE_RE: tl.constexpr, STRIDE_RK: tl.constexpr, STRIDE_RN: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _gmm_fwd_body(
        LHS, RHS, OFFSETS, TILE_STARTS, OUT, M, K, N, E, STRIDE_LM, STRIDE_LK, STRIDE_RE, STRIDE_RK, STRIDE_RN,
        NUM_PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, BLOCK_E, IEEE,
    )  # fmt: skip


@triton.jit
def gmm_fwd_poisoned(
    LHS, RHS, OFFSETS, TILE_STARTS, OUT_FILL, OUT,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    STRIDE_LM: tl.constexpr, STRIDE_LK: tl.constexpr,
    STRIDE_RE: tl.constexpr, STRIDE_RK: tl.constexpr, STRIDE_RN: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _gmm_fwd_body(
        LHS, RHS, OFFSETS, TILE_STARTS, OUT, M, K, N, E, STRIDE_LM, STRIDE_LK, STRIDE_RE, STRIDE_RK, STRIDE_RN,
        NUM_PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, BLOCK_E, IEEE,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Weight gradient: drhs[g] = lhs_g^T @ dout_g, [E, K, N]
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _gmm_drhs_body(
    LHS, DOUT, OFFSETS, DRHS,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    # Here BLOCK_M tiles K (rows of drhs[g]), BLOCK_N tiles N, and BLOCK_K steps through the group's rows.
    KM_TILES: tl.constexpr = (K + BLOCK_M - 1) // BLOCK_M
    N_TILES: tl.constexpr = (N + BLOCK_N - 1) // BLOCK_N
    PER_GROUP: tl.constexpr = KM_TILES * N_TILES
    m_range = tl.arange(0, BLOCK_M)
    n_range = tl.arange(0, BLOCK_N)
    r_range = tl.arange(0, BLOCK_K)
    for item in tl.range(tl.program_id(0), E * PER_GROUP, NUM_PROGRAMS):
        group = item // PER_GROUP
        tile_m, tile_n = _band_order(item - group * PER_GROUP, KM_TILES, N_TILES, GROUP_M)
        row_start = tl.load(OFFSETS + group)
        row_end = tl.load(OFFSETS + group + 1)
        ks = tile_m * BLOCK_M + m_range
        cols = tile_n * BLOCK_N + n_range
        k_ok = ks < K
        col_ok = cols < N
        # lhs_g^T tile [BLOCK_M, BLOCK_K]: element (k, r) at lhs[row_start + r, k]
        a_ptrs = LHS + row_start.to(tl.int64) * K + r_range[None, :] * K + ks[:, None]
        b_ptrs = DOUT + row_start.to(tl.int64) * N + r_range[:, None] * N + cols[None, :]
        acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
        for r0 in range(0, row_end - row_start, BLOCK_K):
            r_ok = r_range < row_end - row_start - r0
            a = tl.load(a_ptrs, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=r_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _mma(a, b, acc, IEEE)
            a_ptrs += BLOCK_K * K
            b_ptrs += BLOCK_K * N
        out_ptrs = DRHS + group.to(tl.int64) * (K * N) + ks[:, None] * N + cols[None, :]
        tl.store(out_ptrs, acc.to(DRHS.dtype.element_ty), mask=k_ok[:, None] & col_ok[None, :])


@triton.jit
def gmm_drhs(
    LHS, DOUT, OFFSETS, DRHS,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _gmm_drhs_body(LHS, DOUT, OFFSETS, DRHS, M, K, N, E, NUM_PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, IEEE)


@triton.jit
def gmm_drhs_poisoned(
    LHS, DOUT, OFFSETS, DRHS_FILL, DRHS,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, E: tl.constexpr,
    NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _gmm_drhs_body(LHS, DOUT, OFFSETS, DRHS, M, K, N, E, NUM_PROGRAMS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, IEEE)
