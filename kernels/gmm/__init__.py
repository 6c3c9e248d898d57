"""Grouped matrix multiply for mixture-of-experts layers.

`gmm(lhs, rhs, group_sizes)`: the rows of `lhs` [m, k] come sorted by group; rows of group g (the next
`group_sizes[g]` rows) are multiplied by `rhs[g]` [k, n]. Rows past `sum(group_sizes)` give zeros, so a
buffer may be padded at the end. Differentiable in `lhs` and `rhs`.

`impl`:
- "reference": `jax.lax.ragged_dot` (see `kernels.gmm.reference`);
- "auto": the fastest implementation that can run here; today that is the reference everywhere (a fast
  grouped-GEMM kernel plugs in here).
"""

from __future__ import annotations

import jax

from kernels.gmm import reference

__all__ = ["IMPLS", "gmm"]

IMPLS = ("auto", "reference")


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    impl: str = "auto",
    preferred_element_type=None,
) -> jax.Array:
    """[m, k] rows sorted by group × [g, k, n] per-group weights -> [m, n]."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.ndim != 1:
        raise ValueError(
            f"gmm expects lhs [m, k], rhs [g, k, n], group_sizes [g]; got {lhs.shape}, {rhs.shape}, {group_sizes.shape}"
        )
    if lhs.shape[1] != rhs.shape[1] or rhs.shape[0] != group_sizes.shape[0]:
        raise ValueError(
            f"gmm shapes disagree: lhs {lhs.shape}, rhs {rhs.shape}, group_sizes {group_sizes.shape} "
            "(need lhs[1] == rhs[1] and rhs[0] == group_sizes[0])"
        )
    return reference.gmm(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
