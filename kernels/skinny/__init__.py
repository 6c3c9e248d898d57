"""Matmul of a few rows against a large weight: the projections of batch-1 (or small-batch) decode.

`skinny_matmul(x, w)`: x [..., K] @ w [K, N] -> [..., N] in x's dtype, products summed in float32. The leading
dims of x are flattened to M rows; the work is reading w once, which a split-K Triton kernel does near copy
bandwidth (README.md). Differentiable in x and w: the kernel is forward only, its `custom_vjp` backward is the
reference matmuls (`kernels.skinny.ops`).

`impl`:
- "reference": `jnp.matmul` with float32 accumulation (`kernels.skinny.reference`);
- "triton": the Triton kernel (GPU; jax-triton), or a ValueError when the input cannot take it;
- "interpret": the same kernel in Triton's interpreter (CPU tests; slow);
- "auto": the kernel when `triton_runtime.unavailable_reason()` is None and M <= MAX_ROWS (64), else the
  reference (beyond 64 rows the product is no longer a weight read with a little arithmetic; XLA's GEMM fits).

x and w must share one dtype, bfloat16, float16 or float32 (ValueError otherwise, for every impl).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kernels import triton_runtime
from kernels.skinny.launch import MAX_ROWS
from kernels.skinny.ops import SUPPORTED_DTYPES, triton_skinny_matmul
from kernels.skinny.reference import skinny_matmul_reference

__all__ = ["IMPLS", "MAX_ROWS", "skinny_matmul", "skinny_matmul_reference"]

IMPLS = ("auto", "reference", "triton", "interpret")


def check_inputs(x: jax.Array, w: jax.Array) -> None:
    """ValueError unless x [..., K] and w [K, N] fit together and share a supported dtype."""
    if w.ndim != 2:
        raise ValueError(f"skinny_matmul expects w [K, N], got shape {w.shape}")
    if x.ndim < 1:
        raise ValueError(f"skinny_matmul expects x [..., K], got a scalar of shape {x.shape}")
    if x.shape[-1] != w.shape[0]:
        raise ValueError(f"skinny_matmul shapes disagree: x {x.shape}, w {w.shape} (need x.shape[-1] == w.shape[0])")
    if x.dtype != w.dtype:
        raise ValueError(f"skinny_matmul needs x and w of one dtype, got {x.dtype} and {w.dtype}")
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"skinny_matmul supports {[str(d) for d in SUPPORTED_DTYPES]}, got {x.dtype}")


def skinny_matmul(x: jax.Array, w: jax.Array, *, impl: str = "auto") -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype (float32 accumulation); M = prod(x.shape[:-1])."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_inputs(x, w)
    m = math.prod(x.shape[:-1])
    if impl == "auto":
        fast = m <= MAX_ROWS and triton_runtime.unavailable_reason() is None
        impl = "triton" if fast else "reference"
    if impl == "reference":
        return skinny_matmul_reference(x, w)
    if m > MAX_ROWS:
        raise ValueError(
            f"impl={impl!r} takes at most {MAX_ROWS} rows (x.shape[:-1] = {x.shape[:-1]} gives {m}); "
            "use impl='auto' or 'reference' for more"
        )
    out = triton_skinny_matmul(x.reshape(m, x.shape[-1]), w, runner=impl)
    return out.reshape(*x.shape[:-1], w.shape[1])
