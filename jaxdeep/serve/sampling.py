"""Next-token sampling on device for the whole batch, each row with its own parameters.

Randomness comes from each request's seed folded with the index of the token being sampled, never from a
key shared by the batch: a request draws the same tokens whatever else is being decoded beside it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _sample_row(logits_v, temperature, top_k, top_p, seed, index):
    logits_v = logits_v.astype(jnp.float32)
    greedy = jnp.argmax(logits_v).astype(jnp.int32)
    scaled_v = logits_v / jnp.maximum(temperature, 1e-6)
    # Sort once; top-k and top-p both cut the sorted list, then the draw happens among what is kept.
    sorted_v = jnp.sort(scaled_v)[::-1]
    vocab = logits_v.shape[-1]
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth = sorted_v[k - 1]
    probs_v = jax.nn.softmax(jnp.where(jnp.arange(vocab) < k, sorted_v, -jnp.inf))
    before_v = jnp.cumsum(probs_v) - probs_v  # mass of the tokens ranked above each one
    # The smallest prefix whose mass reaches top_p: a token stays while the mass above it is below top_p.
    keep_v = (before_v < top_p) | (jnp.arange(vocab) == 0)
    pth = jnp.min(jnp.where(keep_v, sorted_v, jnp.inf))
    threshold = jnp.maximum(kth, pth)
    masked_v = jnp.where(scaled_v >= threshold, scaled_v, -jnp.inf)
    key = jax.random.fold_in(jax.random.key(seed), index)
    drawn = jax.random.categorical(key, masked_v).astype(jnp.int32)
    return jnp.where(temperature == 0.0, greedy, drawn)


def sample_rows(logits_bv, temperature_b, top_k_b, top_p_b, seed_b, index_b):
    """Token ids [b]. temperature 0 = argmax; top_k 0 = no cut; seed_b uint32, index_b = the token's index in
    its request's completion (so a resampled batch gives every request the same draws)."""
    return jax.vmap(_sample_row)(logits_bv, temperature_b, top_k_b, top_p_b, seed_b, index_b)


@jax.jit
def sample(logits_bv, temperature_b, top_k_b, top_p_b, seed_b, index_b):
    """`sample_rows`, jitted; logits [b, vocab], or one row [vocab] as prefill returns it (taken as b = 1 inside
    the program, so no separate reshape runs on the device)."""
    logits_bv = logits_bv.reshape(-1, logits_bv.shape[-1])
    return sample_rows(logits_bv, temperature_b, top_k_b, top_p_b, seed_b, index_b)
