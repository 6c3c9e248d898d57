"""The serving layout of projection weights (input dims minor) and the single-row product decode uses with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxdeep.model.matmul import project, single_row_product
from jaxdeep.serve.layout import decode_formats, inputs_minor, to_decode_layout


@pytest.mark.parametrize(
    "subscripts,x_shape,w_shape",
    [
        ("btd,dnh->btnh", (1, 1, 12), (12, 3, 5)),
        ("btnh,nhd->btd", (1, 1, 3, 5), (3, 5, 12)),
        ("btf,fd->btd", (1, 1, 20), (20, 7)),
        ("td,dcf->tcf", (1, 6), (6, 2, 4)),
    ],
)
def test_single_row_product_is_the_einsum(subscripts, x_shape, w_shape):
    kx, kw = jax.random.split(jax.random.key(len(subscripts)))
    x = jax.random.normal(kx, x_shape, jnp.float32)
    w = jax.random.normal(kw, w_shape, jnp.float32)
    want = np.einsum(subscripts, np.asarray(x, np.float64), np.asarray(w, np.float64))
    got = single_row_product(subscripts, x, w)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(project(subscripts, x, w)), want, rtol=1e-5, atol=1e-5)


def test_single_row_product_keeps_bf16_and_sums_in_fp32():
    x = jnp.full((1, 4096), 1.0, jnp.bfloat16)
    w = jnp.full((4096, 2), 1.0 / 64, jnp.bfloat16)
    y = single_row_product("bk,kn->bn", x, w)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), 64.0)  # a bf16 running sum would stall at 4 or 8


def test_inputs_minor_orders_stack_outputs_inputs():
    assert inputs_minor(4, 3, 1) == (0, 2, 3, 1)  # [layers, d, n, h] -> d minor
    assert inputs_minor(4, 3, 2) == (0, 3, 1, 2)  # [layers, n, h, d] -> n, h minor
    assert inputs_minor(4, 2, 1) == (0, 1, 3, 2)  # [layers, experts, f, d] -> f minor
    assert inputs_minor(2, 2, 1) == (1, 0)
    with pytest.raises(ValueError, match="input dims"):
        inputs_minor(1, 2, 1)
    with pytest.raises(ValueError, match="input dims"):
        inputs_minor(3, 3, 3)


def test_decode_layout_moves_only_projections_and_keeps_values():
    sharding = NamedSharding(jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",)), PartitionSpec())
    tree = {
        "blocks": {
            "attn": {"wq": jnp.arange(2 * 4 * 3 * 2.0).reshape(2, 4, 3, 2)},
            "norm": {"scale": jnp.ones((2, 4))},
        },
        "embed": jnp.arange(12.0).reshape(3, 4),
    }
    tree = jax.device_put(tree, sharding)
    formats = decode_formats(tree)
    assert formats["blocks"]["attn"]["wq"].layout.major_to_minor == (0, 2, 3, 1)
    assert formats["embed"] == tree["embed"].format
    relaid, formats = to_decode_layout(tree)
    assert relaid["blocks"]["attn"]["wq"].format.layout.major_to_minor == (0, 2, 3, 1)
    assert relaid["embed"].format.layout.major_to_minor == (0, 1)
    for a, b in zip(jax.tree.leaves(relaid), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # A jit given these formats reads the re-laid weights as they are, and computes the same.
    product = lambda t: jnp.einsum("d,ldnh->lnh", t["embed"][0], t["blocks"]["attn"]["wq"])
    want = product(jax.tree.map(np.asarray, tree))
    np.testing.assert_allclose(np.asarray(jax.jit(product, in_shardings=(formats,))(relaid)), np.asarray(want))


def test_decode_layer_norm_against_float64():
    from jaxdeep.model.layers import LayerNorm
    from jaxdeep.serve.extend import _decode_layer_norm

    norm = LayerNorm(256, 1e-5, jnp.float32)
    kx, ks, kb = jax.random.split(jax.random.key(7), 3)
    norm.scale[...] = 1.0 + 0.1 * jax.random.normal(ks, (256,))
    norm.bias[...] = 0.1 * jax.random.normal(kb, (256,))
    # An ordinary row, a row whose mean lies 10^5 standard deviations from zero, a wide row off zero: the one-pass
    # statistics about the first element hold on all three.
    x = jax.random.normal(kx, (3, 1, 256), jnp.float32) * jnp.array([1.0, 0.01, 30.0])[:, None, None]
    x = x + jnp.array([0.0, 1000.0, -5.0])[:, None, None]
    x64 = np.asarray(x, np.float64)
    z = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5)
    want = z * np.asarray(norm.scale[...], np.float64) + np.asarray(norm.bias[...], np.float64)
    np.testing.assert_allclose(np.asarray(_decode_layer_norm(norm, x)), want, rtol=0, atol=2e-6)
