"""Held-out evaluation split: the tail of the token stream, cut at a document boundary where one is near."""

from __future__ import annotations

import numpy as np

from jaxdeep.data.tokenizer import ByteTokenizer

DEFAULT_EVAL_FRACTION = 0.02


def split_train_eval(
    tokens: np.ndarray,
    eval_fraction: float = DEFAULT_EVAL_FRACTION,
    eos_id: int = ByteTokenizer.eos_id,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) views of `tokens`: eval is about the last `eval_fraction` of the stream, train the rest.

    The two never share a token. The cut moves to the nearest eos within half the eval size, so eval starts
    at a document start and no document is split between the two; a stream without eos there is cut exactly.
    Both are views (no copy), so a memory-mapped stream stays memory-mapped.
    """
    if isinstance(eval_fraction, bool) or not isinstance(eval_fraction, int | float):
        raise ValueError(f"eval_fraction must be a number in [0, 1), got {eval_fraction!r}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must lie in [0, 1), got {eval_fraction}; 0 disables the eval split")
    n = len(tokens)
    if eval_fraction == 0.0:
        return tokens, tokens[n:]
    if n < 2:
        raise ValueError(f"a token stream of {n} tokens cannot be split; use a larger source or max_bytes")
    target = min(n - 1, max(1, round(n * eval_fraction)))
    cut = n - target
    half = target // 2
    # Search only near the cut: O(eval size), even on a memory-mapped multi-gigabyte stream.
    low, high = max(0, cut - 1 - half), min(n - 2, cut - 1 + half)
    eos_positions = low + np.flatnonzero(np.asarray(tokens[low : high + 1]) == eos_id)
    if eos_positions.size:
        # Train keeps the eos that ends its last document; eval begins right after it.
        cut = int(eos_positions[np.argmin(np.abs(eos_positions + 1 - cut))]) + 1
    return tokens[:cut], tokens[cut:]
