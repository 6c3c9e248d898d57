"""DeepSeek numerics against the independent reference, transformers' DeepseekV3ForCausalLM (CPU, fp32).

Each case builds a random tiny transformers model (weights at unit scale so that logits are O(1) and
routing decisions matter), saves it in the Hugging Face format, loads it with `jaxdeep.hf.load` and
compares logits on random tokens.
"""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.modeling_layers import MtpModel

import jaxdeep.hf as hf
from jaxdeep.config import load_config
from jaxdeep.model.deepseek.router import route

TOLERANCE = 1e-4
BASE = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    routed_scaling_factor=2.0,
    kv_lora_rank=16,
    q_lora_rank=24,
    qk_rope_head_dim=8,
    v_head_dim=12,
    qk_nope_head_dim=10,
    n_group=2,
    topk_group=1,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    max_position_embeddings=128,
    num_nextn_predict_layers=0,
)
CASES = {
    "q_lora_groups_negative_bias": {},
    "no_q_lora_no_groups_all_moe": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0),
    "groups_2_of_4_two_dense_yarn_tied": dict(
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        first_k_dense_replace=2,
        num_hidden_layers=4,
        norm_topk_prob=False,
        tie_word_embeddings=True,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=4.0,
            original_max_position_embeddings=4,
            beta_fast=32.0,
            beta_slow=1.0,
            mscale=0.8,
            mscale_all_dim=1.0,
        ),
    ),
    "halves_rope_two_shared_v_wider": dict(rope_interleave=False, n_shared_experts=2, v_head_dim=24),
}


def _randomize(module: torch.nn.Module, seed: int, skip=()) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
            else:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        for sub in module.modules():
            if hasattr(sub, "e_score_correction_bias"):
                # Negative biases: the case where masking unselected groups with 0 instead of -inf differs.
                sub.e_score_correction_bias.copy_(
                    -0.5 - 0.3 * torch.rand(sub.e_score_correction_bias.shape, generator=g)
                )


def hf_v3_model(**overrides) -> DeepseekV3ForCausalLM:
    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**{**BASE, **overrides})).eval()
    _randomize(model, seed=1)
    return model


def tokens(shape=(2, 12), vocab=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int64)


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


def _max_error(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    reference = hf_v3_model(**CASES[case])
    reference.save_pretrained(tmp_path)
    ids = tokens()
    want = reference_logits(reference, ids)
    model, _ = hf.load(tmp_path)
    err = _max_error(model(ids), want)
    assert np.abs(want).max() > 1.0  # logits large enough for the tolerance to mean something
    assert err <= TOLERANCE, f"{case}: max abs logit error {err:.2e}"


def test_masking_unselected_groups_with_zero_differs_from_the_reference(tmp_path):
    # The same checkpoint run with the first HF remote code's rule (unselected groups scored 0): with
    # negative biased scores this routes differently, so the comparison above really tests the masking.
    reference = hf_v3_model()
    reference.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    model, cfg = hf.load(tmp_path)
    assert cfg.deepseek.group_mask_fill == "neg_inf" and config["n_group"] == 2
    cfg.deepseek.group_mask_fill = "zero"
    zero_model = hf.HFModel(cfg, model.params, model.model_state)
    ids = tokens()
    assert _max_error(zero_model(ids), reference_logits(reference, ids)) > 1e-2


@pytest.mark.parametrize("fill", ["neg_inf", "zero"])
def test_group_limited_routing_against_a_direct_implementation(fill):
    # Both fills against a plain loop over tokens: rank groups by their top-2 biased scores, keep the
    # best `topk_group`, give every other expert `fill`, take the top K, weigh by unbiased scores.
    cfg = load_config(
        None,
        ["model.kind=deepseek", "model.deepseek.n_group=4", "model.deepseek.topk_group=2",
         "model.deepseek.num_experts_per_tok=3", f"model.deepseek.group_mask_fill={fill}",
         "model.deepseek.routed_scaling_factor=2.5"],
    ).model.deepseek  # fmt: skip
    rng = np.random.default_rng(0)
    logits, bias = rng.normal(size=(64, 8)).astype(np.float32), -rng.uniform(0.5, 1.0, 8).astype(np.float32)
    got = route(jax.numpy.asarray(logits), jax.numpy.asarray(bias), cfg)
    scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
    for t in range(64):
        choice = (scores[t] + bias).reshape(4, 2)
        groups = np.argsort(-np.sort(choice, axis=1)[:, -2:].sum(1))[:2]
        masked = np.full_like(choice, -np.inf if fill == "neg_inf" else 0.0)
        masked[groups] = choice[groups]
        experts = np.argsort(-masked.reshape(-1), kind="stable")[:3]
        weights = scores[t, experts] / scores[t, experts].sum() * 2.5
        assert sorted(np.asarray(got.experts_tk[t]).tolist()) == sorted(experts.tolist()), t
        order_got, order_want = np.argsort(np.asarray(got.experts_tk[t])), np.argsort(experts)
        np.testing.assert_allclose(np.asarray(got.weights_tk[t])[order_got], weights[order_want], rtol=1e-5)
    # With all biased scores negative the two fills route differently.
    other = "zero" if fill == "neg_inf" else "neg_inf"
    cfg.group_mask_fill = other
    assert not np.array_equal(np.asarray(route(jax.numpy.asarray(logits), jax.numpy.asarray(bias), cfg).experts_tk),
                              np.asarray(got.experts_tk))  # fmt: skip


@pytest.mark.parametrize("topk_method", ["greedy", "group_limited_greedy"])
def test_softmax_scoring_matches_transformers_deepseek_v2(topk_method, tmp_path):
    # transformers' DeepSeek-V2 scores experts with a softmax (V3 always uses sigmoid).
    config = {k: v for k, v in BASE.items() if k != "num_nextn_predict_layers"}
    torch.manual_seed(0)
    reference = DeepseekV2ForCausalLM(
        DeepseekV2Config(**{**config, "topk_method": topk_method, "norm_topk_prob": False})
    ).eval()
    _randomize(reference, seed=2)
    reference.save_pretrained(tmp_path)
    model, cfg = hf.load(tmp_path)
    assert cfg.deepseek.scoring_func == "softmax" and cfg.deepseek.topk_method == topk_method
    ids = tokens()
    assert _max_error(model(ids), reference_logits(reference, ids)) <= TOLERANCE


def _write_mtp_layer(directory, main: DeepseekV3ForCausalLM, mtp: MtpModel) -> None:
    """Add transformers' MTP layer to a saved checkpoint under DeepSeek's names (model.layers.{L}.*)."""
    tensors = load_file(str(directory / "model.safetensors"))
    prefix = f"model.layers.{main.config.num_hidden_layers}."
    for name, value in mtp.state_dict().items():
        if "embed_tokens" in name or "shared_head" in name:
            continue  # shared with the main model
        rest = name.removeprefix("layers.0.").removeprefix("mtp_block.")
        rest = "shared_head.norm.weight" if rest == "post_norm.weight" else rest
        value = value.numpy()
        if rest == "mlp.experts.gate_up_proj":
            f = value.shape[1] // 2
            for e in range(value.shape[0]):
                tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = np.ascontiguousarray(value[e, :f])
                tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"] = np.ascontiguousarray(value[e, f:])
        elif rest == "mlp.experts.down_proj":
            for e in range(value.shape[0]):
                tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"] = np.ascontiguousarray(value[e])
        else:
            tensors[prefix + rest] = np.ascontiguousarray(value)
    save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("hidden_first", [False, True])
def test_mtp_module_matches_transformers(hidden_first, tmp_path):
    # Checkpoints feed the MTP projection [enorm(embedding); hnorm(hidden)]; the paper writes [h; e].
    main = hf_v3_model(num_nextn_predict_layers=1)
    main.config.mtp_hidden_states_first = hidden_first
    mtp = MtpModel(main, 1).eval()
    _randomize(mtp, seed=5, skip=("embed_tokens", "shared_head"))
    main.save_pretrained(tmp_path)
    _write_mtp_layer(tmp_path, main, mtp)
    config = json.loads((tmp_path / "config.json").read_text())
    config["mtp_hidden_states_first"] = hidden_first
    (tmp_path / "config.json").write_text(json.dumps(config))

    ids = tokens()
    with torch.no_grad():
        ids_t = torch.tensor(ids)
        hidden = main.model(ids_t).last_hidden_state
        positions = torch.arange(ids.shape[1] - 1)[None]
        out = mtp.forward_layer(0, hidden[:, :-1], positions, None, input_ids=ids_t[:, 1:])
        want = mtp._project_to_logits(out).numpy()
    model, cfg = hf.load(tmp_path)
    assert cfg.deepseek.num_nextn_predict_layers == 1
    output = model.output(ids)
    # Depth 1 at position i reads token i+1 and predicts token i+2; the last position has no input token.
    assert _max_error(output.mtp_logits_dbtv[0][:, :-1], want) <= TOLERANCE
    assert _max_error(output.logits_btv, reference_logits(main, ids)) <= TOLERANCE
