"""Serving's decode kernels (`kernels.decode`): the Pallas kernels (run on the host in interpret mode here, compiled
on a GPU) against the pure-JAX references, their lowering to Triton, and the runner's decode through them."""

from __future__ import annotations

import contextlib
import dataclasses
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdeep.config import ConfigError, load_config
from jaxdeep.serve.loading import from_config
from jaxdeep.serve.runner import CacheGeometry, ModelRunner
from kernels.decode import attention, latent, resolve, route, routing, write_attend, write_attend_latent
from tests.fast_compile import FAST
from tests.helpers import TINY
from tests.test_serve_engine import DEEPSEEK, EXPERIMENTS

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def _attention_inputs(dtype, layers=3, slots=4, context=300, heads=2, head_dim=64, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    k = jax.random.normal(ks[0], (layers, slots, context, heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[1], (layers, slots, context, heads, head_dim), jnp.float32).astype(dtype)
    q = (2 * jax.random.normal(ks[2], (slots, heads, head_dim), jnp.float32)).astype(dtype)
    return q, k, v


def _tables(positions, head_dim, theta=10000.0):
    angles = positions[:, None].astype(jnp.float32) * theta ** (-jnp.arange(head_dim // 2) / (head_dim // 2))
    return jnp.cos(angles), jnp.sin(angles)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_write_attend_kernel_matches_reference(dtype):
    """Rotation, cache write and attention in one kernel: the same output and caches as the reference at position 0,
    a later chunk's first entry (its owner loops over nothing), mid-block, the cache's end and an idle slot past it;
    nothing else in the caches moves."""
    q, k_cache, v_cache = _attention_inputs(dtype, slots=5)
    _, k_new, v_new = _attention_inputs(dtype, layers=1, slots=5, seed=1)
    k_new, v_new = k_new[0, :, 0], v_new[0, :, 0]  # [slots, heads, head_dim]
    positions = jnp.array([0, 128, 129, 299, 305], jnp.int32)
    cos, sin = _tables(positions, 64)
    args = (q, k_new, v_new, cos, sin, k_cache, v_cache)
    want, want_k, want_v = attention.write_attend_reference(*args, 1, positions, 0.125)
    got, got_k, got_v, arrivals = attention.write_attend(
        *args, jnp.int32(1), positions, 0.125, interpret=True, poison=True
    )
    assert got.dtype == dtype and not np.isnan(np.asarray(got, np.float32)).any()
    assert arrivals.shape == (3, 5, 2) and not np.asarray(arrivals).any()  # every count back to zero
    atol = TOL[dtype] * float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=atol)
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(want_v))
    np.testing.assert_allclose(np.asarray(got_k, np.float32), np.asarray(want_k, np.float32), rtol=0, atol=1e-5)
    changed = np.argwhere(np.any(np.asarray(got_k) != np.asarray(k_cache), axis=(3, 4)))
    assert {tuple(int(i) for i in c) for c in changed} == {
        (1, 0, 0),
        (1, 1, 128),
        (1, 2, 129),
        (1, 3, 299),
        (1, 4, 299),
    }


def test_write_attend_on_the_first_slots_of_a_larger_cache():
    """Three rows of queries on a cache of five slots: rows are slots 0-2, which match the same slots decoded with
    all five rows; slots 3 and 4 stay as they were."""
    q, k_cache, v_cache = _attention_inputs(jnp.float32, slots=5)
    positions = jnp.array([7, 130, 0, 50, 60], jnp.int32)
    cos, sin = _tables(positions, 64)
    full = attention.write_attend_reference(q, q, q, cos, sin, k_cache, v_cache, 2, positions, 0.125)
    part = attention.write_attend(
        q[:3], q[:3], q[:3], cos[:3], sin[:3], k_cache, v_cache, jnp.int32(2), positions[:3], 0.125, interpret=True
    )
    np.testing.assert_allclose(np.asarray(part[0]), np.asarray(full[0][:3]), rtol=0, atol=1e-5)
    for got, all_rows, before in zip(part[1:3], full[1:], (k_cache, v_cache), strict=True):
        np.testing.assert_allclose(np.asarray(got[:, :3]), np.asarray(all_rows[:, :3]), rtol=0, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(got[:, 3:]), np.asarray(before[:, 3:]))
    with pytest.raises(ValueError, match="6 rows of queries for a cache of 5 slots"):
        six = jnp.concatenate([q, q[:1]])
        write_attend(
            six,
            six,
            six,
            *_tables(jnp.zeros(6, jnp.int32), 64),
            k_cache,
            v_cache,
            0,
            jnp.zeros(6, jnp.int32),
            1.0,
            impl="interpret",
        )


def test_write_attend_reads_nothing_past_the_position():
    q, k_cache, v_cache = _attention_inputs(jnp.float32, context=200)
    positions = jnp.array([5, 64, 130, 199], jnp.int32)
    cos, sin = _tables(positions, 64)
    args = (q, q, q, cos, sin)
    out, *_ = attention.write_attend(*args, k_cache, v_cache, jnp.int32(0), positions, 0.125, interpret=True)
    after = jnp.arange(200)[None, :, None, None] > positions[:, None, None, None]
    garbage = jnp.where(after[None], 1e4, k_cache), jnp.where(after[None], jnp.nan, v_cache)
    out2, *_ = attention.write_attend(*args, *garbage, jnp.int32(0), positions, 0.125, interpret=True)
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))


def test_default_chunks_and_where_the_kernel_merges():
    """A lone row of 16 heads gets chunks of 32-64 positions and merges them in the kernel; larger batches keep
    chunks of 128 and merge in XLA. Both merges give the reference's output."""
    assert [attention.default_chunk(448, rows, 16) for rows in (1, 2, 4, 16, 64)] == [32, 64, 128, 128, 128]
    assert attention.default_chunk(1000, 1, 16) == 64 and attention.default_chunk(4096, 1, 16) == 128
    # In the kernel up to 512 programs and 64 chunks per head: 1-8 rows of 16 heads at 448 positions, not 16 rows.
    assert [attention.merges_in_kernel(rows, 16, 4 if rows > 2 else 14) for rows in (1, 8, 16)] == [True, True, False]
    assert not attention.merges_in_kernel(1, 2, 128)  # too many chunks for one program to merge
    q, k_cache, v_cache = _attention_inputs(jnp.float32, slots=5)
    positions = jnp.array([0, 128, 129, 299, 7], jnp.int32)
    args = (q, q, q, *_tables(positions, 64), k_cache, v_cache, jnp.int32(1), positions, 0.125)
    want = attention.write_attend_reference(*args)[0]
    for merge in (True, False):
        got, _, _, arrivals = attention.write_attend(*args, interpret=True, poison=True, merge=merge)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
        assert not np.asarray(arrivals).any() if merge else arrivals is None  # made and zeroed, or not used at all


def test_write_attend_lowers_to_triton():
    """The Pallas-to-Triton lowering runs on any host: an op the backend lacks fails here, not first on a GPU."""
    q, k, v = _attention_inputs(jnp.bfloat16)
    cos, sin = _tables(jnp.zeros(4, jnp.int32), 64)
    fused = lambda *a: attention.write_attend(*a, 0.125)  # noqa: E731
    args = (q, q, q, cos, sin, k, v, jnp.int32(0), jnp.zeros(4, jnp.int32))
    assert "__gpu$xla.gpu.triton" in jax.jit(fused).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def test_dispatch_and_bad_input():
    q, k, v = _attention_inputs(jnp.float32, context=40)
    pos = jnp.array([3, 0, 39, 12], jnp.int32)
    cos, sin = _tables(pos, 64)
    args = (q, q, q, cos, sin, k, v, 2, pos, 0.3)
    *kernel, arrivals = write_attend(*args, impl="interpret")
    *reference, passed = write_attend(*args, impl="reference", arrivals=arrivals)
    for got, want in zip(kernel, reference, strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert passed is arrivals and not np.asarray(arrivals).any()
    if jax.default_backend() == "cpu":
        assert resolve("auto") == "reference"
        with pytest.raises(ValueError, match="'pallas' cannot run here: no GPU"):
            resolve("pallas")
    with pytest.raises(ValueError, match="impl must be one of"):
        resolve("triton")
    odd = (q[..., :48], q[..., :48], q[..., :48], cos[:, :24], sin[:, :24], k[..., :48], v[..., :48], 0, pos, 0.3)
    with pytest.raises(ValueError, match="head_dim 48 is not a power of two"):
        write_attend(*odd, impl="interpret")
    with pytest.raises(ValueError, match="chunk 96 must be a multiple of block 64"):
        attention.write_attend(*args, interpret=True, chunk=96)


# ----------------------------------------------------------------------------- MLA: the latent cache


def _latent_inputs(dtype, layers=2, slots=5, context=300, heads=4, width=32, rope=16, seed=0):
    """(q_latent, q_rope, new latent, new rope part, latent cache, rope cache)."""
    ks = jax.random.split(jax.random.key(seed), 6)
    shapes = [(slots, heads, width), (slots, heads, rope), (slots, width), (slots, rope)]
    shapes += [(layers, slots, context, width), (layers, slots, context, rope)]
    return tuple(jax.random.normal(k, s, jnp.float32).astype(dtype) for k, s in zip(ks, shapes, strict=True))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("chunk", [None, 64, 128])
def test_write_attend_latent_kernel_matches_reference(dtype, chunk):
    """Cache write and absorbed-MLA attention in one kernel, with its own chunking and two others: the same output
    and caches as the reference at position 0, a chunk's first entry (its owner loops over nothing), mid-block,
    the cache's end and an idle slot past it (which skips the attention); nothing else in the caches moves."""
    args = _latent_inputs(dtype)
    positions = jnp.array([0, 64, 65, 299, 310], jnp.int32)
    want, want_lat, want_rope = latent.write_attend_reference(*args, 1, positions, 0.2)
    got, got_lat, got_rope = latent.write_attend(
        *args, jnp.int32(1), positions, 0.2, interpret=True, poison=True, chunk=chunk
    )
    assert got.dtype == dtype and got.shape == want.shape and not np.isnan(np.asarray(got, np.float32)).any()
    atol = TOL[dtype] * float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=atol)
    np.testing.assert_array_equal(np.asarray(got_lat), np.asarray(want_lat))
    np.testing.assert_array_equal(np.asarray(got_rope), np.asarray(want_rope))
    changed = np.argwhere(np.any(np.asarray(got_lat) != np.asarray(args[4]), axis=3))
    assert {tuple(int(i) for i in c) for c in changed} == {(1, 0, 0), (1, 1, 64), (1, 2, 65), (1, 3, 299), (1, 4, 299)}
    # the idle slot (position past the cache) attends to its own new entry alone
    own = np.broadcast_to(np.asarray(args[2][4], np.float32), got[4].shape)
    np.testing.assert_allclose(np.asarray(got[4], np.float32), own, rtol=0, atol=atol)


def test_write_attend_latent_reads_nothing_past_the_position_nor_other_slots():
    """Garbage past each row's position, and in the slots past the rows, changes nothing; rows are the first
    slots of a larger cache."""
    q, qr, new_lat, new_rope, lat, rope = _latent_inputs(jnp.float32, slots=6, context=200)
    positions = jnp.array([5, 64, 130, 199], jnp.int32)
    rows = (q[:4], qr[:4], new_lat[:4], new_rope[:4])
    out, got_lat, _ = latent.write_attend(*rows, lat, rope, jnp.int32(0), positions, 0.3, interpret=True)
    want, want_lat, _ = latent.write_attend_reference(*rows, lat, rope, 0, positions, 0.3)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max()))
    np.testing.assert_array_equal(np.asarray(got_lat), np.asarray(want_lat))
    np.testing.assert_array_equal(np.asarray(got_lat[:, 4:]), np.asarray(lat[:, 4:]))
    after = jnp.arange(200)[None, :, None] > jnp.pad(positions, (0, 2), constant_values=-1)[:, None, None]
    garbage = jnp.where(after[None], jnp.nan, lat), jnp.where(after[None], 1e4, rope)
    out2, _, _ = latent.write_attend(*rows, *garbage, jnp.int32(0), positions, 0.3, interpret=True)
    np.testing.assert_array_equal(np.asarray(out2), np.asarray(out))


def _kv_b(dtype, layers=2, width=32, heads=4, nope=24, values=32, seed=7):
    """kv_b_proj's layer stack [layers, c, n, nope + values]."""
    return jax.random.normal(jax.random.key(seed), (layers, width, heads, nope + values), jnp.float32).astype(dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("context, chunk", [(300, 32), (300, 128), (1100, 32)])  # 10, 3 and 35 chunks a row
def test_merge_values_matches_merge_then_value_projection(dtype, context, chunk):
    """The latent kernel's partials merged and mapped through the layer's value columns of kv_b in a second
    launch: the reference's output times those columns, for rows at a chunk's edge, mid-chunk, the cache's end and
    idle; with 35 chunks the merge reads its partials in three groups."""
    args = _latent_inputs(dtype, context=context)
    stack = _kv_b(dtype)
    positions = jnp.array([0, 32, 65, context - 1, context + 10], jnp.int32)
    want, _, _ = write_attend_latent(*args, 1, positions, 0.2, impl="reference", values=(stack, 24))
    attended, _, _ = latent.write_attend_reference(*args, 1, positions, 0.2)
    by_hand = jnp.einsum("bnc,cnh->bnh", attended.astype(jnp.float32), stack[1, :, :, 24:].astype(jnp.float32))
    atol = TOL[dtype] * float(jnp.abs(by_hand).max())
    np.testing.assert_allclose(np.asarray(want, np.float32), np.asarray(by_hand), rtol=0, atol=atol)
    got, _, _ = latent.write_attend(
        *args, jnp.int32(1), positions, 0.2, interpret=True, poison=True, chunk=chunk, values=(stack, 24)
    )
    assert got.dtype == dtype and got.shape == (5, 4, 32) and not np.isnan(np.asarray(got, np.float32)).any()
    atol = TOL[dtype] * float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=atol)
    # the other layer's columns give another answer: the kernel reads the stack at the layer it is given
    other, _, _ = latent.write_attend(*args, jnp.int32(0), positions, 0.2, interpret=True, values=(stack, 24))
    assert float(jnp.abs(other.astype(jnp.float32) - got.astype(jnp.float32)).max()) > 10 * atol


def test_merge_values_past_value_rows_keeps_xla_merge(monkeypatch):
    """More rows than `latent.VALUE_ROWS` merge in XLA and take a batched product: one kernel launch, not two, and
    the same output."""
    args = _latent_inputs(jnp.float32, context=100)
    stack, positions = _kv_b(jnp.float32), jnp.array([0, 31, 32, 99, 120], jnp.int32)
    want, _, _ = write_attend_latent(*args, 1, positions, 0.2, impl="reference", values=(stack, 24))
    for rows, launches in ((5, 2), (4, 1)):
        monkeypatch.setattr(latent, "VALUE_ROWS", rows)
        run = lambda *a: latent.write_attend(*a, 0.2, interpret=True, values=(stack, 24))  # noqa: E731
        assert str(jax.make_jaxpr(run)(*args, jnp.int32(1), positions)).count("pallas_call") == launches
        got, _, _ = run(*args, jnp.int32(1), positions)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5 * float(jnp.abs(want).max()))


def test_merge_values_bad_input():
    args = _latent_inputs(jnp.float32, context=40)
    positions = jnp.zeros(5, jnp.int32)
    with pytest.raises(ValueError, match=r"kv_b stack \(2, 32, 3, 56\) does not hold"):
        write_attend_latent(*args, 1, positions, 1.0, impl="interpret", values=(_kv_b(jnp.float32, heads=3), 24))
    with pytest.raises(ValueError, match="does not hold"):
        write_attend_latent(*args, 1, positions, 1.0, impl="interpret", values=(_kv_b(jnp.float32), 56))
    # 12 value columns take no tile of 8 or more: XLA merges, and the output is the reference's
    narrow = (_kv_b(jnp.float32, values=12), 24)
    run = lambda *a: write_attend_latent(*a, 1, positions, 1.0, impl="interpret", values=narrow)  # noqa: E731
    assert latent.value_tile(1, 12) is None and str(jax.make_jaxpr(run)(*args)).count("pallas_call") == 1
    want, _, _ = write_attend_latent(*args, 1, positions, 1.0, impl="reference", values=narrow)
    atol = 1e-5 * float(jnp.abs(want).max())
    np.testing.assert_allclose(np.asarray(run(*args)[0]), np.asarray(want), rtol=0, atol=atol)
    cases = ((1, 128), (2, 128), (2, 96), (1, 16), (1, 24))
    assert [latent.value_tile(rows, width) for rows, width in cases] == [32, 64, 32, 16, 8]
    partials = jnp.zeros((3, 5, 4, 32)), jnp.zeros((3, 5, 2, 4))
    with pytest.raises(ValueError, match="24 value columns do not split into power-of-two tiles of 12"):
        latent.merge_values(*partials, _kv_b(jnp.float32), 0, 32, 4, jnp.float32, tile=12)


def test_write_attend_latent_lowers_to_triton():
    """Sixteen heads and the DeepSeek widths (512 + 64) lower; four heads are padded to the products' sixteen."""
    for heads in (16, 4):
        args = _latent_inputs(jnp.bfloat16, slots=2, context=256, heads=heads, width=512, rope=64)
        stack = _kv_b(jnp.bfloat16, width=512, heads=heads, nope=128, values=128)
        fused = lambda *a: latent.write_attend(*a[:-1], 0.1, values=(a[-1], 128))  # noqa: E731
        traced = jax.jit(fused).trace(*args, jnp.int32(0), jnp.zeros(2, jnp.int32), stack)
        lowered = traced.lower(lowering_platforms=("cuda",))
        assert lowered.as_text().count("__gpu$xla.gpu.triton") == 2  # attention, then merge and values


def test_write_attend_latent_dispatch_and_bad_input():
    args = _latent_inputs(jnp.float32, context=40)
    positions = jnp.array([3, 0, 39, 12, 50], jnp.int32)
    for got, want in zip(
        write_attend_latent(*args, 1, positions, 0.3, impl="interpret"),
        write_attend_latent(*args, 1, positions, 0.3, impl="reference"),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, atol=1e-5)
    q, qr, new_lat, new_rope, lat, rope = args
    with pytest.raises(ValueError, match="rope width 8 is not a power of two >= 16"):
        write_attend_latent(
            q, qr[..., :8], new_lat, new_rope[:, :8], lat, rope[..., :8], 0, positions, 1.0, "interpret"
        )
    with pytest.raises(ValueError, match="latent width 24 is not a power of two"):
        write_attend_latent(
            q[..., :24], qr, new_lat[:, :24], new_rope, lat[..., :24], rope, 0, positions, 1.0, "interpret"
        )
    with pytest.raises(ValueError, match="6 rows of queries for a cache of 5 slots"):
        six = [jnp.concatenate([x, x[:1]]) for x in (q, qr, new_lat, new_rope)]
        write_attend_latent(*six, lat, rope, 0, jnp.zeros(6, jnp.int32), 1.0, impl="interpret")
    with pytest.raises(ValueError, match="chunk 96 must be a multiple of block 64"):
        latent.write_attend(*args, 0, positions, 1.0, interpret=True, chunk=96)
    with pytest.raises(ValueError, match="block 8, a power of two >= 16"):  # the tensor-core products' least
        latent.write_attend(*args, 0, positions, 1.0, interpret=True, chunk=8)
    # a block asked for alone: the default chunk (32 here) grows to hold it
    blocked = latent.write_attend(*args, 1, positions, 0.3, interpret=True, block=64)
    for got, want in zip(blocked, latent.write_attend_reference(*args, 1, positions, 0.3), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ValueError, match="20 heads on a device"):
        wide = [jnp.concatenate([x] * 5, axis=1) for x in (q, qr)]
        write_attend_latent(*wide, new_lat, new_rope, lat, rope, 0, positions, 1.0, impl="interpret")
    # chunks per sequence: up to 128 for a lone row (each of 32 positions at least), fewer as rows fill the GPU
    assert [latent.default_chunk(1024, rows) for rows in (1, 16, 32, 64, 256)] == [32, 128, 256, 512, 1024]
    assert latent.default_chunk(4096, 1) == 32 and latent.default_chunk(448, 16) == 64
    assert latent.default_chunk(40, 1) == 32


def test_latent_kernel_reason_counts_heads_per_device_and_refuses_a_split_latent():
    from jaxdeep.serve.extend import latent_kernel_reason
    from jaxdeep.sharding import use_rules

    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    cfg = load_config(EXPERIMENTS / "deepseek_tiny.yaml", [*DEEPSEEK, "model.deepseek.qk_rope_head_dim=16"])
    wide = dataclasses.replace(cfg.model, n_heads=32)
    from jaxdeep.config import MESH_AXES

    sizes = tuple(2 if a == "tensor" else 1 for a in MESH_AXES)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]).reshape(sizes), MESH_AXES)
    rules = cfg.sharding.rules
    assert latent_kernel_reason(cfg.model) is None
    assert "32 heads on a device" in latent_kernel_reason(wide)
    with use_rules(rules, mesh):  # heads split two ways: 16 per device
        assert latent_kernel_reason(wide) is None
    with use_rules({**rules, "kv_lora": ["tensor"]}, mesh):
        assert "the latent is split over mesh axes" in latent_kernel_reason(cfg.model)
    # the runner says the same for its own mesh and setting
    split = load_config(
        EXPERIMENTS / "deepseek_tiny.yaml",
        [*DEEPSEEK, "model.deepseek.qk_rope_head_dim=16", "mesh.tensor=2", "sharding.rules.kv_lora=[tensor]"],
    )
    split.kernels.decode = "xla"
    loaded = from_config(split, compiler_options=FAST)
    assert "xla runs XLA's path" in ModelRunner.from_loaded(loaded, CacheGeometry(2, 16, 4)).attention_kernel_reason
    split.kernels.decode = "interpret"
    runner = ModelRunner.from_loaded(from_config(split, compiler_options=FAST), CacheGeometry(2, 16, 4))
    assert "the latent is split over mesh axes" in runner.attention_kernel_reason


@pytest.mark.parametrize("mesh", [{}, {"tensor": 2}, {"tensor": 2, "data": 2}])
def test_deepseek_decode_through_the_latent_kernel_matches_the_full_forward(mesh):
    """DeepSeek slots at different positions (one idle) decode through the latent kernel, per shard of the heads on
    a mesh; each active slot's logits equal the full forward's. Widths the kernel cannot take keep XLA's path."""
    if len(jax.devices()) < int(np.prod(list(mesh.values()) or [1])):
        pytest.skip(f"needs {np.prod(list(mesh.values()))} devices, {len(jax.devices())} here")
    from jaxdeep.serve.extend import latent_kernel_reason

    overrides = [*DEEPSEEK, "model.deepseek.qk_rope_head_dim=16", "kernels.decode=interpret"]
    cfg = load_config(EXPERIMENTS / "deepseek_tiny.yaml", [*overrides, *(f"mesh.{a}={n}" for a, n in mesh.items())])
    assert latent_kernel_reason(cfg.model) is None
    assert "rope width 4" in latent_kernel_reason(load_config(EXPERIMENTS / "deepseek_tiny.yaml", DEEPSEEK).model)
    loaded = from_config(cfg, compiler_options=FAST)
    runner = ModelRunner.from_loaded(loaded, CacheGeometry(4, 40, 8), compiler_options=FAST)
    assert runner.decode_kernels == "interpret" and runner.attention_kernel_reason is None
    cache, tokens, positions, _ = _decode_matches_the_full_forward(loaded, runner, seed=2)
    traced = runner._decode.trace(runner.params, runner.model_state, cache, tokens, positions)
    # per layer stack (dense, MoE; each a loop of layers): the latent kernel, then the merge with the values' product
    assert str(traced.jaxpr).count("pallas_call") == 4


def test_deepseek_decode_routes_through_the_kernel():
    """With greedy (ungrouped) selection a decode step's experts are chosen by `kernels.decode.route`, on one device:
    each active slot's logits equal the full forward's. Grouped selection keeps XLA's path (the test above)."""
    routed = [
        f"model.deepseek.{k}" for k in ("topk_method=greedy", "scoring_func=softmax", "n_group=1", "topk_group=1")
    ]
    overrides = [*DEEPSEEK, "model.deepseek.qk_rope_head_dim=16", "kernels.decode=interpret", *routed]
    loaded = from_config(load_config(EXPERIMENTS / "deepseek_tiny.yaml", overrides), compiler_options=FAST)
    runner = ModelRunner.from_loaded(loaded, CacheGeometry(4, 40, 8), compiler_options=FAST)
    cache, tokens, positions, logits = _decode_matches_the_full_forward(loaded, runner, seed=3)
    traced = runner._decode.trace(runner.params, runner.model_state, cache, tokens, positions)
    assert str(traced.jaxpr).count("pallas_call") == 5  # two attention kernels per layer stack, the MoE's router
    # One row, as a lone request decodes: the routing kernel and the shared experts in the routed stack.
    ds = loaded.cfg.model.deepseek
    experts = runner.params["moe_blocks"]["mlp"]["experts"]["gate_up_proj"][0].shape[0]
    assert experts == ds.n_routed_experts + ds.n_shared_experts
    _, first = runner.decode(cache, tokens[:1], positions[:1])
    np.testing.assert_allclose(np.asarray(first[0]), np.asarray(logits[0]), rtol=0, atol=1e-5 * np.abs(first).max())


def _routing_logits(tokens=5, experts=64, seed=0):
    return 3 * jax.random.normal(jax.random.key(seed), (tokens, experts), jnp.float32)


@pytest.mark.parametrize("scoring", ["softmax", "sigmoid"])
@pytest.mark.parametrize("biased", [False, True])
def test_route_kernel_matches_top_k(scoring, biased):
    """The kernel's choice is `lax.top_k`'s, in its order (ties to the lower expert: rows of equal logits), and its
    weights are the chosen experts' unbiased scores."""
    logits = _routing_logits().at[3].set(0.0).at[4, 10:20].set(50.0)  # a row all ties, a row with a tie at the top
    bias = 0.05 * jax.random.normal(jax.random.key(1), (64,)) if biased else None
    want = routing.route_reference(logits, bias, 6, scoring)
    got = routing.route(logits, bias, 6, scoring, interpret=True)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    if not biased:
        assert np.asarray(got[0])[3].tolist() == [0, 1, 2, 3, 4, 5] and np.asarray(got[0])[4].tolist() == [
            *range(10, 16)
        ]
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6, atol=1e-7)
    if biased:  # the bias moves the choice: the unbiased top 6 of some row differs
        plain = routing.route_reference(logits, None, 6, scoring)[0]
        assert (np.asarray(plain) != np.asarray(want[0])).any()


def test_route_kernel_gives_distinct_experts_whatever_the_scores():
    """NaN and -inf scores: k distinct valid experts, never one taken twice."""
    logits = _routing_logits(tokens=3).at[0, 5].set(jnp.nan).at[1].set(jnp.nan)
    bias = jnp.full((64,), -jnp.inf).at[:3].set(0.0)  # only three experts may be chosen on merit
    experts = np.asarray(routing.route(logits, bias, 6, "sigmoid", interpret=True)[0])
    assert ((experts >= 0) & (experts < 64)).all()
    assert all(len(set(row.tolist())) == 6 for row in experts)
    assert set(experts[2, :3].tolist()) == {0, 1, 2}


def test_route_dispatch_and_bad_input():
    logits = _routing_logits(tokens=2)
    for got, want in zip(
        route(logits, None, 6, "softmax", "interpret"), route(logits, None, 6, "softmax"), strict=True
    ):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    with pytest.raises(ValueError, match="48 experts: the kernel takes a power of two"):
        routing.route(logits[:, :48], None, 6, "softmax", interpret=True)
    with pytest.raises(ValueError, match="k = 0 for 64 experts"):
        routing.route(logits, None, 0, "softmax", interpret=True)
    with pytest.raises(ValueError, match="scoring must be one of"):
        routing.route(logits, None, 6, "softplus", interpret=True)
    lowered = jax.jit(lambda x: routing.route(x, None, 6, "sigmoid")).trace(logits).lower(lowering_platforms=("cuda",))
    assert "__gpu$xla.gpu.triton" in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16])
def test_route_kernel_on_gpu(tokens):
    logits = _routing_logits(tokens=tokens, seed=4)
    bias = 0.05 * jax.random.normal(jax.random.key(5), (64,))
    want = routing.route_reference(logits, bias, 6, "softmax")
    got = jax.jit(lambda x, b: routing.route(x, b, 6, "softmax"))(logits, bias)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    for g, w in zip(got[1:], want[1:], strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def _runner(kernels: str, **mesh):
    axes = [f"mesh.{a}={n}" for a, n in mesh.items()]
    cfg = load_config(None, [*TINY, "model.init_std=0.3", f"kernels.decode={kernels}", *axes])
    loaded = from_config(cfg, compiler_options=FAST)
    return loaded, ModelRunner.from_loaded(loaded, CacheGeometry(4, 40, 8), compiler_options=FAST)


def _decode_matches_the_full_forward(loaded, runner, seed: int):
    """Prefill three of four slots with random prompts, decode all four (slot 1 idle) and check each active slot's
    logits against the full forward at its position. Returns (the cache before decode, tokens, positions,
    logits)."""
    forward = jax.jit(lambda p, s, t: loaded.merge(p, s)(t), compiler_options=FAST)
    rng = np.random.default_rng(seed)
    prompts = {0: rng.integers(1, 256, 5).tolist(), 2: rng.integers(1, 256, 17).tolist(), 3: [7]}
    cache = runner.new_cache()
    for slot, prompt in prompts.items():
        cache, _ = runner.prefill_prompt(cache, prompt[:-1] or prompt, slot)
    tokens = np.array([prompts[0][-1], 1, prompts[2][-1], 7], np.int32)
    positions = np.array([4, 40, 16, 0], np.int32)  # slot 1 idle
    _, logits = runner.decode(jax.tree.map(jnp.copy, cache), tokens, positions)
    for slot, prompt in prompts.items():
        full = np.asarray(forward(loaded.params, loaded.model_state, np.asarray([prompt])))[0, -1]
        np.testing.assert_allclose(np.asarray(logits[slot]), full, rtol=0, atol=1e-5 * np.abs(full).max())
    return cache, tokens, positions, logits


@pytest.mark.parametrize("mesh", [{}, {"tensor": 2}, {"tensor": 2, "data": 2}])
def test_decode_through_the_kernel_matches_the_full_forward(mesh):
    """Slots at different positions (one idle) decode through the kernel, per shard on a mesh; each active slot's
    logits equal the full forward's at its position, and so do the first slot's decoded alone where the mesh
    leaves the slots whole."""
    if len(jax.devices()) < int(np.prod(list(mesh.values()) or [1])):
        pytest.skip(f"needs {np.prod(list(mesh.values()))} devices, {len(jax.devices())} here")
    loaded, runner = _runner("interpret", **mesh)
    assert runner.decode_kernels == "interpret"
    cache, tokens, positions, logits = _decode_matches_the_full_forward(loaded, runner, seed=1)
    if "data" in mesh:  # the mesh splits the slots: decode takes them all
        assert runner.decode_sizes == (4,)
        with pytest.raises(ValueError, match="rows"):
            runner.decode(cache, tokens[:1], positions[:1])
    else:  # the first slot alone
        assert runner.decode_sizes == (1, 2, 4)
        _, first = runner.decode(cache, tokens[:1], positions[:1])
        np.testing.assert_allclose(np.asarray(first[0]), np.asarray(logits[0]), rtol=0, atol=1e-5 * np.abs(first).max())


@pytest.mark.gpu
def test_decode_through_the_compiled_kernel_matches_the_full_forward():
    """As above with the kernel compiled: its chunks merged by the last to arrive, whose counts pass from layer to
    layer."""
    with _float32_products():
        loaded, runner = _runner("pallas")
        assert runner.decode_kernels == "pallas"
        _decode_matches_the_full_forward(loaded, runner, seed=1)


@contextlib.contextmanager
def _float32_products():
    """float32 matrix products on a GPU (not TF32) for every thread, the engine's included, so that the model
    matches its full forward as closely as on the host."""
    before = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", before)


@pytest.mark.parametrize("kernels", ["interpret", pytest.param("pallas", marks=pytest.mark.gpu)])
def test_engine_through_the_kernel_gives_the_greedy_tokens(kernels):
    """Requests decoded together by the engine (device batch, one-step lookahead) through the kernel: each gets the
    argmax continuation of the full forward."""
    with _float32_products():
        _engine_gives_the_greedy_tokens(*_runner(kernels))


def _engine_gives_the_greedy_tokens(loaded, runner):
    from jaxdeep.serve.api import GenerationRequest, SamplingParams
    from jaxdeep.serve.engine import InferenceEngine
    from jaxdeep.serve.tokenizers import ByteTokens

    forward = jax.jit(lambda p, s, t: loaded.merge(p, s)(t), compiler_options=FAST)
    engine = InferenceEngine(runner, ByteTokens(), "tiny")
    rng = np.random.default_rng(4)
    prompts = [rng.integers(1, 256, n).tolist() for n in (3, 11, 6)]
    lengths = (6, 4, 2)  # the last slot empties first: decode shrinks to the first two slots, then to one
    done, results = threading.Event(), {}

    def on_event(event):
        results.setdefault(event.request_id, []).append(event)
        if sum(1 for evs in results.values() if evs[-1].finished) == len(prompts):
            done.set()

    try:
        for i, prompt in enumerate(prompts):
            params = SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True)
            engine.submit(GenerationRequest(f"k{i}", prompt, params), on_event)
        assert done.wait(120)
    finally:
        engine.close()
    for i, prompt in enumerate(prompts):
        tokens = [e.token for e in results[f"k{i}"] if e.token is not None]
        assert len(tokens) == lengths[i]
        full = np.asarray(forward(loaded.params, loaded.model_state, np.asarray([prompt + tokens])))[0]
        assert full[len(prompt) - 1 : -1].argmax(-1).tolist() == tokens


def test_pallas_where_it_cannot_run_names_the_setting():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the error on a host without a GPU")
    with pytest.raises(ConfigError, match="kernels.decode"):
        _runner("pallas")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "rows, context, chunk, merge",
    [  # chunks per head: 8 of 128 (merged after), 8 of 128 (merged in), 16 of 64, 32 of 32, 14 of 32, 7 of 64
        (8, 1000, None, None),
        (8, 1000, None, True),
        (1, 1000, None, None),
        (1, 1000, 32, None),
        (1, 448, None, None),
        (2, 448, None, None),
    ],
)
def test_write_attend_kernel_on_gpu(dtype, rows, context, chunk, merge):
    """Compiled, with the counts of one launch passed to the next as the engine's layers do: each launch merges
    every head's chunks (in the kernel, or after it for 8 rows at 1,000 positions by default) and leaves the counts
    at zero. 448 positions give chunk counts that are not powers of two (the merge's masked loads)."""
    q, k, v = _attention_inputs(dtype, layers=2, slots=8, context=context, heads=16, head_dim=128, seed=3)
    positions = jnp.array([context - 2, 1, 127, 128, 311, 0, context - 1, 1500], jnp.int32)[:rows]
    cos, sin = _tables(positions, 128)
    args = (q[:rows], q[:rows] * 0.5, q[:rows] * 2, cos, sin)
    options = dict(poison=True, chunk=chunk, merge=merge)
    kernel = jax.jit(lambda *a: attention.write_attend(*a[:-1], 128**-0.5, arrivals=a[-1], **options))
    arrivals = jnp.zeros((2, rows, 16), jnp.int32)
    for layer in (1, 0):
        want, want_k, want_v = attention.write_attend_reference(*args, k, v, layer, positions, 128**-0.5)
        got, k, v, arrivals = kernel(*args, k, v, jnp.int32(layer), positions, arrivals)
        assert not np.isnan(np.asarray(got, np.float32)).any()
        assert not np.asarray(arrivals).any()
        atol = TOL[dtype] * float(jnp.abs(want.astype(jnp.float32)).max())
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=atol)
        np.testing.assert_allclose(np.asarray(k, np.float32), np.asarray(want_k, np.float32), rtol=0, atol=1e-2)
        np.testing.assert_array_equal(np.asarray(v), np.asarray(want_v))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("rows", [8, 1])  # default chunks of 64 positions, and one row's of 32
def test_write_attend_latent_kernel_on_gpu(dtype, rows):
    """The DeepSeek 2B preset's shapes (16 heads, latent 512, rope 64), compiled."""
    inputs = _latent_inputs(dtype, layers=2, slots=8, context=1000, heads=16, width=512, rope=64, seed=3)
    args = (*(a[:rows] for a in inputs[:4]), *inputs[4:])
    assert latent.default_chunk(1000, rows) == (32 if rows == 1 else 64)
    positions = jnp.array([998, 1, 63, 64, 511, 0, 999, 1500], jnp.int32)[:rows]
    want, want_lat, want_rope = latent.write_attend_reference(*args, 1, positions, 0.07)
    got, got_lat, got_rope = jax.jit(lambda *a: latent.write_attend(*a, 0.07, poison=True))(
        *args, jnp.int32(1), positions
    )
    assert not np.isnan(np.asarray(got, np.float32)).any()
    atol = TOL[dtype] * float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=atol)
    np.testing.assert_array_equal(np.asarray(got_lat), np.asarray(want_lat))
    np.testing.assert_array_equal(np.asarray(got_rope), np.asarray(want_rope))
    # with the merge and the value up-projection in the second kernel (32 chunks of 32 for one row: 2 groups)
    stack = _kv_b(dtype, width=512, heads=16, nope=128, values=128)
    want = latent.values_reference(want, stack, 1, 128)
    got, _, _ = jax.jit(lambda *a: latent.write_attend(*a, 0.07, poison=True, values=(stack, 128)))(
        *args, jnp.int32(1), positions
    )
    assert got.shape == (rows, 16, 128) and not np.isnan(np.asarray(got, np.float32)).any()
    atol = TOL[dtype] * float(jnp.abs(want.astype(jnp.float32)).max())
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=0, atol=atol)
