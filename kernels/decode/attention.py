"""A dense-model decode layer's attention in one launch: one new token per sequence rotates its query and key,
stores key and value in its slot of a per-head KV cache and attends to the slot's entries up to its position.

Caches are [layers, slots, positions, n, h]; new queries, keys and values [b, n, h] (slot b = row b); entries past a
row's position are stale and never read. The kernel splits each slot's positions into chunks (flash-decoding):
one program per (sequence, head, chunk) runs an online softmax over its chunk in blocks of `BLOCK` positions,
stopping before the row's position, and the program whose chunk holds that position stores the new entry and
counts it from registers. Each program writes its unnormalised output with its running max and sum, then counts
itself in with an atomic add: the last of a head's chunks to arrive merges them and resets the count, so no other
kernel runs for the merge (at large batches a small XLA reduction merges them instead: `MERGE_PROGRAMS`). With a
few chunks per head the programs fill the GPU at batch 1, where one program per head would leave most SMs idle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from kernels.decode import runtime

BLOCK = 64  # positions per step of a program's loop, at most
MIN_CHUNK = 32
MAX_CHUNK = 128  # positions per program at most: with blocks of 64, the fastest of a sweep on an H200 at batch 4-64
# Programs per launch to aim for: a lone row of dense 1B (16 heads) at 448 positions ran its kernel in 4.5 µs a layer
# on an H200 in 14 chunks of 32 (224 programs), against 6.4 in 4 of 128 (experiments/benchmarks/RESULTS.md).
PROGRAMS = 256
# Launches of at most this many programs merge the chunks in the kernel: the dense 1B batch-1 step (224 programs)
# took 3.3% less time on an H200 with it, batch 16 (1,024) was level and batch 64 (4,096) 4.6% slower, where
# each head's last chunk merges while most programs have finished (experiments/benchmarks/RESULTS.md).
MERGE_PROGRAMS = 512
MERGE_CHUNKS = 64  # and at most this many chunks per head, which the merging program holds at once


def merges_in_kernel(rows: int, heads: int, chunks: int) -> bool:
    """Whether a launch over these rows, heads and chunks per head merges its chunks itself by default."""
    return rows * heads * chunks <= MERGE_PROGRAMS and chunks <= MERGE_CHUNKS


def reference(q_bnh, k_cache, v_cache, layer, positions_b, scale: float) -> jax.Array:
    """Plain softmax attention over the visible positions of the cache's first b slots, in float32."""
    b = q_bnh.shape[0]
    keys, values = k_cache[layer, :b].astype(jnp.float32), v_cache[layer, :b].astype(jnp.float32)
    scores = jnp.einsum("bnh,bsnh->bns", q_bnh.astype(jnp.float32), keys) * scale
    visible = jnp.arange(keys.shape[1])[None, None, :] <= positions_b[:, None, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bns,bsnh->bnh", probs, values).astype(q_bnh.dtype)


def check(q_bnh, k_cache, v_cache) -> str | None:
    """Why the kernel cannot take these shapes, or None."""
    h = q_bnh.shape[-1]
    if k_cache.shape != v_cache.shape or k_cache.ndim != 5 or k_cache.shape[3:] != q_bnh.shape[1:]:
        return f"cache {k_cache.shape} / {v_cache.shape} does not match queries {q_bnh.shape}"
    if h & (h - 1):
        return f"head_dim {h} is not a power of two"
    if q_bnh.shape[0] > k_cache.shape[1]:
        return f"{q_bnh.shape[0]} rows of queries for a cache of {k_cache.shape[1]} slots"
    return None


# ----------------------------------------------------------------------------- rotary + cache write + attention


def rotate(x_bnh, cos_bh, sin_bh):
    """Rotary embedding (rotate-half form, as `jaxdeep.model.layers.rotary`) with per-row tables [b, h/2], in
    float32."""
    x1, x2 = jnp.split(x_bnh.astype(jnp.float32), 2, axis=-1)
    cos, sin = cos_bh[:, None, :], sin_bh[:, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def write_attend_reference(q_bnh, k_bnh, v_bnh, cos_bh, sin_bh, k_cache, v_cache, layer, positions_b, scale: float):
    """Rotate the new query and key, store key and value at each row's position (clamped into the cache, as
    `jaxdeep.serve.cache.write` does for idle slots) and attend: returns (out [b, n, h], k_cache, v_cache)."""
    rows = jnp.arange(q_bnh.shape[0])
    at = jnp.minimum(positions_b, k_cache.shape[2] - 1)
    k_cache = k_cache.at[layer, rows, at].set(rotate(k_bnh, cos_bh, sin_bh).astype(k_cache.dtype))
    v_cache = v_cache.at[layer, rows, at].set(v_bnh.astype(v_cache.dtype))
    out = reference(rotate(q_bnh, cos_bh, sin_bh), k_cache, v_cache, layer, at, scale).astype(q_bnh.dtype)
    return out, k_cache, v_cache


def _write_attend_kernel(*refs, scale, chunk, block, head_dim, chunks, merge, interpret):
    # Inputs, then outputs; the caches (and the counts) are outputs sharing their inputs' buffers. Without `merge`
    # there are no counts and no merged output: XLA merges the partials.
    layer_ref, pos_ref, cos_ref, sin_ref, q_ref, kn_ref, vn_ref, k_ref, v_ref = refs[:9]
    if merge:
        _, out_ref, o_ref, stats_ref, k_out, v_out, arrived_ref = refs[9:]
    else:
        o_ref, stats_ref, k_out, v_out = refs[9:]
    b, n, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    half = head_dim // 2
    lo, hi = pl.ds(0, half), pl.ds(half, half)
    layer, last = layer_ref[0], jnp.minimum(pos_ref[b], k_ref.shape[2] - 1)
    cos, sin = cos_ref[b, :], sin_ref[b, :]

    def rotated(ref):
        x1, x2 = ref[b, n, lo].astype(jnp.float32), ref[b, n, hi].astype(jnp.float32)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    q1, q2 = rotated(q_ref)
    q1, q2 = q1 * scale, q2 * scale
    start = s * chunk
    owner = last // chunk == s  # this program's chunk holds the new entry: it stores it and counts it

    @pl.when(owner)
    def _():
        k1, k2 = rotated(kn_ref)
        k_out[layer, b, last, n, lo] = k1.astype(k_out.dtype)
        k_out[layer, b, last, n, hi] = k2.astype(k_out.dtype)
        v_out[layer, b, last, n, :] = vn_ref[b, n, :].astype(v_out.dtype)

    def step(i, carry):
        m, total, acc = carry
        first = start + i * block
        valid = first + jnp.arange(block) < last  # earlier entries only: the new one comes from registers
        half_mask = jnp.broadcast_to(valid[:, None], (block, half))
        k1 = runtime.load(k_ref.at[layer, b, pl.ds(first, block), n, lo], half_mask).astype(jnp.float32)
        k2 = runtime.load(k_ref.at[layer, b, pl.ds(first, block), n, hi], half_mask).astype(jnp.float32)
        v = runtime.load(
            v_ref.at[layer, b, pl.ds(first, block), n, :], jnp.broadcast_to(valid[:, None], (block, head_dim))
        )
        scores = jnp.where(valid, jnp.sum(k1 * q1[None, :], axis=1) + jnp.sum(k2 * q2[None, :], axis=1), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores))
        p = jnp.exp(scores - m_new)
        alpha = jnp.exp(m - m_new)
        return m_new, total * alpha + jnp.sum(p), acc * alpha + jnp.sum(p[:, None] * v.astype(jnp.float32), axis=0)

    init = (jnp.float32(-1e30), jnp.float32(0.0), jnp.zeros((head_dim,), jnp.float32))
    visible = jnp.clip(last - start, 0, chunk)
    m, total, acc = lax.fori_loop(0, (visible + block - 1) // block, step, init)
    # The new entry, for the owner only (elsewhere its weight is exp(-inf) = 0).
    k1, k2 = rotated(kn_ref)
    score = jnp.where(owner, jnp.sum(k1 * q1) + jnp.sum(k2 * q2), -jnp.inf)
    m_new = jnp.maximum(m, score)
    p, alpha = jnp.exp(score - m_new), jnp.exp(m - m_new)
    acc = acc * alpha + p * vn_ref[b, n, :].astype(jnp.float32)
    o_ref[s, b, n, :] = acc
    stats_ref[s, b, n, :] = jnp.where(jnp.arange(2) == 0, m_new, total * alpha + p)

    if not merge:
        return
    # The last of the head's chunks to finish merges them all, and sets the count back to zero for the next launch.
    from jax.experimental.pallas import triton as plt

    if not interpret:  # the interpreter runs programs one at a time, and has no barrier
        plt.debug_barrier()  # every thread's partial stored before the count's release below
    arrived = plt.atomic_add(arrived_ref, (layer, b, n), jnp.int32(1))

    @pl.when(arrived == chunks - 1)
    def _():
        span = pl.ds(0, pl.next_power_of_2(chunks))
        mine = jnp.arange(span.size) < chunks
        load = functools.partial(plt.load, other=0, volatile=True)  # not from L1: other programs wrote them
        m_s = jnp.where(mine, load(stats_ref.at[span, b, n, jnp.int32(0)], mask=mine), -1e30)
        l_s = load(stats_ref.at[span, b, n, jnp.int32(1)], mask=mine)
        o_sh = load(o_ref.at[span, b, n, :], mask=jnp.broadcast_to(mine[:, None], (span.size, head_dim)))
        w_s = jnp.exp(m_s - jnp.max(m_s))
        out = jnp.sum(w_s[:, None] * o_sh, axis=0) / jnp.sum(w_s * l_s)
        out_ref[b, n, :] = out.astype(out_ref.dtype)
        arrived_ref[layer, b, n] = 0


def default_chunk(positions: int, rows: int, heads: int) -> int:
    """Positions per program, a power of two from MIN_CHUNK to MAX_CHUNK: about PROGRAMS programs per launch over the
    rows' heads, as few as MAX_CHUNK allows at larger batches."""
    chunks = max(1, PROGRAMS // (rows * heads))
    chunk = MIN_CHUNK
    while chunk * chunks < positions and chunk < MAX_CHUNK:
        chunk *= 2
    return chunk


def write_attend(
    q_bnh,
    k_bnh,
    v_bnh,
    cos_bh,
    sin_bh,
    k_cache,
    v_cache,
    layer,
    positions_b,
    scale: float,
    *,
    arrivals=None,
    interpret: bool = False,
    poison: bool = False,
    chunk: int | None = None,
    block: int | None = None,
    num_warps: int | None = None,
    merge: bool | None = None,
):
    """`write_attend_reference` as one kernel launch; the caches are updated in place. Returns (out, k_cache,
    v_cache, arrivals). The new entry's score uses the float32 rotated key; the cache (and so later steps, and the
    reference) holds it rounded to its dtype.

    `merge`: the kernel merges the chunks itself (by default where `merges_in_kernel`); otherwise XLA does after
    it. arrivals: int32 [layers, b, n], zeros: each layer's, row's and head's count of finished chunks, which the
    last one sets back to zero. Pass one launch's to the next (layers, steps) so that none needs a fresh zeroed
    array; None makes one. Without `merge` it is not read and comes back as given.
    `chunk` (positions per program) defaults to `default_chunk`, `block` to at most BLOCK of it, `num_warps` to 2
    for blocks of 32 positions or fewer (a lone row's), else 4."""
    b, n, h = q_bnh.shape
    chunk = chunk or max(default_chunk(k_cache.shape[2], b, n), block or 0)
    block = block or min(chunk, BLOCK)
    num_warps = num_warps or (2 if block <= 32 else 4)
    if chunk % block or block & (block - 1):
        raise ValueError(f"write_attend: chunk {chunk} must be a multiple of block {block}, a power of two")
    chunks = -(-k_cache.shape[2] // chunk)
    merge = merges_in_kernel(b, n, chunks) if merge is None else merge
    kernel = functools.partial(
        _write_attend_kernel,
        scale=scale, chunk=chunk, block=block, head_dim=h, chunks=chunks, merge=merge, interpret=interpret,
    )  # fmt: skip
    layer = jnp.reshape(layer, (1,)).astype(jnp.int32)
    tables = (cos_bh.astype(jnp.float32), sin_bh.astype(jnp.float32))
    partials = (
        jax.ShapeDtypeStruct((chunks, b, n, h), jnp.float32),  # each chunk's unnormalised output
        jax.ShapeDtypeStruct((chunks, b, n, 2), jnp.float32),  # its running max and sum
    )
    inputs = (layer, positions_b.astype(jnp.int32), *tables, q_bnh, k_bnh, v_bnh, k_cache, v_cache)
    launch = functools.partial(
        runtime.call, kernel, grid=(b, n, chunks), num_warps=num_warps, interpret=interpret, poison=poison
    )
    if merge:
        counts = (k_cache.shape[0], b, n)
        arrivals = jnp.zeros(counts, jnp.int32) if arrivals is None else arrivals
        if arrivals.shape != counts or arrivals.dtype != jnp.int32:
            raise ValueError(
                f"write_attend: arrivals must be int32 {list(counts)}, got {arrivals.dtype} {arrivals.shape}"
            )
        out_shape = jax.ShapeDtypeStruct((b, n, h), q_bnh.dtype)
        out, _, _, k_cache, v_cache, arrivals = launch(
            inputs=(*inputs, arrivals), out_shapes=(out_shape, *partials), in_place=(7, 8, 9)
        )
        return out, k_cache, v_cache, arrivals
    o, stats, k_cache, v_cache = launch(inputs=inputs, out_shapes=partials, in_place=(7, 8))
    return runtime.merge_chunks(o, stats[..., 0], stats[..., 1], q_bnh.dtype), k_cache, v_cache, arrivals
