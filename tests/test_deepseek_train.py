"""DeepSeek training: the objective's parts, causality of main and MTP heads, the selection-bias update,
gradient accumulation, counts, and a short run through the training loop with checkpoint and resume."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxdeep.model import DeepSeekModel, RoutingBias, count_params, flops_per_token
from jaxdeep.model.deepseek.objective import training_loss
from jaxdeep.model.deepseek.router import sequence_balance_loss
from jaxdeep.train.checkpoint import Checkpointer
from jaxdeep.train.loop import mesh_from_config, train
from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import make_train_step
from tests.helpers import layout, max_rel_error, tiny_config

DEEPSEEK = (
    "model.kind=deepseek",
    "model.tie_embeddings=false",
    "model.deepseek.q_lora_rank=16",
    "model.deepseek.kv_lora_rank=16",
    "model.deepseek.qk_nope_head_dim=8",
    "model.deepseek.qk_rope_head_dim=8",
    "model.deepseek.v_head_dim=8",
    "model.deepseek.n_routed_experts=8",
    "model.deepseek.num_experts_per_tok=2",
    "model.deepseek.moe_intermediate_size=16",
    "model.deepseek.first_k_dense_replace=1",
    "model.deepseek.n_group=2",
    "model.deepseek.topk_group=1",
    "model.deepseek.routed_scaling_factor=2.0",
    "model.deepseek.num_nextn_predict_layers=1",
    "model.deepseek.aux_loss_alpha=0.01",
    "model.deepseek.bias_update_speed=0.01",
)


def _tokens(shape=(8, 17), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape).astype(np.int32)


def _model(*overrides: str) -> DeepSeekModel:
    return DeepSeekModel(tiny_config(*DEEPSEEK, *overrides).model, nnx.Rngs(0))


_loss = nnx.jit(training_loss)
_forward = nnx.jit(lambda model, tokens: model.forward(tokens))


def _bias(tree: dict, stack: str):
    node = tree[stack]["block"] if stack == "mtp" else tree[stack]
    return node["mlp"]["gate"]["e_score_correction_bias"]


def test_total_loss_is_ce_plus_weighted_mtp_and_balance(one_step):
    cfg, *_, aux, total = one_step
    ds = cfg.model.deepseek
    assert float(aux["mtp"]) > 0 and float(aux["balance"]) > 0
    want = aux["ce"] + ds.mtp_loss_weight * aux["mtp"] + ds.aux_loss_alpha * aux["balance"]
    np.testing.assert_allclose(float(total), float(want), rtol=1e-6)
    assert float(aux["dropped"]) == 0.0
    counts = aux["expert_counts"]
    assert counts["moe_blocks"].shape == (1, 8) and counts["mtp"].shape == (1, 8)
    # Every token copy is counted once: batch × seq × K per layer.
    assert float(counts["moe_blocks"].sum()) == 8 * 16 * 2


def test_main_and_mtp_predictions_never_see_their_targets():
    # Main logits at position i may read tokens <= i; MTP depth 1 at i predicts token i+2 and may read
    # tokens <= i+1. Changing token j must leave main positions < j and MTP positions < j-1 alone.
    model = _model()
    tokens = _tokens((2, 16))
    base = _forward(model, jnp.asarray(tokens))
    j = 9
    changed = tokens.copy()
    changed[:, j] = (changed[:, j] + 1) % 256
    out = _forward(model, jnp.asarray(changed))
    np.testing.assert_array_equal(np.asarray(out.logits_btv[:, :j]), np.asarray(base.logits_btv[:, :j]))
    np.testing.assert_array_equal(
        np.asarray(out.mtp_logits_dbtv[0, :, : j - 1]), np.asarray(base.mtp_logits_dbtv[0, :, : j - 1])
    )
    assert not np.allclose(np.asarray(out.mtp_logits_dbtv[0, :, j - 1]), np.asarray(base.mtp_logits_dbtv[0, :, j - 1]))


def test_sequence_balance_loss_against_its_definition():
    rng = np.random.default_rng(0)
    b, t, e, k = 3, 10, 8, 2
    scores = rng.uniform(0.05, 1.0, (b, t, e))
    experts = np.stack([np.stack([rng.choice(e, k, replace=False) for _ in range(t)]) for _ in range(b)])
    want = 0.0
    for s in range(b):
        f = np.zeros(e)
        for tok in range(t):
            f[experts[s, tok]] += e / (k * t)
        p = (scores[s] / scores[s].sum(-1, keepdims=True)).mean(0)
        want += (f * p).sum() / b
    got = sequence_balance_loss(jnp.asarray(scores, jnp.float32), jnp.asarray(experts))
    np.testing.assert_allclose(float(got), want, rtol=1e-5)
    # Perfect balance with uniform affinities gives exactly 1.
    uniform = jnp.ones((1, 8, 8)) / 8
    balanced = jnp.asarray(np.arange(16).reshape(1, 8, 2) % 8)
    np.testing.assert_allclose(float(sequence_balance_loss(uniform, balanced)), 1.0, rtol=1e-6)


@pytest.fixture(scope="module")
def one_step():
    cfg, mesh = layout(*DEEPSEEK)
    setup = build_setup(cfg, mesh)
    state = init_train_state(setup)
    before = jax.device_get(state)
    model = setup.merge(before["params"], before["model_state"])
    total, aux = _loss(model, jnp.asarray(_tokens()))
    after, metrics = make_train_step(setup)(state, _tokens())
    return cfg, setup, before, jax.device_get(after), jax.device_get(metrics), jax.device_get(aux), float(total)


def test_selection_bias_is_model_state_updated_from_observed_load(one_step):
    cfg, setup, before, after, metrics, aux, _ = one_step
    gamma = cfg.model.deepseek.bias_update_speed
    assert "e_score_correction_bias" not in json.dumps(jax.tree.map(lambda x: 0, before["params"]))
    assert set(before["model_state"]) == {"moe_blocks", "mtp"}
    for stack in ("moe_blocks", "mtp"):
        bias_before, bias_after = _bias(before["model_state"], stack), _bias(after["model_state"], stack)
        counts = aux["expert_counts"][stack]
        want = bias_before + gamma * np.sign(counts.mean(-1, keepdims=True) - counts)
        np.testing.assert_allclose(bias_after, want, atol=1e-7)
        assert np.any(bias_after != bias_before)
    assert metrics["moe_dropped_tokens"] == 0.0
    assert metrics["moe_max_load"] >= 1.0 >= metrics["moe_min_load"]
    np.testing.assert_allclose([metrics["moe_bias_min"], metrics["moe_bias_max"]], [-gamma, gamma], rtol=1e-5)
    # The step trained the parameters, and the optimizer holds no state for the bias.
    assert max_rel_error(after["params"], before["params"]) > 1e-4
    assert "model_state" in setup.state_shardings and "e_score" not in str(jax.tree.structure(after["opt_state"]))


def test_gradient_accumulation_equals_the_full_batch(one_step):
    _, _, before, after, metrics, _, _ = one_step
    cfg, mesh = layout(*DEEPSEEK, "optim.grad_accum_steps=2")
    setup = build_setup(cfg, mesh)
    state = jax.device_put(before, setup.state_shardings)
    accumulated, acc_metrics = jax.device_get(make_train_step(setup)(state, _tokens()))
    assert max_rel_error(accumulated["params"], after["params"]) <= 1e-5
    np.testing.assert_array_equal(jax.tree.leaves(accumulated["model_state"]), jax.tree.leaves(after["model_state"]))
    np.testing.assert_allclose(acc_metrics["loss"], metrics["loss"], rtol=1e-6)


def test_unrolled_layers_train_like_the_scan():
    # Two dense layers, three MoE layers and two MTP depths: every stack is longer than one layer, so each is a
    # loop when scanned (XLA drops a loop of one trip).
    stacks = ("model.n_layers=5", "model.deepseek.first_k_dense_replace=2", "model.deepseek.num_nextn_predict_layers=2")
    results, loops, start = {}, {}, None
    for scan in ("true", "false"):
        cfg, mesh = layout(*DEEPSEEK, *stacks, f"model.scan_layers={scan}")
        setup = build_setup(cfg, mesh)
        start = jax.device_get(init_train_state(setup)) if start is None else start
        state = jax.device_put(start, setup.state_shardings)
        step = make_train_step(setup)
        loops[scan] = step.lower(state, _tokens()).as_text().count("stablehlo.while")
        results[scan] = jax.device_get(step(state, _tokens()))
    # Unrolled, none of the three stacks is a loop in the forward or the backward (the routing has loops of its own).
    assert loops["false"] == loops["true"] - 6, loops
    (scanned, metrics), (unrolled, unrolled_metrics) = results["true"], results["false"]
    assert max_rel_error(unrolled["params"], scanned["params"]) <= 1e-5
    for got, want in zip(
        jax.tree.leaves(unrolled["model_state"]), jax.tree.leaves(scanned["model_state"]), strict=True
    ):
        np.testing.assert_array_equal(got, want)  # the selection biases: the same experts were chosen
    np.testing.assert_allclose(unrolled_metrics["loss"], metrics["loss"], rtol=1e-6)


@pytest.mark.parametrize("q_lora", [None, 16])
def test_count_params_matches_the_initialised_model(q_lora):
    cfg = tiny_config(*DEEPSEEK, f"model.deepseek.q_lora_rank={'null' if q_lora is None else q_lora}").model
    _, params, state = nnx.split(DeepSeekModel(cfg, nnx.Rngs(0)), nnx.Param, RoutingBias)
    n = sum(x.size for x in jax.tree.leaves(params))
    counts = count_params(cfg)
    assert counts["total"] == n
    assert counts["active"] < counts["total"]
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * 8  # one bias per MoE layer (main + MTP)
    assert flops_per_token(cfg, 16) > 6 * counts["active"] - 6 * 32 * 256  # at least the matmuls


def test_training_loop_logs_moe_metrics_and_checkpoints_the_bias(tmp_path):
    cfg, _ = layout(*DEEPSEEK, "train.steps=2", "train.eval_every=2", "train.checkpoint_every=1")
    result = train(cfg, tmp_path, devices=jax.devices()[:1])
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 2 and all(r["moe_dropped_tokens"] == 0 and r["moe_max_load"] >= 1 for r in steps)
    assert steps[-1]["moe_bias_max"] > 0 > steps[-1]["moe_bias_min"] and "mtp_loss" in steps[-1]
    assert any("eval_loss" in r for r in records)
    # The selection bias is saved with the rest of the state and restores bitwise (resume depends on it).
    setup = build_setup(cfg, mesh_from_config(cfg, jax.devices()[:1])[0])
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    restored, _ = ckpt.restore(setup.abstract_train_state)
    ckpt.close()
    assert int(restored["step"]) == 2
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(jax.device_get(result.state)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.any(np.asarray(_bias(restored["model_state"], "moe_blocks")) != 0)
