"""Triton kernels for dense x block-sparse matmul: the product (also the input gradient) and the block gradient.

`bsmm`: out[M, NB * BS] = A[M, KB * BS] @ B, B block-sparse with BS x BS blocks. Block column j of B holds the
entries OFFSETS[j] .. OFFSETS[j + 1] - 1 of a list of present blocks; entry e lies in block row IDX[e], its
values at VALUES[POS[e]] (VALUES[e] when DIRECT) read through strides (STRIDE_VK along the reduction, STRIDE_VN
along the output columns). So the same kernel computes dA = dOut @ B^T from B's by-row index set with the
strides of a block swapped: nothing is copied. One program per output tile BLOCK_M x BS (row tile, block
column); it loops over the present blocks of its column only, BS / BLOCK_K steps per block, flattened into one
loop so that Triton pipelines the loads across blocks (num_stages). An empty block column runs no iterations and
stores zeros. Tiles are visited in bands of GROUP_M row tiles (block columns inner) so that programs running
together share A's row tiles in L2.

`bsmm_dvalues`: dVALUES[p] = A[:, rows of block p]^T @ dOUT[:, columns of block p], a BS x BS tile per present
block, reducing over M in steps of BLOCK_M (the product sampled at the present blocks). One program per block;
programs are ordered like the blocks (by block column), so neighbours share dOut's column block in L2.

Every kernel has a `*_poisoned` twin taking one extra, pre-filled buffer per output, aliased to that output by
the caller: tests fill it with NaN so that an element the kernel fails to write shows.
"""

import os

import triton
import triton.language as tl

# Triton's interpreter multiplies bfloat16 tiles as their raw 16-bit integers; there (CPU tests only) operands
# are widened to float32 first, which gives the products a bf16 MMA with float32 accumulation gives.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True"))

# No tl.sum / tl.zeros / tl.cdiv here: those @triton.jit library functions are fixed as compiled or interpreted
# when triton is first imported, so the interpreted copy of this module (CPU tests) cannot call them once triton
# has been imported for the GPU. Zeros are tl.full, tile counts integer division.


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
# Product (and input gradient): out[M, NB * BS] = A @ B
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _bsmm_body(
    A, VALUES, OFFSETS, IDX, POS, OUT,
    M: tl.constexpr, NB: tl.constexpr, BS: tl.constexpr,
    STRIDE_AM: tl.constexpr, STRIDE_AK: tl.constexpr,
    STRIDE_VP: tl.constexpr, STRIDE_VK: tl.constexpr, STRIDE_VN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    M_TILES: tl.constexpr = (M + BLOCK_M - 1) // BLOCK_M
    STEPS: tl.constexpr = BS // BLOCK_K  # reduction steps per block
    EVEN_M: tl.constexpr = M % BLOCK_M == 0
    N_OUT: tl.constexpr = NB * BS
    # Bands of GROUP_M row tiles, block columns inner.
    pid = tl.program_id(0)
    band_items = GROUP_M * NB
    band = pid // band_items
    first_m = band * GROUP_M
    band_height = tl.minimum(M_TILES - first_m, GROUP_M)
    in_band = pid - band * band_items
    tile_m = first_m + in_band % band_height
    col = in_band // band_height

    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    k_range = tl.arange(0, BLOCK_K)
    n_range = tl.arange(0, BS)
    a_rows = A + rows.to(tl.int64)[:, None] * STRIDE_AM + k_range[None, :] * STRIDE_AK
    v_tile = k_range[:, None] * STRIDE_VK + n_range[None, :] * STRIDE_VN
    first = tl.load(OFFSETS + col)
    last = tl.load(OFFSETS + col + 1)
    end = last * STEPS
    # The index of the next step is loaded one step ahead: Triton's pipeliner then gives the tile loads all
    # num_stages buffers (addresses fed by a load in the same iteration only get about half of them).
    block_row = tl.load(IDX + first, mask=first < last, other=0)
    if DIRECT:  # blocks stored in the order of the list (the product itself)
        pos = first
    else:
        pos = tl.load(POS + first, mask=first < last, other=0)
    acc = tl.full([BLOCK_M, BS], 0.0, tl.float32)
    for step in tl.range(first * STEPS, end):
        entry = step // STEPS
        k0 = (step - entry * STEPS) * BLOCK_K  # offset inside the block
        a_ptrs = a_rows + (block_row * BS + k0) * STRIDE_AK
        v_ptrs = VALUES + pos.to(tl.int64) * STRIDE_VP + k0 * STRIDE_VK + v_tile
        if EVEN_M:
            a = tl.load(a_ptrs)
        else:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        acc = _mma(a, tl.load(v_ptrs), acc, IEEE)
        next_entry = (step + 1) // STEPS
        has_next = step + 1 < end
        block_row = tl.load(IDX + next_entry, mask=has_next, other=0)
        if DIRECT:
            pos = next_entry
        else:
            pos = tl.load(POS + next_entry, mask=has_next, other=0)
    out_ptrs = OUT + rows.to(tl.int64)[:, None] * N_OUT + col * BS + n_range[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def bsmm(
    A, VALUES, OFFSETS, IDX, POS, OUT,
    M: tl.constexpr, NB: tl.constexpr, BS: tl.constexpr,
    STRIDE_AM: tl.constexpr, STRIDE_AK: tl.constexpr,
    STRIDE_VP: tl.constexpr, STRIDE_VK: tl.constexpr, STRIDE_VN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _bsmm_body(
        A, VALUES, OFFSETS, IDX, POS, OUT, M, NB, BS, STRIDE_AM, STRIDE_AK, STRIDE_VP, STRIDE_VK, STRIDE_VN,
        BLOCK_M, BLOCK_K, GROUP_M, DIRECT, IEEE,
    )  # fmt: skip


@triton.jit
def bsmm_poisoned(
    A, VALUES, OFFSETS, IDX, POS, OUT_FILL, OUT,
    M: tl.constexpr, NB: tl.constexpr, BS: tl.constexpr,
    STRIDE_AM: tl.constexpr, STRIDE_AK: tl.constexpr,
    STRIDE_VP: tl.constexpr, STRIDE_VK: tl.constexpr, STRIDE_VN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _bsmm_body(
        A, VALUES, OFFSETS, IDX, POS, OUT, M, NB, BS, STRIDE_AM, STRIDE_AK, STRIDE_VP, STRIDE_VK, STRIDE_VN,
        BLOCK_M, BLOCK_K, GROUP_M, DIRECT, IEEE,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Block gradient: dvalues[p] = A[:, block row of p]^T @ dout[:, block column of p], [nnz, BS, BS]
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _bsmm_dvalues_body(
    A, DOUT, ROWS, COLS, DVALUES,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    EVEN_M: tl.constexpr = M % BLOCK_M == 0
    p = tl.program_id(0)
    block_row = tl.load(ROWS + p)
    block_col = tl.load(COLS + p)
    i_range = tl.arange(0, BS)
    r_range = tl.arange(0, BLOCK_M)
    # A^T tile [BS, BLOCK_M]: element (i, r) at A[r, block_row * BS + i]; dOut tile [BLOCK_M, BS].
    a_ptrs = A + (block_row * BS + i_range)[:, None] + r_range[None, :].to(tl.int64) * K
    d_ptrs = DOUT + (block_col * BS + i_range)[None, :] + r_range[:, None].to(tl.int64) * N
    acc = tl.full([BS, BS], 0.0, tl.float32)
    for r0 in tl.range(0, M, BLOCK_M):
        if EVEN_M:
            a = tl.load(a_ptrs)
            d = tl.load(d_ptrs)
        else:
            r_ok = r_range < M - r0
            a = tl.load(a_ptrs, mask=r_ok[None, :], other=0.0)
            d = tl.load(d_ptrs, mask=r_ok[:, None], other=0.0)
        acc = _mma(a, d, acc, IEEE)
        a_ptrs += BLOCK_M * K
        d_ptrs += BLOCK_M * N
    out_ptrs = DVALUES + p.to(tl.int64) * (BS * BS) + i_range[:, None] * BS + i_range[None, :]
    tl.store(out_ptrs, acc.to(DVALUES.dtype.element_ty))


@triton.jit
def bsmm_dvalues(
    A, DOUT, ROWS, COLS, DVALUES,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _bsmm_dvalues_body(A, DOUT, ROWS, COLS, DVALUES, M, K, N, BS, BLOCK_M, IEEE)


@triton.jit
def bsmm_dvalues_poisoned(
    A, DOUT, ROWS, COLS, DVALUES_FILL, DVALUES,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, BS: tl.constexpr,
    BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _bsmm_dvalues_body(A, DOUT, ROWS, COLS, DVALUES, M, K, N, BS, BLOCK_M, IEEE)
