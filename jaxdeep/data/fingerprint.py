"""Fingerprint of a token stream, stored in iterator state so a resume onto other data is caught."""

from __future__ import annotations

import hashlib

import numpy as np

# Streams up to this many tokens are hashed whole (a few tens of ms); longer ones are sampled, so a
# multi-gigabyte memory-mapped corpus is not read end to end on every checkpoint.
FULL_HASH_LIMIT = 1 << 24
_SAMPLES = 256
_SAMPLE_LEN = 4096
_CHUNK = 1 << 22


def token_fingerprint(tokens: np.ndarray) -> str:
    """Hex digest of the stream's length and ids (all of them, or 256 evenly spaced 4096-token samples).

    Ids are hashed as little-endian int32, so the same ids stored as uint8, uint16 or int32 agree.
    """
    n = len(tokens)
    digest = hashlib.blake2b(f"tokens:{n}:".encode(), digest_size=16)
    if n <= FULL_HASH_LIMIT:
        starts, length = range(0, n, _CHUNK), _CHUNK
    else:
        starts, length = np.linspace(0, n - _SAMPLE_LEN, _SAMPLES).astype(np.int64).tolist(), _SAMPLE_LEN
    for start in starts:
        digest.update(np.ascontiguousarray(tokens[start : start + length], dtype="<i4").tobytes())
    return digest.hexdigest()
