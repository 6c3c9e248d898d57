"""Block layout and numerics of the block-sparse matmul (kernels.block_sparse) against float64 numpy.

On CPU the Triton kernels run in Triton's interpreter (runner / impl "interpret"): the same source, arguments
and launch parameters as on the GPU, every output pre-filled with NaN so an element the kernels never write
fails. Small tiles (16 rows, 16-wide reduction steps) make every case walk several row tiles, block columns and
steps per block, with block columns that are empty or full and row counts that are not tile multiples.

Tolerances (relative Frobenius error against float64 on the same, already rounded, inputs):
- float32 operands: 1e-5 (IEEE float32 products and sums, no tf32);
- bfloat16 operands, float32 output: 1e-5 as well (products of bf16 values are exact in float32);
- bfloat16 output: 1e-2 (rounding to bf16 costs up to 2^-8 per element; gradients also round the cotangent);
- float16 output: 2e-3 (the same with 2^-11).
NaN never passes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.block_sparse import (
    BlockLayout,
    block_mask_of,
    block_sparse_matmul,
    from_dense,
    launch,
    layout_from_block_mask,
    to_dense,
)
from kernels.block_sparse.ops import triton_block_sparse_matmul
from tests.helpers import needs_triton_interpreter

F32, BF16, F16 = jnp.float32, jnp.bfloat16, jnp.float16
TOL = {jnp.dtype(F32): 1e-5, jnp.dtype(BF16): 1e-2, jnp.dtype(F16): 2e-3}
SMALL = launch.Config(block_m=16, block_k=16, group_m=2)  # product and dA: 16-row tiles, 16-wide steps
SMALL_DV = launch.Config(block_m=16)  # dValues: 16-row reduction steps


# ----------------------------------------------------------------------------------------------------
# Inputs and the float64 oracle
# ----------------------------------------------------------------------------------------------------
def random_mask(kb, nb, density, seed, *, empty_col=None, full_col=None):
    mask = np.random.default_rng(seed).random((kb, nb)) < density
    if empty_col is not None:
        mask[:, empty_col] = False
    if full_col is not None:
        mask[:, full_col] = True
    return mask


def make_inputs(m, k, n, bs, mask, dtype, seed):
    rng = np.random.default_rng(seed)
    a = jnp.asarray(rng.normal(size=(m, k)), dtype)
    layout, values = from_dense(jnp.asarray(rng.normal(size=(k, n)), dtype), mask, bs)
    dout = jnp.asarray(rng.normal(size=(m, n)), dtype)
    return a, layout, values, dout


def dense_of(layout, values) -> np.ndarray:
    """float64 dense B by explicit loops over the by-column index set (independent of `to_dense`)."""
    bs = layout.block_size
    b = np.zeros(layout.shape)
    offsets, rows = np.asarray(layout.col_offsets), np.asarray(layout.block_rows)
    vals = np.asarray(values, np.float64)
    for j in range(layout.block_shape[1]):
        for p in range(offsets[j], offsets[j + 1]):
            b[rows[p] * bs : (rows[p] + 1) * bs, j * bs : (j + 1) * bs] = vals[p]
    return b


def oracle(a, layout, values, dout):
    """(out, da, dvalues) in float64."""
    a, dout = np.asarray(a, np.float64), np.asarray(dout, np.float64)
    b = dense_of(layout, values)
    bs = layout.block_size
    full = a.T @ dout
    rows, cols = np.asarray(layout.block_rows), np.asarray(layout.block_cols)
    dvalues = np.zeros(layout.values_shape)
    for p, (r, c) in enumerate(zip(rows, cols, strict=True)):
        dvalues[p] = full[r * bs : (r + 1) * bs, c * bs : (c + 1) * bs]
    return a @ b, dout @ b.T, dvalues


def rel_err(got, want) -> float:
    got = np.asarray(got, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.all(np.isfinite(got)), "non-finite values (NaN: an unwritten element)"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# ----------------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------------
MASKS = {
    "random": lambda: random_mask(5, 7, 0.4, 0, empty_col=2, full_col=4),
    "all-empty": lambda: np.zeros((3, 4), bool),
    "all-full": lambda: np.ones((4, 3), bool),
    "one-block": lambda: np.eye(1, 6, 5, dtype=bool),
    "empty-rows": lambda: random_mask(6, 5, 0.5, 1) & (np.arange(6) % 2 == 0)[:, None],
}


@pytest.mark.parametrize("name", MASKS)
def test_layout_index_sets_describe_the_mask(name):
    mask = MASKS[name]()
    bs = 16
    layout = layout_from_block_mask(mask, bs)
    kb, nb = mask.shape
    assert layout.shape == (kb * bs, nb * bs) and layout.block_shape == mask.shape
    assert layout.nnz == mask.sum() and layout.values_shape == (mask.sum(), bs, bs)
    np.testing.assert_array_equal(layout.block_mask(), mask)
    for arr in (layout.col_offsets, layout.block_rows, layout.row_offsets, layout.row_positions):
        assert arr.dtype == jnp.int32
    # by block column: offsets delimit each column's blocks, block rows increasing
    offsets, rows, cols = (np.asarray(x) for x in (layout.col_offsets, layout.block_rows, layout.block_cols))
    assert offsets.shape == (nb + 1,) and offsets[0] == 0 and offsets[-1] == layout.nnz
    for j in range(nb):
        assert rows[offsets[j] : offsets[j + 1]].tolist() == np.nonzero(mask[:, j])[0].tolist()
        assert np.all(cols[offsets[j] : offsets[j + 1]] == j)
    # by block row: block columns increasing, positions point at the same blocks
    r_offsets, r_cols, r_pos = (
        np.asarray(x) for x in (layout.row_offsets, layout.row_block_cols, layout.row_positions)
    )
    assert r_offsets.shape == (kb + 1,) and r_offsets[-1] == layout.nnz
    assert sorted(r_pos.tolist()) == list(range(layout.nnz))
    for i in range(kb):
        entries = slice(r_offsets[i], r_offsets[i + 1])
        assert r_cols[entries].tolist() == np.nonzero(mask[i])[0].tolist()
        assert np.all(rows[r_pos[entries]] == i) and np.all(cols[r_pos[entries]] == r_cols[entries])


@pytest.mark.parametrize("name", MASKS)
def test_from_dense_to_dense_round_trip(name):
    mask = MASKS[name]()
    bs = 16
    rng = np.random.default_rng(2)
    b = rng.normal(size=(mask.shape[0] * bs, mask.shape[1] * bs)).astype(np.float32)
    layout, values = from_dense(jnp.asarray(b), mask, bs)
    kept = np.kron(mask, np.ones((bs, bs), bool))
    np.testing.assert_array_equal(np.asarray(to_dense(layout, values)), np.where(kept, b, 0))
    np.testing.assert_array_equal(dense_of(layout, values), np.where(kept, b, 0))
    # the blocks holding a nonzero of the masked matrix are the mask again (random normals are never 0)
    np.testing.assert_array_equal(block_mask_of(np.where(kept, b, 0), bs), mask)
    layout2, values2 = from_dense(np.where(kept, b, 0), None, bs)
    np.testing.assert_array_equal(np.asarray(values2), np.asarray(values))
    np.testing.assert_array_equal(np.asarray(layout2.block_rows), np.asarray(layout.block_rows))


def test_from_dense_with_an_element_mask_keeps_touched_blocks_and_zeroes_the_rest():
    bs = 16
    b = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) + 1
    elem = np.zeros((64, 32), bool)
    elem[3, 20] = elem[40, 1] = True
    layout, values = from_dense(jnp.asarray(b), elem, bs)
    np.testing.assert_array_equal(layout.block_mask(), [[False, True], [False, False], [True, False], [False, False]])
    np.testing.assert_array_equal(np.asarray(to_dense(layout, values)), np.where(elem, b, 0))


def test_layout_is_a_pytree_with_static_block_size_and_shape():
    layout = layout_from_block_mask(random_mask(4, 4, 0.5, 3), 16)
    leaves, treedef = jax.tree_util.tree_flatten(layout)
    assert len(leaves) == 6 and all(leaf.dtype == jnp.int32 for leaf in leaves)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert again.block_size == 16 and again.shape == (64, 64)
    other = layout_from_block_mask(random_mask(4, 4, 0.5, 3), 32)
    assert jax.tree_util.tree_structure(other) != treedef  # the block size is part of the structure
    nnz = jax.jit(lambda lay: lay.block_rows.shape[0] + lay.block_size)(layout)
    assert int(nnz) == layout.nnz + 16


def test_layout_rejects_bad_arguments():
    with pytest.raises(ValueError, match="block_size must be one of"):
        layout_from_block_mask(np.ones((2, 2), bool), 48)
    with pytest.raises(ValueError, match="must divide"):
        from_dense(jnp.zeros((64, 40)), None, 16)
    with pytest.raises(ValueError, match="must divide"):
        from_dense(jnp.zeros((40, 64)), np.ones((2, 4), bool), 16)
    with pytest.raises(ValueError, match="block mask .* or an element mask"):
        from_dense(jnp.zeros((64, 64)), np.ones((3, 4), bool), 16)
    with pytest.raises(ValueError, match="boolean"):
        layout_from_block_mask(np.ones((2, 2), np.int32), 16)
    with pytest.raises(ValueError, match="2-D"):
        from_dense(jnp.zeros((2, 64, 64)), None, 16)
    layout = layout_from_block_mask(np.ones((2, 2), bool), 16)
    with pytest.raises(ValueError, match="values must have shape"):
        to_dense(layout, jnp.zeros((3, 16, 16)))


# ----------------------------------------------------------------------------------------------------
# Reference and oracle agree; the tolerance catches a wrong block
# ----------------------------------------------------------------------------------------------------
def test_reference_and_its_gradients_match_the_oracle():
    a, layout, values, dout = make_inputs(24, 64, 80, 16, random_mask(4, 5, 0.5, 4, empty_col=0), F32, seed=4)
    want = oracle(a, layout, values, dout)
    out, vjp = jax.vjp(lambda a, v: block_sparse_matmul(a, layout, v, impl="reference"), a, values)
    for got, w in zip((out, *vjp(dout)), want, strict=True):
        assert rel_err(got, w) < 1e-6


def test_tolerance_catches_one_block_in_the_wrong_place():
    """The same values with one block moved to another block row: far outside even the bf16 tolerance."""
    mask = np.zeros((4, 3), bool)
    mask[[0, 1, 3], [0, 1, 2]] = True
    a, layout, values, dout = make_inputs(32, 64, 48, 16, mask, F32, seed=5)
    moved = mask.copy()
    moved[3, 2], moved[2, 2] = False, True
    wrong = oracle(a, layout_from_block_mask(moved, 16), values, dout)
    for r, w in zip(oracle(a, layout, values, dout)[:2], wrong[:2], strict=True):
        assert rel_err(w, r) > 10 * TOL[jnp.dtype(BF16)]


# ----------------------------------------------------------------------------------------------------
# Kernels in the interpreter
# ----------------------------------------------------------------------------------------------------
KERNEL_CASES = [
    # (M, block mask maker, block size, dtype)
    (40, lambda: random_mask(4, 5, 0.5, 10, empty_col=1, full_col=3), 16, F32),  # M not a tile multiple
    (40, lambda: random_mask(4, 5, 0.5, 10, empty_col=1, full_col=3), 16, BF16),
    (32, lambda: random_mask(3, 4, 0.25, 11, full_col=0), 32, F32),  # two reduction steps per block
    (32, lambda: random_mask(3, 4, 0.25, 11, full_col=0), 32, BF16),
    (17, lambda: np.ones((3, 2), bool), 32, F32),  # dense
    (48, lambda: random_mask(6, 3, 0.1, 12, full_col=2), 16, F32),  # sparse, empty block rows
    (16, lambda: np.zeros((2, 3), bool), 16, F32),  # nothing present: zeros everywhere
    (20, lambda: random_mask(2, 2, 0.6, 13, empty_col=0), 64, BF16),  # the real block size, four steps each
    (24, lambda: random_mask(3, 3, 0.5, 15, empty_col=2), 32, F16),
]


@needs_triton_interpreter
@pytest.mark.parametrize("m,mask,bs,dtype", KERNEL_CASES, ids=[f"case{i}" for i in range(len(KERNEL_CASES))])
def test_kernels_match_float64(m, mask, bs, dtype):
    mask = mask()
    k, n = mask.shape[0] * bs, mask.shape[1] * bs
    a, layout, values, dout = make_inputs(m, k, n, bs, mask, dtype, seed=m + k + n)
    want_out, want_da, want_dv = oracle(a, layout, values, dout)
    out = launch.bsmm(a, layout, values, runner="interpret", config=SMALL)
    da = launch.bsmm_da(dout, layout, values, runner="interpret", config=SMALL)
    dv = launch.bsmm_dvalues(a, dout, layout, runner="interpret", config=SMALL_DV)
    assert out.dtype == da.dtype == dv.dtype == dtype
    tol = TOL[jnp.dtype(dtype)]
    for name, got, want in (("out", out, want_out), ("da", da, want_da), ("dvalues", dv, want_dv)):
        assert rel_err(got, want) < tol, f"{name}: {rel_err(got, want):.2e}"
    # empty block columns of B give exactly zero columns; empty block rows exactly zero columns of dA
    for j in np.nonzero(~mask.any(axis=0))[0]:
        assert not np.any(np.asarray(out, np.float64)[:, j * bs : (j + 1) * bs])
    for i in np.nonzero(~mask.any(axis=1))[0]:
        assert not np.any(np.asarray(da, np.float64)[:, i * bs : (i + 1) * bs])


@needs_triton_interpreter
def test_default_configs_and_float32_output_of_bf16_operands():
    mask = random_mask(3, 4, 0.5, 14, empty_col=2, full_col=0)
    a, layout, values, dout = make_inputs(50, 96, 128, 32, mask, BF16, seed=14)
    out = launch.bsmm(a, layout, values, out_dtype=F32, runner="interpret")
    assert out.dtype == F32
    assert rel_err(out, oracle(a, layout, values, dout)[0]) < 1e-5


@needs_triton_interpreter
def test_kernel_launch_rejects_a_step_that_does_not_divide_the_block():
    a, layout, values, _ = make_inputs(16, 64, 64, 32, np.ones((2, 2), bool), F32, seed=0)
    with pytest.raises(ValueError, match="block_k 48"):
        launch.bsmm(a, layout, values, runner="interpret", config=launch.Config(block_m=16, block_k=48))
    with pytest.raises(ValueError, match="block_m must be a power of two"):
        launch.bsmm_dvalues(a, a, layout, runner="interpret", config=launch.Config(block_m=24))


# ----------------------------------------------------------------------------------------------------
# The dispatcher and the custom_vjp
# ----------------------------------------------------------------------------------------------------
@needs_triton_interpreter
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_forward_and_gradients_under_jit_match_float64_and_the_reference(dtype):
    mask = random_mask(4, 4, 0.5, 20, empty_col=1, full_col=2)
    a, layout, values, dout = make_inputs(40, 64, 64, 16, mask, dtype, seed=20)
    want = oracle(a, layout, values, dout)

    def fwd_bwd(impl):
        @jax.jit
        def f(a, layout, values, dout):
            out, vjp = jax.vjp(lambda a, v: block_sparse_matmul(a, layout, v, impl=impl), a, values)
            return out, *vjp(dout)

        return f(a, layout, values, dout)

    got, ref = fwd_bwd("interpret"), fwd_bwd("reference")
    tol = TOL[jnp.dtype(dtype)]
    for name, g, r, w in zip(("out", "da", "dvalues"), got, ref, want, strict=True):
        assert g.dtype == dtype and g.shape == w.shape
        assert rel_err(g, w) < tol, f"{name} vs float64: {rel_err(g, w):.2e}"
        assert rel_err(g, np.asarray(r, np.float64)) < 2 * tol, f"{name} vs reference"  # both round to dtype


@needs_triton_interpreter
def test_grad_of_a_loss_with_float32_output_matches_jax_grad_of_the_reference():
    mask = random_mask(3, 5, 0.4, 21, empty_col=4, full_col=0)
    a, layout, values, _ = make_inputs(2 * 12, 48, 80, 16, mask, BF16, seed=21)
    a = a.reshape(2, 12, 48)  # leading dimensions are more rows
    weight = jnp.asarray(np.random.default_rng(22).normal(size=(2, 12, 80)), F32)

    def loss(impl):
        def f(a, values):
            out = block_sparse_matmul(a, layout, values, impl=impl, preferred_element_type=F32)
            assert out.dtype == F32 and out.shape == (2, 12, 80)
            return jnp.sum(out * weight)

        return jax.jit(jax.grad(f, argnums=(0, 1)))(a, values)

    for g, r in zip(loss("interpret"), loss("reference"), strict=True):
        assert g.dtype == BF16
        assert rel_err(g, np.asarray(r, np.float64)) < TOL[jnp.dtype(BF16)]


@needs_triton_interpreter
def test_mixed_operand_dtypes_promote_and_no_rows_give_an_empty_result():
    a, layout, values, _ = make_inputs(16, 32, 32, 16, np.ones((2, 2), bool), F32, seed=23)
    out = block_sparse_matmul(a, layout, values.astype(BF16), impl="interpret")
    assert out.dtype == F32
    assert rel_err(out, oracle(a, layout, values.astype(BF16), a)[0]) < 1e-5
    empty = triton_block_sparse_matmul(jnp.zeros((0, 32)), layout, values, runner="interpret")
    assert empty.shape == (0, 32)


def test_dispatcher_rejects_bad_arguments():
    a, layout, values, _ = make_inputs(8, 32, 48, 16, np.ones((2, 3), bool), F32, seed=24)
    with pytest.raises(ValueError, match="impl must be one of"):
        block_sparse_matmul(a, layout, values, impl="cuda")
    with pytest.raises(ValueError, match="runner must be one of"):
        triton_block_sparse_matmul(a, layout, values, runner="cuda")
    with pytest.raises(ValueError, match="disagree"):
        block_sparse_matmul(a[:, :16], layout, values)
    with pytest.raises(ValueError, match="values must have shape"):
        block_sparse_matmul(a, layout, values[:2])
    with pytest.raises(ValueError, match="values must have shape"):
        block_sparse_matmul(a, layout, values[:, :8, :8])
    with pytest.raises(ValueError, match="supported operand dtypes"):
        block_sparse_matmul(a.astype(jnp.int32), layout, values.astype(jnp.int32), impl="interpret")
    with pytest.raises(ValueError, match="a must be"):
        block_sparse_matmul(a[0], layout, values)
    with pytest.raises(ValueError, match="BlockLayout"):
        block_sparse_matmul(a, np.ones((2, 3), bool), values)
    assert isinstance(layout, BlockLayout)


# ----------------------------------------------------------------------------------------------------
# On a CUDA GPU (jax-triton): larger shapes, poisoned outputs, fp32 and bf16
# ----------------------------------------------------------------------------------------------------
GPU_CASES = [
    # (M, K, N, block size, density, dtype)
    (2048, 2048, 2048, 128, 0.1, BF16),
    (2048, 2048, 2048, 128, 0.5, BF16),
    (1000, 1024, 1536, 64, 0.25, BF16),  # M not a tile multiple
    (1024, 1024, 1024, 128, 0.3, F32),
    (512, 2048, 1024, 64, 1.0, F32),
    (1024, 1024, 2048, 128, 0.2, F16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m,k,n,bs,density,dtype", GPU_CASES, ids=lambda v: str(v))
def test_gpu_poisoned_kernels_match_float64(m, k, n, bs, density, dtype):
    mask = random_mask(k // bs, n // bs, density, m + k, empty_col=1, full_col=0)
    a, layout, values, dout = make_inputs(m, k, n, bs, mask, dtype, seed=n)
    want_out, want_da, want_dv = oracle(a, layout, values, dout)
    out = launch.bsmm(a, layout, values, poison=True)
    da = launch.bsmm_da(dout, layout, values, poison=True)
    dv = launch.bsmm_dvalues(a, dout, layout, poison=True)
    tol = TOL[jnp.dtype(dtype)]
    for name, got, want in (("out", out, want_out), ("da", da, want_da), ("dvalues", dv, want_dv)):
        assert rel_err(got, want) < tol, f"{name}: {rel_err(got, want):.2e}"
    assert not np.any(np.asarray(out[:, bs : 2 * bs], np.float64)), "empty block column must give zeros"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["f32", "bf16"])
def test_gpu_custom_vjp_under_jit_matches_float64(dtype):
    mask = random_mask(16, 12, 0.3, 30, empty_col=5, full_col=7)
    a, layout, values, dout = make_inputs(1500, 2048, 1536, 128, mask, dtype, seed=30)
    want = oracle(a, layout, values, dout)

    @jax.jit
    def fwd_bwd(a, layout, values, dout):
        out, vjp = jax.vjp(lambda a, v: block_sparse_matmul(a, layout, v, impl="triton"), a, values)
        return out, *vjp(dout)

    tol = TOL[jnp.dtype(dtype)]
    for name, got, w in zip(("out", "da", "dvalues"), fwd_bwd(a, layout, values, dout), want, strict=True):
        assert rel_err(got, w) < tol, f"{name}: {rel_err(got, w):.2e}"


@pytest.mark.gpu
def test_gpu_all_empty_and_tuned_configs():
    bs = 128
    a, layout, values, dout = make_inputs(1024, 1024, 1024, bs, np.zeros((8, 8), bool), BF16, seed=31)
    assert not np.any(np.asarray(launch.bsmm(a, layout, values, poison=True), np.float64))
    mask = random_mask(8, 8, 0.5, 32)
    a, layout, values, dout = make_inputs(1024, 1024, 1024, bs, mask, BF16, seed=32)
    want_out = oracle(a, layout, values, dout)[0]
    for cfg in (launch.Config(64, 64, 8, 4, 3), launch.Config(128, 128, 8, 8, 3), launch.Config(64, 32, 4, 4, 5)):
        got = launch.bsmm(a, layout, values, poison=True, config=cfg)
        assert rel_err(got, want_out) < TOL[jnp.dtype(BF16)], cfg


def _program(fn, *args) -> str:
    return str(jax.make_jaxpr(fn)(*args))  # nested jaxprs (custom_vjp bodies) included


def test_auto_takes_the_reference_without_a_gpu():
    if jax.default_backend() == "gpu":
        pytest.skip("on a GPU, auto takes the Triton kernels (test_gpu_auto_takes_the_triton_kernels)")
    a, layout, values, _ = make_inputs(32, 64, 64, 16, random_mask(4, 4, 0.5, 40), F32, seed=40)
    program = _program(lambda a, v: block_sparse_matmul(a, layout, v, impl="auto"), a, values)
    assert "pure_callback" not in program and "dot_general" in program


@pytest.mark.gpu
def test_gpu_auto_takes_the_triton_kernels():
    a, layout, values, dout = make_inputs(512, 512, 512, 128, random_mask(4, 4, 0.5, 41), BF16, seed=41)
    program = _program(lambda a, v: block_sparse_matmul(a, layout, v, impl="auto"), a, values)
    assert "triton_kernel_call" in program
    want = oracle(a, layout, values, dout)[0]
    assert rel_err(block_sparse_matmul(a, layout, values, impl="auto"), want) < TOL[jnp.dtype(BF16)]
