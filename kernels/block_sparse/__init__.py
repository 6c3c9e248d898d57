"""Dense x block-sparse matmul: a [M, K] @ B [K, N], B stored as its present square blocks (bs 64 or 128).

    layout, values = from_dense(b, block_mask, block_size=128)   # host: index sets built once, numpy
    out = block_sparse_matmul(a, layout, values)                 # [M, N], differentiable in a and values

`layout` (`BlockLayout`) is a pytree (int32 index arrays as leaves; block size and shape static); `values`
[nnz, bs, bs] holds the present blocks by block column (see `layout.py`). Leading dimensions of `a` are treated
as more rows.

`impl`:
- "reference": the blocks scattered into a dense B, one `jnp.dot` with float32 accumulation (`reference.py`);
- "triton": the Triton kernels (`ops.py`; GPU): only present blocks are read and multiplied;
- "interpret": the same kernels in Triton's interpreter (CPU tests);
- "auto": the Triton kernels where they can run (CUDA GPU, triton and jax-triton importable), else the reference.
  On an H200 they beat the reference at every density measured, and XLA's dense matmul below ~60% density
  (6.2x at 10%, experiments/benchmarks/RESULTS.md).
"""

from __future__ import annotations

from functools import partial

import jax

from kernels import triton_runtime
from kernels.block_sparse import reference
from kernels.block_sparse.layout import (
    SUPPORTED_BLOCK_SIZES,
    BlockLayout,
    block_mask_of,
    from_dense,
    layout_from_block_mask,
    to_dense,
)
from kernels.block_sparse.ops import check_arguments, triton_block_sparse_matmul

__all__ = [
    "IMPLS",
    "SUPPORTED_BLOCK_SIZES",
    "BlockLayout",
    "block_mask_of",
    "block_sparse_matmul",
    "from_dense",
    "layout_from_block_mask",
    "to_dense",
]

IMPLS = ("auto", "reference", "triton", "interpret")
_IMPLS = {
    "reference": reference.block_sparse_matmul,
    "triton": partial(triton_block_sparse_matmul, runner="triton"),
    "interpret": partial(triton_block_sparse_matmul, runner="interpret"),
}


def block_sparse_matmul(
    a: jax.Array, layout: BlockLayout, values: jax.Array, *, impl: str = "auto", preferred_element_type=None
) -> jax.Array:
    """a [..., M, K] @ B [K, N] -> [..., M, N], B given by (layout, values [nnz, bs, bs])."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if a.ndim < 2:
        raise ValueError(f"a must be [..., M, K], got shape {a.shape}")
    lead = a.shape[:-1]
    a2 = a.reshape(-1, a.shape[-1])
    check_arguments(a2, layout, values)
    if impl == "auto":
        impl = "triton" if triton_runtime.unavailable_reason() is None else "reference"
    out = _IMPLS[impl](a2, layout, values, preferred_element_type=preferred_element_type)
    return out.reshape(*lead, layout.shape[1])
