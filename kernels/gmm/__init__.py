"""Grouped matrix multiply for mixture-of-experts layers.

`gmm(lhs, rhs, group_sizes)`: the rows of `lhs` [m, k] come sorted by group; rows of group g (the next
`group_sizes[g]` rows) are multiplied by `rhs[g]` [k, n]. Rows past `sum(group_sizes)` give zeros, so a
buffer may be padded at the end. Differentiable in `lhs` and `rhs`. `transpose_rhs=True` takes `rhs` as
[g, n, k] and multiplies by `rhs[g]^T`: the kernels read such weights in place (serving keeps the experts so,
with the contracted axis minor, for its single-token products).

`impl`:
- "reference": `jax.lax.ragged_dot` (see `kernels.gmm.reference`);
- "triton": the Triton kernels of `kernels.gmm.ops` (GPU; persistent grouped GEMM, see README.md);
- "interpret": the same kernels in Triton's interpreter (CPU tests);
- "auto": the Triton kernels where they can run (CUDA GPU, triton and jax-triton importable, bf16 / fp16 / fp32
  operands), else the reference. On an H200 they run the MoE shapes about 50x faster than `ragged_dot`, whose
  backward does not even fit in memory at DeepSeek-V3's expert shape (experiments/benchmarks/RESULTS.md).

`jax.vmap` works over any argument (`kernels.gmm.batching`): per-replica gradients vmap the MoE layers with
weights shared across the batch, which `jax.lax.ragged_dot` cannot batch by itself.
"""

from __future__ import annotations

from functools import cache, partial

import jax
import jax.numpy as jnp

from kernels import triton_runtime
from kernels.gmm import reference
from kernels.gmm.batching import mappable
from kernels.gmm.ops import SUPPORTED_DTYPES, check_shapes, triton_gmm

__all__ = ["IMPLS", "auto_impl", "gmm"]

IMPLS = ("auto", "reference", "triton", "interpret")


def auto_impl(dtype) -> str:
    """What impl "auto" runs for operands of this dtype: "triton" where the kernels can run, else "reference"."""
    fast = jnp.dtype(dtype) in SUPPORTED_DTYPES and triton_runtime.unavailable_reason() is None
    return "triton" if fast else "reference"


@cache
def _mappable(impl: str, transpose_rhs: bool):
    fn = reference.gmm if impl == "reference" else partial(triton_gmm, runner=impl)
    return mappable(partial(fn, transpose_rhs=transpose_rhs))


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    impl: str = "auto",
    preferred_element_type=None,
    transpose_rhs: bool = False,
) -> jax.Array:
    """[m, k] rows sorted by group × [g, k, n] per-group weights ([g, n, k] with `transpose_rhs`) -> [m, n]."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_shapes("gmm", lhs, rhs, group_sizes, transpose_rhs)
    if impl == "auto":
        impl = auto_impl(jnp.result_type(lhs.dtype, rhs.dtype))
    return _mappable(impl, bool(transpose_rhs))(lhs, rhs, group_sizes, preferred_element_type)
