"""Incremental detokenization with stop strings: what text a new token makes safe to send.

Text that could still turn out to be the beginning of a stop string is held back until the next tokens
resolve it; so is a trailing U+FFFD, which is usually a multi-byte character whose remaining bytes have not
been generated yet.
"""

from __future__ import annotations

from collections.abc import Sequence


class TextStream:
    def __init__(self, decode, stops: Sequence[str]):
        self._decode = decode
        self._stops = tuple(stops)
        self._ids: list[int] = []
        self._text = ""
        self._sent = 0  # characters of self._text already handed out

    def add(self, token: int) -> tuple[str, bool]:
        """(new text safe to send, whether a stop string ended the text). After a stop, send nothing more."""
        self._ids.append(token)
        self._text = self._decode(self._ids)
        cut = self._first_stop()
        if cut is not None:
            delta = self._text[self._sent : cut] if cut > self._sent else ""
            self._sent = max(self._sent, cut)
            return delta, True
        safe = len(self._text) - self._held_back()
        delta = self._text[self._sent : safe] if safe > self._sent else ""
        self._sent = max(self._sent, safe)
        return delta, False

    def flush(self) -> str:
        """Whatever is still held back (generation ended without a stop string)."""
        delta = self._text[self._sent :]
        self._sent = len(self._text)
        return delta

    def _first_stop(self) -> int | None:
        hits = [i for i in (self._text.find(s) for s in self._stops) if i >= 0]
        return min(hits) if hits else None

    def _held_back(self) -> int:
        text, held = self._text, 0
        for stop in self._stops:
            # The longest end of the text that is a proper beginning of this stop string.
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:n]):
                    held = n
                    break
        pending = len(text) - len(text.rstrip("\ufffd"))
        return max(held, pending)
