"""Causal self-attention through `jax.nn.dot_product_attention`, its implementation chosen per call.

`model.attention`:
- "cudnn": cuDNN's fused flash attention (CUDA GPUs; JAX raises where it cannot run these inputs).
- "xla": JAX's attention in XLA ops. It keeps the [batch, heads, seq, seq] probabilities for the backward.
- "auto": cuDNN where it can run, else XLA. cuDNN needs a CUDA GPU of compute capability 8.0 or more, bf16 or
  fp16 inputs, an unsplit sequence axis (its partitioning rule splits batch and heads only) and no `shard_map`
  over part of the mesh (the pipeline's: its partitioning rule then sees no mesh), and JAX must accept the call
  at trace time (head width, cuDNN version). On an H200 it made the bf16 training step of
  `experiments/deepseek_fp8_accuracy.yaml` 1.46x faster than XLA's and its temporaries 39% smaller
  (experiments/benchmarks/RESULTS.md). Checks that cuDNN makes only when XLA compiles the program cannot be seen
  here: set "xla" if one fails. The choice is logged once per reason.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp

from jaxdeep import sharding
from kernels.triton_runtime import cuda_unavailable_reason

IMPLEMENTATIONS = ("auto", "xla", "cudnn")
HEADS = ("batch", "act_seq", "act_heads", None)  # how the model lays out q, k and v: [batch, seq, heads, width]
MIN_COMPUTE_CAPABILITY = (8, 0)  # cuDNN's flash attention: Ampere and later

log = logging.getLogger(__name__)


@functools.cache
def _log_choice(message: str) -> None:
    log.info("model.attention auto: %s", message)


def _compute_capability() -> tuple[int, ...]:
    version = getattr(jax.devices()[0], "compute_capability", None)
    return tuple(int(part) for part in str(version).split(".")) if version else (0,)


def cudnn_unavailable_reason(q_btnh: jax.Array) -> str | None:
    """Why "auto" does not take cuDNN for queries like `q_btnh` here, or None when it tries it."""
    reason = cuda_unavailable_reason()
    if reason is not None:
        return reason
    capability = _compute_capability()
    if capability < MIN_COMPUTE_CAPABILITY:
        return f"cuDNN flash attention needs compute capability 8.0 or more, this GPU has {capability}"
    if q_btnh.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN attention takes bf16 or fp16, not {q_btnh.dtype}"
    abstract = jax.sharding.get_abstract_mesh()
    manual = set(getattr(abstract, "manual_axes", ()))
    if manual and set(abstract.axis_names) - manual:
        return f"inside a shard_map over mesh axes {sorted(manual)} only (a pipeline stage, say)"
    spec = sharding.active_spec(HEADS)  # mesh axes of size 1 are left out of it
    if spec is not None and spec[1][1] is not None:
        return f"the sequence axis is split over mesh axes {spec[1][1]}"
    return None


def causal_attention(
    q_btnh: jax.Array, k_btnh: jax.Array, v_btnh: jax.Array, *, implementation: str = "auto", scale=None
) -> jax.Array:
    """Causal `jax.nn.dot_product_attention` of q, k, v [batch, seq, heads, width] with `implementation` one of
    `IMPLEMENTATIONS`."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")

    def attend(impl: str) -> jax.Array:
        return jax.nn.dot_product_attention(q_btnh, k_btnh, v_btnh, scale=scale, is_causal=True, implementation=impl)

    if implementation != "auto":
        return attend(implementation)
    reason = cudnn_unavailable_reason(q_btnh)
    if reason is None:
        try:
            out = attend("cudnn")
            _log_choice("cuDNN flash attention")
            return out
        except (ValueError, RuntimeError, TypeError) as e:  # JAX refused cuDNN for these inputs (head width, version)
            reason = f"JAX refused cuDNN for these inputs ({type(e).__name__}: {e})"
    _log_choice(f"XLA's attention: {reason}")
    return attend("xla")
