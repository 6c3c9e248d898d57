"""Pure-JAX references: the definitions that the fast kernels must match.

Statistics are computed in float32 with the centred (two-pass) variance; the output is cast back to
the input's dtype. Gradients come from JAX's autodiff of these functions.
"""

import jax
import jax.numpy as jnp

F32 = jnp.float32


def gelu(z: jax.Array, approximate: bool) -> jax.Array:
    """GELU on float32 values: exact erf form, or the tanh approximation."""
    return jax.nn.gelu(z, approximate=approximate)


def layer_norm(
    x: jax.Array,
    scale: jax.Array,
    bias: jax.Array,
    *,
    eps: float = 1e-5,
    activation: str | None = None,
) -> jax.Array:
    """activation(layernorm(x) * scale + bias) over the last axis; activation None, 'gelu' or 'gelu_tanh'."""
    x32 = x.astype(F32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    centred = x32 - mean
    var = jnp.mean(centred * centred, axis=-1, keepdims=True)
    z = centred * jax.lax.rsqrt(var + eps) * scale.astype(F32) + bias.astype(F32)
    if activation == "gelu":
        z = gelu(z, approximate=False)
    elif activation == "gelu_tanh":
        z = gelu(z, approximate=True)
    elif activation is not None:
        raise ValueError(f"activation must be None, 'gelu' or 'gelu_tanh', got {activation!r}")
    return z.astype(x.dtype)


def rms_norm(x: jax.Array, scale: jax.Array, *, eps: float = 1e-6) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * scale over the last axis."""
    x32 = x.astype(F32)
    ms = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(ms + eps) * scale.astype(F32)).astype(x.dtype)


def add_rms_norm(
    x: jax.Array, residual: jax.Array, scale: jax.Array, *, eps: float = 1e-6
) -> tuple[jax.Array, jax.Array]:
    """(rms_norm(x + residual), x + residual); the sum is rounded to the input dtype before the norm."""
    new_residual = (x.astype(F32) + residual.astype(F32)).astype(x.dtype)
    return rms_norm(new_residual, scale, eps=eps), new_residual
