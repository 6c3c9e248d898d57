"""Fused normalisation kernels: LayerNorm (+ GELU), RMSNorm, residual add + RMSNorm.

Each op normalises over the last axis of `x` (any leading shape), with float32 statistics, and takes
`impl`:
- "auto": the fused Triton kernel when it can run here (CUDA GPU, triton + jax-triton importable,
  bf16/fp32 input, hidden size <= 16384), else the pure-JAX reference;
- "fused": the fused kernel, or a ValueError that says why it cannot run;
- "reference": the pure-JAX reference (see `kernels.norms.reference`), recomputed in the backward, which keeps x
  rather than autodiff's float32 copies of it;
- "interpret": the fused kernels run by Triton's interpreter on the host (slow; for CPU tests).

The fused ops are `jax.custom_vjp` functions whose backward is also a fused kernel (input gradient,
plus scale/bias gradients as per-program partial sums reduced by a small XLA sum).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels import triton_runtime
from kernels.norms import reference
from kernels.norms.launch import MAX_HIDDEN

__all__ = ["add_rms_norm", "fused_unavailable_reason", "layer_norm", "layer_norm_gelu", "rms_norm"]

IMPLS = ("auto", "fused", "reference", "interpret")
SUPPORTED_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


def fused_unavailable_reason(x: jax.Array, *others: jax.Array, check_backend: bool = True) -> str | None:
    """Why the fused kernel cannot take `x` (and same-shaped `others`) here, or None when it can."""
    if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} is not supported (bfloat16 or float32)"
    if any(o.dtype != x.dtype for o in others):
        return "x and residual must have the same dtype"
    if x.ndim == 0 or x.size == 0:
        return f"shape {x.shape} has no rows to normalise"
    if x.shape[-1] > MAX_HIDDEN:
        return f"hidden size {x.shape[-1]} is above the supported {MAX_HIDDEN}"
    return triton_runtime.unavailable_reason() if check_backend else None


def _runner(impl: str, x: jax.Array, *others: jax.Array) -> str | None:
    """The kernel runner to use, or None for the reference."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return None
    reason = fused_unavailable_reason(x, *others, check_backend=impl != "interpret")
    if reason is None:
        return "interpret" if impl == "interpret" else "triton"
    if impl == "auto":
        return None
    raise ValueError(f"impl={impl!r} cannot run: {reason}. Use impl='reference' (or 'auto').")


def _check_params(x: jax.Array, **params: jax.Array) -> None:
    n = x.shape[-1] if x.ndim else None
    for name, p in params.items():
        if p.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match x.shape[-1]; got {p.shape}")


def _recomputed(norm):
    """The reference `norm`, recomputed in the backward: autodiff of it would keep float32 copies of x (8 bytes per
    value) where this keeps x itself. The values and gradients are the reference's."""
    return jax.checkpoint(norm)


def _rows(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


def layer_norm_gelu(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    eps: float = 1e-5,
    approximate: bool = False,
    impl: str = "auto",
) -> jax.Array:
    """gelu(layernorm(x) * scale + bias); exact erf GELU, or the tanh form when `approximate`."""
    return _layer_norm(x, scale, bias, eps, "gelu_tanh" if approximate else "gelu", impl)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float = 1e-5, impl: str = "auto") -> jax.Array:
    """layernorm(x) * scale + bias."""
    return _layer_norm(x, scale, bias, eps, None, impl)


def _layer_norm(x, scale, bias, eps, activation, impl):
    _check_params(x, scale=scale, bias=bias)
    runner = _runner(impl, x)
    if runner is None:
        return _recomputed(functools.partial(reference.layer_norm, eps=eps, activation=activation))(x, scale, bias)
    from kernels.norms import ops

    y = ops.layer_norm_2d(_rows(x), scale, bias, float(eps), activation, runner)
    return y.reshape(x.shape)


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float = 1e-6, impl: str = "auto") -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale."""
    _check_params(x, scale=scale)
    runner = _runner(impl, x)
    if runner is None:
        return _recomputed(functools.partial(reference.rms_norm, eps=eps))(x, scale)
    from kernels.norms import ops

    return ops.rms_norm_2d(_rows(x), scale, float(eps), runner).reshape(x.shape)


def add_rms_norm(
    x: jax.Array, residual: jax.Array, scale: jax.Array, *, eps: float = 1e-6, impl: str = "auto"
) -> tuple[jax.Array, jax.Array]:
    """(rms_norm(x + residual) * scale, x + residual), the sum rounded to x.dtype first (DeepSeek blocks)."""
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {residual.shape} must equal x shape {x.shape}")
    _check_params(x, scale=scale)
    runner = _runner(impl, x, residual)
    if runner is None:
        return _recomputed(functools.partial(reference.add_rms_norm, eps=eps))(x, residual, scale)
    from kernels.norms import ops

    y, h = ops.add_rms_norm_2d(_rows(x), _rows(residual), scale, float(eps), runner)
    return y.reshape(x.shape), h.reshape(x.shape)
