"""What the serving engine and the HTTP server agree on: requests, sampling parameters, events, errors.

The engine runs its own thread (prefill and decode steps over the mesh); the server submits requests and
receives one `TokenEvent` per generated token through a callback called from the engine thread, then a
final event with `finished=True`. Nothing here imports JAX.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


class RequestError(ValueError):
    """A request the engine cannot accept as given (HTTP 400); `field` names the offending field."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


class QueueFull(RuntimeError):
    """The waiting queue is at its limit (HTTP 429)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16  # new tokens at most
    temperature: float = 1.0  # 0 means greedy (argmax)
    top_k: int = 0  # keep the k most likely tokens; 0 keeps all
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p
    seed: int | None = None  # same seed, same prompt, same parameters -> same text
    stop: tuple[str, ...] = ()  # generation ends before the first of these strings; it is not returned
    ignore_eos: bool = False  # keep generating past end-of-sequence until max_tokens (for load tests)

    def validate(self) -> None:
        """Raise RequestError naming the first impossible field."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise RequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise RequestError("temperature", f"must be a number in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or not 0 <= self.top_k < 2**31:
            raise RequestError("top_k", f"must be an integer in [0, 2**31), got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise RequestError("top_p", f"must be a number in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise RequestError("seed", f"must be an integer, got {self.seed!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise RequestError("stop", "must be non-empty strings")
        if not isinstance(self.ignore_eos, bool):
            raise RequestError("ignore_eos", f"must be true or false, got {self.ignore_eos!r}")


def _is_number(x) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    token: int | None  # the new token id; None on a final event that carries no token
    text: str  # new text this event adds (stop strings already cut; may be "" while a stop string could form)
    finished: bool = False
    finish_reason: FinishReason | None = None  # set on the final event
    prompt_tokens: int = 0  # on the final event: usage
    completion_tokens: int = 0


@dataclass
class GenerationRequest:
    request_id: str
    prompt_tokens: Sequence[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class EngineStats:
    running: int  # requests holding a cache slot
    waiting: int  # requests queued for a slot
    cache_usage: float  # fraction of the KV cache allocated to requests, 0..1
    batch_size: int  # sequences in the last decode step
    max_context: int  # prompt + max_tokens must fit in this
    prefill_calls: int = 0  # prefill launches since the engine started
    prefill_chunks: int = 0  # prompt chunks those launches read (a launch reads one chunk of each of its prompts)


class Tokenizer(Protocol):
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class Engine(Protocol):
    model_name: str
    tokenizer: Tokenizer

    def submit(self, request: GenerationRequest, on_event: Callable[[TokenEvent], None]) -> None:
        """Queue a request. Raises RequestError (bad parameters, prompt too long) or QueueFull.

        `on_event` is called from the engine thread, once per generated token and once finally."""
        ...

    def cancel(self, request_id: str) -> None:
        """Stop a request (client gone); its slot is freed before the next decode step. Unknown ids are ignored."""
        ...

    def stats(self) -> EngineStats: ...

    def close(self) -> None: ...
