"""kernels.gmm: the grouped matmul of the MoE layers against a float64 loop over groups."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.gmm import gmm


def _loop(lhs, rhs, sizes):
    out = np.zeros((lhs.shape[0], rhs.shape[2]))
    start = 0
    for g, n in enumerate(sizes):
        out[start : start + n] = lhs[start : start + n].astype(np.float64) @ rhs[g].astype(np.float64)
        start += n
    return out


@pytest.mark.parametrize("sizes", [[3, 0, 5, 2], [0, 0, 10, 0], [1, 1, 1, 1]])
def test_gmm_matches_a_loop_over_groups_and_zeroes_rows_past_the_groups(sizes):
    rng = np.random.default_rng(0)
    rows = 12  # more rows than sum(sizes): the tail is padding
    lhs, rhs = rng.normal(size=(rows, 8)).astype(np.float32), rng.normal(size=(4, 8, 6)).astype(np.float32)
    out = np.full((rows, 6), np.nan, np.float32)  # poisoned: every element must be written
    out[:] = gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes, jnp.int32), impl="auto")
    want = _loop(lhs, rhs, sizes)
    assert not np.isnan(out).any()
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.all(out[sum(sizes) :] == 0)


def test_gmm_gradients_match_the_loop():
    rng = np.random.default_rng(1)
    sizes = [2, 3, 0, 4]
    lhs, rhs = rng.normal(size=(10, 5)).astype(np.float32), rng.normal(size=(4, 5, 3)).astype(np.float32)
    cot = rng.normal(size=(10, 3)).astype(np.float32)
    d_lhs, d_rhs = jax.grad(
        lambda a, b: jnp.sum(gmm(a, b, jnp.asarray(sizes), impl="reference") * cot), argnums=(0, 1)
    )(jnp.asarray(lhs), jnp.asarray(rhs))
    starts = np.cumsum([0, *sizes])
    want_lhs, want_rhs = np.zeros_like(lhs, np.float64), np.zeros_like(rhs, np.float64)
    for g in range(4):
        rows = slice(starts[g], starts[g + 1])
        want_lhs[rows] = cot[rows].astype(np.float64) @ rhs[g].T
        want_rhs[g] = lhs[rows].T.astype(np.float64) @ cot[rows]
    np.testing.assert_allclose(d_lhs, want_lhs, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_rhs, want_rhs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rhs_batched", [False, True])
def test_vmapped_gmm_and_its_gradients_match_the_loop(rhs_batched):
    # Per-replica gradients vmap the MoE layers: rows and group sizes per batch element, weights shared or not.
    rng = np.random.default_rng(2)
    sizes = np.asarray([[2, 3, 0, 4], [0, 9, 0, 0], [1, 1, 1, 1]])
    lhs = rng.normal(size=(3, 10, 5)).astype(np.float32)
    rhs = rng.normal(size=(3, 4, 5, 3) if rhs_batched else (4, 5, 3)).astype(np.float32)
    cot = rng.normal(size=(3, 10, 3)).astype(np.float32)

    def loss(a, b, n, c):
        return jnp.sum(gmm(a, b, n) * c)

    in_axes = (0, 0 if rhs_batched else None, 0, 0)
    out = jax.vmap(gmm, in_axes=in_axes[:3])(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes))
    d_lhs, d_rhs = jax.vmap(jax.grad(loss, argnums=(0, 1)), in_axes=in_axes)(lhs, rhs, sizes, cot)
    for i in range(3):
        rhs_i = rhs[i] if rhs_batched else rhs
        np.testing.assert_allclose(out[i], _loop(lhs[i], rhs_i, sizes[i]), rtol=1e-5, atol=1e-5)
        want_lhs, want_rhs = jax.grad(loss, argnums=(0, 1))(lhs[i], rhs_i, sizes[i], cot[i])
        np.testing.assert_allclose(d_lhs[i], want_lhs, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(d_rhs[i], want_rhs, rtol=1e-6, atol=1e-6)
    assert np.all(np.asarray(out[1])[9:] == 0)


def test_gmm_refuses_bad_arguments():
    lhs, rhs, sizes = jnp.ones((4, 3)), jnp.ones((2, 3, 5)), jnp.array([2, 2])
    with pytest.raises(ValueError, match="impl"):
        gmm(lhs, rhs, sizes, impl="fast")
    with pytest.raises(ValueError, match="shapes disagree"):
        gmm(lhs, jnp.ones((2, 4, 5)), sizes)
