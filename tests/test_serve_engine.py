"""The inference engine: cached decode equals the full forward (dense and absorbed-MLA DeepSeek), chunked prefill,
continuous batching gives every request what it gets alone, stop strings / limits / cancel / queue / bad
input, and sharded layouts give the tokens of one device."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdeep.config import ConfigError, load_config
from jaxdeep.serve.api import GenerationRequest, QueueFull, RequestError, SamplingParams
from jaxdeep.serve.engine import InferenceEngine
from jaxdeep.serve.loading import from_config
from jaxdeep.serve.runner import CacheGeometry, DecodeBatch, ModelRunner
from jaxdeep.serve.textstream import TextStream
from tests.fast_compile import FAST
from tests.helpers import TINY, needs_triton_interpreter

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
SLOTS, CONTEXT, CHUNK = 4, 40, 8
# fp32 throughout: decode logits agree with the full forward to 1e-5 of the largest logit.
RTOL = 1e-5

DEEPSEEK = [
    "mesh.data=1",
    "mesh.expert=1",
    "mesh.cpu_devices=0",
    "mesh.topology=auto",
    "model.d_model=32",
    "model.n_layers=3",  # a dense first layer, then two MoE layers
    "model.n_heads=4",
    "model.d_ff=64",
    "model.deepseek.q_lora_rank=16",
    "model.deepseek.kv_lora_rank=16",
    "model.deepseek.qk_nope_head_dim=8",
    "model.deepseek.qk_rope_head_dim=4",
    "model.deepseek.v_head_dim=8",
    "model.deepseek.moe_intermediate_size=16",
    "model.deepseek.num_nextn_predict_layers=0",  # serving never runs the MTP modules
    "model.init_std=0.3",  # larger weights than training's start: varied greedy text, no near-ties
    "data.seq_len=32",
]


def _loaded(kind: str, **mesh):
    axes = [f"mesh.{a}={n}" for a, n in mesh.items()]
    if kind == "dense":
        cfg = load_config(None, [*TINY, "model.init_std=0.3", *axes])
    else:
        cfg = load_config(EXPERIMENTS / "deepseek_tiny.yaml", [*DEEPSEEK, *axes])
    loaded = from_config(cfg, compiler_options=FAST)
    if kind == "deepseek":
        # A non-zero selection bias, so the bias-adjusted choice of experts is exercised.
        rng = np.random.default_rng(3)
        biases = jax.tree.map(lambda b: jnp.asarray(rng.normal(0, 0.05, b.shape), b.dtype), loaded.model_state)
        loaded.model_state = jax.device_put(biases, jax.tree.map(lambda b: b.sharding, loaded.model_state))
    return loaded


def _engine(loaded, **options) -> InferenceEngine:
    options = {"num_slots": SLOTS, "max_context": CONTEXT, "prefill_chunk": CHUNK, "compiler_options": FAST} | options
    return InferenceEngine.from_loaded(loaded, **options)


class _Served:
    """One engine (and a jitted full forward) per model kind, built on first use and shared by the tests."""

    def __init__(self):
        self.items = {}

    def get(self, kind: str):
        if kind not in self.items:
            loaded = _loaded(kind)
            forward = jax.jit(lambda p, s, t: loaded.merge(p, s)(t), compiler_options=FAST)
            full = lambda tokens: np.asarray(forward(loaded.params, loaded.model_state, tokens))
            self.items[kind] = (kind, loaded, _engine(loaded), full)
        return self.items[kind]

    def close(self):
        for _, _, engine, _ in self.items.values():
            engine.close()


@pytest.fixture(scope="module")
def models():
    served = _Served()
    yield served
    served.close()


@pytest.fixture(params=["dense", "deepseek"])
def served(request, models):
    return models.get(request.param)


@pytest.fixture
def dense(models):
    return models.get("dense")[2]


def _prompt(n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(1, 256, n).tolist()


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0)


def _seeded(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=1.0, seed=11)


def _generate_together(engine: InferenceEngine, requests, timeout: float = 120) -> dict[str, list[int]]:
    """Each request's tokens, the requests submitted while the engine's loop waits for its (reentrant) lock, so
    all are admitted on one turn and their prompts read in the same prefill calls."""
    events, done = {r.request_id: [] for r in requests}, threading.Event()

    def on_event(event):
        events[event.request_id].append(event)
        if all(evs and evs[-1].finished for evs in events.values()):
            done.set()

    with engine._cond:
        for r in requests:
            engine.submit(r, on_event)
    assert done.wait(timeout)
    return {rid: [e.token for e in evs if e.token is not None] for rid, evs in events.items()}


def _sibling(engine: InferenceEngine, tokenizer=None, **kw) -> InferenceEngine:
    """Another engine on the same compiled model (its own cache and thread)."""
    return InferenceEngine(engine.runner, tokenizer or engine.tokenizer, "sibling", **kw)


class Letters:
    """Ids -> letters, one character per token: stop strings and eos on text we can predict."""

    def __init__(self, eos_id=None):
        self.eos_id = eos_id

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        return "".join(chr(ord("a") + i % 26) for i in ids)


# ----------------------------------------------------------------------------- numerics against the full forward


def test_decode_logits_match_full_forward(served):
    kind, _, engine, forward = served
    runner = engine.runner
    prompt = _prompt(19, 0)  # three prefill chunks, the last one padded
    cache = runner.new_cache()
    cache, logits_v = runner.prefill_prompt(cache, prompt, slot=2)
    seq, decoded = list(prompt), [np.asarray(logits_v)]
    for _ in range(8):
        seq.append(int(np.argmax(decoded[-1])))
        tokens_b, positions_b = np.zeros(SLOTS, np.int32), np.full(SLOTS, CONTEXT, np.int32)
        tokens_b[2], positions_b[2] = seq[-1], len(seq) - 1
        cache, logits_bv = runner.decode(cache, tokens_b, positions_b)
        decoded.append(np.asarray(logits_bv[2]))
    full = forward(np.asarray([seq]))[0, len(prompt) - 1 :]
    np.testing.assert_allclose(np.stack(decoded), full, rtol=0, atol=RTOL * np.abs(full).max())
    if kind == "deepseek":
        assert set(cache) == {"dense_blocks", "moe_blocks"}  # latent cache only: no per-head K/V arrays
        assert set(cache["moe_blocks"]) == {"latent", "k_rope"}
        assert cache["moe_blocks"]["latent"].shape == (2, SLOTS, CONTEXT, 16)


@pytest.mark.parametrize("decode_layout", [True, False])
def test_one_sequence_decode_matches_full_forward(served, decode_layout):
    """One slot: every projection sees a single row (`single_row_product`, and for DeepSeek the gathered experts of
    one token, with the shared experts appended to them in the serving layout: `layout.with_shared_experts`), with
    the weights in the serving layout (input dims minor) or the model's."""
    kind, loaded, _, forward = served
    runner = ModelRunner.from_loaded(
        loaded, CacheGeometry(1, CONTEXT, CHUNK), compiler_options=FAST, decode_layout=decode_layout
    )
    assert runner.relaid == (("projections", "experts") if decode_layout else ())
    params, model = runner.params, loaded.params
    # Re-laid weights are held transposed into their serving order, in the default layout (layout.in_default_layout).
    wo, wo_model = (
        (params["blocks"]["attn"]["wo"], model["blocks"]["attn"]["wo"])
        if kind == "dense"
        else (params["moe_blocks"]["self_attn"]["o_proj"], model["moe_blocks"]["self_attn"]["o_proj"])
    )
    assert wo.format.layout.major_to_minor == (0, 1, 2, 3)
    order = (0, 3, 1, 2) if decode_layout else (0, 1, 2, 3)
    np.testing.assert_array_equal(np.asarray(wo), np.asarray(wo_model).transpose(order))
    if kind == "deepseek":  # the router's [embed, experts] weight too: one token's logits are row reductions
        router = params["moe_blocks"]["mlp"]["gate"]["weight"]
        assert router.shape == tuple(
            np.asarray(model["moe_blocks"]["mlp"]["gate"]["weight"].shape)[[0, 2, 1] if decode_layout else [0, 1, 2]]
        )
        ds, experts = loaded.cfg.model.deepseek, params["moe_blocks"]["mlp"]["experts"]["gate_up_proj"]
        stacked = [e.shape[0] for e in experts] if decode_layout else [experts.shape[1]]
        assert set(stacked) == {ds.n_routed_experts + (ds.n_shared_experts if decode_layout else 0)}
    prompt = _prompt(11, 5)
    cache, logits_v = runner.prefill_prompt(runner.new_cache(), prompt, slot=0)
    seq, decoded = list(prompt), [np.asarray(logits_v)]
    for _ in range(6):
        seq.append(int(np.argmax(decoded[-1])))
        cache, logits_bv = runner.decode(cache, [seq[-1]], [len(seq) - 1])
        decoded.append(np.asarray(logits_bv[0]))
    full = forward(np.asarray([seq]))[0, len(prompt) - 1 :]
    np.testing.assert_allclose(np.stack(decoded), full, rtol=0, atol=RTOL * np.abs(full).max())


@needs_triton_interpreter
def test_grouped_kernel_reads_the_relaid_experts_in_place():
    """With the grouped Triton matmul (here in its interpreter) the routed experts are re-laid too, and prefill and
    decode read them transposed through the kernel's strides: the logits are the full forward's."""
    cfg = load_config(EXPERIMENTS / "deepseek_tiny.yaml", [*DEEPSEEK, "kernels.gmm=interpret"])
    loaded = from_config(cfg, compiler_options=FAST)
    forward = jax.jit(lambda p, s, t: loaded.merge(p, s)(t), compiler_options=FAST)
    runner = ModelRunner.from_loaded(loaded, CacheGeometry(2, CONTEXT, CHUNK), compiler_options=FAST)
    assert runner.relaid == ("projections", "experts")
    gate_up = runner.params["moe_blocks"]["mlp"]["experts"]["gate_up_proj"]  # per layer (layout.split_layers)
    # each held as its serving order [E, 2, f, d] (d minor) in the default layout (layout.in_default_layout)
    assert len(gate_up) == 2 and all(g.format.layout.major_to_minor == (0, 1, 2, 3) for g in gate_up)
    gate_up = [np.asarray(g).transpose(0, 3, 1, 2) for g in gate_up]  # back to [E, d, 2, f]
    stacked = loaded.params["moe_blocks"]["mlp"]["experts"]["gate_up_proj"]
    n_routed = stacked.shape[1]  # the shared experts follow the routed ones (layout.with_shared_experts)
    np.testing.assert_array_equal(np.stack([g[:n_routed] for g in gate_up]), np.asarray(stacked))
    shared_gate = np.asarray(loaded.params["moe_blocks"]["mlp"]["shared_experts"]["gate_proj"])  # [L, d, n_s * f]
    f = stacked.shape[-1]
    np.testing.assert_array_equal(gate_up[1][n_routed, :, 0], shared_gate[1][:, :f])
    unsplit = ModelRunner.from_loaded(loaded, CacheGeometry(2, CONTEXT, CHUNK), decode_layout=False)
    assert unsplit.params["moe_blocks"]["mlp"]["experts"]["gate_up_proj"] is stacked  # the caller's: never twice
    prompt = _prompt(10, 9)
    cache, logits_v = runner.prefill_prompt(runner.new_cache(), prompt, slot=1)
    seq, decoded = list(prompt), [np.asarray(logits_v)]
    for _ in range(2):
        seq.append(int(np.argmax(decoded[-1])))
        cache, logits_bv = runner.decode(cache, [0, seq[-1]], [CONTEXT, len(seq) - 1])
        decoded.append(np.asarray(logits_bv[1]))
    full = np.asarray(forward(loaded.params, loaded.model_state, np.asarray([seq])))[0, len(prompt) - 1 :]
    np.testing.assert_allclose(np.stack(decoded), full, rtol=0, atol=RTOL * np.abs(full).max())


def test_decode_writes_only_its_positions_and_idle_slots_only_their_last(served):
    _, _, engine, _ = served
    runner = engine.runner
    cache = runner.new_cache()
    cache, _ = runner.prefill_prompt(cache, _prompt(9, 6), slot=1)
    before = jax.tree.map(np.asarray, cache)
    tokens_b, positions_b = np.full(SLOTS, 7, np.int32), np.full(SLOTS, CONTEXT + 3, np.int32)
    positions_b[1] = 9
    after = jax.tree.map(np.asarray, runner.decode(cache, tokens_b, positions_b)[0])
    for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(after), strict=True):
        changed = np.argwhere(np.any(old != new, axis=tuple(range(3, old.ndim))))  # (layer, slot, position)
        allowed = {(1, 9)} | {(slot, CONTEXT - 1) for slot in range(SLOTS) if slot != 1}
        assert {(int(s), int(p)) for _, s, p in changed} <= allowed
        assert (1, 9) in {(int(s), int(p)) for _, s, p in changed}


def test_decode_step_carries_the_batch_on_the_device(served):
    """A block of one step (`decode_steps`) = `decode` then `sample` of its logits; active slots move one position
    and one token on, idle slots stay; a batch rebuilt on the host hits the same compiled step."""
    from jaxdeep.serve.sampling import sample

    _, _, engine, _ = served
    runner = engine.runner
    cache, _ = runner.prefill_prompt(runner.new_cache(), _prompt(6, 8), slot=1)
    cache, _ = runner.prefill_prompt(cache, _prompt(9, 9), slot=3)
    tokens, positions = np.array([0, 5, 0, 7], np.int32), np.array([CONTEXT, 6, CONTEXT, 9], np.int32)
    temperature, top_k = np.array([0, 0.8, 0, 1.0], np.float32), np.array([0, 5, 0, 0], np.int32)
    top_p, seed, index = np.array([1, 0.9, 1, 1], np.float32), np.array([0, 2**32 - 1, 0, 4], np.uint32), np.arange(4)
    expect_cache, logits = runner.decode(jax.tree.map(jnp.copy, cache), tokens, positions)
    expect = np.asarray(sample(logits, temperature, top_k, top_p, seed, index.astype(np.int32)))
    batch = runner.decode_batch(tokens, positions, temperature, top_k, top_p, seed, index)
    compiled = runner._decode_block._cache_size()
    cache, following, sampled = runner.decode_steps(cache, batch)
    np.testing.assert_array_equal(np.asarray(sampled), expect[None])
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(expect_cache), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    active = positions < CONTEXT
    np.testing.assert_array_equal(np.asarray(following.tokens), np.where(active, expect, tokens))
    np.testing.assert_array_equal(np.asarray(following.positions), positions + active)
    np.testing.assert_array_equal(np.asarray(following.index), index + active)
    np.testing.assert_array_equal(np.asarray(following.seed), seed)
    cache, following, _ = runner.decode_steps(cache, following)
    # Rows 0 and 3 replaced on the device; the others come through as they were.
    rows = np.array([True, False, False, True])
    before = jax.tree.map(np.asarray, following)
    new = (tokens + 1, positions - 1, temperature * 2, top_k + 1, top_p / 2, seed, index)
    merged = runner.decode_batch(*new, into=following, rows=rows)
    for name, got, old, want in zip(DecodeBatch._fields, merged, before, new, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.where(rows, want.astype(old.dtype), old), err_msg=name)
    cache, _, _ = runner.decode_steps(cache, merged)
    runner.decode_steps(cache, runner.decode_batch(tokens, positions + 2, temperature, top_k, top_p, seed, index))
    assert runner._decode_block._cache_size() <= compiled + 1  # one program for all these batches


def test_decode_steps_equal_single_steps(served):
    """A block of steps in one launch samples, writes and moves the batch as that many blocks of one; a slot
    reaching the end of the context mid-block turns idle."""
    _, _, engine, _ = served
    runner = engine.runner
    cache, _ = runner.prefill_prompt(runner.new_cache(), _prompt(6, 8), slot=1)
    cache, _ = runner.prefill_prompt(cache, _prompt(CONTEXT - 2, 9), slot=2)
    cache, _ = runner.prefill_prompt(cache, _prompt(9, 10), slot=3)
    tokens, positions = np.array([0, 5, 3, 7], np.int32), np.array([CONTEXT, 6, CONTEXT - 2, 9], np.int32)
    temperature, top_k = np.array([0, 0.8, 0, 1.0], np.float32), np.array([0, 5, 0, 0], np.int32)
    top_p, seed, index = np.array([1, 0.9, 1, 1], np.float32), np.array([0, 2**32 - 1, 0, 4], np.uint32), np.arange(4)
    columns = (tokens, positions, temperature, top_k, top_p, seed, index)
    single_cache, single = jax.tree.map(jnp.copy, cache), runner.decode_batch(*columns)
    expect = []
    for _ in range(3):
        single_cache, single, sampled = runner.decode_steps(single_cache, single)
        expect.append(np.asarray(sampled)[0])
    cache, block, sampled = runner.decode_steps(cache, runner.decode_batch(*columns), 3)
    np.testing.assert_array_equal(np.asarray(sampled), np.stack(expect))
    for got, want in zip(jax.tree.leaves(cache), jax.tree.leaves(single_cache), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for name, got, want in zip(DecodeBatch._fields, block, single, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=name)
    np.testing.assert_array_equal(np.asarray(block.positions), [CONTEXT, 9, CONTEXT, 12])  # slot 2 ran out
    compiled = runner._decode_block._cache_size()
    runner.decode_steps(cache, block, 3)
    assert runner._decode_block._cache_size() == compiled
    with pytest.raises(ValueError, match="steps"):
        runner.decode_steps(cache, block, 0)


def test_decode_tokens_land_in_host_memory(served):
    """A decode block's tokens, which the host reads every step, are written to pinned host memory by the program
    itself, where the device has it (a read from device memory starts a transfer and waits for it); the batch stays
    with the model."""
    _, _, engine, _ = served
    runner = engine.runner
    assert "pinned_host" in {m.kind for m in runner.mesh.devices.flat[0].addressable_memories()}
    cache, _ = runner.prefill(runner.new_cache(), _prompt(5, 30), slot=0, start=0)
    zeros = np.zeros(1, np.int32)
    batch = runner.decode_batch(
        np.array([4], np.int32), np.array([5], np.int32), zeros, zeros, np.ones(1), zeros, zeros
    )
    cache, batch, sampled = runner.decode_steps(cache, batch, 2, "greedy")
    assert sampled.sharding.memory_kind == "pinned_host"
    assert batch.tokens.sharding.memory_kind == "device"
    np.testing.assert_array_equal(np.asarray(sampled)[-1], np.asarray(batch.tokens))


def test_engine_samples_a_prompts_first_token_into_host_memory(served, monkeypatch):
    """The engine samples a prompt's first token through the runner's sampler, whose output is in pinned host
    memory, and gets the argmax of prefill's logits for a greedy request."""
    _, _, engine, full = served
    runner, seen = engine.runner, []
    sample = runner.sample

    def recording(logits_v, *columns):
        token = sample(logits_v, *columns)
        seen.append((token.sharding.memory_kind, int(np.asarray(token)[0]), int(np.argmax(np.asarray(logits_v)))))
        return token

    monkeypatch.setattr(runner, "sample", recording)
    prompt = _prompt(6, 31)
    out = engine.generate(GenerationRequest("first", prompt, _greedy(1)), timeout=60)
    assert [kind for kind, _, _ in seen] == ["pinned_host"]
    assert seen[0][1] == seen[0][2] == out.tokens[0] == np.argmax(full(np.array([prompt]))[0, -1])


def test_greedy_sampling_mode_gives_the_same_tokens(served):
    """A batch whose rows are all greedy (idle ones included) samples the same tokens and moves the same way in
    "greedy" mode, which skips the vocabulary's sort and draw; the engine picks the mode from its requests."""
    from jaxdeep.serve.sampling import mode_for

    _, _, engine, _ = served
    runner = engine.runner
    cache, _ = runner.prefill_prompt(runner.new_cache(), _prompt(6, 8), slot=1)
    cache, _ = runner.prefill_prompt(cache, _prompt(9, 10), slot=3)
    tokens, positions = np.array([0, 5, 0, 7], np.int32), np.array([CONTEXT, 6, CONTEXT, 9], np.int32)
    zeros = np.zeros(4, np.int32)
    columns = (tokens, positions, zeros.astype(np.float32), zeros, np.ones(4, np.float32), zeros, zeros)
    results = {}
    for mode in ("sample", "greedy"):
        results[mode] = runner.decode_steps(jax.tree.map(jnp.copy, cache), runner.decode_batch(*columns), 2, mode)
    for got, want in zip(jax.tree.leaves(results["greedy"]), jax.tree.leaves(results["sample"]), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert mode_for([0.0, 0]) == "greedy" and mode_for([0.0, 0.7]) == "sample"
    with pytest.raises(ValueError, match="sampling must be one of"):
        runner.decode_steps(cache, runner.decode_batch(*columns), 1, "beam")


def test_engine_greedy_is_argmax_of_full_forward(served):
    _, _, engine, forward = served
    for seed, (n_prompt, n_new) in enumerate([(5, 12), (17, 9)]):
        prompt = _prompt(n_prompt, 10 + seed)
        out = engine.generate(GenerationRequest(f"g{seed}", prompt, _greedy(n_new)), timeout=120)
        generated = out.tokens + ([0] if out.finish_reason == "stop" else [])  # eos (0) ends it early
        assert len(generated) == n_new or out.finish_reason == "stop"
        full = forward(np.asarray([prompt + generated]))[0]
        argmax = full[n_prompt - 1 : n_prompt - 1 + len(generated)].argmax(-1)
        assert argmax.tolist() == generated


def _assert_greedy_is_the_forward_argmax(loaded, engine, prompt: list[int], n: int) -> None:
    """A greedy request of n tokens through `engine` gives the full forward's argmax at every position."""
    out = engine.generate(GenerationRequest("m", prompt, _greedy(n)), timeout=120)
    generated = out.tokens + ([0] if out.finish_reason == "stop" else [])
    forward = jax.jit(lambda p, s, t: loaded.merge(p, s)(t), compiler_options=FAST)
    full = np.asarray(forward(loaded.params, loaded.model_state, np.asarray([prompt + generated])))[0]
    assert full[len(prompt) - 1 : len(prompt) - 1 + len(generated)].argmax(-1).tolist() == generated


def test_runner_holds_no_mtp_weights_and_decodes_as_the_model():
    """A DeepSeek model with an MTP module: serving never runs it, so the runner neither holds nor passes its weights
    (`runner.serving_params`); handed over, they are freed; greedy decode is still the full forward's argmax."""
    cfg = load_config(EXPERIMENTS / "deepseek_tiny.yaml", [*DEEPSEEK, "model.deepseek.num_nextn_predict_layers=1"])
    loaded = from_config(cfg, compiler_options=FAST)
    mtp = jax.tree.leaves(loaded.params["mtp"])
    assert mtp
    engine = _engine(loaded)
    try:
        assert "mtp" not in engine.runner.params and not any(a.is_deleted() for a in mtp)  # the caller's still
        _assert_greedy_is_the_forward_argmax(loaded, engine, _prompt(6, 21), 8)
    finally:
        engine.close()
    owned = _engine(loaded, own_params=True)  # the engine takes the tree over
    try:
        assert all(a.is_deleted() for a in mtp)
    finally:
        owned.close()


def test_chunked_prefill_equals_one_shot(served):
    _, loaded, engine, _ = served
    prompt = _prompt(21, 4)
    one_shot = ModelRunner.from_loaded(loaded, CacheGeometry(SLOTS, CONTEXT, 24))
    cache_a, logits_a = engine.runner.prefill_prompt(engine.runner.new_cache(), prompt, slot=1)
    cache_b, logits_b = one_shot.prefill_prompt(one_shot.new_cache(), prompt, slot=1)
    np.testing.assert_allclose(logits_a, logits_b, rtol=0, atol=RTOL * np.abs(logits_b).max())
    for a, b in zip(jax.tree.leaves(cache_a), jax.tree.leaves(cache_b), strict=True):
        a, b = np.asarray(a)[:, 1, : len(prompt)], np.asarray(b)[:, 1, : len(prompt)]
        np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * np.abs(b).max())


def test_prompts_prefilled_together_equal_each_alone(served):
    """One prefill call over several prompts (other slots, lengths and starts; a second chunk among them) caches
    what one call per prompt caches and gives each prompt its logits; the idle row that pads three prompts to a
    call of four writes nothing."""
    _, _, engine, _ = served
    runner = engine.runner
    assert runner.prefill_sizes == (1, 2, 4)
    prompts = {1: _prompt(CHUNK + 5, 60), 2: _prompt(3, 61), 3: _prompt(CHUNK, 62)}
    base, _ = runner.prefill(runner.new_cache(), prompts[1][:CHUNK], slot=1, start=0)  # slot 1's first chunk
    pieces = [(prompts[2], 2, 0), (prompts[1][CHUNK:], 1, CHUNK), (prompts[3], 3, 0)]
    together, logits_pv = runner.prefill_chunks(jax.tree.map(jnp.copy, base), pieces)
    assert logits_pv.shape == (4, runner.cfg.model.vocab_size)
    alone = base
    for row, (tokens, slot, start) in enumerate(pieces):
        alone, logits_v = runner.prefill(alone, tokens, slot, start)
        want = np.asarray(logits_v)
        np.testing.assert_allclose(np.asarray(logits_pv[row]), want, rtol=0, atol=RTOL * np.abs(want).max())
    for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=0, atol=RTOL * np.abs(b).max())
        np.testing.assert_array_equal(a[:, 0], 0)  # the idle row's slot 0, and each slot past its last chunk
        for slot, prompt in prompts.items():
            np.testing.assert_array_equal(a[:, slot, -(-len(prompt) // CHUNK) * CHUNK :], 0)


def test_prefill_chunks_rejects_what_it_cannot_take(served):
    _, loaded, engine, _ = served
    runner, cache = engine.runner, engine.runner.new_cache()
    with pytest.raises(ValueError, match="1..4 prompts per call, got 5"):
        runner.prefill_chunks(cache, [([1], s, 0) for s in range(5)])
    with pytest.raises(ValueError, match="slot of its own"):
        runner.prefill_chunks(cache, [([1], 2, 0), ([3], 2, 1)])
    with pytest.raises(ValueError, match="slot 4 is not one of the 4 slots"):
        runner.prefill_chunks(cache, [([1], 4, 0)])
    with pytest.raises(ValueError, match=f"1..{CHUNK} tokens per prompt, got 0"):
        runner.prefill_chunks(cache, [([], 0, 0)])
    with pytest.raises(ConfigError, match="prefill_rows: must be >= 1, got 0"):
        ModelRunner.from_loaded(loaded, CacheGeometry(SLOTS, CONTEXT, CHUNK, prefill_rows=0))
    # More rows than slots: a call never holds more prompts than there are slots.
    assert ModelRunner.from_loaded(loaded, CacheGeometry(2, CONTEXT, CHUNK, prefill_rows=8)).prefill_sizes == (1, 2)


class _PrefillsSeen:
    """A runner that records how many prompts each prefill call takes."""

    def __init__(self, runner):
        self.runner, self.calls = runner, []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def prefill_chunks(self, cache, pieces):
        self.calls.append(len(pieces))
        return self.runner.prefill_chunks(cache, pieces)


def test_engine_prefills_waiting_prompts_in_one_launch(served):
    """Prompts admitted together are read in calls of up to prefill_rows prompts, a chunk of each per call, and
    their requests get what they get alone."""
    _, _, engine, _ = served
    requests = [GenerationRequest(f"p{i}", _prompt(n, 70 + i), _greedy(4)) for i, n in enumerate((3, 2 * CHUNK, 5))]
    alone = [engine.generate(r, timeout=60).tokens for r in requests]
    runner = _PrefillsSeen(engine.runner)
    batched = InferenceEngine(runner, engine.tokenizer, "batched")
    try:
        tokens = _generate_together(batched, requests, timeout=60)
        assert runner.calls == [3, 1]  # three prompts in one call, then the long one's second chunk alone
        assert (batched.stats().prefill_calls, batched.stats().prefill_chunks) == (2, 4)
        assert [tokens[r.request_id] for r in requests] == alone
    finally:
        batched.close()


# ----------------------------------------------------------------------------- continuous batching


REQUESTS = [  # prompt length, max_tokens, sampling
    (3, 10, dict(temperature=0.0)),
    (19, 6, dict(temperature=0.9, seed=1)),
    (9, 14, dict(temperature=1.3, top_k=5, seed=2)),
    (1, 8, dict(temperature=0.7, top_p=0.8, seed=3)),
    (12, 5, dict(temperature=0.0)),
    (26, 7, dict(temperature=1.0, top_k=40, top_p=0.9, seed=4)),
    (6, 11, dict(temperature=2.0, seed=5)),
]


def _requests():
    return [
        GenerationRequest(f"r{i}", _prompt(n, 100 + i), SamplingParams(max_tokens=m, **kw))
        for i, (n, m, kw) in enumerate(REQUESTS)
    ]


def test_batched_requests_get_what_they_get_alone(served):
    _, _, engine, _ = served
    alone = {r.request_id: engine.generate(r, timeout=120) for r in _requests()}
    requests = _requests()
    results: dict[str, list] = {}
    seen = {"running": 0, "waiting": 0}
    done = threading.Event()

    def on_event(event):
        # Runs on the engine thread: later requests are submitted from here, so they join at fixed points
        # (while r0..r2 decode, and when r1 finishes); 7 requests share 4 slots.
        evs = results.setdefault(event.request_id, [])
        evs.append(event)
        stats = engine.stats()
        seen["running"], seen["waiting"] = max(seen["running"], stats.running), max(seen["waiting"], stats.waiting)
        if event.request_id == "r0" and len(evs) == 1:
            for r in requests[3:5]:
                engine.submit(r, on_event)
        if event.request_id == "r1" and event.finished:
            for r in requests[5:]:
                engine.submit(r, on_event)
        if sum(1 for evs in results.values() if evs[-1].finished) == len(REQUESTS):
            done.set()

    for r in requests[:3]:
        engine.submit(r, on_event)
    assert done.wait(120)
    assert seen["running"] == SLOTS and seen["waiting"] >= 1
    for r in requests:
        events = results[r.request_id]
        tokens = [e.token for e in events if e.token is not None]
        text = "".join(e.text for e in events)
        assert (tokens, text, events[-1].finish_reason) == (
            alone[r.request_id].tokens,
            alone[r.request_id].text,
            alone[r.request_id].finish_reason,
        ), r.request_id
    assert len({tuple(a.tokens) for a in alone.values()}) == len(REQUESTS)
    # Same seed, same request: the same tokens; another seed: other tokens.
    again = engine.generate(_requests()[2], timeout=60)
    assert again.tokens == alone["r2"].tokens
    other = _requests()[2]
    other.params = SamplingParams(max_tokens=14, temperature=1.3, top_k=5, seed=99)
    assert engine.generate(other, timeout=60).tokens != alone["r2"].tokens


class _StepsSeen:
    """A runner that records the steps and rows of each block the engine launches."""

    def __init__(self, runner):
        self.runner, self.steps, self.sizes, self.modes = runner, [], [], []

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def decode_steps(self, cache, batch, steps, sampling):
        self.steps.append(steps)
        self.sizes.append(batch.tokens.shape[0])
        self.modes.append(sampling)
        return self.runner.decode_steps(cache, batch, steps, sampling)


def test_blocks_of_steps_give_every_request_what_one_step_does(served):
    """An engine launching up to three steps at once gives the same tokens, text and ends as one launching one:
    requests alone, batched with joins and leaves, and ended early by a stop string or a short max_tokens."""
    _, _, engine, _ = served
    runner = _StepsSeen(engine.runner)
    blocks = InferenceEngine(runner, Letters(), "blocks", decode_steps=3)
    single = _sibling(engine, Letters())
    try:
        requests = _requests()
        requests[4].params = SamplingParams(max_tokens=5, temperature=1.0, seed=6)
        stopped = single.generate(requests[4], timeout=60).text
        requests[4].params = SamplingParams(max_tokens=5, temperature=1.0, seed=6, stop=(stopped[2:4],))
        want = {r.request_id: single.generate(r, timeout=60) for r in requests}
        assert want["r4"].finish_reason == "stop" and want["r4"].text == stopped[: stopped.find(stopped[2:4])]
        for r in (requests[2], requests[4], requests[0]):  # alone: a long one, one a stop string ends mid-block, greedy
            got = blocks.generate(r, timeout=60)
            assert (got.tokens, got.text, got.finish_reason) == (
                want[r.request_id].tokens,
                want[r.request_id].text,
                want[r.request_id].finish_reason,
            ), r.request_id
        assert 3 in runner.steps and 1 in runner.steps
        assert set(runner.sizes) == {1}  # alone in slot 0: decoded as batch 1
        assert set(runner.modes) == {"greedy", "sample"}  # r2 and r4 sample, r0 is greedy
        together: dict[str, list] = {}
        done = threading.Event()

        def on_event(event):
            together.setdefault(event.request_id, []).append(event)
            if sum(1 for evs in together.values() if evs[-1].finished) == len(requests):
                done.set()

        runner.steps.clear(), runner.sizes.clear()
        for r in requests:
            blocks.submit(r, on_event)
        assert done.wait(120)
        assert 3 in runner.steps and set(runner.sizes) > {SLOTS}  # fewer rows as the slots empty
        for r in requests:
            events = together[r.request_id]
            tokens = [e.token for e in events if e.token is not None]
            expected = (want[r.request_id].tokens, want[r.request_id].text, want[r.request_id].finish_reason)
            assert (tokens, "".join(e.text for e in events), events[-1].finish_reason) == expected, r.request_id
    finally:
        blocks.close()
        single.close()
    with pytest.raises(ValueError, match="decode_steps"):
        InferenceEngine(engine.runner, Letters(), "bad", decode_steps=0)


def test_resize_batch_keeps_rows_and_adds_idle_ones(served):
    _, _, engine, _ = served
    runner = engine.runner
    columns = (np.array([3, 4]), np.array([5, 6]), np.array([0.5, 0]), np.array([2, 0]), np.array([0.9, 1]))
    batch = runner.decode_batch(*columns, np.array([7, 8], np.uint32), np.array([1, 2]))
    grown, shrunk = runner.resize_batch(batch, 4), runner.resize_batch(batch, 1)
    idle = (0, CONTEXT, 0.0, 0, 1.0, 0, 0)
    for name, old, big, small, extra in zip(DecodeBatch._fields, batch, grown, shrunk, idle, strict=True):
        np.testing.assert_array_equal(np.asarray(big), np.concatenate([np.asarray(old), [extra, extra]]), err_msg=name)
        np.testing.assert_array_equal(np.asarray(small), np.asarray(old)[:1], err_msg=name)
        assert big.dtype == old.dtype
    with pytest.raises(ValueError, match="rows"):
        runner.resize_batch(batch, 3)


def test_cancel_and_eos_inside_a_block(dense):
    """With blocks of four steps, a request cancelled or ended by eos while its block is in flight frees its slot,
    and the next request in that slot gets what it gets alone."""
    prompt = _prompt(6, 9)
    plain = _sibling(dense, Letters())
    try:
        tokens = plain.generate(GenerationRequest("p", prompt, _seeded(12)), timeout=60).tokens
        after = plain.generate(GenerationRequest("q", _prompt(5, 3), _greedy(10)), timeout=60)
    finally:
        plain.close()
    k = next(i for i, t in enumerate(tokens) if t not in tokens[:i] and i > 2)
    engine = _sibling(dense, Letters(eos_id=tokens[k]), decode_steps=4)
    try:
        out = engine.generate(GenerationRequest("e", prompt, _seeded(12)), timeout=60)
        assert out.finish_reason == "stop" and out.tokens == tokens[:k]
        events, started, done = [], threading.Event(), threading.Event()

        def on_event(event):
            events.append(event)
            started.set()
            if event.finished:
                done.set()

        engine.submit(GenerationRequest("c", prompt, SamplingParams(max_tokens=30, temperature=0.0)), on_event)
        assert started.wait(60)
        engine.cancel("c")
        assert done.wait(60) and events[-1].finish_reason == "abort"
        again = engine.generate(GenerationRequest("q", _prompt(5, 3), _greedy(10)), timeout=60)
        assert (again.tokens, again.text, again.finish_reason) == (after.tokens, after.text, after.finish_reason)
        assert engine.stats().running == 0
    finally:
        engine.close()


def test_decode_all_slots_decodes_a_lone_request_as_a_full_batch(models):
    _, loaded, _, _ = models.get("dense")
    runner = ModelRunner.from_loaded(
        loaded, CacheGeometry(SLOTS, CONTEXT, CHUNK), compiler_options=FAST, decode_all_slots=True
    )
    assert runner.decode_sizes == (SLOTS,)
    assert runner.prefill_sizes == (1,)  # one prompt per call: its logits never depend on another's
    seen = _StepsSeen(runner)
    engine = InferenceEngine(seen, Letters(), "all")
    try:
        engine.generate(GenerationRequest("a", _prompt(4, 1), _greedy(3)), timeout=60)
    finally:
        engine.close()
    assert set(seen.sizes) == {SLOTS}
    assert set(seen.modes) == {"sample"}  # one program for every step, even for a greedy request


def test_steps_compile_with_concurrent_kernels_where_asked(models, monkeypatch):
    """Every serving step hands XLA `runner.CONCURRENT_KERNELS` with concurrent_kernels=True and leaves it out
    otherwise (the default, for every model); the caller's own options win. A value XLA refuses shows where the
    option goes; the real one compiles and runs."""
    from jaxdeep.serve import runner as runner_module

    mode = runner_module.SCHEDULING_MODE
    assert runner_module.step_compiler_options(True, None) == runner_module.CONCURRENT_KERNELS == {mode: "CONCURRENT"}
    assert runner_module.step_compiler_options(False, None) is None
    assert runner_module.step_compiler_options(True, {mode: "SERIALIZE"}) == {mode: "SERIALIZE"}
    _, deepseek, _, _ = models.get("deepseek")
    _, dense, _, _ = models.get("dense")

    geometry = CacheGeometry(SLOTS, CONTEXT, CHUNK)
    tokens, positions = np.ones(SLOTS, np.int32), np.full(SLOTS, 3, np.int32)
    on = ModelRunner.from_loaded(deepseek, geometry, compiler_options=FAST, concurrent_kernels=True)
    assert on.concurrent_kernels
    _, logits = on.decode(on.new_cache(), tokens, positions)
    assert np.isfinite(np.asarray(logits)).all()
    overridden = {**FAST, mode: "SERIALIZE"}
    assert not ModelRunner.from_loaded(deepseek, geometry, compiler_options=overridden).concurrent_kernels

    monkeypatch.setattr(runner_module, "CONCURRENT_KERNELS", {mode: "NO_SUCH_MODE"})
    refused = ModelRunner.from_loaded(dense, geometry, compiler_options=FAST, concurrent_kernels=True)
    batch = refused.decode_batch(*refused._idle_columns(SLOTS))
    steps = (
        lambda: refused.decode(refused.new_cache(), tokens, positions),
        lambda: refused.prefill(refused.new_cache(), np.ones(CHUNK, np.int32), 0, 0),
        lambda: refused.decode_steps(refused.new_cache(), batch, 2, "greedy"),
    )
    for step in steps:
        with pytest.raises(Exception, match="NO_SUCH_MODE"):
            step()
    plain = ModelRunner.from_loaded(deepseek, geometry, compiler_options=FAST)  # off by default, for DeepSeek too
    assert not plain.concurrent_kernels
    _, logits = plain.decode(plain.new_cache(), tokens, positions)
    assert np.isfinite(np.asarray(logits)).all()


def test_warm_up_compiles_every_model_program(models, caplog):
    """A warm-up compiles prefill and its sampling for every number of prompts per call, and decode of every size,
    block length and sampling mode with its batch's programs; serving greedy and sampled requests, their prompts
    read four, two and one per call, then compiles nothing."""
    _, loaded, _, _ = models.get("dense")
    runner = ModelRunner.from_loaded(loaded, CacheGeometry(SLOTS, CONTEXT, CHUNK), compiler_options=FAST)
    assert runner.prefill_sizes == (1, 2, 4)

    def compiled():
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("Compiling ")]

    with caplog.at_level(logging.DEBUG), jax.log_compiles(True):
        engine = InferenceEngine(runner, Letters(), "warm", decode_steps=2, warm_up=True)
        try:
            blocks, modes = 2, 2  # block lengths 1 and 2; greedy and sampling
            assert sum("decode_block" in m for m in compiled()) == blocks * modes * len(runner.decode_sizes)
            assert sum(m.startswith("Compiling jit(prefill)") for m in compiled()) == len(runner.prefill_sizes)
            caplog.clear()
            for wave in ([(9, False), (5, False), (3, False), (6, True)], [(4, False), (2, True)], [(3, False)]):
                params = [_seeded(n) if seeded else _greedy(n) for n, seeded in wave]
                requests = [GenerationRequest(f"w{len(wave)}.{i}", _prompt(4, i), p) for i, p in enumerate(params)]
                _generate_together(engine, requests)  # their prompts read in one call
            assert compiled() == []
        finally:
            engine.close()


def test_sampling_cuts_and_seeds():
    from jaxdeep.serve.sampling import sample

    probs = np.array([0.05, 0.5, 0.3, 0.15])
    logits_bv = np.log(np.tile(probs, (256, 1))).astype(np.float32)
    seeds, index = np.arange(256, dtype=np.uint32), np.zeros(256, np.int32)

    def draw(temperature=1.0, top_k=0, top_p=1.0, seeds=seeds, index=index):
        n = len(seeds)
        args = (np.full(n, temperature, np.float32), np.full(n, top_k, np.int32), np.full(n, top_p, np.float32))
        return np.asarray(sample(logits_bv[:n], *args, seeds, index))

    assert set(draw().tolist()) == {0, 1, 2, 3}
    assert set(draw(top_k=2).tolist()) == {1, 2}
    assert set(draw(top_p=0.7).tolist()) == {1, 2}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(draw(top_p=0.5).tolist()) == {1}
    assert set(draw(temperature=0.0).tolist()) == {1}
    # A row's draw depends on its seed and token index only, not on its place in the batch.
    whole = draw()
    alone = [draw(seeds=seeds[i : i + 1], index=index[i : i + 1])[0] for i in range(0, 256, 17)]
    assert whole[::17].tolist() == alone
    assert draw(seeds=seeds[::-1])[::-1].tolist() == whole.tolist()
    assert not np.array_equal(draw(), draw(index=index + 1))


def test_sampling_rows_of_every_kind_in_one_batch():
    """Greedy rows, rows drawn from the whole vocabulary and rows cut by top-k or top-p share a batch: each row
    gets what it gets alone; the greedy rows get the same tokens in "greedy" mode, which computes only the argmax."""
    from jaxdeep.serve.sampling import sample, sample_rows

    rng = np.random.default_rng(0)
    n = 64
    logits = rng.normal(size=(n, 300)).astype(np.float32) * 3
    kind = np.arange(n) % 4  # greedy, whole vocabulary, top-k, top-p
    temperature = np.where(kind == 0, 0.0, 0.8).astype(np.float32)
    top_k = np.where(kind == 2, 5, 0).astype(np.int32)
    top_p = np.where(kind == 3, 0.6, 1.0).astype(np.float32)
    seeds, index = np.arange(n, dtype=np.uint32), rng.integers(0, 100, n).astype(np.int32)
    batch = np.asarray(sample(logits, temperature, top_k, top_p, seeds, index))
    for i in range(n):
        alone = sample(logits[i : i + 1], temperature[i : i + 1], top_k[i : i + 1], top_p[i : i + 1], seeds[i : i + 1],
                       index[i : i + 1])  # fmt: skip
        assert int(alone[0]) == batch[i], i
    assert (batch[kind == 0] == logits[kind == 0].argmax(-1)).all()
    greedy = kind == 0
    only_greedy = sample_rows(logits[greedy], *(a[greedy] for a in (temperature, top_k, top_p, seeds, index)), "greedy")
    np.testing.assert_array_equal(np.asarray(only_greedy), batch[greedy])
    with pytest.raises(ValueError, match="sampling mode must be one of"):
        sample_rows(logits, temperature, top_k, top_p, seeds, index, "beam")
    ranks = (logits > logits[np.arange(n), batch][:, None]).sum(-1)  # how many tokens rank above the drawn one
    assert ranks[kind == 2].max() < 5 and ranks[kind == 1].max() >= 5


def test_cache_bytes_per_token():
    from jaxdeep.serve.cache import bytes_per_token

    dense = load_config(None, TINY).model  # 2 layers × K and V × 4 heads × 8, fp32
    assert bytes_per_token(dense) == 2 * 2 * 4 * 8 * 4
    deepseek = load_config(EXPERIMENTS / "deepseek_tiny.yaml", DEEPSEEK).model  # 3 layers × (16 + 4), fp32
    assert bytes_per_token(deepseek) == 3 * (16 + 4) * 4


# ----------------------------------------------------------------------------- stopping and limits


def test_stop_string_is_cut_and_never_sent(dense):
    engine = _sibling(dense, Letters())
    try:
        prompt = _prompt(4, 7)
        full = engine.generate(GenerationRequest("a", prompt, _seeded(16)), timeout=60)
        assert full.finish_reason == "length" and len(full.text) == 16
        stop = full.text[5:8]
        cut = full.text.find(stop)
        assert cut > 0
        events = []
        engine.submit(
            GenerationRequest("c", prompt, SamplingParams(16, 1.0, seed=11, stop=("zzzzzz", stop))), events.append
        )
        while not (events and events[-1].finished):
            time.sleep(0.01)
        assert "".join(e.text for e in events) == full.text[:cut]
        assert events[-1].finish_reason == "stop"
        sent = ""
        for e in events:  # nothing is sent that the stop string later takes back
            sent += e.text
            assert full.text[:cut].startswith(sent)
    finally:
        engine.close()


def test_text_stream_holds_back_possible_stop_starts():
    stream = TextStream(lambda ids: "".join(chr(i) for i in ids), ["END", "xy"])
    outs = [stream.add(ord(c)) for c in "abEN"]
    assert [o[0] for o in outs] == ["a", "b", "", ""]
    assert stream.add(ord("Z")) == ("ENZ", False)  # "ENZ" cannot start a stop string any more
    assert stream.add(ord("x")) == ("", False)
    assert stream.add(ord("y")) == ("", True)


def test_text_stream_sends_runs_of_invalid_bytes():
    # An untrained byte model repeating a continuation byte: each U+FFFD but the last few is final and is sent.
    from jaxdeep.serve.tokenizers import ByteTokens

    tokens = ByteTokens()
    stream = TextStream(tokens.decode, [], tokens.hold_replacements)
    assert [stream.add(0xAF)[0] for _ in range(4)] == ["", "\ufffd", "\ufffd", "\ufffd"]
    assert stream.add(ord("a"))[0] == "\ufffda"
    # A character completed after stray bytes comes out whole; nothing sent is taken back.
    sent = "".join(stream.add(b)[0] for b in b"\xff\xe2\x82\xac")
    assert sent == "\ufffd€"
    # With 3 held (byte-fallback decoders give one U+FFFD per byte of an incomplete character).
    generic = TextStream(tokens.decode, [])
    assert [generic.add(0xAF)[0] for _ in range(5)] == ["", "", "", "\ufffd", "\ufffd"]
    assert generic.flush() == "\ufffd" * 3


def test_text_stream_equals_decoding_everything():
    # Random byte streams (ASCII, multi-byte characters, stray continuation bytes) and stop strings: what the
    # incremental stream sends equals the full decode cut at the first stop string, and is never taken back.
    from jaxdeep.serve.tokenizers import ByteTokens

    decode = ByteTokens().decode
    rng = np.random.default_rng(0)
    pieces = [b"a", b"b", b" ", b"ab", "é".encode(), "€".encode(), "😀".encode(), b"\x80", b"\xe2\x82", b"\xaf" * 5]
    for trial in range(300):
        data = b"".join(pieces[i] for i in rng.integers(0, len(pieces), rng.integers(1, 40)))
        ids = list(data)
        full = decode(ids)
        stops = (
            []
            if trial % 3 == 0
            else [full[i : i + n] for i, n in zip(rng.integers(0, len(full), 2), (2, 3), strict=True)]
        )
        stops = [x for x in stops if x and "\ufffd" not in x]  # replacement characters are not text to stop on
        stream, sent, stopped_at = TextStream(decode, stops, 1 + trial % 3), "", None
        for k, token in enumerate(ids):
            delta, stopped = stream.add(token)
            sent += delta
            text_so_far = decode(ids[: k + 1])
            assert text_so_far.startswith(sent) or stopped, (data, stops, sent)
            if stopped:
                stopped_at = k
                break
        if stopped_at is None:
            sent += stream.flush()
            hits = [full.find(x) for x in stops if x in full]
            assert not hits, (data, stops)
            assert sent == full, (data, sent, full)
        else:
            text = decode(ids[: stopped_at + 1])
            assert sent == text[: min(text.find(x) for x in stops if x in text)], (data, stops, sent)


def test_max_tokens_and_usage(dense):
    events = []
    done = threading.Event()
    dense.submit(
        GenerationRequest("m", _prompt(7, 8), SamplingParams(max_tokens=5, temperature=0.0)),
        lambda e: (events.append(e), e.finished and done.set()),
    )
    assert done.wait(60)
    final = events[-1]
    assert [e.finished for e in events] == [False] * 5 + [True]
    assert (final.token, final.finish_reason, final.prompt_tokens, final.completion_tokens) == (None, "length", 7, 5)


def test_eos_ends_generation(dense):
    prompt = _prompt(6, 9)
    plain = _sibling(dense, Letters())
    try:
        tokens = plain.generate(GenerationRequest("p", prompt, _seeded(12)), timeout=60).tokens
    finally:
        plain.close()
    k = next(i for i, t in enumerate(tokens) if t not in tokens[:i] and i > 0)
    engine = _sibling(dense, Letters(eos_id=tokens[k]))
    try:
        out = engine.generate(GenerationRequest("e", prompt, _seeded(12)), timeout=60)
    finally:
        engine.close()
    assert out.finish_reason == "stop" and out.tokens == tokens[:k]


# ----------------------------------------------------------------------------- cancel, queue, bad input


def test_cancel_frees_the_slot(dense):
    events = []
    started, done = threading.Event(), threading.Event()

    def on_event(event):
        events.append(event)
        started.set()
        if event.finished:
            done.set()

    dense.submit(GenerationRequest("long", _prompt(5, 1), SamplingParams(max_tokens=30, temperature=0.0)), on_event)
    assert started.wait(60)
    stats = dense.stats()
    assert stats.running == 1 and stats.max_context == CONTEXT
    assert stats.cache_usage == 1 / dense.geometry.num_slots  # one whole slot allocated
    dense.cancel("long")
    dense.cancel("unknown-id")  # ignored
    assert done.wait(60)
    assert events[-1].finish_reason == "abort" and len(events) < 31
    stats = dense.stats()
    assert (stats.running, stats.waiting, stats.cache_usage) == (0, 0, 0.0)


def test_queue_full_and_cancel_while_waiting(dense):
    engine = _sibling(dense, max_waiting=2)
    events: dict[str, list] = {}
    finished = threading.Event()

    def on_event(event):
        events.setdefault(event.request_id, []).append(event)
        if event.request_id == "q3" and event.finished:
            finished.set()

    try:
        with engine._cond:  # hold the loop so nothing is admitted while we fill the queue
            for i in range(2):
                engine.submit(GenerationRequest(f"q{i}", [1, 2], _greedy(2)), on_event)
            with pytest.raises(QueueFull):
                engine.submit(GenerationRequest("q2", [1, 2], _greedy(2)), on_event)
            assert engine.stats().waiting == 2
            engine.cancel("q1")  # still waiting: dropped with a final event and no tokens
        engine.submit(GenerationRequest("q3", [1, 2], _greedy(2)), on_event)
        assert finished.wait(60)
        assert [(e.token, e.finish_reason) for e in events["q1"]] == [(None, "abort")]
        assert events["q0"][-1].finish_reason in ("length", "stop") and "q2" not in events
    finally:
        engine.close()


def test_bad_requests_name_the_field(dense):
    def field(params=None, prompt=(1, 2, 3)):
        with pytest.raises(RequestError) as err:
            dense.submit(GenerationRequest("bad", list(prompt), params or SamplingParams()), lambda e: None)
        return err.value.field

    assert field(SamplingParams(max_tokens=CONTEXT)) == "prompt"  # 3 + 40 > 40
    assert field(prompt=[1] * CONTEXT) == "prompt"
    assert field(prompt=[]) == "prompt"
    assert field(prompt=[1, 256]) == "prompt"
    assert field(SamplingParams(temperature=-1.0)) == "temperature"
    assert field(SamplingParams(top_p=0.0)) == "top_p"
    assert field(SamplingParams(top_k=-2)) == "top_k"
    assert field(SamplingParams(top_k=2**40)) == "top_k"  # would overflow the batch's int32 row
    assert field(SamplingParams(max_tokens=0)) == "max_tokens"
    # top_k beyond the vocabulary keeps every token (and must not disturb the shared decode step).
    wide = dense.generate(GenerationRequest("wide", [1, 2, 3], SamplingParams(max_tokens=3, top_k=10**6, seed=1)), 60)
    same = dense.generate(GenerationRequest("all", [1, 2, 3], SamplingParams(max_tokens=3, top_k=0, seed=1)), 60)
    assert wide.finish_reason == "length" and wide.tokens == same.tokens
    assert field(SamplingParams(seed="x")) == "seed"
    assert field(SamplingParams(stop=("",))) == "stop"
    assert dense.stats().waiting == 0


def test_ignore_eos_keeps_generating_past_eos(dense):
    # Near-uniform sampling reaches eos (id 0) within 30 tokens about one time in nine: find a seed that does.
    for seed in range(200):
        params = SamplingParams(max_tokens=30, temperature=5.0, seed=seed)
        ended = dense.generate(GenerationRequest(f"eos{seed}", [1, 2, 3], params), 60)
        if ended.finish_reason == "stop":
            break
    else:
        pytest.fail("no sampled sequence reached eos")
    assert len(ended.tokens) < 30
    params = SamplingParams(max_tokens=30, temperature=5.0, seed=seed, ignore_eos=True)
    past = dense.generate(GenerationRequest(f"past{seed}", [1, 2, 3], params), 60)
    assert past.finish_reason == "length" and len(past.tokens) == 30
    assert past.tokens[: len(ended.tokens) + 1] == [*ended.tokens, dense.tokenizer.eos_id]  # same draws, eos kept


def test_failed_step_aborts_and_engine_recovers(dense):
    engine = _sibling(dense)
    try:
        original = engine.runner

        class Broken:
            def __getattr__(self, name):
                return getattr(original, name)

            def prefill_chunks(self, *args):
                raise RuntimeError("injected failure")

        engine.runner = Broken()
        out = engine.generate(GenerationRequest("x", [1, 2, 3], _greedy(3)), timeout=60)
        assert out.finish_reason == "abort"
        engine.runner = original
        assert engine.generate(GenerationRequest("y", [1, 2, 3], _greedy(3)), timeout=60).finish_reason != "abort"
    finally:
        engine.close()


# ----------------------------------------------------------------------------- sharded layouts


@pytest.mark.parametrize("kind,mesh", [("dense", dict(tensor=2, data=2)), ("deepseek", dict(tensor=2, expert=2))])
def test_sharded_layout_gives_the_same_tokens(models, kind, mesh):
    if len(jax.devices()) < 4:  # the CPU test process has eight; a one-GPU host has one
        pytest.skip(f"needs 4 devices for the mesh, {len(jax.devices())} here")
    one, split = models.get(kind)[2], _engine(_loaded(kind, **mesh))
    try:
        assert split.runner.mesh.size == 4
        for i, (n, m) in enumerate([(4, 8), (13, 6)]):
            request = GenerationRequest(f"s{i}", _prompt(n, 50 + i), SamplingParams(max_tokens=m, temperature=0.0))
            assert split.generate(request, timeout=120).tokens == one.generate(request, timeout=120).tokens
        # Two prompts read in one prefill call over the mesh.
        requests = [GenerationRequest(f"t{i}", _prompt(n, 55 + i), _greedy(5)) for i, n in enumerate((6, 11))]
        tokens = _generate_together(split, requests)
        for r in requests:
            assert tokens[r.request_id] == one.generate(r, timeout=120).tokens
    finally:
        split.close()


# ----------------------------------------------------------------------------- loading


def test_run_directory_restores_the_checkpoint(tmp_path):
    from jaxdeep.config import save_config
    from jaxdeep.serve.loading import load_model
    from jaxdeep.train.checkpoint import Checkpointer
    from jaxdeep.train.loop import mesh_from_config
    from jaxdeep.train.state import build_setup, init_train_state

    cfg = load_config(None, [*TINY, "mesh.topology=auto"])
    mesh, _ = mesh_from_config(cfg, jax.devices()[:1])
    state = init_train_state(build_setup(cfg, mesh))
    state["params"] = jax.tree.map(lambda p: p + 1.0, state["params"])  # not what a fresh init gives
    save_config(cfg, tmp_path / "config.yaml")
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(3, state, {})
    ckpt.close()
    loaded = load_model(tmp_path, ["mesh.tensor=2"])
    assert loaded.mesh.shape["tensor"] == 2 and loaded.name == tmp_path.name
    assert loaded.tokenizer.encode("hé") == [104, 195, 169] and loaded.tokenizer.eos_id == 0
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(state["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_run_directory_of_a_deepseek_run_serves_without_reading_its_mtp_or_optimizer_state(tmp_path, monkeypatch):
    """Serving restores only the weights it runs: not the optimizer moments, not the MTP modules (`runner.UNUSED`).
    The rest is the checkpoint's, bit for bit, and greedy decode is the full forward's argmax."""
    from jaxdeep.config import save_config
    from jaxdeep.serve.loading import load_model
    from jaxdeep.train.checkpoint import Checkpointer
    from jaxdeep.train.loop import mesh_from_config
    from jaxdeep.train.state import build_setup, init_train_state

    cfg = load_config(EXPERIMENTS / "deepseek_tiny.yaml", [*DEEPSEEK, "model.deepseek.num_nextn_predict_layers=1"])
    mesh, _ = mesh_from_config(cfg, jax.devices()[:1])
    state = init_train_state(build_setup(cfg, mesh))
    state["params"] = jax.tree.map(lambda p: p * 1.5, state["params"])  # not what a fresh init gives
    assert "mtp" in state["params"] and jax.tree.leaves(state["opt_state"])
    save_config(cfg, tmp_path / "config.yaml")
    ckpt = Checkpointer(tmp_path / "checkpoints", async_save=False)
    ckpt.save(4, state, {})
    ckpt.close()
    restores = []
    restore = Checkpointer.restore
    monkeypatch.setattr(Checkpointer, "restore", lambda self, *a, **kw: restores.append(kw) or restore(self, *a, **kw))
    loaded = load_model(tmp_path)
    assert len(restores) == 1 and {("opt_state",), ("params", "mtp")} <= set(restores[0]["skip"])
    assert "mtp" not in loaded.params and "mtp" not in loaded.model_state and "mtp" in state["model_state"]
    want = {k: v for k, v in state["params"].items() if k != "mtp"}
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    engine = _engine(loaded)
    try:
        _assert_greedy_is_the_forward_argmax(loaded, engine, _prompt(5, 31), 6)
    finally:
        engine.close()


def test_hugging_face_directory_serves_the_same_tokens(models, tmp_path):
    import json

    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models

    from jaxdeep import hf
    from jaxdeep.hf.model import HFModel
    from jaxdeep.serve.loading import load_engine, load_model

    _, loaded, engine, _ = models.get("deepseek")
    hf.save(HFModel(loaded.cfg.model, loaded.params, loaded.model_state), tmp_path)
    words = Tokenizer(tok_models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.save(str(tmp_path / "tokenizer.json"))
    template = "{{ bos_token }} {% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    template += "{% if add_generation_prompt %}w9{% endif %}"
    config = {"eos_token": "w3", "bos_token": {"content": "w2"}, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    served = load_engine(tmp_path, [], num_slots=SLOTS, max_context=CONTEXT, prefill_chunk=CHUNK, compiler_options=FAST)
    same_eos = _sibling(engine, Letters(eos_id=3))
    try:
        assert served.tokenizer.eos_id == 3 and served.tokenizer.encode("w5 w7") == [5, 7]
        # The model's own chat template: bos, "role content" per message, then the generation prompt.
        chat = served.tokenizer.chat_tokens([{"role": "w4", "content": "w5 w6"}, {"role": "w7", "content": "w8"}])
        assert chat == [2, 4, 5, 6, 7, 8, 9]
        request = GenerationRequest("h", _prompt(10, 60), _greedy(8))
        assert served.generate(request, timeout=120).tokens == same_eos.generate(request, timeout=60).tokens
        chosen = load_model(tmp_path, ["kernels.gmm=reference"])  # kernel overrides reach an imported model
        assert chosen.merge(chosen.params, chosen.model_state).kernels.gmm == "reference"
    finally:
        served.close()
        same_eos.close()


def test_byte_tokens_decode_equals_the_byte_tokenizer_between_placeholders():
    # Random ids with eos (0), bytes of multi-byte characters and ids past the bytes: each run of bytes decodes as
    # ByteTokenizer.decode decodes it (documents apart at eos), placeholders between them.
    from jaxdeep.data.tokenizer import ByteTokenizer
    from jaxdeep.serve.tokenizers import ByteTokens

    decode, rng = ByteTokens().decode, np.random.default_rng(1)
    for _ in range(200):
        ids = [
            int(i) for i in rng.choice([0, 97, 0xC3, 0xA9, 0xE2, 0x82, 0xAC, 0xFF, 300, 102399], rng.integers(0, 20))
        ]
        want, run = "", []
        for i in [*ids, None]:
            if i is None or i >= 256:
                want += ByteTokenizer().decode(np.asarray(run, np.int64)) + ("" if i is None else f"<x{i}>")
                run = []
            else:
                run.append(i)
        assert decode(ids) == want, ids
    with pytest.raises(ValueError, match="must be >= 0"):
        decode([97, -1])


def test_byte_tokens_decode_ids_past_the_bytes_as_placeholders():
    # A DeepSeek preset trained on bytes has a vocabulary far past 256; an untrained one samples such ids.
    from jaxdeep.serve.tokenizers import ByteTokens

    tokens = ByteTokens()
    ids = [72, 105, 300, 0xC3, 0xA9, 102399, 0xE2]
    assert tokens.decode(ids) == "Hi<x300>é<x102399>\ufffd"
    stream = TextStream(tokens.decode, [], tokens.hold_replacements)
    sent = "".join(stream.add(i)[0] for i in ids) + stream.flush()
    assert sent == tokens.decode(ids)
