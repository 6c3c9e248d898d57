"""Numerics of the Triton grouped matmul (kernels.gmm.ops.triton_gmm) against a float64 loop over groups.

On CPU the kernels run in Triton's interpreter (runner "interpret"): the same source, arguments and launch
parameters as on the GPU, every output pre-filled with NaN so an element the kernel never writes fails.
Small blocks (16) and a persistent grid of a few programs make every case walk many work items per program,
with groups that are empty, shorter than a tile, not tile multiples, or hold every row, plus padding rows.

Tolerances (relative Frobenius error against float64 on the same, already rounded, inputs):
- float32 operands: 1e-5. Products and sums are float32 (IEEE, no tf32); the error grows like sqrt(K) * 2^-24.
- bfloat16 operands, float32 output: 1e-5 as well: products of bf16 values are exact in float32 and the
  accumulation is float32, so only the summation rounds.
- bfloat16 output: 1e-2. Rounding the result to bf16 costs up to 2^-8 relative per element (2^-7 in the
  interpreter, which rounds toward zero); gradients also round the cotangent to bf16 before multiplying.
NaN never passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gmm import launch
from kernels.gmm.ops import triton_gmm
from tests.helpers import needs_triton_interpreter

F32, BF16 = jnp.float32, jnp.bfloat16
TOL = {jnp.dtype(F32): 1e-5, jnp.dtype(BF16): 1e-2}
SMALL = launch.GemmConfig(block_m=16, block_n=16, block_k=16, group_m=2, programs=3)


# ----------------------------------------------------------------------------------------------------
# float64 oracle
# ----------------------------------------------------------------------------------------------------
def oracle(lhs, rhs, sizes, dout):
    """(out, dlhs, drhs) in float64 by a loop over groups; rows past sum(sizes) are zero."""
    lhs, rhs, dout = (np.asarray(x, np.float64) for x in (lhs, rhs, dout))
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    dlhs, drhs = np.zeros_like(lhs), np.zeros_like(rhs)
    start = 0
    for g, size in enumerate(sizes):
        rows = slice(start, start + size)
        out[rows] = lhs[rows] @ rhs[g]
        dlhs[rows] = dout[rows] @ rhs[g].T
        drhs[g] = lhs[rows].T @ dout[rows]
        start += size
    return out, dlhs, drhs


def rel_err(got, want) -> float:
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got)), "non-finite values (NaN: an unwritten element)"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def make_inputs(sizes, m, k, n, dtype, seed):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.normal(size=(m, k)), dtype)
    rhs = jnp.asarray(rng.normal(size=(len(sizes), k, n)), dtype)
    dout = jnp.asarray(rng.normal(size=(m, n)), dtype)
    return lhs, rhs, jnp.asarray(sizes, jnp.int32), dout


def check_launch(sizes, m, k, n, dtype, *, config=SMALL, out_dtype=None, tol=None):
    """The three kernels, launched directly, against the oracle."""
    lhs, rhs, gs, dout = make_inputs(sizes, m, k, n, dtype, seed=sum(sizes) + m + k + n)
    want_out, want_dlhs, want_drhs = oracle(lhs, rhs, sizes, dout)
    out = launch.gmm_fwd(lhs, rhs, gs, out_dtype=out_dtype, runner="interpret", config=config)
    dlhs = launch.gmm_dlhs(dout, rhs, gs, runner="interpret", config=config)
    drhs = launch.gmm_drhs(lhs, dout, gs, len(sizes), runner="interpret", config=config)
    assert out.shape == (m, n) and out.dtype == jnp.dtype(out_dtype or dtype)
    assert dlhs.shape == (m, k) and dlhs.dtype == dtype and drhs.shape == rhs.shape and drhs.dtype == dtype
    tol = tol or TOL[jnp.dtype(out_dtype or dtype)]
    for name, got, want in (("out", out, want_out), ("dlhs", dlhs, want_dlhs), ("drhs", drhs, want_drhs)):
        err = rel_err(got, want)
        assert err < (tol if name == "out" else TOL[jnp.dtype(dtype)]), f"{name}: {err:.2e}"
    total = sum(sizes)
    assert np.all(np.asarray(out, np.float64)[total:] == 0), "padding rows of the output must be zero"
    assert np.all(np.asarray(dlhs, np.float64)[total:] == 0), "padding rows of dlhs must be zero"
    for g, size in enumerate(sizes):
        if size == 0:
            assert np.all(np.asarray(drhs[g], np.float64) == 0), f"empty group {g}: drhs must be zero"


# ----------------------------------------------------------------------------------------------------
# Oracle and schedule
# ----------------------------------------------------------------------------------------------------
def test_oracle_matches_ragged_dot_and_its_gradients():
    sizes = [3, 0, 6, 2]
    lhs, rhs, gs, dout = make_inputs(sizes, 13, 5, 4, F32, seed=0)
    want_out, want_dlhs, want_drhs = oracle(lhs, rhs, sizes, dout)
    out, vjp = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, gs, precision="highest"), lhs, rhs)
    dlhs, drhs = vjp(dout)
    for got, want in ((out, want_out), (dlhs, want_dlhs), (drhs, want_drhs)):
        assert rel_err(got, want) < 1e-6


def test_tolerance_catches_a_row_given_to_the_wrong_group():
    """One row moved across a group boundary is far outside even the bf16 tolerance."""
    lhs, rhs, _, dout = make_inputs([8, 8], 16, 32, 16, F32, seed=1)
    right = oracle(lhs, rhs, [8, 8], dout)
    wrong = oracle(lhs, rhs, [9, 7], dout)
    for r, w in zip(right, wrong, strict=True):
        assert rel_err(w, r) > 10 * TOL[jnp.dtype(BF16)]


def test_schedule_offsets_and_tile_prefix_sums():
    offsets, tile_starts = launch.schedule(jnp.asarray([5, 0, 17, 1]), 30, 16)
    assert offsets.tolist() == [0, 5, 5, 22, 23, 30]  # last group: padding rows 23..29
    assert tile_starts.tolist() == [0, 1, 1, 3, 4, 5]
    offsets, _ = launch.schedule(jnp.asarray([20, 20]), 30, 16)  # sizes past M are clipped
    assert offsets.tolist() == [0, 20, 30, 30]


# ----------------------------------------------------------------------------------------------------
# Kernels in the interpreter
# ----------------------------------------------------------------------------------------------------
LAUNCH_CASES = [
    # (sizes, M, K, N, dtype): uneven, empty and 1-row groups, padding, K and N not multiples of the blocks
    ([5, 0, 17, 1, 30, 0], 60, 40, 24, F32),
    ([5, 0, 17, 1, 30, 0], 60, 40, 24, BF16),
    ([0, 0, 50, 0], 53, 32, 48, F32),  # one group holds every row
    ([1, 1, 1, 1, 1, 1, 1], 7, 16, 16, F32),  # tiny groups, no padding
    ([16, 32, 0, 16], 64, 64, 32, BF16),  # tile multiples throughout
    ([0, 0, 0], 9, 24, 20, F32),  # no rows at all: everything zero
]


@needs_triton_interpreter
@pytest.mark.parametrize("sizes,m,k,n,dtype", LAUNCH_CASES, ids=lambda v: str(v))
def test_kernels_match_float64(sizes, m, k, n, dtype):
    check_launch(sizes, m, k, n, dtype)


@needs_triton_interpreter
def test_bf16_operands_with_float32_output_accumulate_exactly_enough():
    check_launch([7, 0, 20, 3], 34, 48, 40, BF16, out_dtype=F32, tol=1e-5)


@needs_triton_interpreter
@pytest.mark.parametrize("programs", [1, 200], ids=["one-program", "more-programs-than-items"])
def test_persistent_grid_sizes(programs):
    cfg = launch.GemmConfig(block_m=16, block_n=16, block_k=16, group_m=3, programs=programs)
    check_launch([9, 0, 21, 2], 40, 20, 36, F32, config=cfg)


@needs_triton_interpreter
def test_skewed_groups_spread_over_programs():
    """Zipf-like sizes: one group holds most rows, several are empty; 5 programs share the items."""
    sizes = [70, 12, 5, 2, 1, 0, 0, 1]
    cfg = launch.GemmConfig(block_m=16, block_n=16, block_k=32, group_m=2, programs=5)
    check_launch(sizes, 96, 40, 40, F32, config=cfg)


@needs_triton_interpreter
@pytest.mark.parametrize("sizes,m,k,n,dtype", [LAUNCH_CASES[0], LAUNCH_CASES[1], LAUNCH_CASES[4]], ids=str)
def test_kernels_read_weights_stored_transposed(sizes, m, k, n, dtype):
    """rhs stored [E, N, K] (the serving layout of the experts) with `transpose_rhs`: the same products, read
    through strides; the weight gradient comes back [E, N, K] as well."""
    lhs, rhs, gs, dout = make_inputs(sizes, m, k, n, dtype, seed=len(sizes) + m)
    want_out, want_dlhs, want_drhs = oracle(lhs, rhs, sizes, dout)
    rhs_t = jnp.swapaxes(rhs, 1, 2)
    out = launch.gmm_fwd(lhs, rhs_t, gs, transpose_rhs=True, runner="interpret", config=SMALL)
    dlhs = launch.gmm_dlhs(dout, rhs_t, gs, transpose_rhs=True, runner="interpret", config=SMALL)
    tol = TOL[jnp.dtype(dtype)]
    assert out.shape == (m, n) and dlhs.shape == (m, k)
    assert rel_err(out, want_out) < tol and rel_err(dlhs, want_dlhs) < tol
    assert not np.any(np.asarray(out, np.float64)[sum(sizes) :])

    @jax.jit
    def fwd_bwd(a, b_t, gs, dout):
        out, vjp = jax.vjp(lambda a, b_t: triton_gmm(a, b_t, gs, runner="interpret", transpose_rhs=True), a, b_t)
        return out, *vjp(dout)

    out, dlhs, drhs_t = fwd_bwd(lhs, rhs_t, gs, dout)
    assert drhs_t.shape == rhs_t.shape and drhs_t.dtype == dtype
    for got, want in ((out, want_out), (dlhs, want_dlhs), (drhs_t, want_drhs.transpose(0, 2, 1))):
        assert rel_err(got, want) < tol


@pytest.mark.parametrize("impl", ["reference", pytest.param("interpret", marks=needs_triton_interpreter)])
def test_dispatcher_with_transposed_weights_gives_the_plain_product_and_gradients(impl):
    from kernels.gmm import gmm

    sizes = [6, 0, 9, 1]
    lhs, rhs, gs, dout = make_inputs(sizes, 20, 24, 16, F32, seed=8)
    want = oracle(lhs, rhs, sizes, dout)
    rhs_t = jnp.swapaxes(rhs, 1, 2)
    out, vjp = jax.vjp(lambda a, b_t: gmm(a, b_t, gs, impl=impl, transpose_rhs=True), lhs, rhs_t)
    dlhs, drhs_t = vjp(dout)
    for got, w in ((out, want[0]), (dlhs, want[1]), (jnp.swapaxes(drhs_t, 1, 2), want[2])):
        assert rel_err(got, w) < TOL[jnp.dtype(F32)]
    # under vmap with the weights shared (per-replica gradients)
    batched = jax.vmap(lambda a: gmm(a, rhs_t, gs, impl=impl, transpose_rhs=True))(jnp.stack([lhs, 2 * lhs]))
    assert rel_err(batched[1], 2 * want[0]) < TOL[jnp.dtype(F32)]
    with pytest.raises(ValueError, match=r"rhs \[g, n, k\].*need lhs\[1\] == rhs\[2\]"):
        gmm(lhs, rhs, gs, impl=impl, transpose_rhs=True)


# ----------------------------------------------------------------------------------------------------
# The custom_vjp op (default launch configurations, shrunk to the small shapes)
# ----------------------------------------------------------------------------------------------------
@needs_triton_interpreter
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_triton_gmm_forward_and_gradients_under_jit(dtype):
    sizes = [11, 0, 40, 3]
    lhs, rhs, gs, dout = make_inputs(sizes, 60, 72, 40, dtype, seed=5)
    want_out, want_dlhs, want_drhs = oracle(lhs, rhs, sizes, dout)

    @jax.jit
    def fwd_bwd(a, b, gs, dout):
        out, vjp = jax.vjp(lambda a, b: triton_gmm(a, b, gs, runner="interpret"), a, b)
        return out, *vjp(dout)

    out, dlhs, drhs = fwd_bwd(lhs, rhs, gs, dout)
    tol = TOL[jnp.dtype(dtype)]
    assert out.dtype == dlhs.dtype == drhs.dtype == dtype
    assert rel_err(out, want_out) < tol
    assert rel_err(dlhs, want_dlhs) < tol
    assert rel_err(drhs, want_drhs) < tol
    ref = jax.jit(lambda a, b, gs: jax.lax.ragged_dot(a, b, gs, precision="highest"))(lhs, rhs, gs)
    assert rel_err(out, np.asarray(ref, np.float64)) < 2 * tol  # both round to dtype


@needs_triton_interpreter
def test_triton_gmm_preferred_float32_output_and_gradients_of_a_loss():
    sizes = [4, 20, 0, 6]
    lhs, rhs, gs, _ = make_inputs(sizes, 32, 24, 16, BF16, seed=6)
    weight = jnp.asarray(np.random.default_rng(7).normal(size=(32, 16)), F32)

    def loss(a, b, fn):
        return jnp.sum(fn(a, b, gs) * weight)

    kernel = lambda a, b, gs: triton_gmm(a, b, gs, runner="interpret", preferred_element_type=F32)
    ref = lambda a, b, gs: jax.lax.ragged_dot(a, b, gs, precision="highest", preferred_element_type=F32)
    out = kernel(lhs, rhs, gs)
    assert out.dtype == F32
    assert rel_err(out, oracle(lhs, rhs, sizes, weight)[0]) < 1e-5
    got = jax.jit(jax.grad(lambda a, b: loss(a, b, kernel), argnums=(0, 1)))(lhs, rhs)
    want = jax.grad(lambda a, b: loss(a, b, ref), argnums=(0, 1))(lhs, rhs)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == BF16
        assert rel_err(g, np.asarray(w, np.float64)) < TOL[jnp.dtype(BF16)]


def test_interpret_runner_says_why_where_the_interpreter_cannot_run(monkeypatch):
    from kernels import triton_runtime

    monkeypatch.setattr(triton_runtime, "interpreter_unavailable_reason", lambda: "an old interpreter")
    lhs, rhs, gs = jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.asarray([2, 2])
    with pytest.raises(RuntimeError, match="cannot run in Triton's interpreter here: an old interpreter"):
        triton_gmm(lhs, rhs, gs, runner="interpret")


def test_triton_gmm_rejects_bad_arguments():
    lhs, rhs, gs = jnp.zeros((4, 3)), jnp.zeros((2, 3, 5)), jnp.asarray([2, 2])
    with pytest.raises(ValueError, match="runner must be one of"):
        triton_gmm(lhs, rhs, gs, runner="cuda")
    with pytest.raises(ValueError, match="shapes disagree"):
        triton_gmm(lhs, rhs[:, :2], gs)
    with pytest.raises(ValueError, match="expects lhs"):
        triton_gmm(lhs[None], rhs, gs)
    with pytest.raises(ValueError, match="must be integers"):
        triton_gmm(lhs, rhs, gs.astype(F32))
    with pytest.raises(ValueError, match="supports"):
        triton_gmm(lhs.astype(jnp.int32), rhs.astype(jnp.int32), gs)


def test_triton_gmm_with_an_empty_dimension_is_zeros():
    out = triton_gmm(jnp.zeros((0, 3)), jnp.zeros((2, 3, 5)), jnp.asarray([0, 0]), runner="interpret")
    assert out.shape == (0, 5)
    out = triton_gmm(jnp.ones((4, 0)), jnp.ones((2, 0, 5)), jnp.asarray([1, 2]), runner="interpret")
    assert out.shape == (4, 5) and not np.any(np.asarray(out))


# ----------------------------------------------------------------------------------------------------
# On a CUDA GPU (jax-triton): real shapes, poisoned outputs, fp32 and bf16
# ----------------------------------------------------------------------------------------------------
def _gpu_sizes(groups: int, rows: int, seed: int) -> list[int]:
    """Uneven sizes with empty groups, summing to less than `rows` (the tail is padding)."""
    rng = np.random.default_rng(seed)
    weights = rng.zipf(1.5, groups).astype(np.float64)
    weights[rng.choice(groups, groups // 8, replace=False)] = 0
    sizes = np.floor(weights / weights.sum() * (rows - 37)).astype(int)
    return sizes.tolist()


GPU_CASES = [
    # (E, M, K, N, dtype)
    (64, 8192, 2048, 1408, BF16),  # the anchors' expert shape (fewer tokens)
    (64, 4096, 2048, 1408, F32),
    (32, 2048, 7168, 2048, BF16),  # DeepSeek-V3 expert shape (fewer experts and rows)
    (16, 3000, 1000, 700, BF16),  # nothing a multiple of a block
]


@pytest.mark.gpu
@pytest.mark.parametrize("e,m,k,n,dtype", GPU_CASES, ids=lambda v: str(v))
def test_gpu_poisoned_kernels_match_float64(e, m, k, n, dtype):
    sizes = _gpu_sizes(e, m, seed=e + m)
    lhs, rhs, gs, dout = make_inputs(sizes, m, k, n, dtype, seed=k + n)
    want_out, want_dlhs, want_drhs = oracle(lhs, rhs, sizes, dout)
    out = launch.gmm_fwd(lhs, rhs, gs, poison=True)
    dlhs = launch.gmm_dlhs(dout, rhs, gs, poison=True)
    drhs = launch.gmm_drhs(lhs, dout, gs, e, poison=True)
    tol = TOL[jnp.dtype(dtype)]
    for name, got, want in (("out", out, want_out), ("dlhs", dlhs, want_dlhs), ("drhs", drhs, want_drhs)):
        assert rel_err(got, want) < tol, f"{name}: {rel_err(got, want):.2e}"
    total = sum(sizes)
    assert not np.any(np.asarray(out[total:], np.float64)) and not np.any(np.asarray(dlhs[total:], np.float64))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_gpu_triton_gmm_under_jit_matches_reference(dtype):
    sizes = [0, 700, 1, 0, 1300, 17, 0, 2000]
    lhs, rhs, gs, dout = make_inputs(sizes, 4100, 1024, 768, dtype, seed=3)
    want_out, want_dlhs, want_drhs = oracle(lhs, rhs, sizes, dout)

    @jax.jit
    def fwd_bwd(a, b, gs, dout):
        out, vjp = jax.vjp(lambda a, b: triton_gmm(a, b, gs), a, b)
        return out, *vjp(dout)

    tol = TOL[jnp.dtype(dtype)]
    for got, want in zip(fwd_bwd(lhs, rhs, gs, dout), (want_out, want_dlhs, want_drhs), strict=True):
        assert rel_err(got, want) < tol


@pytest.mark.gpu
@pytest.mark.parametrize("e,m,k,n,dtype", [GPU_CASES[0], GPU_CASES[3]], ids=lambda v: str(v))
def test_gpu_weights_stored_transposed_match_float64(e, m, k, n, dtype):
    sizes = _gpu_sizes(e, m, seed=e + m + 1)
    lhs, rhs, gs, dout = make_inputs(sizes, m, k, n, dtype, seed=k + n + 1)
    want_out, want_dlhs, want_drhs = oracle(lhs, rhs, sizes, dout)
    rhs_t = jnp.swapaxes(rhs, 1, 2)
    out = launch.gmm_fwd(lhs, rhs_t, gs, transpose_rhs=True, poison=True)
    dlhs = launch.gmm_dlhs(dout, rhs_t, gs, transpose_rhs=True, poison=True)

    @jax.jit
    def fwd_bwd(a, b_t, gs, dout):
        out, vjp = jax.vjp(lambda a, b_t: triton_gmm(a, b_t, gs, transpose_rhs=True), a, b_t)
        return out, *vjp(dout)

    jit_out, jit_dlhs, drhs_t = fwd_bwd(lhs, rhs_t, gs, dout)
    tol = TOL[jnp.dtype(dtype)]
    for name, got, want in (
        ("out", out, want_out),
        ("dlhs", dlhs, want_dlhs),
        ("jit out", jit_out, want_out),
        ("jit dlhs", jit_dlhs, want_dlhs),
        ("drhs", drhs_t, want_drhs.transpose(0, 2, 1)),
    ):
        assert rel_err(got, want) < tol, f"{name}: {rel_err(got, want):.2e}"
    assert not np.any(np.asarray(out[sum(sizes) :], np.float64))


@pytest.mark.gpu
def test_gpu_one_group_holds_everything_and_all_groups_empty():
    lhs, rhs, _, dout = make_inputs([0] * 8, 2048, 512, 384, BF16, seed=4)
    for sizes in ([0, 0, 0, 2048, 0, 0, 0, 0], [0] * 8):
        gs = jnp.asarray(sizes, jnp.int32)
        want = oracle(lhs, rhs, sizes, dout)
        got = (
            launch.gmm_fwd(lhs, rhs, gs, poison=True),
            launch.gmm_dlhs(dout, rhs, gs, poison=True),
            launch.gmm_drhs(lhs, dout, gs, 8, poison=True),
        )
        for g, w in zip(got, want, strict=True):
            if np.any(w):
                assert rel_err(g, w) < TOL[jnp.dtype(BF16)]
            else:
                assert not np.any(np.asarray(g, np.float64))


def _program(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))  # nested jaxprs (custom_vjp bodies) included


def test_auto_takes_the_reference_without_a_gpu():
    from kernels.gmm import gmm

    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU, auto takes the Triton kernels (test_gpu_auto_takes_the_triton_kernels)")
    lhs, rhs, gs, _ = make_inputs([3, 0, 5], 8, 32, 16, BF16, seed=5)
    assert "ragged_dot_general" in _program(lambda a, b: gmm(a, b, gs, impl="auto"), lhs, rhs)


@pytest.mark.gpu
def test_gpu_auto_takes_the_triton_kernels():
    from kernels.gmm import gmm

    sizes = [300, 0, 212]
    lhs, rhs, gs, dout = make_inputs(sizes, 512, 256, 128, BF16, seed=6)
    program = _program(lambda a, b: gmm(a, b, gs, impl="auto"), lhs, rhs)
    assert "ragged_dot_general" not in program and "triton_kernel_call" in program
    assert rel_err(gmm(lhs, rhs, gs, impl="auto"), oracle(lhs, rhs, sizes, dout)[0]) < TOL[jnp.dtype(BF16)]


@needs_triton_interpreter
def test_independent_interpreted_launches_in_one_program_all_match():
    # XLA may run the host callbacks of independent launches at the same time; the interpreter must not mix them.
    from kernels.gmm import gmm

    sizes = [10, 20, 0, 34]
    lhs, rhs, gs, dout = make_inputs(sizes, 64, 32, 16, F32, seed=7)
    batch = [lhs, lhs + 1, lhs * 2]
    outs = jax.jit(lambda xs: [gmm(x, rhs, gs, impl="interpret") for x in xs])(batch)
    for x, out in zip(batch, outs, strict=True):
        assert rel_err(out, oracle(x, rhs, sizes, dout)[0]) < TOL[jnp.dtype(F32)]
