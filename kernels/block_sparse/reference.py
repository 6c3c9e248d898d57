"""Pure-JAX block-sparse matmul: the blocks scattered into a dense B, then one dense matmul (float32 accumulation).

Obviously right, and as slow as the dense product (plus the scatter); its gradients (through the scatter) are
the ones the kernels must reproduce.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from kernels.block_sparse.layout import BlockLayout, to_dense


def block_sparse_matmul(a: jax.Array, layout: BlockLayout, values: jax.Array, *, preferred_element_type=None):
    dtype = jnp.result_type(a.dtype, values.dtype)
    out_dtype = jnp.dtype(preferred_element_type or dtype)
    b = to_dense(layout, values.astype(dtype))
    return jnp.dot(a.astype(dtype), b, preferred_element_type=jnp.float32).astype(out_dtype)
