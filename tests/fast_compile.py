"""Compile test programs with less backend optimisation: XLA's CPU code generation dominates the time of the
parallelism tests, and unoptimised machine code computes the same operations (the HLO passes, including sharding
and buffer assignment, are unchanged). Float32 sums may run in another order, so compare programs compiled the
same way when a test asks for tight agreement."""

from __future__ import annotations

from collections.abc import Callable

import jax

FAST = {"xla_backend_optimization_level": 0}


def compiled(fn: Callable, *args, **jit_kwargs):
    """`jax.jit(fn, **jit_kwargs)` compiled for `args` (arrays or ShapeDtypeStructs); `fn` may already be jitted."""
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn, **jit_kwargs)
    return jitted.lower(*args).compile(FAST)
