"""Collective matmul: the ring versions equal all-gather + matmul and matmul + reduce-scatter (values and
gradients), and the dense model with the switch on computes what one device computes, with and without a
pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdeep.parallel.collective_matmul import ring_allgather_apply, ring_reducescatter_apply
from jaxdeep.sharding import use_rules
from jaxdeep.train.pipeline_step import make_pipeline_loss_and_grads
from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import batch_sharding, cross_entropy
from tests.fast_compile import FAST, compiled
from tests.helpers import layout, max_rel_error


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "tensor"))


def _shard_map(mesh, f, in_specs, out_specs):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={"tensor"}, check_vma=False)


def _column(mesh, ring: bool):
    """[b, t, d] (sequence split over tensor) × two [d, f] (columns split) -> two [b, t, f] (f split)."""

    def per_shard(x, w1, w2):
        matmuls = lambda xc: (xc @ w1, jnp.tanh(xc) @ w2)
        if ring:
            return ring_allgather_apply(x, matmuls, "tensor", dim=1)
        return matmuls(jax.lax.all_gather(x, "tensor", axis=1, tiled=True))

    cols = P(None, "tensor")
    return _shard_map(mesh, per_shard, (P(None, "tensor", None), cols, cols), (P(None, None, "tensor"),) * 2)


def _row(mesh, ring: bool):
    """[b, t, f] (f split) × [f, d] (rows split) -> [b, t, d] summed, sequence split over tensor."""

    def per_shard(h, w):
        if ring:
            return ring_reducescatter_apply(h, lambda hc: hc @ w, "tensor", dim=1)
        return jax.lax.psum_scatter(h @ w, "tensor", scatter_dimension=1, tiled=True)

    return _shard_map(mesh, per_shard, (P(None, None, "tensor"), P("tensor", None)), P(None, "tensor", None))


def _data(*shapes):
    keys = jax.random.split(jax.random.key(0), len(shapes))
    return [jax.random.normal(k, s, jnp.float32) for k, s in zip(keys, shapes, strict=True)]


@pytest.mark.parametrize("kind", ["column", "row"])
def test_ring_equals_the_plain_collective(mesh, kind):
    if kind == "column":
        args = _data((4, 16, 8), (8, 12), (8, 12))
        ring, plain = _column(mesh, True), _column(mesh, False)
    else:
        args = _data((4, 16, 12), (12, 8))
        ring, plain = _row(mesh, True), _row(mesh, False)
    loss = lambda f: lambda *a: sum(jnp.sum(jnp.sin(y)) for y in jax.tree.leaves(f(*a)))
    grad_args = tuple(range(len(args)))
    both = lambda *a: [(f(*a), jax.grad(loss(f), grad_args)(*a)) for f in (ring, plain)]
    got, want = compiled(both, *args)(*args)
    assert max_rel_error(got, want) <= 1e-5
    # The ring really replaces the collective: permutes only, no all-gather / reduce-scatter left.
    hlo = jax.jit(ring).lower(*args).as_text()
    assert "collective_permute" in hlo
    assert "all_gather" not in hlo and "reduce_scatter" not in hlo


# ----------------------------------------------------------------------------- the model switch

SMALL = ("model.n_layers=4", "model.d_model=16", "model.n_heads=4", "model.head_dim=8", "model.d_ff=32")


def _tokens():
    return np.random.default_rng(3).integers(1, 256, (8, 17)).astype(np.int32)


def _loss_and_grads(setup):
    cfg, mesh = setup.cfg, setup.mesh
    pipelined = make_pipeline_loss_and_grads(setup) if mesh.shape["pipeline"] > 1 else None

    def run(params, tokens):
        with use_rules(cfg.sharding.rules, mesh):
            if pipelined is not None:
                return pipelined(params, tokens)
            return jax.value_and_grad(lambda p: cross_entropy(setup, p, tokens))(params)

    return jax.jit(run, in_shardings=(setup.state_shardings["params"], batch_sharding(setup)))


def _permutes(*overrides, **sizes) -> int:
    cfg, mesh = layout(*SMALL, *overrides, **sizes)
    setup = build_setup(cfg, mesh)
    params = jax.eval_shape(lambda: init_train_state(setup))["params"]
    tokens = jax.ShapeDtypeStruct((8, 17), np.int32)
    return _loss_and_grads(setup).lower(params, tokens).as_text().count("collective_permute")


def test_the_switch_chooses_per_layer_type():
    off = _permutes(tensor=4)
    mlp = _permutes("model.collective_matmul=[mlp]", tensor=4)
    both = _permutes("model.collective_matmul=[attention, mlp]", tensor=4)
    assert off == 0 < mlp < both


MODEL = (*SMALL, "model.collective_matmul=[attention, mlp]", "model.tie_embeddings=false", "parallel.microbatches=2")


@pytest.fixture(scope="module")
def one_device():
    cfg, mesh = layout(*MODEL)
    setup = build_setup(cfg, mesh)
    params = jax.device_get(init_train_state(setup)["params"])
    return params, jax.device_get(compiled(_loss_and_grads(setup), params, _tokens())(params, _tokens()))


@pytest.mark.parametrize(
    "sizes",
    [dict(data=2, tensor=4), dict(pipeline=2, data=2, tensor=2)],
    ids=["data2_tensor4", "pipeline2_data2_tensor2"],
)
def test_model_with_collective_matmul_matches_one_device(sizes, one_device):
    params, want = one_device
    cfg, mesh = layout(*MODEL, **sizes)
    setup = build_setup(cfg, mesh)
    params = jax.device_put(params, setup.state_shardings["params"])
    got = compiled(_loss_and_grads(setup), params, _tokens())(params, _tokens())
    err = max_rel_error(got, want)
    assert err <= 1e-5, f"loss or gradients differ from one device by {err:.2e}"


def test_residual_stream_is_split_over_the_sequence():
    """With the switch on, blocks hand each other sequence-split activations (no all-gather between them)."""
    cfg, tp_mesh = layout(*SMALL, "model.collective_matmul=[attention, mlp]", tensor=4)
    setup = build_setup(cfg, tp_mesh)
    params = jax.eval_shape(lambda: init_train_state(setup))["params"]
    tokens = jax.ShapeDtypeStruct((8, 16), np.int32, sharding=NamedSharding(tp_mesh, P()))

    def residual(params, tokens):
        with use_rules(cfg.sharding.rules, tp_mesh):
            model = _model(setup, params)
            return model.apply_blocks(model.embed_tokens(tokens))

    shardings = jax.jit(residual, in_shardings=(setup.state_shardings["params"], None)).lower(params, tokens)
    assert shardings.compile(FAST).output_shardings.spec[1] == "tensor"


def _model(setup, params):
    state = jax.tree.map(lambda v: v, setup.abstract_state)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(setup.graphdef, state)


def test_fp8_mlp_recomputing_its_down_input_inside_the_ring_changes_only_w_out():
    """FP8 with collective matmuls: the MLP's GELU and down projection run on each ring chunk as one layer that
    recomputes the GELU output for its weight gradient. Against composing the two (`fp8_down_input: keep`) in the
    same sharded program, the loss and every gradient but w_out's are the same; w_out's moves by FP8 rounding."""
    results = {}
    for choice in ("recompute", "keep"):
        cfg, mesh = layout(*MODEL, "precision.matmul=fp8", f"precision.fp8_down_input={choice}", data=2, tensor=4)
        setup = build_setup(cfg, mesh)
        params = init_train_state(setup)["params"]
        results[choice] = jax.device_get(compiled(_loss_and_grads(setup), params, _tokens())(params, _tokens()))
    (loss, grads), (loss_keep, grads_keep) = results["recompute"], results["keep"]
    assert loss == loss_keep
    moved = []
    for (path, a), b in zip(jax.tree.leaves_with_path(grads), jax.tree.leaves(grads_keep), strict=True):
        name = jax.tree_util.keystr(path)
        if "w_out" in name:
            moved.append(float(np.linalg.norm(a - b) / np.linalg.norm(b)))
        else:
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=name)
    assert len(moved) == 1 and 1e-4 < moved[0] < 0.1, moved
