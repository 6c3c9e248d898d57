"""Bytes one device sends per step for the gradient reduction, per tier: compressed, and a dense equivalent.

A model, not a measurement (the slow-link benchmark measures the real thing beside it): collectives are counted
as ring algorithms — an all-reduce of P bytes over G devices sends 2(G-1)/G·P per device, a reduce-scatter or an
all-gather of the result (G-1)/G·P, an all-gather of p bytes from each device (G-1)·p — and a collective's bytes
are counted on the slowest tier its group crosses. The dense equivalent reduces the same gradient with the same
hierarchy and no compression: ring all-reduce of the fast-tier chunk across the slow tier. Note the sparse
exchange grows with the number of slow-tier replicas S (every replica receives everyone's pairs) while the dense
all-reduce does not: at value and index of 4 bytes each, compression pays on the slow tier only while
S × ratio < 1.
"""

from __future__ import annotations

from jaxdeep.optim.layout import ExchangeLayout

INDEX_BYTES = 4  # int32 indices


def exchange_bytes(
    layout: ExchangeLayout,
    ratio: float,
    itemsize: int,
    n_replicas: int,
    slow_tier: str,
    fast_tier: str | None,
) -> dict[str, float]:
    """Metrics of one step at density `ratio`: `comm_bytes_<tier>`, `comm_dense_bytes_<tier>`,
    `comm_compression_ratio` (dense / compressed bytes on the slow tier) and `comm_density`."""
    fast = layout.fast_size
    slow = n_replicas // fast
    sent = {slow_tier: 0.0}
    dense = {slow_tier: 0.0}
    if fast > 1:
        sent[fast_tier] = dense[fast_tier] = 0.0
    for bucket in layout.buckets:
        if fast > 1:
            # Reduce-scatter in, all-gather out, over the padded vector: the same with or without compression.
            around = 2 * (fast - 1) / fast * bucket.chunk * fast * itemsize
            sent[fast_tier] += around
            dense[fast_tier] += around
        sent[slow_tier] += (slow - 1) * bucket.sent(ratio) * (INDEX_BYTES + itemsize)
        dense[slow_tier] += 2 * (slow - 1) / slow * bucket.chunk * itemsize
    # Tensors under the size floor: a dense all-reduce inside the fast tier, then across the slow one.
    for tier, group in ((fast_tier, fast), (slow_tier, slow)):
        if group > 1:
            small = 2 * (group - 1) / group * layout.dense_size * itemsize
            sent[tier] += small
            dense[tier] += small
    metrics = {f"comm_bytes_{tier}": value for tier, value in sent.items()}
    metrics.update({f"comm_dense_bytes_{tier}": value for tier, value in dense.items()})
    metrics["comm_compression_ratio"] = dense[slow_tier] / sent[slow_tier] if sent[slow_tier] else 1.0
    metrics["comm_density"] = ratio
    return metrics
