"""Pure-JAX skinny matmul: one `jnp.matmul` with float32 accumulation, the obviously right baseline."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def skinny_matmul_reference(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N] -> [..., N] in x's dtype, products summed in float32."""
    return jnp.matmul(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
