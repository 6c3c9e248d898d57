"""Decode kernels for serving: the per-layer work of one new token per sequence in few launches.

A batch-1 decode step of a 1B model on XLA alone runs ~20 small kernels per layer; each costs the GPU 1.5-2.5 µs
whatever its size, which caps the step far below the memory roofline (experiments/benchmarks/RESULTS.md).
`write_attend` does a dense layer's attention over the cache, rotation and cache write included, in one launch;
`write_attend_latent` a DeepSeek (absorbed MLA) layer's over the latent cache, cache write included; `route` a
DeepSeek MoE layer's scores and greedy top-k for a few tokens. All are forward-only (serving does not
differentiate).

`impl`:
- "pallas": Pallas kernels on the Triton backend (CUDA GPU; a ValueError elsewhere, saying why). See
  `runtime.py` for why this backend and not jax-triton or Mosaic GPU;
- "interpret": the same kernels run on the host (CPU tests);
- "reference": pure JAX (`attention.write_attend_reference`, `latent.write_attend_reference`,
  `routing.route_reference`);
- "auto": "pallas" where it can run, else "reference".
"""

from __future__ import annotations

import jax

from kernels.decode import attention, latent, routing, runtime

__all__ = ["IMPLS", "resolve", "route", "write_attend", "write_attend_latent"]

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


def _kernel(name: str, module, args, check_args, impl: str, **kernel_options):
    """`module.write_attend(*args)` for a resolved `impl` ("pallas" or "interpret"); a ValueError naming `name` when
    `module.check(*check_args)` finds shapes the kernel cannot take."""
    reason = module.check(*check_args)
    if reason:
        raise ValueError(f"{name}: {reason}")
    return module.write_attend(*args, interpret=impl == "interpret", **kernel_options)


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
    arrivals: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """A decode layer's attention from its projections, row i for the caches' slot i (b <= slots: the first b):
    rotate the new query and key (tables [b, h/2] at each row's position), store key and value in the caches at
    that position (clamped into the cache) and attend
    (`attention.write_attend_reference`). Returns (out [b, n, h], k_cache, v_cache, arrivals); the kernel
    updates the caches in place. arrivals: the kernel's count of finished chunks (`attention.write_attend`),
    int32 [layers, b, n] zeros, which comes back zeroed: pass one call's to the next (None: the kernel makes
    one). The reference returns it as given, None included."""
    args = (q_bnh, k_bnh, v_bnh, cos_bh, sin_bh, k_cache, v_cache, layer, positions_b, scale)
    impl = resolve(impl)
    if impl == "reference":
        return (*attention.write_attend_reference(*args), arrivals)
    return _kernel("write_attend", attention, args, (q_bnh, k_cache, v_cache), impl, arrivals=arrivals)


def write_attend_latent(
    q_latent_bnc: jax.Array,
    q_rope_bnr: jax.Array,
    latent_bc: jax.Array,
    rope_br: jax.Array,
    latent_cache: jax.Array,
    rope_cache: jax.Array,
    layer,
    positions_b: jax.Array,
    scale: float,
    impl: str = "auto",
    values: tuple[jax.Array, int] | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """A DeepSeek decode layer's absorbed MLA over the latent cache, row i for the caches' slot i (the first b):
    store the new latent [b, c] and rotated key part [b, r] at each row's position (clamped into the cache) and
    attend with the queries in latent space (q_latent [b, n, c], rotated q_rope [b, n, r];
    `latent.write_attend_reference`). Returns (out [b, n, c], latent_cache, rope_cache); the kernel updates the
    caches in place. `values`: (kv_b_proj's layer stack [layers, c, n, w], the first value column): the output
    also goes through the layer's value up-projection, [b, n, w - that column] (`latent.values_reference`)."""
    args = (q_latent_bnc, q_rope_bnr, latent_bc, rope_br, latent_cache, rope_cache, layer, positions_b, scale)
    impl = resolve(impl)
    if impl == "reference":
        out, latent_cache, rope_cache = latent.write_attend_reference(*args)
        if values is not None:
            out = latent.values_reference(out, values[0], layer, values[1])
        return out, latent_cache, rope_cache
    check_args = (q_latent_bnc, q_rope_bnr, latent_cache, rope_cache)
    return _kernel("write_attend_latent", latent, args, check_args, impl, values=values)


def route(logits_te: jax.Array, bias_e: jax.Array | None, k: int, scoring: str, impl: str = "auto"):
    """A MoE layer's expert choice for a few tokens (`routing.route_reference`): (experts [t, k] int32, largest
    first, ties to the lower index; their scores [t, k] float32; scores [t, E] float32, softmax or sigmoid of the
    logits). `bias_e` (or None) shifts the choice only."""
    impl = resolve(impl)
    if impl == "reference":
        return routing.route_reference(logits_te, bias_e, k, scoring)
    return routing.route(logits_te, bias_e, k, scoring, interpret=impl == "interpret")
