"""A DeepSeek (MLA) decode layer's attention over the latent cache in one launch: one new token per sequence
stores its latent and rotated key part in its slot and attends to the slot's entries up to its position.

Absorbed MLA: every head reads the same cached rows, [latent (c) | rotated key part (r)] per position, and
scores them with its query moved into latent space (q_latent [n, c], q_rope [n, r]); the output is the
softmax-weighted sum of the latents, [n, c], which the caller maps back through the value up-projection.
Caches are [layers, slots, positions, c] and [layers, slots, positions, r]; entries past a row's position are
stale and never read.

As `attention.py` for the dense model, each slot's positions split into chunks (flash-decoding): one program
per (sequence, chunk) scores a block of positions for all heads at once with two small tensor-core products,
runs an online softmax, and writes its unnormalised output with its running max and sum; a small XLA reduction
merges the chunks. The program whose chunk holds the row's position stores the new entry and counts it from
registers. One program serves all heads, so each cached row is read once per step, not once per head.
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
MAX_CHUNKS = 128  # programs per sequence at most
# Programs per launch to aim for. On an H200 a lone row ran fastest with the most chunks (4,096 positions: 128
# chunks of 32 took the kernel and its merge 6.9 µs a layer, 32 of 128 12.0), 16 rows with about 8 chunks each
# (2,048 positions: 25.0 µs in chunks of 256, 28.2 in 128), as every chunk adds partials to merge
# (experiments/benchmarks/RESULTS.md).
PROGRAMS = 128
MIN_HEADS = 16  # the tensor-core products need 16 rows: fewer heads are padded with zero queries
MAX_HEADS = 16  # one program holds every head's [latent] float32 accumulator: sized and measured for 16


def reference(q_bnc, qr_bnr, latent_cache, rope_cache, layer, positions_b, scale: float) -> jax.Array:
    """Softmax attention of the first b slots' visible positions, in float32: [b, n, c]."""
    b = q_bnc.shape[0]
    lat, rope = latent_cache[layer, :b].astype(jnp.float32), rope_cache[layer, :b].astype(jnp.float32)
    scores = jnp.einsum("bnc,bsc->bns", q_bnc.astype(jnp.float32), lat)
    scores = (scores + jnp.einsum("bnr,bsr->bns", qr_bnr.astype(jnp.float32), rope)) * scale
    visible = jnp.arange(lat.shape[1])[None, None, :] <= positions_b[:, None, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1)
    return jnp.einsum("bns,bsc->bnc", probs, lat).astype(q_bnc.dtype)


def write_attend_reference(q_bnc, qr_bnr, latent_bc, rope_br, latent_cache, rope_cache, layer, positions_b, scale):
    """Store each row's new latent and rotated key part at its position and attend: returns (out [b, n, c],
    latent_cache, rope_cache). A position past the cache marks an idle slot (as in `jaxdeep.serve.cache.write`):
    it stores its entry at the last position and its output is that entry's latent, attending to nothing else."""
    rows = jnp.arange(q_bnc.shape[0])
    at = jnp.minimum(positions_b, latent_cache.shape[2] - 1)
    latent_cache = latent_cache.at[layer, rows, at].set(latent_bc.astype(latent_cache.dtype))
    rope_cache = rope_cache.at[layer, rows, at].set(rope_br.astype(rope_cache.dtype))
    out = reference(q_bnc, qr_bnr, latent_cache, rope_cache, layer, at, scale)
    idle = (positions_b >= latent_cache.shape[2])[:, None, None]
    own = jnp.broadcast_to(latent_cache[layer, rows, at][:, None, :], out.shape).astype(out.dtype)
    return jnp.where(idle, own, out), latent_cache, rope_cache


def _pow2(x: int) -> bool:
    return x > 0 and not x & (x - 1)


def check(q_bnc, qr_bnr, latent_cache, rope_cache) -> str | None:
    """Why the kernel cannot take these shapes, or None."""
    (b, n, c), r = q_bnc.shape, qr_bnr.shape[-1]
    if latent_cache.ndim != 4 or rope_cache.shape[:3] != latent_cache.shape[:3]:
        return f"caches {latent_cache.shape} / {rope_cache.shape} are not [layers, slots, positions, width]"
    if qr_bnr.shape[:2] != (b, n) or latent_cache.shape[3] != c or rope_cache.shape[3] != r:
        return f"queries {q_bnc.shape} / {qr_bnr.shape} do not match caches {latent_cache.shape} / {rope_cache.shape}"
    for name, width in (("latent", c), ("rope", r)):
        if not _pow2(width) or width < 16:
            return f"{name} width {width} is not a power of two >= 16"
    if n > MAX_HEADS:
        return f"{n} heads on a device: one program holds every head's accumulator, sized for {MAX_HEADS} at most"
    if b > latent_cache.shape[1]:
        return f"{b} rows of queries for a cache of {latent_cache.shape[1]} slots"
    return None


def _kernel(
    layer_ref, pos_ref, q_ref, qr_ref, cn_ref, rn_ref, c_ref, r_ref,  # inputs
    o_ref, stats_ref, c_out, r_out,  # outputs; c_out and r_out share c_ref's and r_ref's buffers
    *, scale, chunk, block,
):  # fmt: skip
    b, s = pl.program_id(0), pl.program_id(1)
    layer, last = layer_ref[0], jnp.minimum(pos_ref[b], c_ref.shape[2] - 1)
    idle = pos_ref[b] >= c_ref.shape[2]  # an idle slot: it stores its entry at the end and attends to that alone
    q, qr = q_ref[b], qr_ref[b]  # [n, c], [n, r] in the cache's dtype
    cn, rn = cn_ref[b, :], rn_ref[b, :]
    n, width, rope = q.shape[0], c_ref.shape[3], r_ref.shape[3]
    start = s * chunk
    owner = last // chunk == s  # this program's chunk holds the new entry: it stores it and counts it

    @pl.when(owner)
    def _():
        c_out[layer, b, last, :] = cn
        r_out[layer, b, last, :] = rn

    def scores_of(lat, rot):  # [n, block] in float32
        dims = (((1,), (1,)), ((), ()))
        s1 = lax.dot_general(q, lat, dims, preferred_element_type=jnp.float32)
        return (s1 + lax.dot_general(qr, rot, dims, preferred_element_type=jnp.float32)) * scale

    def step(i, carry):
        m, total, acc = carry
        first = start + i * block
        valid = first + jnp.arange(block) < last  # earlier entries only: the new one comes from registers
        lat = runtime.load(c_ref.at[layer, b, pl.ds(first, block), :], jnp.broadcast_to(valid[:, None], (block, width)))
        rot = runtime.load(r_ref.at[layer, b, pl.ds(first, block), :], jnp.broadcast_to(valid[:, None], (block, rope)))
        scores = jnp.where(valid[None, :], scores_of(lat, rot), -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(scores, axis=1))
        p = jnp.exp(scores - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        weighted = lax.dot_general(
            p.astype(lat.dtype), lat, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )
        return m_new, total * alpha + jnp.sum(p, axis=1), acc * alpha[:, None] + weighted

    init = (jnp.full((n,), -1e30, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n, width), jnp.float32))
    visible = jnp.where(idle, 0, jnp.clip(last - start, 0, chunk))
    m, total, acc = lax.fori_loop(0, (visible + block - 1) // block, step, init)
    # The new entry, for the owner only (elsewhere its weight is exp(-inf) = 0).
    cn32 = cn.astype(jnp.float32)
    score = jnp.sum(q.astype(jnp.float32) * cn32[None, :], axis=1) + jnp.sum(
        qr.astype(jnp.float32) * rn.astype(jnp.float32)[None, :], axis=1
    )
    score = jnp.where(owner, score * scale, -jnp.inf)
    m_new = jnp.maximum(m, score)
    p, alpha = jnp.exp(score - m_new), jnp.exp(m - m_new)
    o_ref[s, b] = acc * alpha[:, None] + p[:, None] * cn32[None, :]
    stats_ref[s, b, 0] = m_new
    stats_ref[s, b, 1] = total * alpha + p


def default_chunk(positions: int, rows: int) -> int:
    """Positions per program, a power of two from MIN_CHUNK up: enough chunks per sequence to fill the GPU with the
    batch's rows (up to MAX_CHUNKS), no more. Each chunk writes a partial output of [heads, latent] float32 that
    the merge reads back, which at 64 rows would outweigh the cache itself."""
    chunks = min(MAX_CHUNKS, max(1, PROGRAMS // rows))
    chunk = MIN_CHUNK
    while chunk * chunks < positions:
        chunk *= 2
    return chunk


def write_attend(
    q_bnc,
    qr_bnr,
    latent_bc,
    rope_br,
    latent_cache,
    rope_cache,
    layer,
    positions_b,
    scale: float,
    interpret: bool = False,
    poison: bool = False,
    chunk: int | None = None,
    block: int | None = None,
    num_warps: int = 4,
    values: tuple | None = None,
):
    """`write_attend_reference` as one kernel launch; the caches are updated in place. Queries are used in the
    cache's dtype (the tensor-core products take both operands alike); scores and sums are float32. `values`:
    (kv_b stack [layers, c, n, w], the value columns' first index): the output then goes through the layer's
    value up-projection, [b, n, w - offset]; up to VALUE_ROWS rows in a second launch that also merges the chunks
    (`merge_values`, where `value_tile` finds a tile), more after XLA's merge (`values_reference`)."""
    chunk = chunk or max(default_chunk(latent_cache.shape[2], q_bnc.shape[0]), block or 0)
    block = block or min(chunk, BLOCK)
    if chunk % block or not _pow2(block) or block < 16:  # the tensor-core products take 16 positions at least
        raise ValueError(
            f"write_attend_latent: chunk {chunk} must be a multiple of block {block}, a power of two >= 16"
        )
    b, n, c = q_bnc.shape
    heads = max(MIN_HEADS, 1 << (n - 1).bit_length())  # a power of two, as Triton's blocks must be
    dtype = latent_cache.dtype
    q, qr = (jnp.pad(x.astype(dtype), ((0, 0), (0, heads - n), (0, 0))) for x in (q_bnc, qr_bnr))
    chunks = -(-latent_cache.shape[2] // chunk)
    o, stats, latent_cache, rope_cache = runtime.call(
        functools.partial(_kernel, scale=scale, chunk=chunk, block=block),
        grid=(b, chunks),
        inputs=(
            jnp.reshape(layer, (1,)).astype(jnp.int32),
            positions_b.astype(jnp.int32),
            q,
            qr,
            latent_bc.astype(dtype),
            rope_br.astype(dtype),
            latent_cache,
            rope_cache,
        ),
        out_shapes=(
            jax.ShapeDtypeStruct((chunks, b, heads, c), jnp.float32),  # each chunk's unnormalised output
            jax.ShapeDtypeStruct((chunks, b, 2, heads), jnp.float32),  # its running max and sum
        ),
        in_place=(6, 7),
        num_warps=num_warps,
        interpret=interpret,
        poison=poison,
    )
    tile = value_tile(b, values[0].shape[-1] - values[1]) if values is not None and b <= VALUE_ROWS else None
    if tile:  # the merge and the value up-projection in a second launch
        out = merge_values(
            o, stats, values[0], layer, values[1], n, q_bnc.dtype, interpret=interpret, poison=poison, tile=tile
        )
        return out, latent_cache, rope_cache
    out = runtime.merge_chunks(o, stats[:, :, 0], stats[:, :, 1], q_bnc.dtype)[:, :n]
    if values is not None:
        out = values_reference(out, values[0], layer, values[1])
    return out, latent_cache, rope_cache


def values_reference(out_bnc, w_lcnw, layer, offset: int) -> jax.Array:
    """Each head's latent output through its value up-projection, the columns from `offset` on of the layer's
    kv_b weight [c, n, w] (the key's come before them), summed in float32: [b, n, w - offset]."""
    w_cnh = lax.dynamic_index_in_dim(w_lcnw, layer, keepdims=False)[..., offset:].astype(out_bnc.dtype)
    out = jnp.einsum("bnc,cnh->bnh", out_bnc, w_cnh, preferred_element_type=jnp.float32)
    return out.astype(out_bnc.dtype)


def _values_kernel(layer_ref, o_ref, stats_ref, w_ref, out_ref, *, chunks, offset, tile, group):
    # One program per (row, head, tile of output columns): merge the head's chunks into its [c] output, then
    # multiply by the tile's columns of the value up-projection. Every tile of a head merges it again, from L2.
    from jax.experimental.pallas import triton as plt

    r, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    width = o_ref.shape[3]
    every = pl.ds(0, pl.next_power_of_2(chunks))
    mine = jnp.arange(every.size) < chunks
    m_s = jnp.where(mine, plt.load(stats_ref.at[every, r, jnp.int32(0), h], mask=mine, other=0), -1e30)
    top = jnp.max(m_s)
    total = jnp.sum(jnp.exp(m_s - top) * plt.load(stats_ref.at[every, r, jnp.int32(1), h], mask=mine, other=0))

    def add(i, acc):  # `group` chunks at a time, so a long row's partials need not sit in registers at once
        span = pl.ds(i * group, group)
        ours = i * group + jnp.arange(group) < chunks
        m = plt.load(stats_ref.at[span, r, jnp.int32(0), h], mask=ours, other=-1e30)
        o_sc = plt.load(o_ref.at[span, r, h, :], mask=jnp.broadcast_to(ours[:, None], (group, width)), other=0)
        return acc + jnp.sum(jnp.exp(m - top)[:, None] * o_sc, axis=0)

    o_c = lax.fori_loop(0, -(-chunks // group), add, jnp.zeros((width,), jnp.float32)) / total
    w_ct = w_ref[layer_ref[0], :, h, pl.ds(offset + j * tile, tile)].astype(jnp.float32)
    out_ref[r, h, pl.ds(j * tile, tile)] = jnp.sum(o_c[:, None] * w_ct, axis=0).astype(out_ref.dtype)


# Output columns per program: 32 for a lone row (16 heads of 128 values: 64 programs), 64 for more, so fewer
# programs merge each head's partials again. Rows up to VALUE_ROWS merge and project in the kernel; more keep XLA's
# merge and a batched product, since every program reads its tile of the weight again for each row. On an H200,
# against XLA's chain (the latent kernel included): 0.80x at 1 row, 0.88x at 4, 0.86x at 8, 1.08x at 16
# (experiments/benchmarks/RESULTS.md).
VALUE_TILES = (32, 64)
VALUE_ROWS = 8
MERGE_GROUP = 16  # chunks of partials read at a time


def value_tile(rows: int, width: int) -> int | None:
    """`merge_values`' output columns per program for these rows and value width: VALUE_TILES' choice, halved until
    it divides the width; None below 8 columns (the width then keeps XLA's merge)."""
    tile = VALUE_TILES[rows > 1]
    while tile >= 8 and width % tile:
        tile //= 2
    return tile if tile >= 8 else None


def merge_values(
    o_sbnc,
    stats_sb2n,
    w_lcnw,
    layer,
    offset: int,
    n: int,
    dtype,
    *,
    interpret: bool = False,
    poison: bool = False,
    tile: int | None = None,
    num_warps: int = 4,
):
    """The kernel's chunk partials (o [chunks, b, heads, c], stats [chunks, b, 2, heads]: running max and sum)
    merged and mapped through the value up-projection in one launch: `runtime.merge_chunks` then
    `values_reference` on the first n heads of kv_b's stack `w_lcnw` [layers, c, n, w] at `layer`. Returns
    [b, n, w - offset] in `dtype`. `tile`: output columns per program (default `value_tile`)."""
    chunks, b, _, c = o_sbnc.shape
    width = w_lcnw.shape[-1] - offset
    tile = tile or value_tile(b, width) or width
    if w_lcnw.ndim != 4 or w_lcnw.shape[1:3] != (c, n) or not 0 <= offset < w_lcnw.shape[-1]:
        raise ValueError(
            f"merge_values: kv_b stack {w_lcnw.shape} does not hold [layers, {c}, {n}, w] with columns past {offset}"
        )
    if width % tile or not _pow2(tile):
        raise ValueError(f"merge_values: {width} value columns do not split into power-of-two tiles of {tile}")
    group = min(MERGE_GROUP, pl.next_power_of_2(chunks))
    (out,) = runtime.call(
        functools.partial(_values_kernel, chunks=chunks, offset=offset, tile=tile, group=group),
        grid=(b, n, width // tile),
        inputs=(jnp.reshape(layer, (1,)).astype(jnp.int32), o_sbnc, stats_sb2n, w_lcnw),
        out_shapes=(jax.ShapeDtypeStruct((b, n, width), dtype),),
        num_warps=num_warps,
        interpret=interpret,
        poison=poison,
    )
    return out
