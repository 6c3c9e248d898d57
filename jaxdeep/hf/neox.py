"""Our dense transformer as a Hugging Face GPT-NeoX directory, and a byte-level `tokenizer.json`.

The dense model (`model.kind=dense`: pre-LayerNorm blocks, exact-GELU MLP, rotate-half rotary positions on the
whole head, no linear biases) is GPT-NeoX with `use_parallel_residual=false`, `rotary_pct=1` and
`attention_bias=false`; GPT-NeoX's MLP always has biases, written as zeros. transformers'
`GPTNeoXForCausalLM` gives the same logits as our model (tested), so `transformers` can run it, e.g. as the
baseline of a serving benchmark. Export only: `jaxdeep serve` reads the experiment or run directly.

`byte_tokenizer_json(vocab_size)` is a `tokenizers` file equivalent to our byte tokenizer: text encodes to its
UTF-8 bytes (ids 0-255, no special tokens added) and decodes back; ids from 256 up (a model whose vocabulary is
larger than the bytes, e.g. a DeepSeek preset) decode to the placeholder text `<xN>`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np

from jaxdeep.config import ConfigError, ModelConfig
from jaxdeep.hf.files import ShardedWriter

BYTE_EOS_ID = 0  # our byte tokenizer's end of document (jaxdeep/data/tokenizer.py)


def neox_config(cfg: ModelConfig, torch_dtype: str, max_position_embeddings: int) -> dict:
    """config.json of the GPT-NeoX model equal to our dense `cfg`."""
    if cfg.kind != "dense":
        raise ConfigError(f"only model.kind=dense exports to GPT-NeoX, got {cfg.kind!r}")
    if cfg.n_heads * cfg.head_dim != cfg.d_model:
        raise ConfigError(
            f"GPT-NeoX needs n_heads * head_dim == d_model, got {cfg.n_heads} * {cfg.head_dim} != {cfg.d_model}"
        )
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "intermediate_size": cfg.d_ff,
        "hidden_act": "gelu",
        "layer_norm_eps": cfg.norm_eps,
        "use_parallel_residual": False,
        "attention_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        # transformers 5 reads rope_parameters; earlier versions rotary_pct / rotary_emb_base.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, "partial_rotary_factor": 1.0},
        "rotary_pct": 1.0,
        "rotary_emb_base": cfg.rope_theta,
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "bos_token_id": BYTE_EOS_ID,
        "eos_token_id": BYTE_EOS_ID,
        "pad_token_id": BYTE_EOS_ID,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }


def neox_tensors(cfg: ModelConfig, params: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, host array) of every GPT-NeoX tensor, from our dense model's pure-dict parameters."""

    def host(x) -> np.ndarray:
        return np.asarray(jax.device_get(x))

    blocks = params["blocks"]
    yield "gpt_neox.embed_in.weight", host(params["embed"])
    for i in range(cfg.n_layers):
        prefix = f"gpt_neox.layers.{i}."
        layer = jax.tree.map(lambda a, i=i: a[i], blocks)
        attn, mlp = layer["attn"], layer["mlp"]
        # query_key_value rows are (head, q|k|v, head_dim): GPT-NeoX splits each head's slice in three.
        qkv = np.stack([host(attn[w]).transpose(1, 2, 0) for w in ("wq", "wk", "wv")], axis=1)  # [n, 3, h, d]
        yield prefix + "attention.query_key_value.weight", qkv.reshape(-1, cfg.d_model)
        yield prefix + "attention.dense.weight", host(attn["wo"]).reshape(-1, cfg.d_model).T
        for ours, theirs in (("attn_norm", "input_layernorm"), ("mlp_norm", "post_attention_layernorm")):
            yield prefix + theirs + ".weight", host(layer[ours]["scale"])
            yield prefix + theirs + ".bias", host(layer[ours]["bias"])
        w_in, w_out = host(mlp["w_in"]), host(mlp["w_out"])
        yield prefix + "mlp.dense_h_to_4h.weight", w_in.T
        yield prefix + "mlp.dense_h_to_4h.bias", np.zeros(cfg.d_ff, w_in.dtype)
        yield prefix + "mlp.dense_4h_to_h.weight", w_out.T
        yield prefix + "mlp.dense_4h_to_h.bias", np.zeros(cfg.d_model, w_out.dtype)
    yield "gpt_neox.final_layer_norm.weight", host(params["final_norm"]["scale"])
    yield "gpt_neox.final_layer_norm.bias", host(params["final_norm"]["bias"])
    if not cfg.tie_embeddings:
        yield "embed_out.weight", host(params["head"]).T


def save_neox(
    cfg: ModelConfig, params: dict, path: str | Path, max_position_embeddings: int = 2048, dtype: str | None = None
) -> None:
    """Write our dense model as a GPT-NeoX directory: config.json, safetensors and a byte `tokenizer.json`."""
    import ml_dtypes

    dtype = dtype or cfg.param_dtype
    out_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}[dtype]
    config = neox_config(cfg, dtype, max_position_embeddings)
    path = Path(path)
    writer = ShardedWriter(path, 4 << 30)
    for name, array in neox_tensors(cfg, params):
        writer.add(name, np.ascontiguousarray(array.astype(out_dtype)))
    writer.close()
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    write_byte_tokenizer(path, cfg.vocab_size)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map, which the `tokenizers` ByteLevel steps use."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer_json(vocab_size: int = 256) -> dict:
    """A `tokenizer.json` whose ids 0-255 are the bytes (as our byte tokenizer); ids above decode to `<xN>`."""
    if vocab_size < 256:
        raise ValueError(f"a byte tokenizer needs vocab_size >= 256, got {vocab_size}")
    chars = _bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    vocab.update({f"<x{i}>": i for i in range(256, vocab_size)})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def write_byte_tokenizer(path: str | Path, vocab_size: int = 256) -> None:
    """`tokenizer.json` (see `byte_tokenizer_json`) and a `tokenizer_config.json` naming no special tokens."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json(vocab_size), ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 1 << 30,
        "clean_up_tokenization_spaces": False,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
