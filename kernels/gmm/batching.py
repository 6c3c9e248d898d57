"""A vmappable grouped matmul: `jax.vmap` over any argument of any gmm implementation, gradients included.

`jax.lax.ragged_dot` batches only when every operand has its batch at dimension 0 (so not with weights shared
across the batch), and a kernel call has no batching rule at all. `mappable(impl)` wraps an implementation in a
`custom_vjp` whose forward and backward are `custom_vmap`s mapping over the batch (`lax.map`), each element
sharing the unbatched operands. Under `shard_map` with a vmap's `spmd_axis_name` (per-replica gradients) each
device holds one element of the batch, so the map is a single call of the implementation.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax


def _map_rule(fn: Callable) -> Callable:
    """A custom_vmap rule: `fn` once per batch element (`lax.map`), unbatched arguments shared."""

    def rule(axis_size, in_batched, *args):
        batched = [a for a, b in zip(args, in_batched, strict=True) if b]

        def one(xs):
            it = iter(xs)
            return fn(*[next(it) if b else a for a, b in zip(args, in_batched, strict=True)])

        out = jax.lax.map(one, batched)
        return out, jax.tree.map(lambda _: True, out)

    return rule


def mapped(fn: Callable) -> Callable:
    """`fn` with a vmap rule that runs it once per batch element (`lax.map`), unbatched arguments shared."""
    wrapped = jax.custom_batching.custom_vmap(fn)
    wrapped.def_vmap(_map_rule(fn))
    return wrapped


def mappable(impl: Callable) -> Callable:
    """`impl(lhs, rhs, group_sizes, *, preferred_element_type)` -> `f(lhs, rhs, group_sizes, preferred_element_type)`
    with the same values and gradients, under `jax.vmap` too."""

    def forward(lhs, rhs, group_sizes, preferred_element_type):
        call = lambda a, b, g: impl(a, b, g, preferred_element_type=preferred_element_type)  # noqa: E731
        return mapped(call)(lhs, rhs, group_sizes)

    def backward(lhs, rhs, group_sizes, cot, preferred_element_type):
        def grads(a, b, g, c):
            _, vjp = jax.vjp(lambda x, y: impl(x, y, g, preferred_element_type=preferred_element_type), a, b)
            return vjp(c)

        return mapped(grads)(lhs, rhs, group_sizes, cot)

    @partial(jax.custom_vjp, nondiff_argnums=(3,))
    def gmm(lhs, rhs, group_sizes, preferred_element_type=None):
        return forward(lhs, rhs, group_sizes, preferred_element_type)

    def fwd(lhs, rhs, group_sizes, preferred_element_type):
        return forward(lhs, rhs, group_sizes, preferred_element_type), (lhs, rhs, group_sizes)

    def bwd(preferred_element_type, residuals, cot):
        d_lhs, d_rhs = backward(*residuals, cot, preferred_element_type)
        return d_lhs, d_rhs, None

    gmm.defvjp(fwd, bwd)
    return gmm
