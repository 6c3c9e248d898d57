"""FP8 (E4M3) training with DeepSeek-V3's fine-grained scaling: quantisers, block-scaled GEMMs, linear layer.

- `quantize_tiles` / `dequantize_tiles`: 1 x 128 tiles along the last axis (activations, gradients);
- `quantize_blocks` / `dequantize_blocks`: 128 x 128 blocks (weights);
- `scaled_matmul(xq, x_scales, wq, w_scales, out_dtype)`: the block-scaled GEMM, float32 accumulation promoted
  every 128 reduction elements;
- `scaled_gmm(lhs, lhs_scales, rhs, rhs_scales, group_sizes, out_dtype)`: its grouped version for MoE experts
  (the semantics of `jax.lax.ragged_dot`; forward only);
- `fp8_linear(x, w)`: `x @ w` with the FP8 recipe in forward and backward (a `jax.custom_vjp`).
- `fp8_cached(fn)`: an elementwise `fn` (SwiGLU, GELU) whose backward keeps only its inputs, in FP8 1 x 128 tiles;
  `row_scale=` multiplies its output per row (a routed expert's weight). `times_rows` is that product alone.
- `fp8_cached_linear(fn, xs, w)`: `fp8_linear(fp8_cached(fn)(*xs), w)` whose backward recomputes fn's output
  instead of keeping its FP8 copy (the MLP's activation and down projection).

`impl`:
- "reference": the pure-JAX definitions (`kernels.fp8.reference`, `kernels.fp8.linear`);
- "triton": the Triton kernels (`kernels.fp8.triton_kernels`, GPU through jax-triton);
- "interpret": the same kernels in Triton's interpreter (CPU tests);
- "mosaic": the Triton quantisers with the block-scaled GEMMs on the warp-specialised Pallas Mosaic GPU kernel
  (`mosaic_gemm.py`, Hopper only) wherever the shapes tile exactly, the Triton GEMM elsewhere;
- "auto": "mosaic" on a Hopper GPU, the Triton kernels on other GPUs where they can run (compute capability 8.9
  or newer, with triton and jax-triton importable), else the reference.

`grouped.fp8_gmm` (the MoE experts) takes the same `impl`: its forward and input gradient run on `scaled_gmm`
(on the Triton kernel with "mosaic" too: the grouped Mosaic kernel measured slower, RESULTS.md).

See README.md for the recipe, the error bounds, the kernels and where this deviates from DeepSeek-V3.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from kernels import triton_runtime
from kernels.fp8 import cached, launch, linear, mosaic_gemm, reference
from kernels.fp8.cached import fp8_cached, times_rows
from kernels.fp8.ops import TritonOps
from kernels.fp8.quantize import E4M3, E4M3_MAX, dequantize_blocks, dequantize_tiles, quantize_blocks, quantize_tiles

__all__ = [
    "E4M3",
    "E4M3_MAX",
    "IMPLS",
    "dequantize_blocks",
    "dequantize_tiles",
    "fp8_cached",
    "fp8_cached_linear",
    "fp8_linear",
    "quantize_blocks",
    "quantize_tiles",
    "scaled_gmm",
    "scaled_matmul",
    "times_rows",
]

IMPLS = ("auto", "reference", "triton", "interpret", "mosaic")


def kernels_unavailable_reason() -> str | None:
    """Why "auto" does not take the Triton kernels here, or None when it does."""
    reason = triton_runtime.unavailable_reason()
    if reason is None:
        capability = getattr(jax.devices()[0], "compute_capability", None)  # "9.0" on an H100
        if capability is not None and tuple(int(v) for v in str(capability).split(".")[:2]) < (8, 9):
            reason = f"FP8 tensor cores need compute capability 8.9 or newer; this GPU has {capability}"
    return reason


def mosaic_unavailable_reason() -> str | None:
    """Why the Mosaic GPU GEMMs cannot run here, or None when they can (Hopper: `wgmma` is sm_90 only)."""
    reason = kernels_unavailable_reason()
    if reason is None:
        capability = str(getattr(jax.devices()[0], "compute_capability", ""))
        if not capability.startswith("9."):
            reason = f"the Mosaic GPU FP8 GEMM uses Hopper's wgmma (compute capability 9.x); this GPU has {capability}"
    return reason


def _runner(impl: str) -> str | None:
    """The Triton runner for `impl`, or None for the pure-JAX reference."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if kernels_unavailable_reason() is None else None
    if impl == "mosaic":
        if (reason := mosaic_unavailable_reason()) is not None:
            raise RuntimeError(f"kernels.fp8=mosaic cannot run here: {reason}")
        return "triton"
    return impl if impl in ("triton", "interpret") else None


def _gemms(impl: str) -> str:
    """Which block-scaled GEMM kernel `impl` runs with the Triton quantisers: "mosaic" or "triton"."""
    if impl == "mosaic" or (impl == "auto" and mosaic_unavailable_reason() is None):
        return "mosaic"
    return "triton"


def _check_fp8(**arrays) -> None:
    for name, a in arrays.items():
        if a.dtype != jnp.dtype(E4M3):
            raise ValueError(f"the Triton kernels take float8_e4m3fn operands; {name} is {a.dtype}")


def scaled_matmul(
    xq: jax.Array,
    x_scales: jax.Array,
    wq: jax.Array,
    w_scales: jax.Array,
    out_dtype=jnp.float32,
    *,
    block_k: int = 128,
    block_n: int = 128,
    impl: str = "auto",
) -> jax.Array:
    """Block-scaled FP8 GEMM: xq [M, K] with 1 x block_k tile scales @ wq [K, N] with block_k x block_n scales.

    The Triton kernel takes block_k = 128 only (any block_n), and reads the weight transposed (a copy made by
    XLA: the FP8 tensor cores want it K-major; `launch.scaled_matmul_nt` takes it so without the copy).
    """
    runner = _runner(impl)
    ref = partial(reference.scaled_matmul, out_dtype=out_dtype, block_k=block_k, block_n=block_n)
    if runner is None:
        return ref(xq, x_scales, wq, w_scales)
    jax.eval_shape(ref, xq, x_scales, wq, w_scales)  # the reference's argument checks
    if block_k != launch.TILE:
        raise ValueError(f"the Triton block-scaled GEMM needs block_k = {launch.TILE}, got {block_k}")
    _check_fp8(xq=xq, wq=wq)
    if 0 in (*xq.shape, wq.shape[1]):
        return ref(xq, x_scales, wq, w_scales)  # nothing to compute: zeros
    x_scales, w_scales = x_scales.astype(jnp.float32), w_scales.astype(jnp.float32)
    (m, k), n = xq.shape, wq.shape[1]
    if block_n == launch.TILE and _gemms(impl) == "mosaic" and mosaic_gemm.supported(m, n, k):
        return mosaic_gemm.scaled_matmul_nt(xq, x_scales, wq.T, w_scales, out_dtype)
    return launch.scaled_matmul_nt(xq, x_scales, wq.T, w_scales, out_dtype, block_n=block_n, runner=runner)


def scaled_gmm(
    lhs: jax.Array,
    lhs_scales: jax.Array,
    rhs: jax.Array,
    rhs_scales: jax.Array,
    group_sizes: jax.Array,
    out_dtype=jnp.float32,
    *,
    impl: str = "auto",
) -> jax.Array:
    """Grouped block-scaled FP8 GEMM: lhs [T, K] rows sorted by group (1 x 128 tile scales [T, ceil(K/128)]) @
    rhs[g] (rhs [E, K, N], per-expert 128 x 128 block scales [E, ceil(K/128), ceil(N/128)]) -> [T, N]; rows past
    sum(group_sizes) are zero. The Triton kernel reads rhs transposed (an XLA copy; see scaled_matmul)."""
    runner = _runner(impl)
    if runner is None:
        return reference.scaled_gmm(lhs, lhs_scales, rhs, rhs_scales, group_sizes, out_dtype)
    jax.eval_shape(partial(reference.scaled_gmm, out_dtype=out_dtype), lhs, lhs_scales, rhs, rhs_scales, group_sizes)
    _check_fp8(lhs=lhs, rhs=rhs)
    if not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"group_sizes must be integers, got {group_sizes.dtype}")
    (t, k), (e, _, n) = lhs.shape, rhs.shape
    if 0 in (t, k, e, n):
        return jnp.zeros((t, n), out_dtype)
    return launch.scaled_gmm(
        lhs, lhs_scales.astype(jnp.float32), rhs.transpose(0, 2, 1), rhs_scales.astype(jnp.float32).transpose(0, 2, 1),
        group_sizes.astype(jnp.int32), out_dtype, rhs_transposed=True, runner=runner,
    )  # fmt: skip


def fp8_linear(x: jax.Array, w: jax.Array, *, out_dtype=None, impl: str = "auto") -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] with FP8 forward and backward; out_dtype defaults to x's dtype."""
    ops = _ops(impl)
    if ops is None or 0 in (*x.shape, *w.shape):
        return linear.fp8_linear(x, w, out_dtype=out_dtype)
    return linear.fp8_linear(x, w, out_dtype=out_dtype, ops=ops)


def _ops(impl: str):
    """The linear layer's quantisers and GEMMs for `impl`: None (the reference) or `TritonOps`."""
    runner = _runner(impl)
    if runner is None:
        return None
    return TritonOps(runner, _gemms(impl) if runner == "triton" else "triton")


def fp8_cached_linear(fn, xs, w: jax.Array, *, row_scale=None, out_dtype=None, impl: str = "auto") -> jax.Array:
    """`fp8_linear(fp8_cached(fn)(*xs, row_scale=row_scale), w)` whose backward keeps only xs in FP8 and recomputes
    fn's output (`cached.fp8_cached_linear`); out_dtype defaults to fn's output dtype."""
    ops = _ops(impl)
    if ops is None or 0 in (*xs[0].shape, *w.shape):
        return cached.fp8_cached_linear(fn, xs, w, row_scale=row_scale, out_dtype=out_dtype)
    return cached.fp8_cached_linear(fn, xs, w, row_scale=row_scale, out_dtype=out_dtype, ops=ops)
