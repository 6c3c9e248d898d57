"""Deterministic, resumable batches of token windows.

Each epoch cuts the stream into non-overlapping windows of `seq_len + 1` tokens that share one boundary
token (window j covers [offset + j*seq_len, offset + (j+1)*seq_len]), so every token is a target at most once
per epoch. With `shuffle`, each epoch draws its own window offset in [0, seq_len) and a permutation of the
windows from (seed, epoch); without it, windows go in stream order from offset 0. The batch at position i is
a pure function of (tokens, seq_len, batch_size, seed, shuffle, i): resuming only needs the position.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from jaxdeep.data.fingerprint import token_fingerprint

STATE_FORMAT = "jaxdeep.data.TokenBatches/1"
_MATCHED_FIELDS = ("num_tokens", "tokens_fingerprint", "seq_len", "batch_size", "seed", "shuffle")


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class TokenBatches(Iterator[np.ndarray]):
    """Endless iterator of int32 batches of shape [batch_size, seq_len + 1].

    inputs = batch[:, :-1], targets = batch[:, 1:]. `state()` / `restore()` resume exactly; `name` only
    labels error messages (e.g. "train", "eval").
    """

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        name: str = "train",
    ) -> None:
        if not isinstance(tokens, np.ndarray):
            tokens = np.asarray(tokens)
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(
                f"{name} data: tokens must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}"
            )
        self.name = name
        self.seq_len = _check_count(f"{name} data: seq_len", seq_len, 1)
        self.batch_size = _check_count(f"{name} data: batch_size", batch_size, 1)
        self.seed = _check_count(f"{name} data: seed", seed, 0)
        self.shuffle = bool(shuffle)
        self._tokens = tokens
        n = len(tokens)
        if self.shuffle:
            # Leave room for any epoch offset in [0, seq_len), so every epoch has the same window count.
            self.num_windows = max(0, (n - self.seq_len) // self.seq_len)
            needed = (self.batch_size + 1) * self.seq_len
        else:
            self.num_windows = max(0, (n - 1) // self.seq_len)
            needed = self.batch_size * self.seq_len + 1
        if self.num_windows < self.batch_size:
            raise ValueError(
                f"{name} data has {n} tokens, too few for one batch of batch_size={self.batch_size} x "
                f"seq_len={self.seq_len} (needs at least {needed}); lower batch_size or seq_len, or use a "
                "larger data source (raise max_bytes, or eval_fraction for the eval split)"
            )
        self.batches_per_epoch = self.num_windows // self.batch_size
        self._window = np.arange(self.seq_len + 1, dtype=np.int64)
        self._plans: dict[int, tuple[int, np.ndarray | None]] = {}
        self._fingerprint: str | None = None
        self._position = 0

    @property
    def position(self) -> int:
        """Index of the batch the next `next()` returns."""
        return self._position

    @property
    def epoch(self) -> int:
        """Epoch of the batch the next `next()` returns."""
        return self._position // self.batches_per_epoch

    def _plan(self, epoch: int) -> tuple[int, np.ndarray | None]:
        """(window offset, window order) of an epoch; order None means stream order."""
        if not self.shuffle:
            return 0, None
        plan = self._plans.get(epoch)
        if plan is None:
            # Raw PCG64 output from a SeedSequence is stable across NumPy versions, unlike Generator
            # methods such as permutation(), so the order survives library upgrades.
            raw = np.random.PCG64(np.random.SeedSequence([self.seed, epoch])).random_raw(self.num_windows + 1)
            plan = (int(raw[0] % self.seq_len), np.argsort(raw[1:], kind="stable"))
            self._plans = {epoch: plan}  # one epoch cached: positions move forward
        return plan

    def batch_starts(self, position: int) -> np.ndarray:
        """Stream offsets of the windows that make up the batch at `position` (int64, [batch_size])."""
        position = _check_count("position", position, 0)
        epoch, index = divmod(position, self.batches_per_epoch)
        offset, order = self._plan(epoch)
        rows = slice(index * self.batch_size, (index + 1) * self.batch_size)
        windows = order[rows] if order is not None else np.arange(rows.start, rows.stop, dtype=np.int64)
        return offset + windows.astype(np.int64) * self.seq_len

    def batch_at(self, position: int) -> np.ndarray:
        """The batch at `position` (int32, [batch_size, seq_len + 1]), without moving the iterator."""
        index = self.batch_starts(position)[:, None] + self._window[None, :]
        return np.array(self._tokens[index], dtype=np.int32)

    def __iter__(self) -> TokenBatches:
        return self

    def __next__(self) -> np.ndarray:
        batch = self.batch_at(self._position)
        self._position += 1
        return batch

    def state(self) -> dict[str, Any]:
        """JSON-serialisable resume point: position plus what must match for the resume to be exact."""
        if self._fingerprint is None:
            self._fingerprint = token_fingerprint(self._tokens)
        return {
            "format": STATE_FORMAT,
            "position": self._position,
            "epoch": self.epoch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "num_tokens": len(self._tokens),
            "tokens_fingerprint": self._fingerprint,
        }

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continue from a `state()` taken on the same stream and settings; anything else is an error."""
        where = f"cannot restore {self.name} data iterator"
        if not isinstance(state, Mapping):
            kind = type(state).__name__
            raise TypeError(f"{where}: state must be a dict from TokenBatches.state(), got {kind}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{where}: state format is {state.get('format')!r}, expected {STATE_FORMAT!r}")
        missing = [key for key in (*_MATCHED_FIELDS, "position") if key not in state]
        if missing:
            raise ValueError(f"{where}: state lacks {', '.join(missing)}")
        current = self.state()
        differences = [
            f"{key} saved {state[key]!r}, now {current[key]!r}" for key in _MATCHED_FIELDS if state[key] != current[key]
        ]
        if differences:
            raise ValueError(
                f"{where}: it was saved for a different token stream or batch shape "
                f"({'; '.join(differences)}). Resume with the same data source, max_bytes, eval_fraction, "
                "seq_len, batch_size, seed and shuffle"
            )
        self._position = _check_count(f"{where}: position", state["position"], 0)
