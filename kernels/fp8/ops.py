"""The FP8 linear layer on the Triton kernels: the quantisers and GEMMs of `linear.ReferenceOps`, fused and laid
out for the FP8 tensor cores, with the same values (bit for bit in the quantisers, float32 rounding in the GEMMs).

Forward: x quantised in 1 x 128 tiles; w quantised in 128 x 128 blocks in one pass that writes both wq [K, N]
(saved for the backward) and wq^T [N, K] (the forward GEMM's K-major weight, dropped after it).
Backward: dy quantised once per layout from one read (1 x 128 tiles along N for Dgrad, 128 x 1 tiles along the
tokens, stored transposed [N, M], for Wgrad); the saved FP8 x re-tiled along the tokens in one pass
(dequantised in float32, quantised again, stored transposed [K, M]). Every GEMM then reads both operands with
the reduction axis contiguous: Dgrad reads the saved wq [K, N] as its K-major [N, K] operand, and Wgrad reads
the two transposed copies.

With `gemms="mosaic"` (Hopper) the three GEMMs run on the warp-specialised Pallas Mosaic GPU kernel of
`mosaic_gemm.py` wherever their shapes tile exactly, and on the Triton kernel elsewhere; the quantisers stay Triton.

Residuals are those of the reference layer: (xq, x_scales, wq, w_scales). `backward_from_input` takes a
high-precision x instead of (xq, x_scales) and quantises it along the tokens (`quantize_cols`) for Wgrad.
Under `jax.vmap` (per-replica gradients) each element runs the kernels once (`kernels.gmm.batching.mapped`):
a kernel call has no batching rule.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax.numpy as jnp

from kernels.fp8 import launch, mosaic_gemm
from kernels.gmm.batching import mapped

__all__ = ["GEMMS", "RUNNERS", "TritonOps"]

RUNNERS = ("triton", "interpret")
GEMMS = ("triton", "mosaic")
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class TritonOps:
    """`forward` / `backward` of the FP8 linear layer (see `linear.ReferenceOps`) on runner "triton" or "interpret"."""

    runner: str = "triton"
    gemms: str = "triton"  # "mosaic": the block-scaled GEMMs on the Pallas Mosaic GPU kernel where shapes tile

    def __post_init__(self):
        if self.runner not in RUNNERS:
            raise ValueError(f"runner must be one of {RUNNERS}, got {self.runner!r}")
        if self.gemms not in GEMMS:
            raise ValueError(f"gemms must be one of {GEMMS}, got {self.gemms!r}")
        if self.gemms == "mosaic" and self.runner != "triton":
            raise ValueError("gemms='mosaic' runs on a Hopper GPU only; it needs runner='triton'")

    def _gemm(self, name: str, m: int, n: int, k: int):
        """The GEMM `name` (fprop, dgrad, wgrad) for an [M, K] @ [K, N] product."""
        if self.gemms == "mosaic" and mosaic_gemm.supported(m, n, k):
            return getattr(mosaic_gemm, name)
        return partial(getattr(launch, name), runner=self.runner)

    def forward(self, x, w, out_dtype):
        return mapped(partial(self._forward, out_dtype=out_dtype))(x, w)

    def backward(self, residuals, dy, dx_dtype=F32):
        return mapped(partial(self._backward, dx_dtype=dx_dtype))(*residuals, dy)

    def backward_from_input(self, x, wq, w_scales, dy, dx_dtype=F32):
        return mapped(partial(self._backward_from_input, dx_dtype=dx_dtype))(x, wq, w_scales, dy)

    def _forward(self, x, w, out_dtype):
        run = dict(runner=self.runner)
        xq, x_scales = launch.quantize_rows(x, **run)
        wq, w_scales, wq_t = launch.quantize_blocks(w, transposed=True, **run)
        (m, k), n = x.shape, w.shape[1]
        y = self._gemm("fprop", m, n, k)(xq, x_scales, wq_t, w_scales, out_dtype)
        return y, (xq, x_scales, wq, w_scales)

    def _backward(self, xq, x_scales, wq, w_scales, dy, dx_dtype):
        x_cols = launch.requantize_cols(xq, x_scales, runner=self.runner)
        return self._grads(x_cols, wq, w_scales, dy, dx_dtype)

    def _backward_from_input(self, x, wq, w_scales, dy, dx_dtype):
        return self._grads(launch.quantize_cols(x, runner=self.runner), wq, w_scales, dy, dx_dtype)

    def _grads(self, x_cols, wq, w_scales, dy, dx_dtype):
        dyq, dy_scales, dytq, dyt_scales = launch.quantize_rows_and_cols(dy, runner=self.runner)
        (m, n), k = dy.shape, wq.shape[0]
        dx = self._gemm("dgrad", m, k, n)(dyq, dy_scales, wq, w_scales, dx_dtype)
        xtq, xt_scales = x_cols
        dw = self._gemm("wgrad", k, n, m)(xtq, xt_scales, dytq, dyt_scales, F32)
        return dx, dw
