"""Decode kernels for serving: the per-layer work of one new token per sequence in few launches.

A batch-1 decode step of a 1B model on XLA alone runs ~20 small kernels per layer; each costs the GPU 1.5-2.5 µs
whatever its size, which caps the step far below the memory roofline (experiments/benchmarks/RESULTS.md).
These kernels do a layer's attention over the cache (rotation and cache write included) in one launch, and a
token's chosen experts of an MoE layer in two. They are forward-only (serving does not differentiate).

`impl`:
- "pallas": Pallas kernels on the Triton backend (CUDA GPU; a ValueError elsewhere, saying why). See
  `runtime.py` for why this backend and not jax-triton or Mosaic GPU;
- "interpret": the same kernels run on the host (CPU tests);
- "reference": pure JAX (`attention.write_attend_reference`, `experts.reference`);
- "auto": "pallas" where it can run, else "reference".
"""

from __future__ import annotations

import jax

from kernels.decode import attention, experts, runtime

__all__ = ["IMPLS", "chosen_experts", "resolve", "write_attend"]

IMPLS = ("auto", "pallas", "interpret", "reference")


def resolve(impl: str) -> str:
    """The implementation `impl` runs as here: "pallas", "interpret" or "reference" (ValueError on bad values, or
    for "pallas" where it cannot run)."""
    if impl not in IMPLS:
        raise ValueError(f"decode kernels: impl must be one of {IMPLS}, got {impl!r}")
    reason = runtime.unavailable_reason() if impl in ("auto", "pallas") else None
    if impl == "pallas" and reason:
        raise ValueError(f"decode kernels: 'pallas' cannot run here: {reason}")
    if impl == "auto":
        return "reference" if reason else "pallas"
    return impl


def write_attend(
    q_bnh: jax.Array,
    k_bnh: jax.Array,
    v_bnh: jax.Array,
    cos_bh: jax.Array,
    sin_bh: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    layer,
    positions_b: jax.Array,
    scale: float,
    impl: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A decode layer's attention from its projections: rotate the new query and key (tables [b, h/2] at each
    row's position), store key and value in the caches at that position (clamped into the cache) and attend
    (`attention.write_attend_reference`). Returns (out [b, n, h], k_cache, v_cache); the kernel updates the
    caches in place."""
    impl = resolve(impl)
    args = (q_bnh, k_bnh, v_bnh, cos_bh, sin_bh, k_cache, v_cache, layer, positions_b, scale)
    if impl == "reference":
        return attention.write_attend_reference(*args)
    reason = attention.check(q_bnh, k_cache, v_cache)
    if reason:
        raise ValueError(f"write_attend: {reason}")
    return attention.write_attend(*args, interpret=impl == "interpret")


def chosen_experts(
    x_d: jax.Array,
    experts_k: jax.Array,
    weights_k: jax.Array,
    gate_up_e2fd: jax.Array,
    down_edf: jax.Array,
    impl: str = "auto",
) -> jax.Array:
    """One token's routed experts: sum_j weights[j] · SwiGLU expert experts[j] of x (`experts.reference`), float32
    [d]. Weights with the contracted axis minor: gate/up [E, 2, F, d], down [E, d, F]."""
    impl = resolve(impl)
    args = (x_d, experts_k, weights_k, gate_up_e2fd, down_edf)
    if impl == "reference":
        return experts.reference(*args)
    return experts.pallas(*args, interpret=impl == "interpret")
