"""Launching the decode kernels: Pallas with its Triton backend.

These kernels run once per layer per decode step, a few microseconds each, so what a launch costs the host
matters as much as the kernel: a Pallas Triton kernel is compiled into the XLA program like one of XLA's own
fusions and recorded into its command buffers (CUDA graphs), about 1.9 µs of host time per launch on an H200
against 8–9 µs for a jax-triton or Mosaic GPU custom call (experiments/benchmarks/RESULTS.md). The backend is
deprecated upstream; `unavailable_reason` says when it is gone, and the dispatchers then take the XLA path.
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from kernels.triton_runtime import cuda_unavailable_reason

DEPRECATION = ".*Pallas Triton backend is deprecated.*"


@functools.cache
def _backend_error() -> str | None:
    try:
        from jax.experimental.pallas import triton as _  # noqa: F401
    except Exception as e:
        return f"Pallas' Triton backend cannot be imported ({type(e).__name__}: {e})"
    return None


def unavailable_reason() -> str | None:
    """Why the kernels cannot run compiled here, or None when they can."""
    return cuda_unavailable_reason() or _backend_error()


def load(ref, mask):
    """Masked load (zeros where `mask` is False), on either backend."""
    from jax.experimental.pallas import triton as plt

    return plt.load(ref, mask=mask, other=0)


def merge_chunks(o_sbnh, m_sbn, l_sbn, dtype):
    """Flash-decoding's merge: each chunk's unnormalised output [chunks, b, n, h] with its running max and sum
    [chunks, b, n] -> the softmax-weighted output over all chunks [b, n, h]. A chunk that saw nothing has max
    -1e30 and sum 0, so its weight is 0."""
    w_sbn = jnp.exp(m_sbn - jnp.max(m_sbn, axis=0))
    out = jnp.sum(w_sbn[..., None] * o_sbnh, axis=0) / jnp.sum(w_sbn * l_sbn, axis=0)[..., None]
    return out.astype(dtype)


def call(
    kernel,
    *,
    grid,
    inputs,
    out_shapes,
    num_warps: int,
    interpret: bool,
    poison: bool,
    in_place: tuple[int, ...] = (),
    num_stages: int = 1,
):
    """Run `kernel(*input_refs, *output_refs)` over `grid`; every ref is the whole array (kernels index it).
    `in_place`: indices of inputs that are also outputs, after those of `out_shapes`, sharing the input's buffer
    (the kernel writes only what changes; XLA updates a donated buffer without a copy). `poison` fills the
    `out_shapes` outputs with NaN first, so elements the kernel never writes show."""
    from jax.experimental.pallas import triton as plt

    n_in, n_out = len(inputs), len(out_shapes)
    aliases = {i: n_out + j for j, i in enumerate(in_place)}
    out_shapes = (*out_shapes, *(jax.ShapeDtypeStruct(inputs[i].shape, inputs[i].dtype) for i in in_place))
    body = kernel
    if poison:
        inputs = (*inputs, *(jnp.full(s.shape, jnp.nan, s.dtype) for s in out_shapes[:n_out]))
        aliases |= {n_in + j: j for j in range(n_out)}

        def kernel(*refs):  # the poisoned buffers arrive as inputs aliased to the outputs: skip them
            return body(*refs[:n_in], *refs[n_in + n_out :])

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=DEPRECATION, category=DeprecationWarning)
        return pl.pallas_call(
            kernel,
            grid=grid,
            out_shape=out_shapes,
            input_output_aliases=aliases,
            interpret=interpret,
            compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        )(*inputs)
