"""Hugging Face DeepSeek `config.json` <-> our `ModelConfig` (model.kind=deepseek).

Every field is either mapped, checked (it must hold the one value we implement), or known not to change
the forward pass. Anything else is refused with a message naming the field, so a checkpoint we would run
differently from its authors never loads silently.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxdeep.config import ConfigError, DeepSeekConfig, ModelConfig, RopeScalingConfig, validate_deepseek

# HF field -> ModelConfig field (top level) or "deepseek.<field>".
FIELDS = {
    "vocab_size": "vocab_size",
    "hidden_size": "d_model",
    "intermediate_size": "d_ff",
    "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads",
    "rms_norm_eps": "norm_eps",
    "tie_word_embeddings": "tie_embeddings",
    "initializer_range": "init_std",
    **{
        name: f"deepseek.{name}"
        for name in (
            "q_lora_rank",
            "kv_lora_rank",
            "qk_nope_head_dim",
            "qk_rope_head_dim",
            "v_head_dim",
            "n_routed_experts",
            "n_shared_experts",
            "num_experts_per_tok",
            "moe_intermediate_size",
            "first_k_dense_replace",
            "scoring_func",
            "topk_method",
            "n_group",
            "topk_group",
            "norm_topk_prob",
            "routed_scaling_factor",
            "aux_loss_alpha",
            "num_nextn_predict_layers",
            "rope_interleave",
            "mtp_hidden_states_first",
        )
    },
}

# Fields that must hold this value (the only behaviour implemented).
REQUIRED = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "moe_layer_freq": 1, "pretraining_tp": 1}
REQUIRED_ZERO = ("attention_dropout",)

# Fields that do not change the forward pass (token ids, caching, bookkeeping, training-only switches,
# or sizes derived from the mapped fields and checked below).
IGNORED = {
    "architectures", "auto_map", "model_type", "transformers_version", "dtype", "torch_dtype", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "max_position_embeddings", "output_router_logits", "ep_size",
    "seq_aux", "head_dim", "qk_head_dim", "num_key_value_heads", "rope_theta", "rope_scaling", "rope_parameters",
    "_name_or_path", "name_or_path", "return_dict", "output_hidden_states", "output_attentions", "use_return_dict",
    "tie_last_hidden_states", "num_mtp_layers", "id2label", "label2id", "chunk_size_feed_forward",
    "is_encoder_decoder", "problem_type", "tokenizer_class", "_attn_implementation_autoset",
}  # fmt: skip

# transformers' defaults for fields a config.json leaves out, by model_type.
DEFAULTS = {
    "deepseek_v3": {
        "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
        "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
        "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
        "first_k_dense_replace": 3, "norm_topk_prob": True, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_interleave": True, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "initializer_range": 0.02,
        "num_nextn_predict_layers": 0, "aux_loss_alpha": 0.0,
    },
    "deepseek_v2": {
        "vocab_size": 102400, "hidden_size": 4096, "intermediate_size": 11008, "moe_intermediate_size": 1407,
        "num_hidden_layers": 32, "num_attention_heads": 32, "n_shared_experts": 2, "n_routed_experts": 64,
        "routed_scaling_factor": 1.0, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
        "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 1, "topk_group": 1, "num_experts_per_tok": 6,
        "first_k_dense_replace": 0, "norm_topk_prob": False, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
        "rope_interleave": True, "scoring_func": "softmax", "topk_method": "greedy", "initializer_range": 0.02,
        "num_nextn_predict_layers": 0, "aux_loss_alpha": 0.0,
    },
}  # fmt: skip


def _rope(hf: dict[str, Any]) -> tuple[float, RopeScalingConfig]:
    """rope_theta and YaRN settings from either `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    kind = merged.pop("rope_type", merged.pop("type", "default"))
    if kind == "default":
        unknown = sorted(merged)
        if unknown:
            raise ConfigError(f"config.json: rope field {unknown[0]!r} is not supported without rope_type yarn")
        return float(theta), RopeScalingConfig()
    if kind != "yarn":
        raise ConfigError(f"config.json: rope_scaling type {kind!r} is not supported (only yarn)")
    out = RopeScalingConfig(type="yarn")
    original = merged.pop("original_max_position_embeddings", None) or hf.get("max_position_embeddings", 4096)
    out.original_max_position_embeddings = int(original)
    factor = merged.pop("factor", None)
    out.factor = float(factor if factor is not None else hf.get("max_position_embeddings", original) / original)
    for name in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
        value = merged.pop(name, None)
        if value is not None:
            setattr(out, name, float(value))
    out.truncate = bool(merged.pop("truncate", True))
    if merged.get("partial_rotary_factor", 1.0) == 1.0:
        merged.pop("partial_rotary_factor", None)
    if merged:
        raise ConfigError(f"config.json: rope field {sorted(merged)[0]!r} is not supported")
    return float(theta), out


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Our ModelConfig for a HF DeepSeek config.json (model_type deepseek_v3 or deepseek_v2)."""
    model_type = hf.get("model_type")
    if model_type not in DEFAULTS:
        raise ConfigError(f"config.json: model_type {model_type!r} is not supported (deepseek_v3 or deepseek_v2)")
    if "quantization_config" in hf:
        raise ConfigError(
            "config.json: field 'quantization_config' is not supported: dequantize the checkpoint to bf16 first"
        )
    for name, value in REQUIRED.items():
        if name in hf and hf[name] != value:
            raise ConfigError(f"config.json: field {name!r}={hf[name]!r} is not supported (only {value!r})")
    for name in REQUIRED_ZERO:
        if hf.get(name):
            raise ConfigError(f"config.json: field {name!r}={hf[name]!r} is not supported (only 0)")
    for name in hf:
        if name not in FIELDS and name not in REQUIRED and name not in REQUIRED_ZERO and name not in IGNORED:
            raise ConfigError(f"config.json: field {name!r} is not supported by jaxdeep's DeepSeek model")
    values = {**DEFAULTS[model_type], **{k: v for k, v in hf.items() if k in FIELDS}}
    for name in ("n_group", "topk_group"):
        values[name] = values[name] or 1  # null = no groups
    if model_type == "deepseek_v2" and values["topk_method"] == "noaux_tc":
        raise ConfigError("config.json: topk_method 'noaux_tc' needs model_type deepseek_v3")
    cfg = ModelConfig(kind="deepseek", dtype="float32", param_dtype="float32")
    ds = DeepSeekConfig()
    for hf_name, ours in FIELDS.items():
        if hf_name not in values:
            continue
        target, attr = (ds, ours.split(".", 1)[1]) if ours.startswith("deepseek.") else (cfg, ours)
        value = values[hf_name]
        expected = type(getattr(target, attr))
        if isinstance(getattr(target, attr), float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if value is not None and getattr(target, attr) is not None and not isinstance(value, expected):
            raise ConfigError(f"config.json: field {hf_name!r}={value!r} should be a {expected.__name__}")
        setattr(target, attr, value)
    cfg.rope_theta, ds.rope_scaling = _rope(hf)
    cfg.deepseek = ds
    qk = ds.qk_nope_head_dim + ds.qk_rope_head_dim
    if hf.get("qk_head_dim", qk) != qk:
        raise ConfigError(f"config.json: qk_head_dim={hf['qk_head_dim']} != qk_nope_head_dim + qk_rope_head_dim")
    validate_deepseek(cfg)
    return cfg


def hf_config_from_model(cfg: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    """config.json for our model: DeepSeek's own field names, readable by transformers."""
    ds = cfg.deepseek
    v3 = ds.topk_method == "noaux_tc" or ds.num_nextn_predict_layers > 0 or ds.scoring_func == "sigmoid"
    out: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM" if v3 else "DeepseekV2ForCausalLM"],
        "model_type": "deepseek_v3" if v3 else "deepseek_v2",
        "torch_dtype": torch_dtype,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
    }
    for hf_name, ours in FIELDS.items():
        value = getattr(ds, ours.split(".", 1)[1]) if ours.startswith("deepseek.") else getattr(cfg, ours)
        out[hf_name] = value
    if not ds.mtp_hidden_states_first:
        del out["mtp_hidden_states_first"]
    out["num_key_value_heads"] = cfg.n_heads  # MLA: every head has its own keys and values
    out["rope_theta"] = cfg.rope_theta
    rs = ds.rope_scaling
    if rs.type == "yarn":
        fields = dataclasses.asdict(rs)
        fields.pop("type")
        out["rope_scaling"] = {"type": "yarn", **fields}
        out["max_position_embeddings"] = int(rs.original_max_position_embeddings * rs.factor)
    else:
        out["rope_scaling"] = None
        out["max_position_embeddings"] = 4096
    return out
