"""How unsent entries are kept: the default residual (error feedback) against none on a small training problem,
and ef21, where each replica sends top-k changes to an estimate of its gradient that every replica tracks."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import meshes
from jaxdeep.optim import TopkOptions, compressed_reduction, make_plan
from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import per_replica_loss_and_grads
from tests.helpers import layout
from tests.test_compression_exchange import SHAPES, R, _grads, _setup, _two_level_psum_mean


def test_ef21_options_and_state():
    with pytest.raises(ValueError, match="feedback"):
        TopkOptions(feedback="decay")
    with pytest.raises(ValueError, match="momentum"):
        TopkOptions(feedback="ef21", momentum=0.9)
    _, _, state = _setup("topk", ratio=0.05)
    assert state.estimate == () and state.mean_estimate == (), "the default keeps a residual only"
    reduction, _, state = _setup("topk", ratio=0.05, feedback="ef21")
    assert state.residual == () and state.estimate["w"].shape == (R, *SHAPES["w"])
    assert state.mean_estimate["w"].shape == SHAPES["w"], "one mean estimate, laid out like the parameter"
    _, _, state = _setup("topk", ratio=0.05, feedback="ef21", error_feedback=False)
    assert state.estimate == () and state.residual == ()


@pytest.mark.parametrize("mode", ["topk", "topk_hierarchical"])
def test_ef21_ratio_one_equals_the_dense_psum(mode):
    reduction, update, state = _setup(mode, ratio=1.0, feedback="ef21")
    for step in range(2):
        grads, _ = _grads(reduction, 50 + step)
        mean, state = update(grads, state)
        want = _two_level_psum_mean(reduction, grads)
        for name in SHAPES:
            np.testing.assert_allclose(np.asarray(mean[name]), np.asarray(want[name]), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["topk", "topk_hierarchical"])
def test_ef21_output_is_the_mean_estimate_and_catches_up_with_a_fixed_gradient(mode):
    """Every replica's estimate moves by what it sent, so the output (the mean estimate) stays the mean of the
    estimates. With a fixed gradient the differences shrink to zero: after 1/ratio steps every entry has been
    sent once, and the output is the dense mean exactly; before that it is not."""
    ratio = 0.05
    reduction, update, state = _setup(mode, ratio=ratio, feedback="ef21")
    grads, _ = _grads(reduction, 60)
    want = _two_level_psum_mean(reduction, grads)
    for step in range(math.ceil(1 / ratio)):
        mean, state = update(grads, state)
        for k in ("w", "r"):
            estimates = np.asarray(state.estimate[k], np.float64).sum(0) / R
            np.testing.assert_allclose(np.asarray(mean[k]), estimates, rtol=1e-5, atol=1e-6, err_msg=k)
            np.testing.assert_array_equal(np.asarray(mean[k]), np.asarray(state.mean_estimate[k]))
        if step == 0:
            gap = np.abs(np.asarray(mean["r"]) - np.asarray(want["r"])).sum()
            assert gap > 0.5 * np.abs(np.asarray(want["r"])).sum(), "one step sends only a few entries"
    for k in SHAPES:
        np.testing.assert_allclose(np.asarray(mean[k]), np.asarray(want[k]), rtol=1e-5, atol=1e-6, err_msg=k)


def _least_squares_loss(reduction_options, steps=150, dim=2048, replicas=4):
    """Noisy least squares on `replicas` data replicas, the compressed mean gradient fed to Adam; final loss."""
    devices = jax.devices()[:replicas]
    topology = meshes.Topology.auto(devices)
    mesh = meshes.build_mesh({"data": replicas}, topology, devices)
    plan = make_plan("topk", mesh, topology, ("data",))
    abstract = jax.ShapeDtypeStruct((dim,), jnp.float32)
    replicated = NamedSharding(mesh, PartitionSpec())
    reduction = None
    if reduction_options is not None:
        reduction = compressed_reduction(plan, TopkOptions(**reduction_options), abstract, replicated)
    rng = np.random.default_rng(0)
    scale = np.exp(rng.uniform(-2, 1, dim)).astype(np.float32)  # features of very different sizes
    w_true = jnp.asarray(rng.standard_normal(dim), jnp.float32)
    optimizer = optax.adam(0.01, b2=0.95)

    def loss(w, x, y):
        return 0.5 * jnp.mean((x @ w - y) ** 2)

    def batch(key):
        x = jax.random.normal(key, (replicas, 16, dim)) * scale
        return x, x @ w_true + 0.5 * jax.random.normal(jax.random.fold_in(key, 1), (replicas, 16))

    @jax.jit
    def train(keys):
        def body(carry, key):
            w, comp_state, opt_state = carry
            x, y = batch(key)
            grads = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(w, x, y)
            if reduction is None:
                mean = grads.mean(0)
            else:
                mean, comp_state = reduction.transform.update(grads, comp_state)
            updates, opt_state = optimizer.update(mean, opt_state, w)
            return (optax.apply_updates(w, updates), comp_state, opt_state), None

        w = jnp.zeros(dim)
        comp_state = reduction.transform.init(w) if reduction is not None else ()
        (w, _, _), _ = jax.lax.scan(body, (w, comp_state, optimizer.init(w)), keys)
        x, y = batch(jax.random.key(99))
        return loss(w, x.reshape(-1, dim), y.reshape(-1))

    return float(train(jax.random.split(jax.random.key(1), steps)))


def test_default_error_feedback_trains_better_than_none():
    dense = _least_squares_loss(None)
    default = _least_squares_loss(dict(ratio=0.05))
    without = _least_squares_loss(dict(ratio=0.05, error_feedback=False))
    # Error feedback closes most of the gap to dense that dropping the unsent entries leaves.
    assert dense < default < without, (dense, default, without)
    assert default - dense < 0.25 * (without - dense), (dense, default, without)


def test_error_feedback_conserves_mass_on_the_train_step_gradients():
    """The per-replica gradients of the real train step on data × fsdp × tensor (parameters split two ways,
    some replicated): over three steps, R × (sum of the outputs) + (sum of the residuals) = sum of every replica's
    gradients, leaf by leaf, so neither the exchange nor its sharding loses or double-counts anything."""
    cfg, mesh = layout(
        "model.tie_embeddings=false",
        "data.global_batch_size=16",
        "optim.topk.min_size=100",
        "optim.compression=topk",
        "optim.topk.ratio=0.05",
        data=2,
        fsdp=2,
        tensor=2,
    )
    setup = build_setup(cfg, mesh)
    state = init_train_state(setup)
    grads_of = jax.jit(lambda p, t: per_replica_loss_and_grads(setup, p, t)[1])
    update = jax.jit(setup.compression.transform.update)
    comp_state = state["opt_state"][0]
    given = sent = None
    for step in range(3):
        tokens = np.random.default_rng(100 + step).integers(1, 256, (16, 17)).astype(np.int32)
        grads = grads_of(state["params"], tokens)
        mean, comp_state = update(grads, comp_state)
        g = jax.tree.map(lambda x: np.asarray(x, np.float64).sum(0), grads)
        s = jax.tree.map(lambda x: 2 * np.asarray(x, np.float64), mean)
        given = g if given is None else jax.tree.map(np.add, given, g)
        sent = s if sent is None else jax.tree.map(np.add, sent, s)
    kept = jax.tree.map(lambda x: np.asarray(x, np.float64).sum(0), comp_state.residual)
    assert np.abs(kept["blocks"]["attn"]["wq"]).sum() > 0.1 * np.abs(given["blocks"]["attn"]["wq"]).sum()
    leaves = zip(jax.tree.leaves(sent), jax.tree.leaves(kept), jax.tree.leaves(given), strict=True)
    for got_sent, got_kept, want in leaves:
        np.testing.assert_allclose(got_sent + got_kept, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
