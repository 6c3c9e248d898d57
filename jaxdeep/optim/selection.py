"""Which entries of a flat vector a replica sends: exact top-k by magnitude, or a sampled threshold.

Both return a fixed number `k` of (index, value) pairs, because collectives need static shapes. Slots that carry
nothing hold the index `n` (one past the end) and the value 0; scatters drop them (`mode="drop"`).

Trade-off (measured in experiments/benchmarks/RESULTS.md): `lax.top_k` sorts, so its cost grows like n log n and
dominates the exchange on fast devices; the sampled threshold reads the vector twice (compare, compact) plus a
top-k over a small sample, but picks only approximately the k largest entries and, when more than k entries pass
the threshold, keeps the first k by position. Error feedback keeps whatever was not sent, so the approximation
delays entries rather than losing them.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

Method = Literal["exact", "sampled"]


def k_for_ratio(ratio: float, n: int) -> int:
    """Entries sent out of `n` at density `ratio`: at least one, at most all."""
    return max(1, min(n, math.ceil(ratio * n)))


def select_exact(x_n: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The k entries of largest magnitude (ties broken by position, as `lax.top_k` does)."""
    _, idx_k = lax.top_k(jnp.abs(x_n), k)
    return idx_k.astype(jnp.int32), x_n[idx_k]


# Samples that should land above the threshold: with m of them the count that passes is off by about 1/sqrt(m).
MIN_SAMPLES_ABOVE = 256


def _prefix_count(mask_n: jax.Array) -> jax.Array:
    """Inclusive running count of True entries."""
    counts = mask_n.astype(jnp.int32)
    if jax.default_backend() == "cpu":
        # XLA's CPU cumsum runs as a serial reduce-window; the log-depth scan is ~2x faster there.
        return lax.associative_scan(jnp.add, counts)
    return jnp.cumsum(counts)


def select_sampled(x_n: jax.Array, k: int, key: jax.Array, sample_size: int) -> tuple[jax.Array, jax.Array]:
    """Entries whose magnitude reaches a threshold estimated from a random sample.

    The sample holds at least `sample_size` entries, and enough that ~MIN_SAMPLES_ABOVE of them pass; the
    threshold is the magnitude a fraction k/n of the sample reaches, so about k entries pass. The first k of them
    by position are sent and empty slots are padded.
    """
    n = x_n.shape[0]
    size = max(sample_size, math.ceil(MIN_SAMPLES_ABOVE * n / k))
    if n <= size:
        return select_exact(x_n, k)
    magnitude_n = jnp.abs(x_n)
    positions_s = jax.random.randint(key, (size,), 0, n)
    above_in_sample = max(1, math.ceil(k * size / n))
    # min() rather than [-1]: XLA CPU turns top_k followed by a slice into a full sort (100x slower).
    threshold = lax.top_k(magnitude_n[positions_s], above_in_sample)[0].min()
    passed_n = magnitude_n >= threshold
    rank_n = _prefix_count(passed_n) - 1
    slot_n = jnp.where(passed_n & (rank_n < k), rank_n, k)  # k = no slot: dropped by the scatter
    idx_k = jnp.full((k,), n, jnp.int32).at[slot_n].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
    return idx_k, x_n.at[idx_k].get(mode="fill", fill_value=0)


def select(x_n: jax.Array, k: int, method: Method, key: jax.Array, sample_size: int) -> tuple[jax.Array, jax.Array]:
    if method == "exact":
        return select_exact(x_n, k)
    if method == "sampled":
        return select_sampled(x_n, k, key, sample_size)
    raise ValueError(f"unknown selection method {method!r}; choose 'exact' or 'sampled'")
