"""Triton kernel for a matmul of a few rows against a large weight (the projections of batch-1 decode).

out[M, N] = x[M, K] @ w[K, N] with M small (at most 64; one program holds every row) and w row-major (N
contiguous). The work is reading w once, so the kernel is split over K as well as N: the grid is
(N tiles, SPLIT_K); program (j, s) reads the [K_PER_SPLIT, BLOCK_N] slab of w at K offset s * K_PER_SPLIT and
columns j * BLOCK_N.., in [BLOCK_K, BLOCK_N] tiles (rows of BLOCK_N contiguous elements: coalesced), and the
matching [BLOCK_M, BLOCK_K] tiles of x (rows past M masked to zero). Products accumulate in float32 with `tl.dot`
(tensor cores for 16-bit operands, full IEEE precision for float32) and the program writes its partial sum,
OUT[s, :M, j * BLOCK_N..], with OUT [SPLIT_K, M, N]. The caller sums the SPLIT_K partials (float32, in a fixed
order: deterministic, no atomics); with SPLIT_K = 1 OUT may have x's dtype and is the result itself.

`tl.dot` rather than a broadcast multiply and a reduction over K: with up to 16 rows the broadcast product is a
[BLOCK_M, BLOCK_K, BLOCK_N] tensor held in registers, which spills at the tile sizes that keep enough of w in
flight, while `tl.dot` stages the w tiles through shared memory with asynchronous copies (software-pipelined over
`num_stages`) and multiplies them on the tensor cores, whose spare throughput covers the padded rows.

Every shape and block size is a compile-time constant. K_PER_SPLIT is a multiple of BLOCK_K; the last split stops
at K (fewer steps), and only when K is not a multiple of K_PER_SPLIT are the K masks applied. The loop bound is
computed at run time on purpose: see `_skinny_body`.

The kernel has a `*_poisoned` twin taking one extra, pre-filled buffer aliased to OUT by the caller: tests fill
it with NaN so that an element the kernel fails to write shows.
"""

import os

import triton
import triton.language as tl

# Triton's interpreter multiplies bfloat16 tiles as their raw 16-bit integers; there (CPU tests only) operands
# are widened to float32 first, which gives the products a bf16 MMA with float32 accumulation gives.
_INTERPRETED = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True"))

# tl.sum, tl.zeros and tl.cdiv are @triton.jit library functions, fixed as compiled or interpreted when triton is
# first imported; the interpreted copy of this module (CPU tests) cannot call them once triton has been imported
# for the GPU. So zeros are tl.full and tile counts are integer division (see kernels/norms/triton_kernels.py).


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if _INTERPRETED:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:  # float32 operands at full precision (the default would round them to tf32)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _skinny_body(
    X, W, OUT,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    EVEN_K: tl.constexpr = K % K_PER_SPLIT == 0  # every split is whole: no K mask
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < M
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    k_range = tl.arange(0, BLOCK_K)
    k0 = split * K_PER_SPLIT
    # A loop bound known only at run time: a loop of one step is not folded away, so its loads still go through
    # the pipeliner's asynchronous copies (with K_PER_SPLIT // BLOCK_K constant steps a one-step loop is unrolled
    # into plain loads, whose register round trip to shared memory keeps few of them in flight).
    k_end = tl.minimum(k0 + K_PER_SPLIT, K)
    x_ptrs = X + rows[:, None] * K + (k0 + k_range)[None, :]
    w_ptrs = W + (k0 + k_range).to(tl.int64)[:, None] * N + cols[None, :]
    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k in range(k0, k_end, BLOCK_K):
        if EVEN_K:
            a = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        else:
            k_ok = k_range < K - k
            a = tl.load(x_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = _mma(a, b, acc, IEEE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * N
    out_ptrs = OUT + split.to(tl.int64) * (M * N) + rows[:, None] * N + cols[None, :]
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def skinny_matmul(
    X, W, OUT,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _skinny_body(X, W, OUT, M, K, N, K_PER_SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)


@triton.jit
def skinny_matmul_poisoned(
    X, W, OUT_FILL, OUT,
    M: tl.constexpr, K: tl.constexpr, N: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    _skinny_body(X, W, OUT, M, K, N, K_PER_SPLIT, BLOCK_M, BLOCK_N, BLOCK_K, IEEE)
