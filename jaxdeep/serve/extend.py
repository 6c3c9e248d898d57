"""Run new tokens through the model against the KV cache: the one computation behind prefill and decode.

`extend` takes tokens [b, t] at absolute positions [b, t] for cache rows `slot_b` (prefill: one slot, a chunk of
t prompt tokens; decode: the first b slots, t = 1), writes their keys into the cache, attends to everything cached
at positions <= each query's own, and returns the updated cache and the final residual stream. The layers
use the model's own modules and parameters (norms, MLPs, MoE routing and dispatch); only attention is
rewritten, because it reads the cache.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdeep.model.deepseek.rope import apply_rope, inverse_frequencies
from jaxdeep.model.layers import rotary, rotary_tables
from jaxdeep.model.matmul import decode_kernel, project
from jaxdeep.serve import cache as kv
from jaxdeep.sharding import active_spec, constrain
from kernels.decode import latent, write_attend, write_attend_latent

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
RESIDUAL = ("batch", "act_seq", "act_embed")
HEADS = ("batch", "act_seq", "act_heads", None)
SCORES = ("batch", "act_heads", "act_seq", None)


def _causal_mask(positions_bt: jax.Array, context: int) -> jax.Array:
    """[b, 1, t, context]: key position s is visible to a query at position p when s <= p. Cache entries past a
    query's position are stale (a previous request, prefill padding) and must never be read."""
    return jnp.arange(context)[None, None, None, :] <= positions_bt[:, None, :, None]


def _softmax(scores_bnts: jax.Array, mask_b1ts: jax.Array) -> jax.Array:
    scores_bnts = jnp.where(mask_b1ts, scores_bnts.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores_bnts, axis=-1)


def _per_shard(run, args, in_axes, out_axes):
    """`run(*args)`, on each device's shard where a mesh is active: a kernel is opaque to the SPMD partitioner,
    and rows and heads are independent, so each device handles its own. Axes are logical (None: replicated)."""
    active = active_spec(("batch",))
    if active is None:
        return run(*args)
    spec = lambda axes: jax.sharding.PartitionSpec() if axes is None else active_spec(axes)[1]  # noqa: E731
    in_specs, out_specs = tuple(map(spec, in_axes)), tuple(map(spec, out_axes))
    return jax.shard_map(run, mesh=active[0], in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


ARRIVALS_AXES = ("layers", "batch", "act_heads")  # the attention kernel's per-head counts (`write_attend`)


def _write_attend(q_bnh, k_bnh, v_bnh, tables, cache: dict, layer, positions_b, scale: float, impl: str):
    """`kernels.decode.write_attend` on the layer's new query, key and value, with the kernel's counts in
    `cache["arrivals"]`. Returns (out [b, n, h], cache)."""

    def run(q, k, v, cos, sin, k_cache, v_cache, layer, positions, arrivals):
        return write_attend(q, k, v, cos, sin, k_cache, v_cache, layer, positions, scale, impl, arrivals)

    heads, rows, kv_axes = ("batch", "act_heads", None), ("batch", None), kv.KV_AXES
    in_axes = (heads, heads, heads, rows, rows, kv_axes, kv_axes, None, ("batch",), ARRIVALS_AXES)
    args = (q_bnh, k_bnh, v_bnh, *tables, cache["k"], cache["v"], layer, positions_b, cache["arrivals"])
    out, k_cache, v_cache, arrivals = _per_shard(run, args, in_axes, (heads, kv_axes, kv_axes, ARRIVALS_AXES))
    return out, {"k": k_cache, "v": v_cache, "arrivals": arrivals}


def _scan_layers(stack: nnx.Module, x_btd: jax.Array, cache: dict, layer_fn, unroll: bool) -> tuple[jax.Array, dict]:
    """Run stacked blocks in order; the cache rides in the scan carry so each layer updates it in place.
    `unroll` lays the layers out one after another (static slices of the stacked weights) instead of a loop."""
    graphdef, state = nnx.split(stack)
    n_layers = jax.tree.leaves(cache)[0].shape[0]

    def body(carry, xs):
        x_btd, cache = carry
        layer_state, layer = xs
        x_btd, cache = layer_fn(nnx.merge(graphdef, layer_state), x_btd, cache, layer)
        return (x_btd, cache), None

    (x_btd, cache), _ = jax.lax.scan(body, (x_btd, cache), (state, jnp.arange(n_layers)), unroll=unroll)
    return x_btd, cache


# ----------------------------------------------------------------------------- dense transformer


def _decode_layer_norm(norm, x_btd: jax.Array) -> jax.Array:
    """The model's `LayerNorm` (its scale, bias and eps) for decode, with the statistics of a row taken in one pass
    about a shift to the row's first element: var = E[(x - x0)^2] - E[x - x0]^2 in float32. XLA then reduces the
    row once where the two-pass form takes two kernels in a row; with the shift the cancellation stays small
    unless a row's mean lies many standard deviations from its first element."""
    x32 = x_btd.astype(jnp.float32)
    shifted = x32 - x32[..., :1]
    mean = jnp.mean(shifted, axis=-1, keepdims=True)
    var = jnp.maximum(jnp.mean(shifted * shifted, axis=-1, keepdims=True) - mean * mean, 0.0)
    z = (shifted - mean) * jax.lax.rsqrt(var + norm.eps)
    return (z * norm.scale[...].astype(jnp.float32) + norm.bias[...].astype(jnp.float32)).astype(x_btd.dtype)


def extend_dense(model, cache: dict, tokens_bt, positions_bt, slot_b, leading_slots: bool, unroll: bool = False):
    """The dense `Transformer`: per-head K and V cached. leading_slots: the rows are the cache's first b slots
    (decode), written with idle positions clamped and read without a gather; otherwise the slots `slot_b`. Decode
    (one token per row) inside `matmul.decode_kernels` rotates, caches and attends with
    `kernels.decode.write_attend`."""
    cfg, dt = model.cfg, DTYPES[model.cfg.dtype]

    decoding = tokens_bt.shape[1] == 1
    norm = _decode_layer_norm if decoding else (lambda module, x: module(x))
    kernels = decode_kernel()
    attention_kernel = decoding and leading_slots and kernels != "xla"
    scale = cfg.head_dim**-0.5
    tables = rotary_tables(positions_bt[:, 0], cfg.head_dim, cfg.rope_theta) if attention_kernel else None

    def layer_fn(block, x_btd, cache, layer):
        attn = block.attn
        h_btd = norm(block.attn_norm, x_btd)
        q_btnh, k_btnh, v_btnh = (
            constrain(project("btd,dnh->btnh", h_btd, w[...].astype(dt)), HEADS) for w in (attn.wq, attn.wk, attn.wv)
        )
        if attention_kernel:  # rotation, cache write and attention in one kernel
            o_bnh, cache = _write_attend(
                q_btnh[:, 0], k_btnh[:, 0], v_btnh[:, 0], tables, cache, layer, positions_bt[:, 0], scale, kernels
            )
            o_btnh = constrain(o_bnh[:, None], HEADS)
        else:
            q_btnh = rotary(q_btnh, positions_bt, cfg.rope_theta)
            k_btnh = rotary(k_btnh, positions_bt, cfg.rope_theta)
            cache = {
                "k": kv.write(cache["k"], k_btnh, layer, slot_b, positions_bt, drop=not leading_slots),
                "v": kv.write(cache["v"], v_btnh, layer, slot_b, positions_bt, drop=not leading_slots),
            }
            keys_bsnh = kv.read(cache["k"], layer, slot_b, leading_slots)
            values_bsnh = kv.read(cache["v"], layer, slot_b, leading_slots)
            scores = jnp.einsum("btnh,bsnh->bnts", q_btnh, keys_bsnh) * scale
            probs = _softmax(constrain(scores, SCORES), _causal_mask(positions_bt, keys_bsnh.shape[1]))
            o_btnh = constrain(jnp.einsum("bnts,bsnh->btnh", probs.astype(dt), values_bsnh), HEADS)
        x_btd = constrain(x_btd + project("btnh,nhd->btd", o_btnh, attn.wo[...].astype(dt)), RESIDUAL)
        return constrain(x_btd + block.mlp(norm(block.mlp_norm, x_btd)), RESIDUAL), cache

    x_btd = model.embed_tokens(tokens_bt)
    blocks = cache["blocks"]
    if attention_kernel:  # the kernel's counts, zero between launches: one array for the step's layers
        rows = (cfg.n_layers, tokens_bt.shape[0], cfg.n_heads)
        blocks = {**blocks, "arrivals": constrain(jnp.zeros(rows, jnp.int32), ARRIVALS_AXES)}
    x_btd, blocks = _scan_layers(model.blocks, x_btd, blocks, layer_fn, unroll)
    blocks.pop("arrivals", None)
    return x_btd, {"blocks": blocks}


def logits_dense(model, x_btd: jax.Array) -> jax.Array:
    return model.output_logits(x_btd)


# ----------------------------------------------------------------------------- DeepSeek (absorbed MLA)


def _rope_tables_bt(positions_bt: jax.Array, cfg) -> tuple[jax.Array, jax.Array]:
    """cos and sin [b, t, rope/2] at each token's own position (the model's YaRN frequencies and magnitude)."""
    ds = cfg.deepseek
    inv_freq, magnitude = inverse_frequencies(ds.qk_rope_head_dim, cfg.rope_theta, ds.rope_scaling)
    angles_bth = positions_bt.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.cos(angles_bth) * magnitude, jnp.sin(angles_bth) * magnitude


def _rope_bt(x_btnh, cos_bth, sin_bth, interleave: bool):
    # The model's rotation, once per sequence: each row of the batch sits at its own positions.
    one = lambda x_tnh, cos_th, sin_th: apply_rope(x_tnh[None], cos_th, sin_th, interleave)[0]
    return jax.vmap(one)(x_btnh, cos_bth, sin_bth)


def latent_kernel_reason(cfg) -> str | None:
    """Why DeepSeek decode cannot attend with `kernels.decode.write_attend_latent` under the active mesh rules
    (the shapes it takes, or a latent split over devices), or None."""
    ds = cfg.deepseek
    n, c, r = cfg.n_heads, ds.kv_lora_rank, ds.qk_rope_head_dim
    heads = active_spec(("act_heads",))
    if heads is not None and heads[1][0] is not None:  # each device runs the kernel on its own heads
        mesh, axes = heads[0], heads[1][0]
        n //= math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))
    shape = jax.ShapeDtypeStruct
    reason = latent.check(
        shape((1, n, c), jnp.float32),
        shape((1, n, r), jnp.float32),
        shape((1, 1, 1, c), jnp.float32),
        shape((1, 1, 1, r), jnp.float32),
    )
    active = active_spec(kv.LATENT_AXES)
    if reason is None and active is not None and active[1][3] is not None:
        reason = f"the latent is split over mesh axes {active[1][3]}: each head's scores sum over all of it"
    return reason


def _write_attend_latent(q_bnc, qr_bnr, latent_bc, rope_br, cache: dict, layer, positions_b, scale, impl, kv_b):
    """`kernels.decode.write_attend_latent` on the layer's queries in latent space and its new cache entries, then
    through the value up-projection: columns `offset` on of kv_b_proj's layer stack, `kv_b = (stack, offset)`, read
    at the layer in place (a slice handed to a kernel would be copied first). Returns (out [b, n, h], cache)."""
    stack, offset = kv_b

    def run(q, qr, new_latent, new_rope, latent_cache, rope_cache, layer, positions, stack):
        return write_attend_latent(
            q, qr, new_latent, new_rope, latent_cache, rope_cache, layer, positions, scale, impl, (stack, offset)
        )

    heads, rows, stack_axes = ("batch", "act_heads", None), ("batch", None), (None, None, "act_heads", None)
    in_axes = (heads, heads, rows, rows, kv.LATENT_AXES, kv.ROPE_AXES, None, ("batch",), stack_axes)
    args = (q_bnc, qr_bnr, latent_bc, rope_br, cache["latent"], cache["k_rope"], layer, positions_b, stack)
    out, latent_cache, rope_cache = _per_shard(run, args, in_axes, (heads, kv.LATENT_AXES, kv.ROPE_AXES))
    return out, {"latent": latent_cache, "k_rope": rope_cache}


def _values_up(o_latent_btnc: jax.Array, w_uv_cnh: jax.Array) -> jax.Array:
    """Each head's latent output through its value up-projection: einsum("btnc,cnh->btnh"). For a single row it is
    a float32 multiply and sum, which XLA runs as one reduction; its dot for one row ran as a bf16 multiply that
    wrote [c, n, h] out and a second kernel that summed it (4.6 µs a layer on an H200, RESULTS.md)."""
    if o_latent_btnc.shape[0] * o_latent_btnc.shape[1] != 1:
        return jnp.einsum("btnc,cnh->btnh", o_latent_btnc, w_uv_cnh)
    o_cn = o_latent_btnc[0, 0].T.astype(jnp.float32)
    o_nh = jnp.sum(o_cn[:, :, None] * w_uv_cnh.astype(jnp.float32), axis=0)
    return o_nh[None, None].astype(jnp.result_type(o_latent_btnc, w_uv_cnh))


def absorbed_mla(attn, h_btd, cache: dict, layer, positions_bt, slot_b, leading_slots: bool, rope, kv_b_stack):
    """MLA on the latent cache with the key up-projection folded into the query and the value up-projection
    applied after the weighted sum: scores = (q_nope·W_UK)·c + q_rope·k_rope, out = ((p·c)·W_UV)·W_O.
    kv_b_stack: the stack's kv_b_proj, all layers, which decode's kernels read at `layer`."""
    cfg = attn.cfg
    ds, dt = cfg.deepseek, DTYPES[cfg.dtype]
    nope, c = ds.qk_nope_head_dim, ds.kv_lora_rank
    if ds.q_lora_rank is None:
        q_btnh = project("btd,dnh->btnh", h_btd, attn.q_proj[...].astype(dt))
    else:
        q_btr = project("btd,dr->btr", h_btd, attn.q_a_proj[...].astype(dt))
        q_btnh = project("btr,rnh->btnh", attn.q_a_layernorm(q_btr), attn.q_b_proj[...].astype(dt))
    q_btnh = constrain(q_btnh, HEADS)
    cos_bth, sin_bth = rope
    q_nope_btnh = q_btnh[..., :nope]
    q_rope_btnh = _rope_bt(q_btnh[..., nope:], cos_bth, sin_bth, ds.rope_interleave)

    kv_a_btc = project("btd,dc->btc", h_btd, attn.kv_a_proj_with_mqa[...].astype(dt))
    latent_btc = attn.kv_a_layernorm(kv_a_btc[..., :c])
    k_rope_btr = _rope_bt(kv_a_btc[:, :, None, c:], cos_bth, sin_bth, ds.rope_interleave)[:, :, 0]
    w_ukv_cnh = attn.kv_b_proj[...].astype(dt)
    w_uk_cnh, w_uv_cnh = w_ukv_cnh[..., :nope], w_ukv_cnh[..., nope:]
    q_latent_btnc = constrain(jnp.einsum("btnh,cnh->btnc", q_nope_btnh, w_uk_cnh), HEADS)
    kernels = decode_kernel()
    if h_btd.shape[1] == 1 and leading_slots and kernels != "xla" and latent_kernel_reason(cfg) is None:
        # decode: cache write and attention over the latent cache, then the chunks' merge and the value
        # up-projection in a second kernel
        o_bnh, cache = _write_attend_latent(
            q_latent_btnc[:, 0], q_rope_btnh[:, 0], latent_btc[:, 0], k_rope_btr[:, 0], cache, layer,
            positions_bt[:, 0], attn.scale, kernels, (kv_b_stack, nope),
        )  # fmt: skip
        o_btnh = constrain(o_bnh[:, None].astype(dt), HEADS)
    else:
        drop = not leading_slots  # decode (leading slots) clamps its idle slots' positions instead: see kv.write
        cache = {
            "latent": kv.write(cache["latent"], latent_btc, layer, slot_b, positions_bt, drop),
            "k_rope": kv.write(cache["k_rope"], k_rope_btr, layer, slot_b, positions_bt, drop),
        }
        latent_bsc = kv.read(cache["latent"], layer, slot_b, leading_slots)
        k_rope_bsr = kv.read(cache["k_rope"], layer, slot_b, leading_slots)
        scores = jnp.einsum("btnc,bsc->bnts", q_latent_btnc, latent_bsc)
        scores = scores + jnp.einsum("btnr,bsr->bnts", q_rope_btnh, k_rope_bsr)
        probs = _softmax(constrain(scores * attn.scale, SCORES), _causal_mask(positions_bt, latent_bsc.shape[1]))
        o_latent_btnc = constrain(jnp.einsum("bnts,bsc->btnc", probs.astype(dt), latent_bsc), HEADS)
        o_btnh = constrain(_values_up(o_latent_btnc, w_uv_cnh), HEADS)
    return project("btnh,nhd->btd", o_btnh, attn.o_proj[...].astype(dt)), cache


def extend_deepseek(model, cache: dict, tokens_bt, positions_bt, slot_b, leading_slots: bool, unroll: bool = False):
    """The `DeepSeekModel`: dense then MoE blocks, MLA on the latent cache; MoE layers route and dispatch with
    the model's own code (bias-adjusted selection, as in training). MTP modules are not used. Decode inside
    `matmul.decode_kernels` writes the cache and attends with `kernels.decode.write_attend_latent` where
    `latent_kernel_reason` finds nothing against it."""
    rope = _rope_tables_bt(positions_bt, model.cfg)

    def layer_fn(block, x_btd, cache, layer, kv_b_stack):
        h_btd = block.input_layernorm(x_btd)
        attn_btd, cache = absorbed_mla(
            block.self_attn, h_btd, cache, layer, positions_bt, slot_b, leading_slots, rope, kv_b_stack
        )
        x_btd = constrain(x_btd + attn_btd, RESIDUAL)
        h_btd = block.post_attention_layernorm(x_btd)
        y_btd = block.mlp(h_btd)[0] if block.moe else block.mlp(h_btd)
        return constrain(x_btd + y_btd, RESIDUAL), cache

    x_btd = model._embed(tokens_bt)
    new_cache = {}
    for name in ("dense_blocks", "moe_blocks"):
        if name in cache:
            stack = getattr(model, name)
            per_layer = functools.partial(layer_fn, kv_b_stack=stack.self_attn.kv_b_proj[...])
            x_btd, new_cache[name] = _scan_layers(stack, x_btd, cache[name], per_layer, unroll)
    return x_btd, new_cache


def logits_deepseek(model, x_btd: jax.Array) -> jax.Array:
    return model._logits(model.final_norm(x_btd))


def model_functions(kind: str):
    """(extend, logits) for a model kind."""
    return (extend_deepseek, logits_deepseek) if kind == "deepseek" else (extend_dense, logits_dense)
