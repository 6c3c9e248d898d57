"""The dense transformer: shapes, parameter and FLOP counts, causality, remat, tied heads, axis names, norms."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxdeep.config import default_rules, load_config
from jaxdeep.model import KernelChoice, Transformer, build_model, count_params, flops_per_token, logical_axes_of
from jaxdeep.model.layers import LayerNorm
from jaxdeep.sharding import use_rules
from tests.helpers import layout, max_rel_error, tiny_config

VOCAB = 256
BATCH, SEQ = 2, 16


def _tokens(seed: int = 0, shape=(BATCH, SEQ + 1)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, shape).astype(np.int32)


def _model(cfg, seed: int = 0):
    """`apply(params, tokens)` over plain-dict parameters, and the initial parameters."""
    graphdef, state = nnx.split(Transformer(cfg.model, nnx.Rngs(params=seed)), nnx.Param)

    def apply(params, tokens_bt):
        filled = jax.tree.map(lambda v: v, state)
        nnx.replace_by_pure_dict(filled, params)
        return nnx.merge(graphdef, filled)(tokens_bt)

    return apply, nnx.to_pure_dict(state)


@functools.cache
def _loss_and_grads(*overrides: str):
    """Initial parameters and a jitted (loss, grads) of a tiny config; cached so tests share compiled programs."""
    apply, params = _model(tiny_config(*overrides))

    def loss(params, tokens_bs):
        logits = apply(params, tokens_bs[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, tokens_bs[:, 1:]).mean()

    return params, jax.jit(jax.value_and_grad(loss))


@functools.cache
def _forward(dtype: str):
    """Initial parameters and a jitted forward under the default rules table on a one-device mesh."""
    cfg, mesh = layout(f"model.dtype={dtype}")
    apply, params = _model(cfg)

    @jax.jit
    def forward(params, tokens_bt):
        with use_rules(cfg.sharding.rules, mesh):
            return apply(params, tokens_bt)

    return params, forward


def _flat(tree) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in leaves}


# ----------------------------------------------------------------------------- shapes and counts


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_shape_and_dtype_under_default_rules(dtype):
    # Under the default rules table every activation's logical name must be known, or tracing fails.
    params, forward = _forward(dtype)
    logits = forward(params, _tokens(shape=(BATCH, SEQ)))
    assert logits.shape == (BATCH, SEQ, VOCAB)
    assert logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))
    # Near-uniform predictions at initialisation: a sanity check that the output is a real forward pass.
    assert abs(float(jax.nn.logsumexp(logits, -1).mean() - logits.mean()) - math.log(VOCAB)) < 0.1


@pytest.mark.parametrize("tie", [True, False])
def test_count_params_matches_initialised_parameters(tie):
    # Odd sizes (n_heads * head_dim != d_model, d_ff not a multiple of d_model) catch swapped factors.
    cfg = tiny_config(
        f"model.tie_embeddings={str(tie).lower()}",
        "model.vocab_size=50",
        "model.d_model=24",
        "model.n_heads=3",
        "model.head_dim=10",
        "model.d_ff=40",
        "model.n_layers=3",
    )
    model = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))
    sizes = {path: int(np.prod(leaf.shape)) for path, leaf in _shapes(nnx.state(model, nnx.Param)).items()}
    counts = count_params(cfg.model)
    assert counts["total"] == sum(sizes.values())
    assert counts["embedding"] == sizes["['embed']"] == 50 * 24
    assert counts["head"] == (0 if tie else sizes["['head']"])
    assert ("['head']" in sizes) == (not tie)
    assert counts["blocks"] == sum(n for path, n in sizes.items() if path.startswith("['blocks']"))


def _shapes(state) -> dict[str, jax.ShapeDtypeStruct]:
    leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(state))
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def _equations(jaxpr, repeat: int = 1):
    """Every equation of a jaxpr and its sub-jaxprs, with how often it runs (scan bodies `length` times)."""
    for eqn in jaxpr.eqns:
        yield eqn, repeat
        inner_repeat = repeat * (eqn.params["length"] if eqn.primitive.name == "scan" else 1)
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _equations(inner, inner_repeat)


def _dot_flops(jaxpr) -> int:
    """FLOPs of every dot_general in a jaxpr, 2 per multiply-add."""
    total = 0
    for eqn, repeat in _equations(jaxpr):
        if eqn.primitive.name == "dot_general":
            (contract_lhs, _), _ = eqn.params["dimension_numbers"]
            lhs_shape = eqn.invars[0].aval.shape
            out_size = math.prod(eqn.outvars[0].aval.shape)
            total += repeat * 2 * out_size * math.prod(lhs_shape[d] for d in contract_lhs)
    return total


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_hand_count(tie):
    cfg = tiny_config(
        f"model.tie_embeddings={str(tie).lower()}", "model.n_heads=2", "model.head_dim=8", "model.d_ff=48"
    )
    m, seq = cfg.model, 16
    assert (m.d_model, m.n_layers, m.n_heads * m.head_dim, m.d_ff, m.vocab_size) == (32, 2, 16, 48, 256)
    qkvo = 4 * 32 * 16  # wq, wk, wv [d, heads*head_dim] and wo back
    mlp = 2 * 32 * 48
    head = 32 * 256  # the output projection is a matmul whether or not it is tied to the embedding
    matmul_params = 2 * (qkvo + mlp) + head  # = 18432
    scores_and_values = 2 * (2 * 16 * seq)  # per layer and token: q·k over seq keys, then p·v, 2 FLOPs each
    expected = 3 * (2 * matmul_params + 2 * scores_and_values)  # forward + backward (2× forward)
    assert expected == 116736
    assert flops_per_token(m, seq) == expected

    # The same count read off the model's own forward program: its matmul FLOPs, times 3 for training.
    graphdef, params = nnx.split(nnx.eval_shape(lambda: Transformer(m, nnx.Rngs(0))), nnx.Param)
    tokens = jax.ShapeDtypeStruct((BATCH, seq), jnp.int32)
    jaxpr = jax.make_jaxpr(lambda p, t: nnx.merge(graphdef, p)(t))(params, tokens)
    assert 3 * _dot_flops(jaxpr.jaxpr) == flops_per_token(m, seq) * BATCH * seq


# ----------------------------------------------------------------------------- causality


def test_future_tokens_do_not_change_past_logits():
    params, forward = _forward("float32")
    tokens = _tokens(1, (BATCH, SEQ))
    base = np.asarray(forward(params, tokens))
    rng = np.random.default_rng(2)
    for t in (0, 7, SEQ - 2):
        changed = tokens.copy()
        changed[:, t + 1 :] = (tokens[:, t + 1 :] + rng.integers(1, VOCAB, changed[:, t + 1 :].shape)) % VOCAB
        out = np.asarray(forward(params, changed))
        np.testing.assert_array_equal(out[:, : t + 1], base[:, : t + 1], err_msg=f"future of position {t} leaks")
        assert np.all(np.abs(out[:, t + 1 :] - base[:, t + 1 :]).max(-1) > 0), "the perturbation did nothing"


def test_jacobian_of_past_logits_wrt_future_embeddings_is_zero():
    # Untied head, and every position reads its own embedding row: d logits[t] / d embed[row of s] is then
    # the dependence of position t on the input at position s, and must be exactly zero for s > t.
    cfg = tiny_config("model.tie_embeddings=false")
    apply, params = _model(cfg)
    tokens = np.random.default_rng(3).permutation(VOCAB)[:SEQ].astype(np.int32)[None]
    probe = jnp.asarray(np.random.default_rng(4).normal(size=VOCAB), jnp.float32)

    def logits_dot_probe(embed):
        return apply({**params, "embed": embed}, tokens)[0] @ probe  # [seq]

    jac = np.asarray(jax.jit(jax.jacrev(logits_dot_probe))(params["embed"]))  # [seq, vocab, d]
    per_position = np.abs(jac[:, tokens[0], :]).max(-1)  # [t, s]
    future = np.triu(np.ones((SEQ, SEQ), bool), k=1)
    assert np.all(per_position[future] == 0.0), "a logit depends on a later input"
    assert np.all(per_position[~future] > 0.0), "a logit ignores an earlier input (vacuous check)"
    unused = np.setdiff1d(np.arange(VOCAB), tokens[0])
    assert np.all(jac[:, unused, :] == 0.0)


# ----------------------------------------------------------------------------- remat and heads


def test_remat_policies_give_the_same_loss_and_gradients():
    tokens = _tokens(5)
    results, used = {}, {}
    for remat in ("none", "full", "save_matmuls"):
        params, step = _loss_and_grads(*([] if remat == "none" else [f"model.remat={remat}"]))
        # The block's remat carries the setting's policy; the norms and the activation recompute themselves
        # under remats without one (they keep only their inputs whatever the setting).
        policies = [
            e.params.get("policy")
            for e, _ in _equations(jax.make_jaxpr(step)(params, tokens).jaxpr)
            if e.primitive.name in ("remat2", "checkpoint") and e.params.get("policy") is not None
        ]
        assert len(policies) == (0 if remat == "none" else 1), (remat, policies)  # the setting takes effect
        results[remat] = jax.device_get(step(params, tokens))
        used[remat] = policies
    loss, grads = results["none"]
    assert np.isfinite(loss)
    assert min(np.abs(g).max() for g in _flat(grads).values()) > 0
    for remat in ("full", "save_matmuls"):
        err = max_rel_error(results[remat], results["none"])
        assert err <= 1e-6, f"remat={remat} differs from none by {err:.2e}"
    assert used["full"] != used["save_matmuls"]


def test_unrolled_layers_give_the_scanned_loss_and_gradients():
    tokens = _tokens(5)
    results = {}
    for scan in (True, False):
        params, step = _loss_and_grads(f"model.scan_layers={str(scan).lower()}")
        loops = step.lower(params, tokens).as_text().count("stablehlo.while")
        assert (loops > 0) == scan, f"scan_layers={scan}: {loops} loops in the program"  # the setting takes effect
        results[scan] = jax.device_get(step(params, tokens))
    err = max_rel_error(results[False], results[True])
    assert err <= 1e-6, f"unrolled layers differ from the scan by {err:.2e}"


def test_unrolled_layers_guard_their_recomputation():
    # Outside a loop XLA may merge a block's recomputation with its forward unless the checkpoint prevents it.
    tokens = _tokens(5)
    params, step = _loss_and_grads("model.scan_layers=false", "model.remat=full")
    checkpoints = [
        e.params["prevent_cse"]
        for e, _ in _equations(jax.make_jaxpr(step)(params, tokens).jaxpr)
        if e.primitive.name in ("remat2", "checkpoint") and e.params.get("policy") is not None
    ]
    assert checkpoints == [True], checkpoints  # the scan's body (unrolled when lowered)
    scanned_params, scanned = _loss_and_grads("model.remat=full")
    err = max_rel_error(jax.device_get(step(params, tokens)), jax.device_get(scanned(scanned_params, tokens)))
    assert err <= 1e-6, f"unrolled remat differs from the scanned one by {err:.2e}"


@pytest.mark.parametrize("tie", [True, False])
def test_tied_and_untied_heads_train(tie):
    params, step = _loss_and_grads(*([] if tie else ["model.tie_embeddings=false"]))  # remat=none: shared
    tokens = _tokens(6)
    loss0, grads = step(params, tokens)
    flat = _flat(grads)
    assert np.isfinite(float(loss0))
    assert abs(float(loss0) - math.log(VOCAB)) < 0.1
    # Embedding rows of tokens that never appear as inputs get gradient only through the output head.
    unused = np.setdiff1d(np.arange(VOCAB), tokens[:, :-1])
    head_rows = np.abs(flat["['embed']"][unused]).max()
    if tie:
        assert "['head']" not in flat
        assert head_rows > 0, "tied head: the embedding gets no gradient from the output projection"
    else:
        assert np.abs(flat["['head']"]).max() > 0
        assert head_rows == 0, "untied head: the output projection leaks into the embedding's gradient"
    # A few plain gradient steps on one batch must lower the loss.
    loss = loss0
    for _ in range(3):
        params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
        loss, grads = step(params, tokens)
    assert float(loss) < float(loss0) - 0.05, (float(loss0), float(loss))


# ----------------------------------------------------------------------------- axis names and norms


@pytest.mark.parametrize("tie", [True, False])
def test_logical_axes_exist_in_default_rules(tie):
    cfg = tiny_config(f"model.tie_embeddings={str(tie).lower()}")
    model = nnx.eval_shape(lambda: Transformer(cfg.model, nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    axes = _flat_axes(logical_axes_of(state))
    shapes = _shapes(state)
    rules = default_rules()
    assert set(axes) == set(shapes) and len(axes) >= 10
    for path, names in axes.items():
        assert len(names) == len(shapes[path].shape), f"{path}: {names} vs shape {shapes[path].shape}"
        missing = [n for n in names if n not in rules]
        assert not missing, f"{path}: logical axes {missing} are not in the default rules"
        if path.startswith("['blocks']"):
            assert names[0] == "layers" and shapes[path].shape[0] == cfg.model.n_layers, (path, names)
            assert "layers" not in names[1:]
        else:
            assert "layers" not in names, (path, names)
    assert axes["['embed']"] == ("vocab", "embed")
    assert axes["['blocks']['attn']['wq']"] == ("layers", "embed", "heads", "head_dim")


def _flat_axes(tree) -> dict[str, tuple]:
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: isinstance(x, tuple))
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


def test_layernorm_matches_float64_on_rows_with_large_mean():
    dim, eps = 64, 1e-5
    rng = np.random.default_rng(7)
    x = rng.normal(1e3, 1.0, (16, dim)).astype(np.float32)
    scale = rng.normal(1.0, 0.5, dim).astype(np.float32)
    bias = rng.normal(0.0, 0.5, dim).astype(np.float32)
    norm = LayerNorm(dim, eps, jnp.float32)
    norm.scale[...] = jnp.asarray(scale)
    norm.bias[...] = jnp.asarray(bias)

    y = np.asarray(norm(jnp.asarray(x)))

    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    want = (x64 - mean) / np.sqrt(x64.var(-1, keepdims=True) + eps) * scale + bias
    assert y.dtype == np.float32
    # fp32 sums of values near 1e3 leave errors of a few 1e-4; a one-pass E[x²] - E[x]² variance is off by ~0.3.
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-3)


# ----------------------------------------------------------------------------- kernel choice


def test_kernel_choice_comes_from_the_config_and_leaves_the_parameters_alone():
    assert KernelChoice.from_config(load_config(None, [])) == KernelChoice()  # same defaults as the config
    overrides = ("kernels.norm=auto", "kernels.gmm=reference", "precision.matmul=fp8", "kernels.fp8=reference")
    cfg = tiny_config(*overrides)
    chosen = KernelChoice(norm="auto", gmm="reference", matmul="fp8", fp8="reference")
    assert KernelChoice.from_config(cfg) == chosen
    model = build_model(cfg, nnx.Rngs(0))
    assert model.kernels == chosen and model.final_norm.impl == "auto"
    shapes = lambda m: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.to_pure_dict(nnx.state(m)))
    assert shapes(model) == shapes(build_model(tiny_config(), nnx.Rngs(0)))
    with pytest.raises(ValueError, match="precision.matmul must be one of"):
        KernelChoice(matmul="fp16")
    with pytest.raises(TypeError, match="kernels must be a KernelChoice"):
        Transformer(cfg.model, nnx.Rngs(0), "fused")  # the norm implementation where the choice goes
