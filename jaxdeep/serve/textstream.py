"""Incremental detokenization with stop strings: what text a new token makes safe to send.

Text that could still turn out to be the beginning of a stop string is held back until the next tokens
resolve it; so is a trailing U+FFFD, usually a multi-byte character whose remaining bytes have not been
generated yet. Only the U+FFFD that an incomplete character at the end can decode to are held: at most
`hold_replacements` of them (3: byte-fallback decoders give one per byte of the at most 3 bytes present; a lossy
UTF-8 decoder, as our byte tokenizer's, gives 1). Every character before them is final and is sent, so a run of
invalid bytes (as an untrained byte-level model emits) streams that many tokens behind instead of not at all.

Each step decodes only a short window of ids: the ids since the last text that came out whole, plus a few before
them as context (tokenizers may render a token differently at the start of a text, e.g. a leading space), and
takes the new text as what the window adds to its context. Stop strings are searched only where a new one could
begin. So a step costs the same whatever the length of the completion (except during a run of text that ends in
U+FFFD, whose ids stay in the window until a token ends it cleanly).
"""

from __future__ import annotations

from collections.abc import Sequence

CONTEXT_IDS = 4  # ids decoded before the new ones, so a token renders as it does mid-text


class TextStream:
    def __init__(self, decode, stops: Sequence[str], hold_replacements: int = 3):
        self._decode = decode
        self._hold = max(1, hold_replacements)
        self._stops = tuple(stops)
        self._longest_stop = max((len(s) for s in self._stops), default=0)
        self._ids: list[int] = []
        self._prefix = 0  # ids[prefix:read] decode to text already in self._text (the window's context)
        self._read = 0  # ids before this are in self._text
        self._text = ""  # the text of ids[:read] (whole characters only)
        self._final = ""  # the text of ids[read:] but its last character, a U+FFFD that may still change
        self._sent = 0  # characters of self._text + self._final already handed out
        self._searched = 0  # stop strings cannot start before this character

    def add(self, token: int) -> tuple[str, bool]:
        """(new text safe to send, whether a stop string ended the text). After a stop, send nothing more."""
        self._ids.append(token)
        self._extend_text()
        text = self._text + self._final
        cut = self._first_stop(text)
        if cut is not None:
            delta = text[self._sent : cut] if cut > self._sent else ""
            self._sent = max(self._sent, cut)
            return delta, True
        safe = len(text) - self._held_back(text)
        delta = text[self._sent : safe] if safe > self._sent else ""
        self._sent = max(self._sent, safe)
        return delta, False

    def flush(self) -> str:
        """Whatever is still held back (generation ended without a stop string), incomplete characters included."""
        self._text += self._window_delta()
        self._final = ""
        self._read = len(self._ids)
        delta = self._text[self._sent :]
        self._sent = len(self._text)
        return delta

    def _window_delta(self) -> str:
        context = self._decode(self._ids[self._prefix : self._read])
        window = self._decode(self._ids[self._prefix :])
        if window.startswith(context):
            new = window[len(context) :]
        else:  # the tokenizer renders the boundary differently without more context: decode everything once
            full = self._decode(self._ids)
            new = full[len(self._text) :] if full.startswith(self._text) else ""
        return new

    def _extend_text(self) -> None:
        delta = self._window_delta()
        run = len(delta) - len(delta.rstrip("\ufffd"))
        if run:
            # Only the last few U+FFFD may still change; what comes before them is final (never taken back).
            final = delta[: len(delta) - min(run, self._hold)]
            if len(final) > len(self._final) and final.startswith(self._final):
                self._final = final
        elif delta:
            self._text += delta
            self._final = ""
            self._read = len(self._ids)
            self._prefix = max(0, self._read - CONTEXT_IDS)

    def _first_stop(self, text: str) -> int | None:
        start = max(0, self._searched - self._longest_stop + 1)
        hits = [i for i in (text.find(s, start) for s in self._stops) if i >= 0]
        self._searched = len(text)
        return min(hits) if hits else None

    def _held_back(self, text: str) -> int:
        held = 0
        for stop in self._stops:
            # The longest end of the text that is a proper beginning of this stop string.
            for n in range(min(len(stop) - 1, len(text)), held, -1):
                if text.endswith(stop[:n]):
                    held = n
                    break
        return held
