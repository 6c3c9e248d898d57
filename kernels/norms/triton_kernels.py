"""Triton kernels for LayerNorm(+GELU), RMSNorm and residual-add + RMSNorm, forward and backward.

Layout: the input is a row-major [M, N] matrix, taken in tiles of BLOCK_M whole rows (BLOCK_N = next
power of two >= N, masked), so a row is read from memory once and its statistics come from registers.
All arithmetic is float32.

Every kernel runs on a persistent grid of G programs (a few per SM); program g takes row tiles g, g+G,
g+2G, ... At the top of each iteration it issues the loads of its next tile (masked off past the last
row), so they are in flight while this tile's reductions wait on their barriers and while its results
are stored: HBM does not idle between one tile's load and the next. With HOLD_PARAMS, scale/bias are
loaded once per program and held in registers (one register per element each); otherwise they are
re-read per tile (from L1), which leaves registers for more resident programs.

The backward kernels write dx for each tile and accumulate the program's share of the scale/bias
gradients in registers. At the end each program writes one row of a [G, N] float32 partial-sum
buffer; the caller sums the G rows (a small reduction), so no program waits for another.

Each kernel has a `*_poisoned` twin that takes one extra, already-filled buffer per output, aliased
to that output by the caller: tests fill them with NaN so that an element the kernel fails to write
shows up.
"""

import os

import triton
import triton.language as tl

# On the GPU, reciprocal and exp2 are single MUFU instructions (the .ftz approximations, ~2 ulp); the
# default lowerings add range checks worth several instructions an element. Triton's interpreter
# (CPU tests) cannot run inline PTX, so there the plain operators stand in.
_PTX = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"))

ACT_NONE = 0
ACT_GELU = 1  # exact: z * Phi(z) = 0.5 z (1 + erf(z / sqrt 2))
ACT_GELU_TANH = 2  # 0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) = z * sigmoid(2 u)

# Phi(z) = 1 - 0.5 erfc(|z| / sqrt 2) for z >= 0 (mirror for z < 0), with Abramowitz & Stegun 7.1.26:
# erfc(x) = t (a1 + t (a2 + t (a3 + t (a4 + t a5)))) exp(-x^2), t = 1 / (1 + p x), |error| < 1.5e-7.
# One reciprocal and one exp2 per element, and exp(-z^2/2) comes for free for GELU's derivative; the
# libdevice erf costs about twice the instructions, which made the kernels arithmetic-bound.
_AS_P = tl.constexpr(0.3275911 * 0.7071067811865476)  # p / sqrt 2: t = 1 / (1 + _AS_P |z|)
_AS_A1 = tl.constexpr(0.5 * 0.254829592)  # coefficients halved: the polynomial gives 0.5 erfc
_AS_A2 = tl.constexpr(0.5 * -0.284496736)
_AS_A3 = tl.constexpr(0.5 * 1.421413741)
_AS_A4 = tl.constexpr(0.5 * -1.453152027)
_AS_A5 = tl.constexpr(0.5 * 1.061405429)
_NEG_HALF_LOG2E = tl.constexpr(-0.5 * 1.4426950408889634)  # exp(-z^2/2) = exp2(z^2 * this)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_TANH_CUBIC = tl.constexpr(0.044715)
_NEG_2LOG2E_SQRT_2_OVER_PI = tl.constexpr(-2.0 * 1.4426950408889634 * 0.7978845608028654)


# tl.sum, tl.zeros and tl.cdiv are @triton.jit library functions, fixed as compiled or interpreted when
# triton is first imported; the interpreted copy of this module (CPU tests) cannot call them once triton
# has been imported for the GPU. So sums call tl.reduce with tl.sum's own combiner (same code on the GPU;
# the interpreter recognises it and sums with numpy), zeros are tl.full, tile counts integer division.
_SUM = tl.standard._sum_combine


@triton.jit
def _rcp(x):
    if _PTX:
        out = tl.inline_asm_elementwise(
            "rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        out = 1.0 / x
    return out


@triton.jit
def _exp2(x):
    if _PTX:
        out = tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        out = tl.exp2(x)
    return out


@triton.jit
def _normal_cdf_and_gauss(z):
    """(Phi(z), exp(-z^2 / 2)) in float32."""
    t = _rcp(tl.abs(z) * _AS_P + 1.0)
    half_erfc = t * (_AS_A1 + t * (_AS_A2 + t * (_AS_A3 + t * (_AS_A4 + t * _AS_A5))))
    gauss = _exp2(z * z * _NEG_HALF_LOG2E)
    tail = half_erfc * gauss  # Phi(-|z|)
    return tl.where(z >= 0.0, 1.0 - tail, tail), gauss


@triton.jit
def _sigmoid_2u(z):
    """sigmoid(2 u), u = sqrt(2/pi) (z + 0.044715 z^3): 0.5 (1 + tanh u)."""
    return _rcp(_exp2((z * z * _TANH_CUBIC + 1.0) * z * _NEG_2LOG2E_SQRT_2_OVER_PI) + 1.0)


@triton.jit
def _activation(z, ACT: tl.constexpr):
    if ACT == 1:
        cdf, _ = _normal_cdf_and_gauss(z)
        out = z * cdf
    elif ACT == 2:
        out = z * _sigmoid_2u(z)
    else:
        out = z
    return out


@triton.jit
def _activation_grad(z, ACT: tl.constexpr):
    """d activation / dz (only called with ACT != 0)."""
    if ACT == 1:
        cdf, gauss = _normal_cdf_and_gauss(z)
        grad = z * gauss * _INV_SQRT_2PI + cdf
    else:
        s = _sigmoid_2u(z)
        du = (z * z * (3.0 * 0.044715) + 1.0) * _SQRT_2_OVER_PI
        grad = s + 2.0 * z * s * (1.0 - s) * du
    return grad


# ----------------------------------------------------------------------------------------------------
# Row tiles
#
# Pairs of sums over a row (LayerNorm's one-pass statistics; c1, c2 of its backward) are one reduction
# of the two joined along a trailing axis of 2 (tl.join): the partial pairs cross warps through one
# shared-memory exchange behind one barrier. (A tl.reduce over a tuple compiles to one exchange and
# barrier per operand; seen in the PTX.)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _tile(tile_id, M, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tile_id * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    row_ok = rows < M
    mask = row_ok[:, None] & (cols < N)[None, :]
    offsets = rows.to(tl.int64)[:, None] * N + cols[None, :]
    return rows, row_ok, mask, offsets


@triton.jit
def _row_sums(a, b):
    """(sum of a, sum of b) over axis 1, as one reduction of the joined pairs."""
    sums = tl.reduce(tl.join(a, b), 1, _SUM)
    return tl.split(sums)


@triton.jit
def _load_tile(PTR, tile_id, M, N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The tile in its stored dtype (half the registers of float32 while it waits); zeros past the end."""
    _, _, mask, offsets = _tile(tile_id, M, N, BLOCK_M, BLOCK_N)
    return tl.load(PTR + offsets, mask=mask, other=0.0)


@triton.jit
def _load_rows(PTR, tile_id, M, BLOCK_M: tl.constexpr, STRIDE: tl.constexpr):
    """PTR[row * STRIDE] for the tile's rows: per-row statistics (STRIDE 1), or each row's first element."""
    rows = tile_id * BLOCK_M + tl.arange(0, BLOCK_M)
    return tl.load(PTR + rows.to(tl.int64) * STRIDE, mask=rows < M, other=0.0)


# ----------------------------------------------------------------------------------------------------
# LayerNorm (+ activation)
#
# Statistics with ONE_PASS take one reduction: sums of d = x - s and d^2, with s = x[row, 0] loaded
# beside the row, so mean = s + sum(d) / N and var = sum(d^2) / N - (sum(d) / N)^2. The shift keeps
# rows with a large mean exact (d is small). The cancellation in var is bounded because
# (x[row, 0] - mean)^2 <= N var: it amplifies the float32 rounding of sum(d^2) (a few 2^-24) at most
# ~N times, so the variance is off by <~1e-3 relative at N = 8192 in the worst case (all of a row's
# spread in its first element), below bf16's rounding (2^-9) but far above fp32's: the launcher picks
# ONE_PASS for 16-bit inputs only. Without it, two reductions over registers: the mean, then the
# centred second moment, which stays accurate for rows with a large mean and a small spread.
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _layer_norm_fwd_body(
    X, W, B, M, Y, MEAN, RSTD,
    N: tl.constexpr, EPS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HOLD_PARAMS: tl.constexpr, ONE_PASS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HOLD_PARAMS:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    num_tiles = (M + BLOCK_M - 1) // BLOCK_M
    x_next = _load_tile(X, pid, M, N, BLOCK_M, BLOCK_N)
    if ONE_PASS:
        s_next = _load_rows(X, pid, M, BLOCK_M, N)
    for tile_id in range(pid, num_tiles, num_programs):
        x = x_next.to(tl.float32)
        x_next = _load_tile(X, tile_id + num_programs, M, N, BLOCK_M, BLOCK_N)
        rows, row_ok, mask, offsets = _tile(tile_id, M, N, BLOCK_M, BLOCK_N)
        if ONE_PASS:
            s = s_next.to(tl.float32)
            s_next = _load_rows(X, tile_id + num_programs, M, BLOCK_M, N)
            d = x - s[:, None]
            if N != BLOCK_N:  # padded columns hold 0 - s
                d = tl.where(mask, d, 0.0)
            sum_d, sum_dd = _row_sums(d, d * d)
            shift = sum_d / N  # mean - s
            var = tl.maximum(sum_dd / N - shift * shift, 0.0)
            mean = s + shift
            xc = d - shift[:, None]
        else:
            mean = tl.reduce(x, 1, _SUM) / N
            xc = x - mean[:, None]
            if N != BLOCK_N:
                xc = tl.where(mask, xc, 0.0)
            var = tl.reduce(xc * xc, 1, _SUM) / N
        rstd = 1.0 / tl.sqrt(var + EPS)
        if not HOLD_PARAMS:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = _activation(xc * rstd[:, None] * w[None, :] + b[None, :], ACT)
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=row_ok)
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def layer_norm_fwd(
    X, W, B, M, Y, MEAN, RSTD,
    N: tl.constexpr, EPS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HOLD_PARAMS: tl.constexpr, ONE_PASS: tl.constexpr,
):  # fmt: skip
    _layer_norm_fwd_body(X, W, B, M, Y, MEAN, RSTD, N, EPS, ACT, BLOCK_M, BLOCK_N, HOLD_PARAMS, ONE_PASS)


@triton.jit
def layer_norm_fwd_poisoned(
    X, W, B, M, Y_FILL, MEAN_FILL, RSTD_FILL, Y, MEAN, RSTD,
    N: tl.constexpr, EPS: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HOLD_PARAMS: tl.constexpr, ONE_PASS: tl.constexpr,
):  # fmt: skip
    _layer_norm_fwd_body(X, W, B, M, Y, MEAN, RSTD, N, EPS, ACT, BLOCK_M, BLOCK_N, HOLD_PARAMS, ONE_PASS)


@triton.jit
def _layer_norm_bwd_body(
    X, W, B, DY, MEAN, RSTD, M, DX, DW, DB,
    N: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HOLD_PARAMS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HOLD_PARAMS:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        if ACT != 0:
            b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_dw = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    acc_db = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    num_tiles = (M + BLOCK_M - 1) // BLOCK_M
    x_next = _load_tile(X, pid, M, N, BLOCK_M, BLOCK_N)
    dy_next = _load_tile(DY, pid, M, N, BLOCK_M, BLOCK_N)
    mean_next = _load_rows(MEAN, pid, M, BLOCK_M, 1)
    rstd_next = _load_rows(RSTD, pid, M, BLOCK_M, 1)
    for tile_id in range(pid, num_tiles, num_programs):
        x = x_next.to(tl.float32)
        dy = dy_next.to(tl.float32)
        mean = mean_next
        rstd = rstd_next
        next_id = tile_id + num_programs
        x_next = _load_tile(X, next_id, M, N, BLOCK_M, BLOCK_N)
        dy_next = _load_tile(DY, next_id, M, N, BLOCK_M, BLOCK_N)
        mean_next = _load_rows(MEAN, next_id, M, BLOCK_M, 1)
        rstd_next = _load_rows(RSTD, next_id, M, BLOCK_M, 1)
        _, _, mask, offsets = _tile(tile_id, M, N, BLOCK_M, BLOCK_N)
        if not HOLD_PARAMS:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
            if ACT != 0:
                b = tl.load(B + cols, mask=col_ok, other=0.0).to(tl.float32)
        xhat = (x - mean[:, None]) * rstd[:, None]
        if N != BLOCK_N:
            xhat = tl.where(mask, xhat, 0.0)
        if ACT != 0:
            dz = dy * _activation_grad(xhat * w[None, :] + b[None, :], ACT)
        else:
            dz = dy
        acc_dw += dz * xhat
        acc_db += dz
        dxhat = dz * w[None, :]
        sum_dxhat, sum_dxhat_xhat = _row_sums(dxhat, dxhat * xhat)
        c1 = sum_dxhat / N
        c2 = sum_dxhat_xhat / N
        dx = (dxhat - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * N + cols, tl.reduce(acc_dw, 0, _SUM), mask=col_ok)
    tl.store(DB + pid * N + cols, tl.reduce(acc_db, 0, _SUM), mask=col_ok)


@triton.jit
def layer_norm_bwd(
    X, W, B, DY, MEAN, RSTD, M, DX, DW, DB,
    N: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HOLD_PARAMS: tl.constexpr,
):  # fmt: skip
    _layer_norm_bwd_body(X, W, B, DY, MEAN, RSTD, M, DX, DW, DB, N, ACT, BLOCK_M, BLOCK_N, HOLD_PARAMS)


@triton.jit
def layer_norm_bwd_poisoned(
    X, W, B, DY, MEAN, RSTD, M, DX_FILL, DW_FILL, DB_FILL, DX, DW, DB,
    N: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HOLD_PARAMS: tl.constexpr,
):  # fmt: skip
    _layer_norm_bwd_body(X, W, B, DY, MEAN, RSTD, M, DX, DW, DB, N, ACT, BLOCK_M, BLOCK_N, HOLD_PARAMS)


# ----------------------------------------------------------------------------------------------------
# RMSNorm, optionally after a residual add (h = x + r, stored, then normalised)
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_body(
    X, R, W, M, Y, H, RSTD,
    N: tl.constexpr, EPS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HOLD_PARAMS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HOLD_PARAMS:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    num_tiles = (M + BLOCK_M - 1) // BLOCK_M
    x_next = _load_tile(X, pid, M, N, BLOCK_M, BLOCK_N)
    if HAS_RESIDUAL:
        r_next = _load_tile(R, pid, M, N, BLOCK_M, BLOCK_N)
    for tile_id in range(pid, num_tiles, num_programs):
        x = x_next.to(tl.float32)
        x_next = _load_tile(X, tile_id + num_programs, M, N, BLOCK_M, BLOCK_N)
        rows, row_ok, mask, offsets = _tile(tile_id, M, N, BLOCK_M, BLOCK_N)
        if HAS_RESIDUAL:
            r = r_next.to(tl.float32)
            r_next = _load_tile(R, tile_id + num_programs, M, N, BLOCK_M, BLOCK_N)
            h = (x + r).to(H.dtype.element_ty)
            tl.store(H + offsets, h, mask=mask)
            x = h.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.reduce(x * x, 1, _SUM) / N + EPS)
        if not HOLD_PARAMS:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = x * rstd[:, None] * w[None, :]
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(RSTD + rows, rstd, mask=row_ok)


@triton.jit
def rms_norm_fwd(
    X, R, W, M, Y, H, RSTD,
    N: tl.constexpr, EPS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HOLD_PARAMS: tl.constexpr,
):  # fmt: skip
    _rms_norm_fwd_body(X, R, W, M, Y, H, RSTD, N, EPS, HAS_RESIDUAL, BLOCK_M, BLOCK_N, HOLD_PARAMS)


@triton.jit
def rms_norm_fwd_poisoned(
    X, R, W, M, Y_FILL, H_FILL, RSTD_FILL, Y, H, RSTD,
    N: tl.constexpr, EPS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, HOLD_PARAMS: tl.constexpr,
):  # fmt: skip
    _rms_norm_fwd_body(X, R, W, M, Y, H, RSTD, N, EPS, HAS_RESIDUAL, BLOCK_M, BLOCK_N, HOLD_PARAMS)


@triton.jit
def _rms_norm_bwd_body(
    X, W, DY, DRES, RSTD, M, DX, DW,
    N: tl.constexpr, HAS_DRES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HOLD_PARAMS: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < N
    if HOLD_PARAMS:
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
    acc_dw = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    num_tiles = (M + BLOCK_M - 1) // BLOCK_M
    x_next = _load_tile(X, pid, M, N, BLOCK_M, BLOCK_N)
    dy_next = _load_tile(DY, pid, M, N, BLOCK_M, BLOCK_N)
    rstd_next = _load_rows(RSTD, pid, M, BLOCK_M, 1)
    if HAS_DRES:
        dres_next = _load_tile(DRES, pid, M, N, BLOCK_M, BLOCK_N)
    for tile_id in range(pid, num_tiles, num_programs):
        x = x_next.to(tl.float32)
        dy = dy_next.to(tl.float32)
        rstd = rstd_next
        next_id = tile_id + num_programs
        x_next = _load_tile(X, next_id, M, N, BLOCK_M, BLOCK_N)
        dy_next = _load_tile(DY, next_id, M, N, BLOCK_M, BLOCK_N)
        rstd_next = _load_rows(RSTD, next_id, M, BLOCK_M, 1)
        if HAS_DRES:
            dres = dres_next.to(tl.float32)
            dres_next = _load_tile(DRES, next_id, M, N, BLOCK_M, BLOCK_N)
        _, _, mask, offsets = _tile(tile_id, M, N, BLOCK_M, BLOCK_N)
        if not HOLD_PARAMS:
            w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        xhat = x * rstd[:, None]
        acc_dw += dy * xhat
        dxhat = dy * w[None, :]
        c2 = tl.reduce(dxhat * xhat, 1, _SUM) / N
        dx = (dxhat - xhat * c2[:, None]) * rstd[:, None]
        if HAS_DRES:
            dx += dres
        tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
    tl.store(DW + pid * N + cols, tl.reduce(acc_dw, 0, _SUM), mask=col_ok)


@triton.jit
def rms_norm_bwd(
    X, W, DY, DRES, RSTD, M, DX, DW,
    N: tl.constexpr, HAS_DRES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HOLD_PARAMS: tl.constexpr,
):  # fmt: skip
    _rms_norm_bwd_body(X, W, DY, DRES, RSTD, M, DX, DW, N, HAS_DRES, BLOCK_M, BLOCK_N, HOLD_PARAMS)


@triton.jit
def rms_norm_bwd_poisoned(
    X, W, DY, DRES, RSTD, M, DX_FILL, DW_FILL, DX, DW,
    N: tl.constexpr, HAS_DRES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HOLD_PARAMS: tl.constexpr,
):  # fmt: skip
    _rms_norm_bwd_body(X, W, DY, DRES, RSTD, M, DX, DW, N, HAS_DRES, BLOCK_M, BLOCK_N, HOLD_PARAMS)
