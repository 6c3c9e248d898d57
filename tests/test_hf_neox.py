"""Dense model -> GPT-NeoX export, the byte-level tokenizer.json, and the `generate` baseline server."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM

from jaxdeep.config import ConfigError
from jaxdeep.hf.neox import byte_tokenizer_json, neox_config, save_neox, write_byte_tokenizer
from jaxdeep.model import build_model
from jaxdeep.serve import bench
from tests.helpers import tiny_config

ROOT = Path(__file__).resolve().parents[1]


class Tiny:
    """A tiny dense model built eagerly (no compiled initialiser: fast on CPU), its parameters as a pure dict."""

    def __init__(self, *overrides: str):
        self.cfg = tiny_config(*overrides)
        self.model = build_model(self.cfg, nnx.Rngs(params=0))
        self.params = nnx.to_pure_dict(nnx.split(self.model, nnx.Param, ...)[1])

    def greedy(self, prompt: list[int], n: int) -> list[int]:
        # One padded shape for every step (causal: the padding after a position never changes its logits).
        ids = np.zeros((1, len(prompt) + n), np.int32)
        ids[0, : len(prompt)] = prompt
        for i in range(len(prompt), len(prompt) + n):
            ids[0, i] = int(np.argmax(np.asarray(self.model(ids))[0, i - 1]))
        return ids[0, len(prompt) :].tolist()


@pytest.fixture(scope="module")
def tied():
    return Tiny()


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_gpt_neox_gives_our_logits(tmp_path, tied, tie):
    tiny = tied if tie else Tiny("model.tie_embeddings=false")
    save_neox(tiny.cfg.model, tiny.params, tmp_path, max_position_embeddings=64)
    theirs_model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert type(theirs_model).__name__ == "GPTNeoXForCausalLM"
    tokens = np.random.default_rng(0).integers(1, 256, (2, 13))
    ours = np.asarray(tiny.model(tokens))
    with torch.no_grad():
        theirs = theirs_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-5 * np.abs(ours).max())


def test_bfloat16_export_and_refusals(tmp_path, tied):
    loaded = tied
    save_neox(loaded.cfg.model, loaded.params, tmp_path, dtype="bfloat16")
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.gpt_neox.embed_in.weight.dtype == torch.bfloat16
    cfg = tiny_config().model
    cfg.head_dim = 4  # n_heads * head_dim != d_model: GPT-NeoX cannot hold it
    with pytest.raises(ConfigError, match="n_heads \\* head_dim"):
        neox_config(cfg, "float32", 64)


def test_byte_tokenizer_matches_our_byte_tokenizer(tmp_path):
    write_byte_tokenizer(tmp_path, vocab_size=300)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    text = "def f(x):\n    return x  # héllo, wörld €\t"
    ids = tok.encode(text).ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode([299]) == "<x299>"
    assert tok.get_vocab_size() == 300
    with pytest.raises(ValueError):
        byte_tokenizer_json(100)


def _load_server_module():
    path = ROOT / "experiments/benchmarks/hf_generate_server.py"
    spec = importlib.util.spec_from_file_location("hf_generate_server", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_generate_baseline_server_answers_the_benchmark(tmp_path, tied):
    loaded = tied
    save_neox(loaded.cfg.model, loaded.params, tmp_path, max_position_embeddings=128)
    srv = _load_server_module()
    generator = srv.Generator(str(tmp_path), "cpu", "float32", None)
    handler = type("H", (srv.Handler,), {"generator": generator, "model_name": "tiny"})
    server = srv.Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        cfg = bench.BenchConfig(base_url=url, num_prompts=3, input_len=20, output_len=7, ignore_eos=True)
        summary = asyncio.run(bench.run_benchmark(cfg))
        assert summary["model"] == "tiny"
        assert summary["completed"] == 3 and summary["failed"] == 0
        assert summary["requests"]["prompt_tokens"] == [20, 20, 20]
        assert summary["requests"]["output_tokens"] == [7, 7, 7]  # ignore_eos: exactly max_tokens
        # Greedy text equals the model's own greedy continuation (token ids as prompt).
        prompt = list(range(65, 75))
        ids: list[int] = []
        generator.generate(prompt, max_tokens=5, temperature=0.0, ignore_eos=True, on_token=ids.append)
        assert ids == loaded.greedy(prompt, 5)
    finally:
        server.shutdown()
        server.server_close()
