"""Pure-JAX grouped matmul: `jax.lax.ragged_dot`, the obviously right (and on GPU slow) baseline."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None, transpose_rhs=False
) -> jax.Array:
    if transpose_rhs:  # rhs [g, n, k]
        rhs = jnp.swapaxes(rhs, 1, 2)
    return jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=preferred_element_type)
