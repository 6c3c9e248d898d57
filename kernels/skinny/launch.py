"""Launching the skinny-matmul kernel: launch configuration and two runners.

- runner "triton": `jax_triton.triton_call` (GPU; traceable under jit).
- runner "interpret": Triton's interpreter on the host through `jax.pure_callback` (CPU; slow, for tests).
  It runs the same kernel source with the same arguments and launch parameters, and allocates the output
  filled with NaN, so an element the kernel does not write shows.

`skinny_partials` returns the kernel's output, [SPLIT_K, M, N] partial sums (float32; x's dtype when SPLIT_K is
1); `skinny_matmul` sums them over SPLIT_K in float32 (a small XLA reduction, fixed order: deterministic) and
casts to x's dtype.

Launch heuristic (`default_config`), from (M, K, N, itemsize, SMs); the kernel only has to keep enough of the
weight in flight to cover the memory latency on every SM:
- BLOCK_N = 128 columns (256 bytes of a 16-bit row: whole cache lines); 64 when M <= 16 and the N tiles times
  the allowed splits give fewer than the target number of programs; at least 16 (tl.dot);
- BLOCK_K such that one w tile holds TILE_BYTES = 32 KiB (128 x 128 for 16-bit weights, 64 x 128 for float32),
  capped at the next power of two of K;
- SPLIT_K: enough K splits for PROGRAMS_PER_SM programs per SM over the N tiles, each split a whole number of
  BLOCK_K steps, no split empty; at most K / BLOCK_K, and at most what keeps the float32 partial sums
  (SPLIT_K x M x N x 4 bytes, written and read back) under 1/8 of the weight bytes;
- 4 warps; 3 pipeline stages when a program takes 3 or more K steps and three stages of w and x tiles fit in
  112 KiB (two programs per SM), else 2: fewer stages leave shared memory for more resident programs, and
  resident programs are what keeps loads in flight when each takes only a few K steps.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels import triton_runtime

DEFAULT_NUM_SMS = 132  # H100 / H200 SXM; used when the device does not report its multiprocessor count
MAX_ROWS = 64  # rows one launch takes (BLOCK_M = 16, 32 or 64)
TILE_BYTES = 32 * 1024  # weight bytes per program and K step
PROGRAMS_PER_SM = 3
MAX_PARTIAL_FRACTION = 1 / 8  # float32 partial-sum bytes against weight bytes
MAX_SHARED_PER_PROGRAM = 112 * 1024  # pipeline buffers of one program: two programs fit an SM's 228 KiB


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class SkinnyConfig:
    """How one launch runs: grid (cdiv(N, block_n), split_k), each split `k_per_split` rows of w."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    k_per_split: int  # a multiple of block_k; split_k * k_per_split >= K > (split_k - 1) * k_per_split
    num_warps: int = 4
    num_stages: int = 3

    @property
    def iters(self) -> int:
        return self.k_per_split // self.block_k


def make_config(
    m: int,
    k: int,
    block_n: int,
    block_k: int,
    split_k: int,
    *,
    itemsize: int = 2,
    num_warps: int = 4,
    num_stages: int | None = None,
) -> SkinnyConfig:
    """A configuration with the given blocks and at most `split_k` splits (fewer when some would be empty)."""
    if m > MAX_ROWS:
        raise ValueError(f"skinny_matmul takes at most {MAX_ROWS} rows per launch, got {m}")
    block_k = int(min(block_k, max(16, next_power_of_2(k))))
    k_tiles = cdiv(k, block_k)
    per_split = cdiv(k_tiles, max(1, min(split_k, k_tiles)))
    split_k = cdiv(k_tiles, per_split)
    block_m = max(16, next_power_of_2(m))
    if num_stages is None:  # a third stage only for loops that use it, and only while two programs fit an SM
        stage_bytes = (block_k * block_n + block_m * block_k) * itemsize
        num_stages = 3 if per_split >= 3 and 3 * stage_bytes <= MAX_SHARED_PER_PROGRAM else 2
    return SkinnyConfig(block_m, block_n, block_k, split_k, per_split * block_k, num_warps, num_stages)


def default_config(m: int, k: int, n: int, itemsize: int, num_sms: int = DEFAULT_NUM_SMS) -> SkinnyConfig:
    """The heuristic of the module docstring for x [m, k] @ w [k, n] with `itemsize`-byte elements."""
    target = PROGRAMS_PER_SM * num_sms
    max_split = max(1, int(k * itemsize * MAX_PARTIAL_FRACTION) // (4 * max(m, 1)))
    block_n = int(min(128, max(16, next_power_of_2(n))))

    def k_tiles_for(bn: int) -> int:
        return cdiv(k, min(max(16, TILE_BYTES // (bn * itemsize)), max(16, next_power_of_2(k))))

    few_tiles = cdiv(n, block_n) * min(max_split, k_tiles_for(block_n)) < target
    if block_n > 64 and m <= 16 and few_tiles:  # (more rows: keep the wider tile, x's tile grows with BLOCK_K)
        block_n = 64
    block_k = max(16, TILE_BYTES // (block_n * itemsize))
    split = min(max_split, max(1, cdiv(target, cdiv(n, block_n))))
    return make_config(m, k, block_n, block_k, split, itemsize=itemsize)


def num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or DEFAULT_NUM_SMS)


def _sms(runner: str) -> int:
    return num_sms() if runner == "triton" else DEFAULT_NUM_SMS


def skinny_partials(x, w, *, runner="triton", poison=False, config: SkinnyConfig | None = None):
    """x [M, K] @ w [K, N] (one dtype, M <= MAX_ROWS) -> partial sums [SPLIT_K, M, N]: float32, or x's dtype when
    SPLIT_K is 1 (then the only partial is the product)."""
    m, k = x.shape
    n = w.shape[1]
    cfg = config or default_config(m, k, n, jnp.dtype(x.dtype).itemsize, _sms(runner))
    if cfg.block_m < m or cfg.k_per_split % cfg.block_k or cfg.split_k * cfg.k_per_split < k:
        raise ValueError(f"launch configuration {cfg} does not cover x {x.shape} @ w {w.shape}")
    out_dtype = x.dtype if cfg.split_k == 1 else jnp.float32
    out = jax.ShapeDtypeStruct((cfg.split_k, m, n), out_dtype)
    meta = dict(
        M=m, K=k, N=n, K_PER_SPLIT=cfg.k_per_split, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, IEEE=bool(x.dtype == jnp.float32),
    )  # fmt: skip
    grid = (cdiv(n, cfg.block_n), cfg.split_k)
    name, warps, stages = "skinny_matmul", cfg.num_warps, cfg.num_stages
    return triton_runtime.run("kernels.skinny", runner, name, [x, w], [out], grid, warps, stages, meta, poison)[0]


def skinny_matmul(x, w, *, runner="triton", poison=False, config: SkinnyConfig | None = None):
    """x [M, K] @ w [K, N] -> [M, N] in x's dtype: the kernel's partials summed over SPLIT_K in float32."""
    partials = skinny_partials(x, w, runner=runner, poison=poison, config=config)
    if partials.shape[0] == 1 and partials.dtype == x.dtype:
        return partials[0]
    return jnp.sum(partials, axis=0, dtype=jnp.float32).astype(x.dtype)
