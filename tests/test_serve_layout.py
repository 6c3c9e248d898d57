"""The serving layout of projection weights (input dims minor) and the single-row product decode uses with it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxdeep.model.matmul import project, serving_layout, single_row_product
from jaxdeep.serve.layout import (
    decode_formats,
    from_default_layout,
    in_default_layout,
    inputs_minor,
    relaid_groups,
    split_layers,
    stacked_layers,
    to_decode_layout,
    weight_group,
)


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
    # In bf16: the same products summed in float32, rounded once, like an einsum with float32 accumulation.
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    got_b = single_row_product(subscripts, xb, wb)
    assert got_b.dtype == jnp.bfloat16
    want_b = jnp.einsum(subscripts, xb, wb, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    np.testing.assert_allclose(np.asarray(got_b, np.float32), np.asarray(want_b, np.float32), rtol=1e-2, atol=1e-2)


def _reduce_dtypes(fn, *args) -> set[str]:
    """Input dtypes of the reduce_sum equations of a fresh trace of fn (traces are cached per function, and
    `serving_layout` is read while tracing), nested jaxprs included."""

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "reduce_sum":
                yield str(eqn.invars[0].aval.dtype)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    yield from walk(inner)

    return set(walk(jax.make_jaxpr(lambda *a: fn(*a))(*args).jaxpr))


def test_project_takes_row_reductions_only_where_asked_and_for_one_row():
    x1 = jnp.ones((1, 1, 8), jnp.bfloat16)
    x4 = jnp.ones((2, 2, 8), jnp.bfloat16)
    w = jnp.ones((8, 3), jnp.bfloat16)
    product = lambda x, w: project("btd,df->btf", x, w)
    assert _reduce_dtypes(product, x1, w) == set()  # the model's layout: an einsum
    with serving_layout(["experts"]):
        assert _reduce_dtypes(product, x1, w) == set()
    with serving_layout(["projections"]):
        assert _reduce_dtypes(product, x1, w) == {"float32"}  # summed in float32, not bf16
        assert _reduce_dtypes(product, x4, w) == set()  # several rows: still the einsum
    assert _reduce_dtypes(product, x1, w) == set()  # the context ends with the block


def test_relaid_groups_are_every_projection_but_fp8_ones():
    from jaxdeep.model import KernelChoice

    for gmm in ("auto", "reference", "triton", "interpret"):  # the grouped kernels read re-laid experts in place
        assert relaid_groups(KernelChoice(gmm=gmm)) == ("projections", "experts")
    assert relaid_groups(KernelChoice(matmul="fp8")) == ()


def test_grouped_reads_experts_transposed_in_the_serving_layout():
    """Inside `serving_layout(["experts"])` the routed experts' grouped matmul is handed the weights transposed
    ([E, N, K], the re-laid buffer as it lies) and gives the same product; elsewhere it takes them as they are."""
    from jaxdeep.model import KernelChoice
    from jaxdeep.model.matmul import grouped

    rng = np.random.default_rng(3)
    lhs = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(3, 6, 4)), jnp.float32)
    gs = jnp.asarray([4, 0, 5], jnp.int32)
    kernels = KernelChoice(gmm="reference")
    want = grouped(lhs, rhs, gs, kernels)

    def transposes() -> int:  # views of rhs as [E, N, K] in a fresh trace (traces are cached per function)
        program = str(jax.make_jaxpr(lambda a, b: grouped(a, b, gs, kernels))(lhs, rhs))
        return program.count("f32[3,4,6] = transpose[permutation=(0, 2, 1)]")

    assert transposes() == 0
    with serving_layout(["experts"]):
        got = grouped(lhs, rhs, gs, kernels)
        assert transposes() == 1
    with serving_layout(["projections"]):
        assert transposes() == 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_weight_groups_by_path():
    key = jax.tree_util.DictKey
    assert weight_group((key("moe_blocks"), key("mlp"), key("experts"), key("down_proj"))) == "experts"
    assert weight_group((key("moe_blocks"), key("mlp"), key("shared_experts"), key("down_proj"))) == "projections"
    assert weight_group((key("blocks"), key("attn"), key("wo"))) == "projections"
    assert weight_group((key("moe_blocks"), key("mlp"), key("gate"), key("weight"))) == "projections"  # router
    assert weight_group((key("moe_blocks"), key("mlp"), key("gate"), key("bias"))) is None
    assert weight_group((key("head"),)) is None


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
            "mlp": {"gate": {"weight": jnp.arange(2 * 4 * 3.0).reshape(2, 4, 3)}},  # a MoE router, [L, d, e]
        },
        "embed": jnp.arange(12.0).reshape(3, 4),
    }
    tree = jax.device_put(tree, sharding)
    formats = decode_formats(tree)
    assert formats["blocks"]["attn"]["wq"].layout.major_to_minor == (0, 2, 3, 1)
    assert formats["blocks"]["mlp"]["gate"]["weight"].layout.major_to_minor == (0, 2, 1)
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


def test_donated_layout_frees_only_the_relaid_originals():
    tree = {"attn": {"wq": jnp.ones((2, 4, 3, 2))}, "norm": {"scale": jnp.ones((4,))}}
    relaid, _ = to_decode_layout(tree, donate=True)
    assert tree["attn"]["wq"].is_deleted() and not relaid["attn"]["wq"].is_deleted()
    assert relaid["norm"]["scale"] is tree["norm"]["scale"] and not tree["norm"]["scale"].is_deleted()
    np.testing.assert_array_equal(np.asarray(relaid["attn"]["wq"]), 1.0)


def test_split_layers_gives_each_layer_its_experts_in_their_own_buffer():
    tree = {
        "moe_blocks": {
            "mlp": {
                "experts": {"down_proj": jnp.arange(3 * 2 * 4 * 5.0).reshape(3, 2, 4, 5)},
                "shared_experts": {"down_proj": jnp.ones((3, 4, 5))},
            }
        },
    }
    relaid, formats = to_decode_layout(tree)
    caller_experts = tree["moe_blocks"]["mlp"]["experts"]["down_proj"]
    kept, _ = split_layers(tree, jax.tree.map(lambda a: a.format, tree), keep={id(caller_experts)})
    assert kept["moe_blocks"]["mlp"]["experts"]["down_proj"] is caller_experts  # the caller's: left stacked
    assert not caller_experts.is_deleted()
    split, split_formats = split_layers(relaid, formats)
    layers = split["moe_blocks"]["mlp"]["experts"]["down_proj"]
    assert isinstance(layers, list) and len(layers) == 3
    assert relaid["moe_blocks"]["mlp"]["experts"]["down_proj"].is_deleted()  # a copy: freed once split
    for i, (layer, fmt) in enumerate(
        zip(layers, split_formats["moe_blocks"]["mlp"]["experts"]["down_proj"], strict=True)
    ):
        assert layer.format.layout.major_to_minor == (0, 2, 1) == fmt.layout.major_to_minor  # F minor, as stacked
        np.testing.assert_array_equal(
            np.asarray(layer), np.asarray(tree["moe_blocks"]["mlp"]["experts"]["down_proj"][i])
        )
    shared = split["moe_blocks"]["mlp"]["shared_experts"]["down_proj"]
    assert shared is relaid["moe_blocks"]["mlp"]["shared_experts"]["down_proj"]  # only the routed experts split
    # A jit given these formats stacks them back and computes what the stack gives.
    product = lambda t: jnp.einsum(
        "lefd,f->led", stacked_layers(t)["moe_blocks"]["mlp"]["experts"]["down_proj"], jnp.ones(4)
    )
    want = product(jax.tree.map(np.asarray, tree))
    got = jax.jit(product, in_shardings=(split_formats,))(split)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want))


def test_in_default_layout_holds_the_same_bytes_transposed_and_a_step_gets_them_back():
    """Re-laid weights become their transposes into the serving order, in the default layout (a jitted call then
    checks no layout on the host), split layers included; a step transposes them back and computes the same."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))
    tree = {
        "blocks": {
            "attn": {"wq": jnp.arange(2 * 4 * 3 * 2.0).reshape(2, 4, 3, 2)},
            "norm": {"scale": jnp.ones((2, 4))},
        },
        "moe_blocks": {"mlp": {"experts": {"down_proj": jnp.arange(3 * 2 * 4 * 5.0).reshape(3, 2, 4, 5)}}},
    }
    tree = jax.device_put(tree, NamedSharding(mesh, PartitionSpec("x")))
    relaid, formats = to_decode_layout(tree)
    relaid, formats = split_layers(relaid, formats)
    caller = tree["blocks"]["norm"]["scale"]
    held, shardings, perms = in_default_layout(relaid, formats, keep={id(caller)})
    wq = held["blocks"]["attn"]["wq"]
    assert wq.format.layout.major_to_minor == (0, 1, 2, 3) and wq.shape == (2, 3, 2, 4)  # [L, n, h, d]: d minor
    assert wq.sharding.spec == PartitionSpec("x", None, None, None) == shardings["blocks"]["attn"]["wq"].spec
    np.testing.assert_array_equal(np.asarray(wq), np.asarray(tree["blocks"]["attn"]["wq"]).transpose(0, 2, 3, 1))
    assert perms["blocks"]["attn"]["wq"] == (0, 3, 1, 2) and perms["blocks"]["norm"]["scale"] is None
    assert held["blocks"]["norm"]["scale"] is caller and not caller.is_deleted()
    assert relaid["blocks"]["attn"]["wq"].is_deleted()  # the re-laid copy is freed once held
    assert [p for p in perms["moe_blocks"]["mlp"]["experts"]["down_proj"]] == [(0, 2, 1)] * 3
    logical = jax.jit(lambda t: stacked_layers(from_default_layout(t, perms)), in_shardings=(shardings,))(held)
    for got, want in zip(jax.tree.leaves(logical), jax.tree.leaves(tree), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
