"""Numerics of the skinny matmul (kernels.skinny) against a float64 numpy product.

On CPU the kernel runs in Triton's interpreter (runner "interpret"): the same source, arguments and launch
parameters as on the GPU, its output buffer pre-filled with NaN so an element the kernel never writes fails.
Small blocks make some cases walk several K steps and K splits per program; the default launch configuration
runs too, on shapes whose K and N are not multiples of its blocks.

Tolerances (relative Frobenius error against float64 on the same, already rounded, inputs):
- float32 operands: 1e-5. Products and sums are float32 (IEEE, no tf32); the error grows like sqrt(K) * 2^-24.
- 16-bit operands: products of bf16 / fp16 values are exact in float32 and the sums are float32, so the error is
  the final rounding to the output dtype: at most 2^-8 relative per element for bfloat16 (2^-9 rounding to
  nearest; the interpreter may round toward zero, 2^-8), 2^-10 for float16. A relative Frobenius error is at most
  the largest per-element relative error, so bf16 passes below 4e-3 and fp16 below 1e-3 with room for the float32
  sums, while a dropped K step or column (errors of order 1) fails by far.
NaN never passes.
"""

from __future__ import annotations

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import triton_runtime
from kernels.skinny import MAX_ROWS, launch, skinny_matmul, skinny_matmul_reference

HAS_TRITON = importlib.util.find_spec("triton") is not None
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (its interpreter runs the kernel)")

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
TOL = {jnp.dtype(F32): 1e-5, jnp.dtype(BF16): 4e-3, jnp.dtype(F16): 1e-3}


def rel_err(got, want) -> float:
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got)), "non-finite values (NaN: an unwritten element)"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def make_inputs(lead, k, n, dtype, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(*lead, k)), dtype)
    w = jnp.asarray(rng.normal(size=(k, n)) / np.sqrt(k), dtype)
    return x, w


def oracle(x, w) -> np.ndarray:
    return np.asarray(x, np.float64) @ np.asarray(w, np.float64)


def check(x, w, got):
    assert got.shape == (*x.shape[:-1], w.shape[1]) and got.dtype == x.dtype
    err = rel_err(got, oracle(x, w))
    assert err < TOL[jnp.dtype(x.dtype)], f"relative error {err:.2e}"


# ----------------------------------------------------------------------------------------------------
# Reference and launch heuristic
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_reference_matches_float64(dtype):
    x, w = make_inputs((2, 3), 200, 70, dtype, seed=0)
    check(x, w, skinny_matmul_reference(x, w))


def test_tolerance_catches_a_dropped_k_step():
    x, w = make_inputs((3,), 1000, 80, BF16, seed=1)
    want = oracle(x, w)
    dropped = oracle(x[:, 16:], w[16:])  # one 16-wide K step missing
    assert rel_err(dropped, want) > 10 * TOL[jnp.dtype(BF16)]


DECODE_SHAPES = [(2048, 2048), (2048, 8192), (8192, 2048), (2048, 6144), (7168, 2048), (2048, 129280), (2304, 2304)]


@pytest.mark.parametrize("itemsize", [2, 4])
@pytest.mark.parametrize("m", [1, 4, 16, 64])
@pytest.mark.parametrize("k,n", DECODE_SHAPES, ids=str)
def test_default_config_covers_k_and_fills_the_gpu(k, n, m, itemsize):
    sms = launch.DEFAULT_NUM_SMS
    cfg = launch.default_config(m, k, n, itemsize, sms)
    assert cfg.block_m >= m and cfg.block_m in (16, 32, 64)
    assert cfg.k_per_split % cfg.block_k == 0
    assert (cfg.split_k - 1) * cfg.k_per_split < k <= cfg.split_k * cfg.k_per_split, "a split is empty or K uncovered"
    assert cfg.block_k * cfg.block_n * itemsize >= 16 * 1024, "too little of w per K step"
    programs = launch.cdiv(n, cfg.block_n) * cfg.split_k
    partial_bytes = cfg.split_k * m * n * 4 if cfg.split_k > 1 else 0
    assert partial_bytes <= k * n * itemsize * launch.MAX_PARTIAL_FRACTION
    if m <= 16:  # decode: at least one program per SM, a few on most shapes
        assert programs >= sms, cfg
    stage_bytes = (cfg.block_k * cfg.block_n + cfg.block_m * cfg.block_k) * itemsize
    assert cfg.num_stages * stage_bytes <= 227 * 1024, "pipeline buffers exceed shared memory"


def test_make_config_drops_empty_splits():
    cfg = launch.make_config(3, 100, 16, 16, 6)  # 7 K steps over 6 splits would leave one empty
    assert (cfg.split_k, cfg.k_per_split, cfg.iters) == (4, 32, 2)
    with pytest.raises(ValueError, match=str(MAX_ROWS)):
        launch.make_config(MAX_ROWS + 1, 100, 16, 16, 1)


# ----------------------------------------------------------------------------------------------------
# The kernel in the interpreter
# ----------------------------------------------------------------------------------------------------
SMALL_CASES = [
    # (M, K, N, dtype, block_n, block_k, split_k): K and N not multiples of the blocks, several steps and splits
    (1, 96, 80, F32, 32, 16, 2),
    (3, 1000, 80, BF16, 64, 64, 5),
    (16, 96, 80, BF16, 16, 32, 1),  # one split: the kernel writes x's dtype directly
    (5, 200, 48, F16, 16, 16, 4),
    (40, 100, 50, F32, 32, 16, 3),  # BLOCK_M 64
]


@needs_triton
@pytest.mark.parametrize("m,k,n,dtype,block_n,block_k,split_k", SMALL_CASES, ids=str)
def test_small_blocks_match_float64(m, k, n, dtype, block_n, block_k, split_k):
    x, w = make_inputs((m,), k, n, dtype, seed=m + k + n)
    cfg = launch.make_config(m, k, block_n, block_k, split_k, itemsize=jnp.dtype(dtype).itemsize)
    check(x, w, launch.skinny_matmul(x, w, runner="interpret", config=cfg))


DEFAULT_CASES = [
    (1, 2048, 1000, BF16),
    (3, 1000, 4096, BF16),
    (16, 96, 1000, F32),
    (16, 2048, 80, F32),
    (3, 1000, 1000, F32),
]


@needs_triton
@pytest.mark.parametrize("m,k,n,dtype", DEFAULT_CASES, ids=str)
def test_default_config_matches_float64(m, k, n, dtype):
    x, w = make_inputs((m,), k, n, dtype, seed=m * k + n)
    check(x, w, skinny_matmul(x, w, impl="interpret"))


@needs_triton
def test_every_partial_is_written():
    """The interpreter pre-fills the kernel's output with NaN: every partial sum, every split, must be finite."""
    m, k, n = 3, 1000, 80
    x, w = make_inputs((m,), k, n, F32, seed=7)
    cfg = launch.make_config(m, k, 32, 64, 4, itemsize=4)  # last split covers K 768..999: partly masked
    partials = launch.skinny_partials(x, w, runner="interpret", poison=True, config=cfg)
    assert partials.shape == (cfg.split_k, m, n) and partials.dtype == F32
    assert np.all(np.isfinite(np.asarray(partials)))
    want = [oracle(x[:, s * 256 : (s + 1) * 256], w[s * 256 : (s + 1) * 256]) for s in range(cfg.split_k)]
    assert rel_err(partials, np.stack(want)) < TOL[jnp.dtype(F32)]


@needs_triton
def test_leading_dims_under_jit():
    x, w = make_inputs((2, 1, 3), 96, 80, BF16, seed=3)
    got = jax.jit(lambda a, b: skinny_matmul(a, b, impl="interpret"))(x, w)
    check(x, w, got)


@needs_triton
def test_gradient_is_the_reference_gradient():
    x, w = make_inputs((2, 3), 96, 80, F32, seed=4)
    g = jnp.asarray(np.random.default_rng(5).normal(size=(2, 3, 80)), F32)
    out, vjp = jax.vjp(lambda a, b: skinny_matmul(a, b, impl="interpret"), x, w)
    dx, dw = vjp(g)
    _, ref_vjp = jax.vjp(skinny_matmul_reference, x, w)
    want_dx, want_dw = ref_vjp(g)
    check(x, w, out)
    assert rel_err(dx, np.asarray(want_dx, np.float64)) < 1e-6
    assert rel_err(dw, np.asarray(want_dw, np.float64)) < 1e-6


@needs_triton
def test_empty_inputs():
    assert skinny_matmul(jnp.ones((3, 0), F32), jnp.ones((0, 5), F32), impl="interpret").tolist() == [[0.0] * 5] * 3
    assert skinny_matmul(jnp.ones((0, 4), BF16), jnp.ones((4, 5), BF16), impl="interpret").shape == (0, 5)


# ----------------------------------------------------------------------------------------------------
# Errors and dispatch
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "x_shape,w_shape,x_dtype,w_dtype,match",
    [
        ((2, 8), (9, 4), F32, F32, "disagree"),
        ((2, 8), (1, 8, 4), F32, F32, r"w \[K, N\]"),
        ((), (8, 4), F32, F32, "scalar"),
        ((2, 8), (8, 4), BF16, F32, "one dtype"),
        ((2, 8), (8, 4), jnp.int32, jnp.int32, "supports"),
    ],
)
@pytest.mark.parametrize("impl", ["auto", "reference", "interpret"])
def test_bad_inputs_raise(x_shape, w_shape, x_dtype, w_dtype, match, impl):
    with pytest.raises(ValueError, match=match):
        skinny_matmul(jnp.ones(x_shape, x_dtype), jnp.ones(w_shape, w_dtype), impl=impl)


def test_bad_impl_and_too_many_rows_raise():
    x, w = jnp.ones((MAX_ROWS + 1, 8), F32), jnp.ones((8, 4), F32)
    with pytest.raises(ValueError, match="impl must be"):
        skinny_matmul(x, w, impl="fused")
    for impl in ("interpret", "triton"):
        with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
            skinny_matmul(x, w, impl=impl)
    assert skinny_matmul(x, w, impl="auto").shape == (MAX_ROWS + 1, 4)  # auto falls back to the reference


def test_auto_takes_the_reference_without_a_gpu():
    if triton_runtime.unavailable_reason() is None:
        pytest.skip("the Triton kernel can run here (test_gpu_auto_takes_the_triton_kernel)")
    x, w = make_inputs((3,), 96, 80, BF16, seed=6)
    np.testing.assert_array_equal(np.asarray(skinny_matmul(x, w), np.float32), skinny_matmul_reference(x, w))


# ----------------------------------------------------------------------------------------------------
# On a CUDA GPU (jax-triton): decode shapes, poisoned outputs
# ----------------------------------------------------------------------------------------------------
# Tolerances as on CPU (module docstring): bf16 output rounding (2^-9 relative per element, rounded to nearest on
# the GPU) under 4e-3; float32 1e-5, the kernel multiplying float32 at full IEEE precision (no tf32).
GPU_KN = [(2048, 2048), (2048, 8192), (8192, 2048), (2304, 7168), (7168, 2304), (7168, 2048)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
@pytest.mark.parametrize("k,n", GPU_KN, ids=str)
@pytest.mark.parametrize("m", [1, 8, 16])
def test_gpu_poisoned_kernel_matches_float64(m, k, n, dtype):
    x, w = make_inputs((m,), k, n, dtype, seed=m + k + 3 * n)
    cfg = launch.default_config(m, k, n, jnp.dtype(dtype).itemsize, launch.num_sms())
    partials = launch.skinny_partials(x, w, poison=True)  # output pre-filled with NaN and aliased
    assert np.all(np.isfinite(np.asarray(partials, np.float32))), "an unwritten element"
    assert partials.shape == (cfg.split_k, m, n)
    check(x, w, launch.skinny_matmul(x, w, poison=True))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16, F16], ids=["f32", "bf16", "f16"])
def test_gpu_jit_leading_dims_and_gradient(dtype):
    x, w = make_inputs((2, 4), 2304, 2048, dtype, seed=11)
    out, vjp = jax.vjp(jax.jit(lambda a, b: skinny_matmul(a, b, impl="triton")), x, w)
    check(x, w, out)
    g = jnp.ones_like(out)
    _, ref_vjp = jax.vjp(skinny_matmul_reference, x, w)
    for got, want in zip(vjp(g), ref_vjp(g), strict=True):
        assert rel_err(got, np.asarray(want, np.float64)) < 1e-6


@pytest.mark.gpu
def test_gpu_auto_takes_the_triton_kernel(monkeypatch):
    calls = []
    real = launch.skinny_partials
    monkeypatch.setattr(launch, "skinny_partials", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    x, w = make_inputs((1,), 2048, 2048, BF16, seed=12)
    check(x, w, skinny_matmul(x, w))
    assert calls and calls[0]["runner"] == "triton"
