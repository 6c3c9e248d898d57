"""The model's prefill and decode steps, jitted over the mesh with explicit shardings.

Shapes never depend on a request: prefill takes one chunk of `prefill_chunk` tokens for each of p prompts, p one
of a few sizes (`prefill_sizes`; each prompt's slot, start position and valid length are arrays), and decode takes
one token for each of the first b slots, b one of a few sizes (`decode_sizes`: powers of two, and all slots). So
each compiles once per size (and decode once per block length and sampling mode), whatever is being served. The
cache is donated: XLA updates it in place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxdeep.config import ConfigError, ExperimentConfig
from jaxdeep.model import KernelChoice
from jaxdeep.model.matmul import decode_kernels, serving_layout
from jaxdeep.serve import cache as kv
from jaxdeep.serve.extend import latent_kernel_reason, model_functions
from jaxdeep.serve.layout import (
    from_default_layout,
    in_default_layout,
    relaid_groups,
    split_layers,
    stacked_layers,
    to_decode_layout,
    with_shared_experts,
)
from jaxdeep.serve.sampling import MODES, sample, sample_rows
from jaxdeep.sharding import use_rules
from kernels.decode import resolve


@dataclass(frozen=True)
class CacheGeometry:
    num_slots: int  # sequences decoded together (cache rows)
    max_context: int  # positions per slot: prompt + generated tokens must fit
    prefill_chunk: int  # prompt tokens per prefill call, for each prompt
    prefill_rows: int = 4  # prompts one prefill call takes at most (one chunk each)


# XLA replays a step on a GPU as CUDA graphs. By default a graph runs its kernels one after another; in its
# "concurrent" scheduling mode, kernels that touch no common buffer may run side by side. In a loop of decode steps
# alone this took DeepSeek 2B's steps 2-6% less time on one H200 (the dense 1B model's, one chain of kernels, 1-3%
# more), but behind the HTTP server the same build served a lone request at 0.54-0.55 ms per token against 0.45
# with it off, and held 69-70 requests/s within the TTFT objective against 98 (experiments/benchmarks/RESULTS.md).
# So it is off unless asked for. Steps over several devices, with their collectives, have not been measured with
# it. Ignored off the GPU.
SCHEDULING_MODE = "xla_gpu_command_buffer_scheduling_mode"
CONCURRENT_KERNELS = {SCHEDULING_MODE: "CONCURRENT"}


UNUSED = ("mtp",)  # parameter subtrees serving never reads: DeepSeek's multi-token prediction modules (extend.py)


def serving_params(params, free: bool = False):
    """`params` without the subtrees serving never reads (`UNUSED`), which the runner then neither holds nor passes
    to its steps; the model's `merge` leaves them abstract. With `free` (the caller hands its tree over) their
    arrays are deleted: DeepSeek-V3's MTP module is about 2% of its weights (14B of 685B)."""
    unused = [params[k] for k in UNUSED if k in params]
    if free:
        for a in jax.tree.leaves(unused):
            a.delete()
    return {k: v for k, v in params.items() if k not in UNUSED} if unused else params


def step_compiler_options(concurrent_kernels: bool, compiler_options: dict | None) -> dict | None:
    """XLA options of the serving steps: `CONCURRENT_KERNELS` where asked for, then the caller's (which win)."""
    options = (CONCURRENT_KERNELS if concurrent_kernels else {}) | (compiler_options or {})
    return options or None


class DecodeBatch(NamedTuple):
    """What a decode step of the first b slots takes, kept on the device between steps: each slot's last token, its
    position (>= max_context: idle) and its sampling parameters (as `sampling.sample` takes them; `index` is the
    index of the next token in its request's completion)."""

    tokens: jax.Array
    positions: jax.Array
    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    seed: jax.Array
    index: jax.Array


def decode_kernel_choice(choice: str) -> str:
    """What config `kernels.decode` runs as here: "xla", or an impl of `kernels.decode` ("pallas", "interpret")."""
    if choice == "xla":
        return "xla"
    try:
        impl = resolve(choice)
    except ValueError as e:  # "pallas" where it cannot run
        raise ConfigError(f"kernels.decode: {e}; set kernels.decode=auto or xla") from None
    return "xla" if impl == "reference" else impl


def host_sharding(mesh: Mesh) -> NamedSharding:
    """Replicated, in pinned host memory where the devices have it: the sampled tokens the host reads every step.
    On an H200, reading a finished [8] int32 array from GPU memory took the host 0.15-0.36 ms (the transfer is
    started only then), from pinned host memory 0.02 ms (the program writes it there as it ends)."""
    kinds = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
    return NamedSharding(mesh, PartitionSpec(), memory_kind="pinned_host" if "pinned_host" in kinds else None)


def _batch_shards(rules, mesh: Mesh, name: str) -> int:
    return int(np.prod([mesh.shape[a] for a in rules.get(name, [])]))


def prefill_rules(rules) -> dict:
    """Rules for prefill activations: one sequence, so the axes that split the batch split the chunk instead
    (the MoE dispatch then spreads the chunk's tokens over them)."""
    out = {k: list(v) for k, v in rules.items()}
    out["act_seq"] = [a for a in rules.get("batch", []) if a not in out.get("act_seq", [])] + out.get("act_seq", [])
    out["batch"] = []
    return out


class ModelRunner:
    """Prefill and decode for one model on one mesh.

    merge(params, model_state) builds the nnx model from parameter trees (already placed on the mesh);
    compiler_options go to XLA (e.g. a lower backend optimisation level where compile time dominates);
    concurrent_kernels lets the steps' independent kernels run side by side on a GPU (`CONCURRENT_KERNELS`, off by
    default; `self.concurrent_kernels` says what the steps were given);
    unroll_layers lays the layer stack out straight instead of looping over it: longer compile, 16-20% faster
    decode of the dense 1B model on an H200; decode_layout keeps a copy of the projection weights in the compute
    dtype with their input dimensions minor (`layout.py`, `relaid` names the groups), and runs single-row products
    on them as row reductions: batch-1 decode about 1.8x faster on an H200 (experiments/benchmarks/RESULTS.md).
    With unroll_layers each layer's routed experts are kept in a buffer of their own (`layout.split_layers`), which
    a kernel reads without a copy, where the runner owns them: re-laid copies, or weights handed over. Re-laid
    weights take memory twice while the caller keeps `params`, unless donate_params hands them over: each original
    is freed once its copy exists, and the caller's tree is spent.
    decode_all_slots makes every decode step take all slots (`decode_sizes`)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        mesh: Mesh,
        merge: Callable,
        params,
        model_state,
        geometry: CacheGeometry,
        compiler_options: dict | None = None,
        concurrent_kernels: bool = False,
        unroll_layers: bool = True,
        decode_layout: bool = True,
        donate_params: bool = False,
        decode_all_slots: bool = False,
    ):
        self.cfg, self.mesh, self.geometry = cfg, mesh, geometry
        self.decode_all_slots = decode_all_slots
        compiler_options = step_compiler_options(concurrent_kernels, compiler_options)
        self.concurrent_kernels = (compiler_options or {}).get(SCHEDULING_MODE) == "CONCURRENT"
        self.rules = {k: list(v) for k, v in cfg.sharding.rules.items()}
        self._check(geometry)
        # Weights re-laid for decode, and the products that then run as row reductions (layout.py).
        self.relaid = relaid_groups(KernelChoice.from_config(cfg)) if decode_layout else ()
        params = serving_params(params, free=donate_params)
        callers = frozenset() if donate_params else frozenset(id(a) for a in jax.tree.leaves(params))
        params, param_sh = to_decode_layout(params, self.relaid, donate=donate_params)
        if unroll_layers:  # each layer's routed experts in a buffer of their own, for the grouped kernel (layout.py)
            params, param_sh = split_layers(params, param_sh, keep=callers)
            if "experts" in self.relaid and cfg.model.kind == "deepseek" and mesh.size == 1:
                params, param_sh = with_shared_experts(params, param_sh, cfg.model.deepseek.n_shared_experts)
        # Held in the default layout, so that no launch pays for their layout on the host (layout.py).
        params, param_sh, perms = in_default_layout(params, param_sh, keep=callers)
        logical = lambda params: stacked_layers(from_default_layout(params, perms))  # noqa: E731
        self.params, self.model_state = params, model_state
        self.layout = kv.cache_layout(cfg.model, geometry.num_slots, geometry.max_context)
        self.cache_shardings = kv.cache_shardings(self.layout, self.rules, mesh)
        replicated = NamedSharding(mesh, PartitionSpec())
        state_sh = jax.tree.map(lambda a: a.sharding, model_state)
        extend, logits = model_functions(cfg.model.kind)
        self.decode_kernels = decode_kernel_choice(cfg.kernels.decode)
        chunk = geometry.prefill_chunk
        pre_rules = prefill_rules(self.rules)

        def prefill(params, model_state, cache, tokens_pt, slot_p, start_p, n_valid_p):
            with use_rules(pre_rules, mesh), serving_layout(self.relaid):
                model = merge(logical(params), model_state)
                positions_pt = start_p[:, None] + jnp.arange(chunk, dtype=jnp.int32)
                x_ptd, cache = extend(
                    model, cache, tokens_pt, positions_pt, slot_p, leading_slots=False, unroll=unroll_layers
                )
                last_p = jnp.maximum(n_valid_p - 1, 0)  # an idle row (no valid token) reads its first
                last_p1d = jnp.take_along_axis(x_ptd, last_p[:, None, None], axis=1)
                return cache, logits(model, last_p1d)[:, 0]

        def decode(params, model_state, cache, tokens_b, positions_b):
            with use_rules(self.rules, mesh), serving_layout(self.relaid), decode_kernels(self.decode_kernels):
                model = merge(logical(params), model_state)
                slot_b = jnp.arange(tokens_b.shape[0], dtype=jnp.int32)
                x_btd, cache = extend(
                    model,
                    cache,
                    tokens_b[:, None],
                    positions_b[:, None],
                    slot_b,
                    leading_slots=True,
                    unroll=unroll_layers,
                )
                return cache, logits(model, x_btd)[:, 0]

        def decode_one(params, model_state, cache, batch: DecodeBatch, sampling: str):
            cache, logits_bv = decode(params, model_state, cache, batch.tokens, batch.positions)
            columns = (batch.temperature, batch.top_k, batch.top_p, batch.seed, batch.index)
            tokens_b = sample_rows(logits_bv, *columns, mode=sampling)
            active = batch.positions < geometry.max_context
            step = active.astype(jnp.int32)
            following = batch._replace(
                tokens=jnp.where(active, tokens_b, batch.tokens),
                positions=batch.positions + step,
                index=batch.index + step,
            )
            return cache, following, tokens_b

        def decode_block(params, model_state, cache, batch: DecodeBatch, steps: int, sampling: str):
            def one(carry, _):
                cache, batch, tokens_b = decode_one(params, model_state, *carry, sampling)
                return (cache, batch), tokens_b

            # Laid out straight: in a loop, the dense 1B model's GPU time per token doubled (H200, RESULTS.md).
            (cache, batch), tokens_sb = jax.lax.scan(one, (cache, batch), length=steps, unroll=True)
            return cache, batch, tokens_sb

        self._prefill = jax.jit(
            prefill,
            in_shardings=(param_sh, state_sh, self.cache_shardings, replicated, replicated, replicated, replicated),
            out_shardings=(self.cache_shardings, replicated),
            donate_argnums=(2,),
            compiler_options=compiler_options,
        )
        self._decode = jax.jit(
            decode,
            in_shardings=(param_sh, state_sh, self.cache_shardings, replicated, replicated),
            out_shardings=(self.cache_shardings, replicated),
            donate_argnums=(2,),
            compiler_options=compiler_options,
        )

        host = host_sharding(mesh)  # what the host reads: sampled tokens
        # The engine samples a prompt's first token from prefill's logits, and reads it on the host.
        self.sample = jax.jit(sample, out_shardings=host)
        batch_sh = DecodeBatch(*[replicated] * len(DecodeBatch._fields))
        self._decode_block = jax.jit(
            decode_block,
            in_shardings=(param_sh, state_sh, self.cache_shardings, batch_sh),
            out_shardings=(self.cache_shardings, batch_sh, host),
            static_argnums=(4, 5),
            donate_argnums=(2, 3),
            compiler_options=compiler_options,
        )

    @classmethod
    def from_loaded(cls, loaded, geometry: CacheGeometry, **options) -> ModelRunner:
        """The runner of a `loading.LoadedModel`; options as the constructor's."""
        return cls(loaded.cfg, loaded.mesh, loaded.merge, loaded.params, loaded.model_state, geometry, **options)

    @property
    def attention_kernel_reason(self) -> str | None:
        """Why decode's attention does not run on a `kernels.decode` kernel here (the setting, or for DeepSeek
        `extend.latent_kernel_reason` on this mesh), or None when it does."""
        if self.decode_kernels == "xla":
            return f"kernels.decode={self.cfg.kernels.decode} runs XLA's path here"
        if self.cfg.model.kind != "deepseek":
            return None
        with use_rules(self.rules, self.mesh):
            return latent_kernel_reason(self.cfg.model)

    def _check(self, g: CacheGeometry) -> None:
        if self.mesh.shape.get("pipeline", 1) > 1:
            raise ConfigError("serving: mesh.pipeline > 1 is not supported; set mesh.pipeline=1")
        for name, value in (
            ("num_slots", g.num_slots),
            ("max_context", g.max_context),
            ("prefill_chunk", g.prefill_chunk),
            ("prefill_rows", g.prefill_rows),
        ):
            if value < 1:
                raise ConfigError(f"{name}: must be >= 1, got {value}")
        shards = _batch_shards(self.rules, self.mesh, "batch")
        if g.num_slots % shards:
            raise ConfigError(f"num_slots={g.num_slots} must divide by the {shards} batch shards of the mesh")
        if g.prefill_chunk % shards:
            raise ConfigError(f"prefill_chunk={g.prefill_chunk} must divide by the {shards} batch shards of the mesh")

    @functools.cached_property
    def prefill_sizes(self) -> tuple[int, ...]:
        """The numbers of prompts prefill takes per call: powers of two below the most (`prefill_rows`, at most
        num_slots), and the most. Prompts that fill fewer rows ride with idle ones, which write nothing. Only 1 with
        decode_all_slots: a prompt's logits may differ in their last bits between call sizes, and that option
        promises tokens that never depend on the other requests."""
        if self.decode_all_slots:
            return (1,)
        most = min(self.geometry.prefill_rows, self.geometry.num_slots)
        return tuple(1 << i for i in range(most.bit_length()) if 1 << i < most) + (most,)

    @functools.cached_property
    def decode_sizes(self) -> tuple[int, ...]:
        """The numbers of rows decode takes (the first b slots): powers of two below num_slots, and num_slots.
        Only num_slots where the mesh splits the batch (each device decodes the slots it holds) or with
        decode_all_slots. A row's arithmetic may differ in its last bits from one size to another (at b = 1 the
        projections are row reductions, and GEMM algorithms depend on the rows), so with several sizes a
        request's logits can depend on how many slots are in use beside it; with one they cannot."""
        slots = self.geometry.num_slots
        if self.decode_all_slots or _batch_shards(self.rules, self.mesh, "batch") > 1:
            return (slots,)
        return tuple(1 << i for i in range(slots.bit_length()) if 1 << i < slots) + (slots,)

    def decode_size(self, slots_in_use: int) -> int:
        """The fewest rows of `decode_sizes` that cover slots 0 .. slots_in_use - 1."""
        return min(b for b in self.decode_sizes if b >= slots_in_use)

    def _check_rows(self, b: int) -> None:
        if b not in self.decode_sizes:
            raise ValueError(f"decode takes {self.decode_sizes} rows (the first slots), got {b}")

    def compile_all(self, cache: dict, steps=(1,)) -> int:
        """Compile every program serving runs, so that no call waits for XLA later: for every size of
        `prefill_sizes`, prefill and sampling after it; for every size of `decode_sizes`, `decode_steps` of each block
        length in `steps` and sampling mode, and the batch's own small programs (`decode_batch`, `resize_batch`).
        One after another: on a GPU, XLA times candidate kernels while it compiles, and compilations side by side
        would disturb each other's timings. Jitted calls then find them compiled. `cache` is only looked at.
        Returns how many programs it compiled."""
        chunk, vocab = self.geometry.prefill_chunk, self.cfg.model.vocab_size
        programs = []
        for p in self.prefill_sizes:
            rows = np.zeros(p, np.int32)
            programs += [
                self._prefill.lower(self.params, self.model_state, cache, np.zeros((p, chunk), np.int32), *[rows] * 3),
                # The engine samples the prompts' first tokens from prefill's logits (placed as prefill returns them).
                self.sample.lower(
                    jax.ShapeDtypeStruct((p, vocab), jnp.float32, sharding=NamedSharding(self.mesh, PartitionSpec())),
                    *(np.zeros(p, t) for t in (np.float32, np.int32, np.float32, np.uint32, np.int32)),
                ),
            ]
        batches = {}
        for size in self.decode_sizes:
            ints, floats = self._pack(*self._idle_columns(size))
            batches[size] = batch = self._unpack_batch(ints, floats)
            programs += [
                self._decode_block.lower(self.params, self.model_state, cache, batch, k, mode)
                for k in steps
                for mode in MODES
            ]
            programs += [
                self._unpack_batch.lower(ints, floats),
                self._merge_batch.lower(batch, np.zeros(size, bool), ints, floats),
            ]
        programs += [self._resize_batch.lower(batches[a], b) for a in batches for b in batches if a != b]
        for program in programs:
            program.compile()
        return len(programs)

    def new_cache(self) -> dict:
        return kv.init_cache(self.cfg.model, self.layout, self.cache_shardings)

    def prefill_chunks(self, cache: dict, pieces) -> tuple[dict, jax.Array]:
        """Cache several prompts' chunks in one call: `pieces` is a list of (tokens, slot, start), each tokens at most
        prefill_chunk, each for another slot, at most `prefill_sizes[-1]` of them. Returns the new cache and the
        float32 logits [p, vocab] after each piece's last token, p the fewest of `prefill_sizes` that hold them (rows
        past the pieces are idle: their logits mean nothing)."""
        chunk, most = self.geometry.prefill_chunk, self.prefill_sizes[-1]
        if not 1 <= len(pieces) <= most:
            raise ValueError(f"prefill takes 1..{most} prompts per call, got {len(pieces)}")
        if len({slot for _, slot, _ in pieces}) != len(pieces):
            raise ValueError(f"prefill: each prompt needs a slot of its own, got slots {[s for _, s, _ in pieces]}")
        p = min(size for size in self.prefill_sizes if size >= len(pieces))
        tokens_pt = np.zeros((p, chunk), np.int32)
        # Idle rows start past the cache's end, so their writes are dropped; they read slot 0, and are ignored.
        slot_p, n_valid_p = np.zeros(p, np.int32), np.zeros(p, np.int32)
        start_p = np.full(p, self.geometry.max_context, np.int32)
        for row, (tokens, slot, start) in enumerate(pieces):
            n = len(tokens)
            if not 1 <= n <= chunk:
                raise ValueError(f"prefill takes 1..{chunk} tokens per prompt, got {n}")
            if not 0 <= slot < self.geometry.num_slots:
                raise ValueError(f"prefill: slot {slot} is not one of the {self.geometry.num_slots} slots")
            tokens_pt[row, :n] = tokens
            slot_p[row], start_p[row], n_valid_p[row] = slot, start, n
        return self._prefill(self.params, self.model_state, cache, tokens_pt, slot_p, start_p, n_valid_p)

    def prefill(self, cache: dict, tokens, slot: int, start: int) -> tuple[dict, jax.Array]:
        """Cache `tokens` (at most prefill_chunk) of slot `slot` at positions start.. ; returns the new cache and the
        float32 logits [vocab] after the last of them."""
        cache, logits_pv = self.prefill_chunks(cache, [(tokens, slot, start)])
        return cache, logits_pv[0]

    def prefill_prompt(self, cache: dict, tokens, slot: int) -> tuple[dict, jax.Array]:
        """A whole prompt, chunk by chunk."""
        chunk = self.geometry.prefill_chunk
        logits = None
        for start in range(0, len(tokens), chunk):
            cache, logits = self.prefill(cache, tokens[start : start + chunk], slot, start)
        return cache, logits

    def decode_batch(
        self, tokens_b, positions_b, temperature_b, top_k_b, top_p_b, seed_b, index_b, into=None, rows=None
    ) -> DecodeBatch:
        """A `DecodeBatch` on the device from per-row host values (row i: slot i; b rows, one of `decode_sizes`;
        two transfers: integers, then floats). With `into` (a device batch of b rows, donated) and `rows`
        (bool [b]): `into` with only those rows replaced."""
        self._check_rows(len(tokens_b))
        ints, floats = self._pack(tokens_b, positions_b, temperature_b, top_k_b, top_p_b, seed_b, index_b)
        if into is None:
            return self._unpack_batch(ints, floats)
        return self._merge_batch(into, np.asarray(rows, bool), ints, floats)

    def _idle_columns(self, n: int) -> tuple:
        """Host columns of `n` idle rows, in `decode_batch`'s order: past the end, greedy, no cuts."""
        zeros = np.zeros(n, np.int32)
        return zeros, zeros + self.geometry.max_context, zeros, zeros, zeros + 1, zeros, zeros

    @staticmethod
    def _pack(tokens_b, positions_b, temperature_b, top_k_b, top_p_b, seed_b, index_b):
        columns = (tokens_b, positions_b, top_k_b, seed_b, index_b)  # the seeds' uint32 bits travel as int32
        ints = np.stack([np.asarray(a).astype(np.int64).astype(np.uint32).view(np.int32) for a in columns])
        return ints, np.stack([np.asarray(temperature_b, np.float32), np.asarray(top_p_b, np.float32)])

    def _batch_jit(self, fn, **options):
        # Placed as decode_steps returns its batch, so every batch hits the same compiled step.
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(fn, out_shardings=DecodeBatch(*[replicated] * len(DecodeBatch._fields)), **options)

    @staticmethod
    def _unpack(ints, floats) -> DecodeBatch:
        tokens, positions, top_k, seed, index = ints
        seed = jax.lax.bitcast_convert_type(seed, jnp.uint32)
        return DecodeBatch(tokens, positions, floats[0], top_k, floats[1], seed, index)

    @functools.cached_property
    def _unpack_batch(self):
        return self._batch_jit(self._unpack)

    @functools.cached_property
    def _merge_batch(self):
        def merge(batch, rows, ints, floats):
            return jax.tree.map(lambda new, old: jnp.where(rows, new, old), self._unpack(ints, floats), batch)

        return self._batch_jit(merge, donate_argnums=(0,))

    def resize_batch(self, batch: DecodeBatch, size: int) -> DecodeBatch:
        """The batch over the first `size` slots (one of `decode_sizes`), on the device: rows past `size` are
        dropped, new rows are idle. Rows kept carry on as they were, with any steps still in flight."""
        self._check_rows(size)
        return self._resize_batch(batch, size)

    @functools.cached_property
    def _resize_batch(self):
        def resize(batch, size):
            extra = size - batch.tokens.shape[0]
            if extra <= 0:
                return jax.tree.map(lambda a: a[:size], batch)
            idle = self._unpack(*self._pack(*self._idle_columns(extra)))
            return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), batch, idle)

        return self._batch_jit(resize, static_argnums=(1,))

    def decode_steps(
        self, cache: dict, batch: DecodeBatch, steps: int = 1, sampling: str = "sample"
    ) -> tuple[dict, DecodeBatch, jax.Array]:
        """`steps` decode steps of the batch's slots in one launch (the engine's step), each sampling the next token
        of every row on the device and feeding it to the step after: returns the new cache, the batch after the
        last step (each active slot's last sampled token, position and index moved on; a slot that reaches
        max_context turns idle; idle slots unchanged) and the sampled tokens [steps, b], for the host to read: in
        pinned host memory where the device has it (`host_sharding`), while cache and batch stay on the device
        (another jitted program taking the tokens would get them in that memory kind). Cache and batch are
        donated, so a generation reuses the same buffers and the host sends nothing while the slots keep their
        requests. The host launches once per block, so its launch cost per token shrinks `steps` times; the tokens
        are those of `steps` blocks of one. `sampling` is `sampling.sample_rows`' mode: "greedy" only when every row
        of the batch is greedy (`sampling.mode_for`; idle rows are). Each `steps` and mode compiles once per decode
        size."""
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if sampling not in MODES:
            raise ValueError(f"sampling must be one of {MODES}, got {sampling!r}")
        return self._decode_block(self.params, self.model_state, cache, batch, steps, sampling)

    def decode_steps_hlo(self, cache: dict, batch: DecodeBatch, steps: int = 1, sampling: str = "sample") -> str:
        """The optimised HLO of `decode_steps` for these arguments (compiled again, not run): the program whose
        kernels a GPU profile of the engine's step names (`experiments/benchmarks/timing.kernel_descriptions`)."""
        return (
            self._decode_block.lower(self.params, self.model_state, cache, batch, steps, sampling).compile().as_text()
        )

    def decode(self, cache: dict, tokens_b, positions_b) -> tuple[dict, jax.Array]:
        """One token for each of the first b slots (b in `decode_sizes`) at its own position; returns the new cache
        and float32 logits [b, vocab]. A position >= max_context marks an idle slot: its logits mean nothing, and
        its own cache row may change at the last position (`cache.write`), never another slot's."""
        self._check_rows(len(tokens_b))
        return self._decode(
            self.params, self.model_state, cache, np.asarray(tokens_b, np.int32), np.asarray(positions_b, np.int32)
        )
