"""KV caches in fixed slots: `num_slots` sequences × `max_context` positions, one array per cached quantity.

Each layer stack of the model gets its own arrays with a leading `layers` axis, so the decode scan reads and
writes layer `l` in place. The slot axis is split like a batch (`batch`), heads like activation heads
(`act_heads`), the MLA latent like the latent weights (`kv_lora`): the same rules table that lays out the
model lays out its cache.

Dense model: K and V per head, [layers, slots, positions, heads, head_dim] each.
DeepSeek (MLA): only the normalised latent [.., kv_lora_rank] and the rotated key part [.., qk_rope_head_dim]
that all heads share; per-head keys and values are never stored.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxdeep.config import ModelConfig
from jaxdeep.sharding import LogicalAxes, Rules, named_sharding

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
KV_AXES: LogicalAxes = ("layers", "batch", None, "act_heads", None)  # dense: per-head keys or values
LATENT_AXES: LogicalAxes = ("layers", "batch", None, "kv_lora")  # MLA: the normalised latent
ROPE_AXES: LogicalAxes = ("layers", "batch", None, None)  # MLA: the rotated key part all heads share


@dataclass(frozen=True)
class CacheEntry:
    shape: tuple[int, ...]
    axes: LogicalAxes


def cache_layout(cfg: ModelConfig, num_slots: int, max_context: int) -> dict[str, dict[str, CacheEntry]]:
    """Stack name (as in the model: `blocks`, `dense_blocks`, `moe_blocks`) -> cached name -> shape and axes."""
    s, t = num_slots, max_context
    if cfg.kind == "deepseek":
        ds = cfg.deepseek
        n_dense = ds.first_k_dense_replace
        stacks = {"dense_blocks": n_dense, "moe_blocks": cfg.n_layers - n_dense}
        return {
            name: {
                "latent": CacheEntry((n, s, t, ds.kv_lora_rank), LATENT_AXES),
                "k_rope": CacheEntry((n, s, t, ds.qk_rope_head_dim), ROPE_AXES),
            }
            for name, n in stacks.items()
            if n
        }
    kv = CacheEntry((cfg.n_layers, s, t, cfg.n_heads, cfg.head_dim), KV_AXES)
    return {"blocks": {"k": kv, "v": kv}}


def bytes_per_token(cfg: ModelConfig) -> int:
    """Cache bytes one token occupies over all layers (the compute dtype is the cache dtype)."""
    if cfg.kind == "deepseek":
        width = cfg.deepseek.kv_lora_rank + cfg.deepseek.qk_rope_head_dim
    else:
        width = 2 * cfg.n_heads * cfg.head_dim
    return cfg.n_layers * width * jnp.dtype(DTYPES[cfg.dtype]).itemsize


def cache_shardings(layout, rules: Rules, mesh: Mesh):
    return {k: {n: named_sharding(e.axes, rules, mesh) for n, e in v.items()} for k, v in layout.items()}


def init_cache(cfg: ModelConfig, layout, shardings):
    """Zeros, created directly in their sharded layout."""
    dtype = DTYPES[cfg.dtype]

    def make():
        return {k: {n: jnp.zeros(e.shape, dtype) for n, e in v.items()} for k, v in layout.items()}

    return jax.jit(make, out_shardings=shardings)()


def write(
    cache_lsx: jax.Array, new_btx: jax.Array, layer, slot_b: jax.Array, positions_bt: jax.Array, drop: bool = True
) -> jax.Array:
    """Store new entries of layer `layer` at (slot_b[b], positions_bt[b, t]). Positions past the end are dropped
    (the padding of a last prefill chunk), or with `drop` False written at the last position instead: for decode,
    whose only such positions are idle slots' (nothing reads an idle row, and a request writes each position
    before it reads it), and where dropping costs two more kernels per write (read the old entry, select)."""
    rows_bt = jnp.broadcast_to(slot_b[:, None], positions_bt.shape)
    new_btx = new_btx.astype(cache_lsx.dtype)
    return cache_lsx.at[layer, rows_bt, positions_bt].set(new_btx, mode="drop" if drop else "clip")


def read(cache_lsx: jax.Array, layer, slot_b: jax.Array, leading: bool = False) -> jax.Array:
    """Rows [b, positions, ...] of layer `layer` for the slots `slot_b`; `leading`: they are slots 0 .. b-1,
    read as a slice instead of a gather."""
    layer_sx = cache_lsx[layer]
    return layer_sx[: slot_b.shape[0]] if leading else layer_sx[slot_b]
