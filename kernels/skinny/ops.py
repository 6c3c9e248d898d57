"""The Triton skinny matmul as a `jax.custom_vjp`: forward is the kernel, backward the reference einsums.

`triton_skinny_matmul(x, w, runner=...)`: x [M, K] @ w [K, N] -> [M, N] in x's dtype (M <= launch.MAX_ROWS),
products summed in float32. The kernel serves inference; the backward (dx = g @ w^T, dw = x^T @ g, float32
accumulation, cast to the operands' dtypes) is plain XLA, so training through it works, at XLA's speed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels.skinny import launch
from kernels.triton_runtime import varying_like

__all__ = ["RUNNERS", "SUPPORTED_DTYPES", "triton_skinny_matmul"]

RUNNERS = ("triton", "interpret")
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def triton_skinny_matmul(x: jax.Array, w: jax.Array, *, runner: str = "triton") -> jax.Array:
    """x [M, K] @ w [K, N] -> [M, N] (x's dtype), differentiable in both (reference backward)."""
    if runner not in RUNNERS:
        raise ValueError(f"runner must be one of {RUNNERS}, got {runner!r}")
    m, k = x.shape
    n = w.shape[1]
    if m > launch.MAX_ROWS:
        raise ValueError(f"the skinny kernel takes at most {launch.MAX_ROWS} rows, got {m}")
    if 0 in (m, k, n):  # nothing to read; an empty reduction sums to zero
        return jnp.zeros((m, n), x.dtype)
    x, w = varying_like((x, w))  # inside shard_map: see kernels.triton_runtime.varying_like
    return _skinny(x, w, runner)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _skinny(x, w, runner):
    return launch.skinny_matmul(x, w, runner=runner)


def _skinny_fwd(x, w, runner):
    return launch.skinny_matmul(x, w, runner=runner), (x, w)


def _skinny_bwd(runner, residuals, g):
    del runner
    x, w = residuals
    dx = jnp.matmul(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
    dw = jnp.matmul(x.T, g, preferred_element_type=jnp.float32).astype(w.dtype)
    return dx, dw


_skinny.defvjp(_skinny_fwd, _skinny_bwd)
