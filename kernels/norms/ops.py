"""The fused ops as `jax.custom_vjp` functions on [rows, hidden] arrays.

The forward kernel also returns the per-row float32 statistics; the backward kernel reuses them and
returns per-program partial parameter gradients, summed here over programs (a small XLA reduction).
`runner` picks how the kernels run: "triton" (jax-triton, GPU) or "interpret" (Triton's interpreter
on the host, for tests).
"""

import functools

import jax
import jax.numpy as jnp

from kernels.norms import launch


def _reduce_partials(partials: jax.Array, like: jax.Array) -> jax.Array:
    return jnp.sum(partials, axis=0).astype(like.dtype)


# LayerNorm (+ GELU) ---------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def layer_norm_2d(x, scale, bias, eps: float, activation: str | None, runner: str):
    y, _, _ = launch.layer_norm_fwd(x, scale, bias, eps=eps, activation=activation, runner=runner)
    return y


def _layer_norm_fwd(x, scale, bias, eps, activation, runner):
    y, mean, rstd = launch.layer_norm_fwd(x, scale, bias, eps=eps, activation=activation, runner=runner)
    return y, (x, scale, bias, mean, rstd)


def _layer_norm_bwd(eps, activation, runner, residuals, dy):
    del eps
    x, scale, bias, mean, rstd = residuals
    dx, dw, db = launch.layer_norm_bwd(x, scale, bias, dy, mean, rstd, activation=activation, runner=runner)
    return dx, _reduce_partials(dw, scale), _reduce_partials(db, bias)


layer_norm_2d.defvjp(_layer_norm_fwd, _layer_norm_bwd)


# RMSNorm --------------------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def rms_norm_2d(x, scale, eps: float, runner: str):
    y, _, _ = launch.rms_norm_fwd(x, None, scale, eps=eps, runner=runner)
    return y


def _rms_norm_fwd(x, scale, eps, runner):
    y, _, rstd = launch.rms_norm_fwd(x, None, scale, eps=eps, runner=runner)
    return y, (x, scale, rstd)


def _rms_norm_bwd(eps, runner, residuals, dy):
    del eps
    x, scale, rstd = residuals
    dx, dw = launch.rms_norm_bwd(x, scale, dy, None, rstd, runner=runner)
    return dx, _reduce_partials(dw, scale)


rms_norm_2d.defvjp(_rms_norm_fwd, _rms_norm_bwd)


# residual add + RMSNorm -----------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def add_rms_norm_2d(x, residual, scale, eps: float, runner: str):
    y, h, _ = launch.rms_norm_fwd(x, residual, scale, eps=eps, runner=runner)
    return y, h


def _add_rms_norm_fwd(x, residual, scale, eps, runner):
    y, h, rstd = launch.rms_norm_fwd(x, residual, scale, eps=eps, runner=runner)
    return (y, h), (h, scale, rstd)


def _add_rms_norm_bwd(eps, runner, residuals, cotangents):
    del eps
    h, scale, rstd = residuals
    dy, dh = cotangents
    dsum, dw = launch.rms_norm_bwd(h, scale, dy, dh, rstd, runner=runner)
    return dsum, dsum, _reduce_partials(dw, scale)


add_rms_norm_2d.defvjp(_add_rms_norm_fwd, _add_rms_norm_bwd)
