"""The inference engine: continuous batching over fixed cache slots, run by one background thread.

Each turn of the loop: drop cancelled requests, admit waiting requests into free slots, prefill one chunk of every
request still reading its prompt (up to `prefill_rows` prompts per launch), then launch a block of decode steps for
every request that is generating and read the tokens of the block launched on the turn before (so the host's launch
overlaps the GPU's work). A block is one step, or `decode_steps` steps while no request waits for a slot or reads
its prompt: one launch then serves several tokens, and the host's cost per token shrinks. A request leaves its slot
as soon as it finishes (eos, max_tokens, a stop string) or is cancelled, and the next waiting request takes the slot
on the next turn; the tokens it still had in flight are dropped. A request takes the lowest free slot, and decode
runs over the fewest leading slots that hold every generating request (`ModelRunner.decode_sizes`): a lone request
decodes as batch 1, however many slots the engine has."""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import numpy as np

from jaxdeep.serve.api import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    QueueFull,
    RequestError,
    TokenEvent,
    Tokenizer,
)
from jaxdeep.serve.runner import CacheGeometry, ModelRunner
from jaxdeep.serve.sampling import mode_for
from jaxdeep.serve.textstream import TextStream

log = logging.getLogger("jaxdeep.serve")


@dataclass(eq=False)
class _Sequence:
    request: GenerationRequest
    on_event: Callable[[TokenEvent], None]
    seed: int  # uint32: the request's seed, or one drawn at submission
    text: TextStream
    slot: int | None = None
    cached: int = 0  # positions of the slot holding this request's tokens
    generated: list[int] = field(default_factory=list)

    @property
    def prompt(self):
        return self.request.prompt_tokens

    @property
    def decoding(self) -> bool:
        return self.cached >= len(self.prompt)


@dataclass
class Completion:
    tokens: list[int]
    text: str
    finish_reason: FinishReason | None


class InferenceEngine:
    """Implements `jaxdeep.serve.api.Engine`."""

    def __init__(
        self,
        runner: ModelRunner,
        tokenizer: Tokenizer,
        model_name: str,
        max_waiting: int = 64,
        decode_steps: int = 1,
        warm_up: bool = False,
    ):
        if not isinstance(decode_steps, int) or decode_steps < 1:
            raise ValueError(f"decode_steps must be an integer >= 1, got {decode_steps!r}")
        self.runner = runner
        self.decode_steps = decode_steps
        self.tokenizer = tokenizer
        # Trailing U+FFFD a stream holds back (TextStream): tokenizers may say how many an incomplete character makes.
        self._hold = getattr(tokenizer, "hold_replacements", 3)
        self.model_name = model_name
        self.max_waiting = max_waiting
        self.geometry = runner.geometry
        self.vocab_size = runner.cfg.model.vocab_size
        self._cache = runner.new_cache()
        self._slots: list[_Sequence | None] = [None] * self.geometry.num_slots
        self._waiting: collections.deque[_Sequence] = collections.deque()
        self._cancelled: set[str] = set()
        self._ids: set[str] = set()  # request ids queued or running
        self._last_batch = 0
        self._prefill_calls = self._prefill_chunks = 0
        # The decode batch lives on the device between steps (`ModelRunner.decode_steps`): `_rows` says which
        # request each of its rows decodes, and only rows whose request changes are sent again. A block is launched
        # before the tokens of the one before are read (`_in_flight`), so the host's launch overlaps the GPU's work.
        self._batch = None
        self._rows: list[_Sequence | None] = [None] * self.geometry.num_slots
        self._in_flight: tuple | None = None
        self._closed = False
        self._cond = threading.Condition()
        self._seeds = random.SystemRandom()
        reason = runner.attention_kernel_reason
        log.info("decode attention: %s", "one kernels.decode kernel per layer" if reason is None else reason)
        if warm_up:
            self._warm_up()
        self._thread = threading.Thread(target=self._loop, name="jaxdeep-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_loaded(
        cls,
        loaded,
        num_slots: int = 8,
        max_context: int | None = None,
        prefill_chunk: int = 64,
        prefill_rows: int = 4,
        max_waiting: int = 64,
        model_name: str | None = None,
        compiler_options: dict | None = None,
        own_params: bool = False,
        decode_steps: int = 1,
        warm_up: bool = False,
        decode_all_slots: bool = False,
        concurrent_kernels: bool = False,
    ) -> InferenceEngine:
        """num_slots: sequences decoded together; max_context: positions per slot (default: the model's training
        length; for HF models max_position_embeddings, at most 4096); prefill_chunk: prompt tokens per prefill call,
        for each prompt; prefill_rows: prompts one prefill call takes at most (a chunk each: the weights are read
        once for all of them; at most num_slots); max_waiting: queued requests before submit raises QueueFull;
        own_params: the engine takes over `loaded.params` (the runner frees each weight it re-lays out or splits by
        layer; `loaded` must not be used after); decode_steps: decode steps per launch while no request waits or
        reads its prompt (tokens then stream in bursts of that many); warm_up: compile the model's programs before
        the engine starts (prefill for each number of prompts per call, decode for each size, block length and
        sampling mode), so no request waits for XLA; decode_all_slots: every decode step takes all slots and
        samples, and prefill takes one prompt per call, so a request's tokens never depend on the others beside it
        (`ModelRunner.decode_sizes`), at the cost of a lone request decoding as a full batch; concurrent_kernels:
        independent kernels of a step may run side by side on a GPU (`runner.CONCURRENT_KERNELS`; off by default:
        behind the server it made DeepSeek 2B slower on an H200)."""
        geometry = CacheGeometry(num_slots, max_context or loaded.context_limit, prefill_chunk, prefill_rows)
        runner = ModelRunner.from_loaded(
            loaded,
            geometry,
            compiler_options=compiler_options,
            donate_params=own_params,
            decode_all_slots=decode_all_slots,
            concurrent_kernels=concurrent_kernels,
        )
        return cls(runner, loaded.tokenizer, model_name or loaded.name, max_waiting, decode_steps, warm_up)

    # ------------------------------------------------------------------------- the Engine protocol

    def submit(self, request: GenerationRequest, on_event: Callable[[TokenEvent], None]) -> None:
        params = request.params
        params.validate()
        self._check_prompt(request)
        seed = params.seed if params.seed is not None else self._seeds.getrandbits(32)
        seq = _Sequence(request, on_event, seed % 2**32, TextStream(self.tokenizer.decode, params.stop, self._hold))
        with self._cond:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if request.request_id in self._ids:
                raise RequestError("request_id", f"{request.request_id!r} is already queued or running")
            if self._waiting_count() >= self.max_waiting:
                raise QueueFull(f"{self._waiting_count()} requests are waiting (max_waiting={self.max_waiting})")
            self._ids.add(request.request_id)
            self._waiting.append(seq)
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        with self._cond:
            if request_id in self._ids:
                self._cancelled.add(request_id)
                self._cond.notify()

    def stats(self) -> EngineStats:
        with self._cond:
            running = sum(s is not None for s in self._slots)
            # A request holds its whole slot (max_context positions) from admission to finish: allocated, as a
            # paged cache would count its blocks, whatever part of the slot is written yet.
            usage = running / self.geometry.num_slots
            return EngineStats(
                running,
                self._waiting_count(),
                usage,
                self._last_batch,
                self.geometry.max_context,
                self._prefill_calls,
                self._prefill_chunks,
            )

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join()

    # ------------------------------------------------------------------------- conveniences

    def generate(self, request: GenerationRequest, timeout: float | None = None) -> Completion:
        """Submit and wait for the whole completion (tests, benchmarks, scripts)."""
        done = threading.Event()
        tokens: list[int] = []
        parts: list[str] = []
        reason: list[FinishReason | None] = [None]

        def on_event(event: TokenEvent) -> None:
            if event.token is not None:
                tokens.append(event.token)
            parts.append(event.text)
            if event.finished:
                reason[0] = event.finish_reason
                done.set()

        self.submit(request, on_event)
        if not done.wait(timeout):
            self.cancel(request.request_id)
            raise TimeoutError(f"request {request.request_id} did not finish within {timeout} s")
        return Completion(tokens, "".join(parts), reason[0])

    # ------------------------------------------------------------------------- the loop

    def _check_prompt(self, request: GenerationRequest) -> None:
        prompt = request.prompt_tokens
        if len(prompt) == 0:
            raise RequestError("prompt", "must hold at least one token")
        if not all(isinstance(t, int | np.integer) and 0 <= t < self.vocab_size for t in prompt):
            raise RequestError("prompt", f"token ids must be integers in [0, {self.vocab_size})")
        total = len(prompt) + request.params.max_tokens
        if total > self.geometry.max_context:
            raise RequestError(
                "prompt",
                f"{len(prompt)} prompt tokens + max_tokens={request.params.max_tokens} = {total} exceed the context "
                f"of {self.geometry.max_context} tokens; shorten the prompt or lower max_tokens",
            )

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._has_work():
                    self._cond.wait()
                if self._closed:
                    break
                cancelled = self._take_cancelled()
                self._admit()
            for seq in cancelled:  # callbacks run outside the lock: they may call back into the engine
                self._finish(seq, "abort")
            try:
                self._step()
            except Exception:
                log.exception("engine step failed; aborting the running requests")
                self._abort_running()
        with self._cond:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for seq in waiting + [s for s in self._slots if s is not None]:
            self._finish(seq, "abort")

    def _waiting_count(self) -> int:
        # A cancelled request leaves the queue on the loop's next turn; it no longer counts as waiting.
        return sum(1 for s in self._waiting if s.request.request_id not in self._cancelled)

    def _has_work(self) -> bool:
        running = any(s is not None for s in self._slots)
        return bool(self._waiting or self._cancelled or running or self._in_flight is not None)

    def _take_cancelled(self) -> list[_Sequence]:
        """Remove cancelled requests from the queue and their slots (so `_admit` can refill them); the caller
        finishes them once it has released the lock."""
        taken = [s for s in self._waiting if s.request.request_id in self._cancelled]
        for seq in taken:
            self._waiting.remove(seq)
        for seq in [s for s in self._slots if s is not None and s.request.request_id in self._cancelled]:
            self._slots[seq.slot] = None
            taken.append(seq)
        self._cancelled.clear()
        return taken

    def _admit(self) -> None:
        for slot, occupant in enumerate(self._slots):
            if occupant is None and self._waiting:
                seq = self._waiting.popleft()
                seq.slot = slot
                self._slots[slot] = seq

    def _step(self) -> None:
        reading = [s for s in self._slots if s is not None and not s.decoding]
        most = self.runner.prefill_sizes[-1]
        prefills = [self._prefill(reading[first : first + most]) for first in range(0, len(reading), most)]
        for group, sampled in filter(None, prefills):  # read once every group is launched: no wait in between
            for seq, token in zip(group, np.asarray(sampled)[: len(group)], strict=True):
                if seq.decoding:
                    self._accept(seq, int(token))
        ready = [s for s in self._slots if s is not None and s.decoding and s.generated]
        launched = self._launch_decode(ready, self._block_steps(ready)) if ready else None
        if self._in_flight is not None:
            self._read_decode(*self._in_flight)
        self._in_flight = launched

    def _prefill(self, group: list[_Sequence]) -> tuple | None:
        """Launch the next chunk of each prompt in `group` in one call and, if that completes some prompts, the
        sampling of their first tokens from its logits. Returns (group, sampled tokens) to read, or None."""
        chunk = self.geometry.prefill_chunk
        pieces = [(seq.prompt[seq.cached : seq.cached + chunk], seq.slot, seq.cached) for seq in group]
        self._cache, logits_pv = self.runner.prefill_chunks(self._cache, pieces)
        self._prefill_calls += 1
        self._prefill_chunks += len(pieces)
        for seq, (piece, _, _) in zip(group, pieces, strict=True):
            seq.cached += len(piece)
        if not any(seq.decoding for seq in group):
            return None
        rows = [seq if seq.decoding else None for seq in group]
        return group, self._launch_sample(logits_pv, rows + [None] * (logits_pv.shape[0] - len(rows)))

    def _block_steps(self, ready: list[_Sequence]) -> int:
        """Steps of the next block: `decode_steps` while no request waits for a slot or reads its prompt, and some
        request has that many tokens left beyond those in flight; otherwise one, so that a slot is freed, a
        prompt read, or a request's end reached without decoding past it."""
        if self.decode_steps == 1 or self._waiting or any(s is not None and not s.decoding for s in self._slots):
            return 1
        flying, flying_steps = set(), 0
        if self._in_flight is not None:
            sampled, rows = self._in_flight
            flying, flying_steps = {seq for _, seq in rows}, sampled.shape[0]
        left = max(s.request.params.max_tokens - len(s.generated) - flying_steps * (s in flying) for s in ready)
        return self.decode_steps if left >= self.decode_steps else 1

    def _launch_decode(self, ready: list[_Sequence], steps: int) -> tuple:
        """Bring the device batch up to date (its size, and rows whose request joined or left) and launch a block
        of `steps` decode steps. Returns what `_read_decode` needs once it is done."""
        want: list[_Sequence | None] = [None] * self.runner.decode_size(1 + max(seq.slot for seq in ready))
        for seq in ready:
            want[seq.slot] = seq
        if self._batch is None:
            self._batch = self._decode_batch(want, None)
        else:
            if len(want) != len(self._rows):  # on the device: kept rows may have a step in flight
                self._batch = self.runner.resize_batch(self._batch, len(want))
                self._rows = (self._rows + [None] * len(want))[: len(want)]
            changed = [a is not b for a, b in zip(want, self._rows, strict=True)]
            if any(changed):
                self._batch = self._decode_batch(want, changed)
        self._rows = want
        # Idle rows are greedy. With decode_all_slots every step runs one program, whatever the requests.
        sampling = "sample" if self.runner.decode_all_slots else mode_for(s.request.params.temperature for s in ready)
        self._cache, self._batch, sampled = self.runner.decode_steps(self._cache, self._batch, steps, sampling)
        self._last_batch = len(ready)
        return sampled, [(seq.slot, seq) for seq in ready]

    def _read_decode(self, sampled, rows: list[tuple[int, _Sequence]]) -> None:
        """Accept a launched block's tokens [steps, slots] in order, for the requests still in their slots (one
        that finished meanwhile decoded past its end: those tokens are dropped, and its cache writes stay in its own
        row)."""
        for tokens_b in np.asarray(sampled):
            for slot, seq in rows:
                if self._slots[slot] is seq:
                    seq.cached += 1
                    self._accept(seq, int(tokens_b[slot]))

    def _decode_batch(self, rows: list[_Sequence | None], changed: list[bool] | None):
        """The device's decode batch for these rows (a request, or None: idle), sent whole (`changed` None) or only
        the changed rows. An idle row sits past the end: its writes land on its own last position, which no
        request reads (prompt + max_tokens <= max_context, and a request's last token is never fed back for its
        own sake: the decode steps that run past a request's end write only its own slot)."""
        slots, context = len(rows), self.geometry.max_context
        tokens, index = np.zeros(slots, np.int32), np.zeros(slots, np.int32)
        positions = np.full(slots, context, np.int32)
        for seq in filter(None, rows):
            tokens[seq.slot], index[seq.slot] = seq.generated[-1], len(seq.generated)
            positions[seq.slot] = seq.cached
        temperature, top_k, top_p, seed = self._sampling_rows(rows)
        if changed is None:
            return self.runner.decode_batch(tokens, positions, temperature, top_k, top_p, seed, index)
        return self.runner.decode_batch(
            tokens, positions, temperature, top_k, top_p, seed, index, into=self._batch, rows=changed
        )

    def _warm_up(self) -> None:
        """Compile every prefill and decode program the loop may run (`ModelRunner.compile_all`)."""
        start = time.perf_counter()
        count = self.runner.compile_all(self._cache, sorted({1, self.decode_steps}))
        cache_dir = jax.config.jax_compilation_cache_dir
        log.info(
            "warm-up: %d programs compiled or loaded in %.1f s (%s)",
            count,
            time.perf_counter() - start,
            f"persistent compilation cache {cache_dir}" if cache_dir else "no persistent compilation cache",
        )

    def _sampling_rows(self, rows: list[_Sequence | None]):
        """Per-row temperature, top_k, top_p and seed; rows without a request sample greedily (and are ignored)."""
        n = len(rows)
        temperature, top_p = np.zeros((n,), np.float32), np.ones((n,), np.float32)
        top_k, seed = np.zeros((n,), np.int32), np.zeros((n,), np.uint32)
        for i, seq in enumerate(rows):
            if seq is not None:
                p = seq.request.params
                temperature[i], top_p[i], seed[i] = p.temperature, p.top_p, seq.seed
                top_k[i] = min(p.top_k, self.vocab_size)
        return temperature, top_k, top_p, seed

    def _launch_sample(self, logits_bv, rows: list[_Sequence | None]) -> jax.Array:
        """Ids of `logits_bv`'s rows, sampled with the requests' parameters (rows without one: greedy, ignored), in
        pinned host memory once the program ends."""
        temperature, top_k, top_p, seed = self._sampling_rows(rows)
        index = np.array([0 if seq is None else len(seq.generated) for seq in rows], np.int32)
        return self.runner.sample(logits_bv, temperature, top_k, top_p, seed, index)

    def _accept(self, seq: _Sequence, token: int) -> None:
        """One new token: emit its safe text, or finish the request."""
        seq.generated.append(int(token))
        eos = self.tokenizer.eos_id
        if eos is not None and token == eos and not seq.request.params.ignore_eos:
            self._finish(seq, "stop", seq.text.flush())
            return
        delta, stopped = seq.text.add(int(token))
        self._emit(seq, TokenEvent(seq.request.request_id, int(token), delta))
        if stopped:
            self._finish(seq, "stop")
        elif len(seq.generated) >= seq.request.params.max_tokens:
            self._finish(seq, "length", seq.text.flush())

    def _finish(self, seq: _Sequence, reason: FinishReason, text: str = "") -> None:
        with self._cond:
            if seq.slot is not None and self._slots[seq.slot] is seq:
                self._slots[seq.slot] = None
            self._ids.discard(seq.request.request_id)
        final = TokenEvent(
            seq.request.request_id,
            None,
            text,
            finished=True,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt),
            completion_tokens=len(seq.generated),
        )
        self._emit(seq, final)

    def _emit(self, seq: _Sequence, event: TokenEvent) -> None:
        try:
            seq.on_event(event)
        except Exception:
            log.exception("on_event of request %s raised; the engine carries on", seq.request.request_id)

    def _abort_running(self) -> None:
        for seq in [s for s in self._slots if s is not None]:
            self._finish(seq, "abort")
        self._batch, self._rows, self._in_flight = None, [None] * self.geometry.num_slots, None  # donated, perhaps
        try:  # a failed step may have consumed the donated cache: start from a fresh one
            self._cache = self.runner.new_cache()
        except Exception:
            log.exception("could not allocate a new KV cache")
