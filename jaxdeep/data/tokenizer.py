"""Byte-level tokenizer: one token per UTF-8 byte, byte 0 (NUL) doubles as end-of-document."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from numpy.typing import ArrayLike

EOS_MARKER = "<|eos|>"


class ByteTokenizer:
    """Maps text to its UTF-8 bytes and back.

    NUL never occurs in text sources, so id 0 is free to separate documents in a token stream.
    """

    vocab_size: ClassVar[int] = 256
    eos_id: ClassVar[int] = 0

    def encode(self, text: str, prepend_eos: bool = False) -> np.ndarray:
        """UTF-8 bytes of `text` as int32 ids; `prepend_eos` marks a document start, like training data."""
        data = text.encode("utf-8")
        if b"\x00" in data:
            raise ValueError(
                f"text contains NUL (position {data.index(0)}); byte 0 is reserved as the eos id, remove it"
            )
        ids = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
        if prepend_eos:
            ids = np.concatenate([np.array([self.eos_id], dtype=np.int32), ids])
        return ids

    def decode(self, ids: ArrayLike, show_eos: bool = False) -> str:
        """Text of `ids`: invalid UTF-8 becomes U+FFFD; eos is dropped, or shown as EOS_MARKER."""
        array = np.asarray(ids)
        if array.ndim != 1:
            raise ValueError(f"decode takes a 1-D sequence of ids, got shape {array.shape}")
        if array.size == 0:
            return ""
        if array.dtype.kind not in "iu":
            raise ValueError(f"token ids must be integers, got dtype {array.dtype}")
        if array.min() < 0 or array.max() >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got min {array.min()}, max {array.max()}")
        data = array.astype(np.uint8).tobytes()
        # Decode document by document so a multi-byte character is never glued across an eos.
        separator = EOS_MARKER if show_eos else ""
        return separator.join(part.decode("utf-8", errors="replace") for part in data.split(b"\x00"))
