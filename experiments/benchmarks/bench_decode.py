"""Decode speed of the serving engine's jitted step against the HBM roofline, and throughput against batch size.

For each batch size: one `ModelRunner` with that many slots, a cache of `--context` positions per slot, and
`--steps` timed decode steps (every slot decodes one token per step, at position `--context // 2` onwards). The
steps are what the engine runs: `ModelRunner.decode_steps` with `--decode-steps` steps per launch (the model's step
and greedy sampling, in `--sampling` mode, the batch kept on the device), each launch's tokens brought back to the
host once the next is launched (as the engine does), without the engine's thread or HTTP. `--inputs host` times the
model's step alone with tokens and positions sent from the host each step (`ModelRunner.decode`, what the engine ran
before it kept its batch on the device).

Roofline: a decode step must read the weights it uses and the cache it attends over. "needed" bytes count the
weights a token of batch 1 touches (for MoE: the active parameters, shared and routed experts of one token)
plus the cache of the positions in use; "read" bytes count what this implementation reads (all weights, and
every cached position of every slot where decode attends over the whole slot with a mask; only the positions in
use where the decode kernel attends). The bound is
bytes / (bandwidth of a copy measured in the same run: `a + 1` over 2 GiB, timed on the GPU's clock from a
profiler trace, as a host clock around the call would add the allocation and synchronisation of each call).
Each row gives the step on the host's clock (what a server sees) and the GPU's busy time per step (from a
profiler trace, `timing.device_seconds`), and the roofline fractions of the host-clock step. `--prefill N` also
times one prefill chunk of N tokens on the GPU's clock (`prefill_ms`), and with `--prefill-rows P ...` one call
of P prompts, a chunk of N each (`prefill_ms_by_rows`). Prompt tokens and each slot's first token
are random (seeded); later decode tokens are the model's own picks. (Rows of earlier raw rows without
`"tokens": "random"` all started from token 1, so an MoE model routed every row to the same experts.)

    python experiments/benchmarks/bench_decode.py experiments/dense_1b.yaml --batch 1 16 64 \
        --override model.param_dtype=bfloat16 --out experiments/benchmarks/bench_decode.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import busy_seconds, device_seconds, gpu_events, kernel_descriptions, kernel_totals  # noqa: E402

from jaxdeep.model import count_params
from jaxdeep.serve.loading import load_model
from jaxdeep.serve.runner import CacheGeometry, ModelRunner


def copy_bandwidth(nbytes: int, repeats: int = 20) -> float:
    """Bytes per second of reading and writing one buffer on the first device (read + write counted)."""
    x = jnp.ones((nbytes // 4,), jnp.float32)
    return 2 * nbytes / device_seconds(jax.jit(lambda a: a + 1.0), x, calls=repeats)


def tree_bytes(tree) -> int:
    return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(tree))


def varied_tokens(runner: ModelRunner, n: int, seed: int) -> np.ndarray:
    """n random token ids: rows on one repeated token would all route to the same experts of an MoE model."""
    return np.random.default_rng(seed).integers(0, runner.cfg.model.vocab_size, n).astype(np.int32)


def time_decode(
    runner: ModelRunner,
    batch: int,
    context: int,
    steps: int,
    top: int = 0,
    inputs: str = "device",
    block: int = 1,
    sampling: str = "greedy",
):
    """Seconds per decode step on the host's clock, the GPU's busy seconds per step, and the `top` kernel names
    by GPU time per step: [(name, (µs per step, kernels per step))]. inputs "device": the engine's blocks of
    `block` steps (`decode_steps`; `steps // block` launches timed, each launch's tokens read on the host after
    the next is launched); "host": `decode` with inputs sent from the host, one step per call."""
    per_call = block if inputs == "device" else 1
    start = context // 2
    calls = max(steps // per_call, 1)
    if start + per_call * (calls + 3 + min(calls, 20)) > context:  # every call moves the slots on
        raise SystemExit(f"--steps {steps} with the warm-up and the trace would run past --context {context}")
    state = {"cache": runner.new_cache(), "position": start - 1}
    tokens = varied_tokens(runner, batch, seed=1)
    zeros = np.zeros((batch,), np.int32)
    state["batch"] = runner.decode_batch(tokens, np.full((batch,), start), zeros, zeros, np.ones(batch), zeros, zeros)

    def engine_step():
        state["cache"], state["batch"], sampled = runner.decode_steps(state["cache"], state["batch"], block, sampling)
        previous, state["pending"] = state.get("pending"), sampled
        if previous is not None:
            np.asarray(previous)  # the engine reads a step's tokens once the next one is launched
        return sampled

    def host_step():
        state["position"] = min(state["position"] + 1, context - 1)
        state["cache"], logits = runner.decode(state["cache"], tokens, np.full((batch,), state["position"], np.int32))
        return logits

    step = engine_step if inputs == "device" else host_step
    for _ in range(2):  # compile, then the first replay (XLA may record or update its CUDA graphs there)
        jax.block_until_ready(step())
    t0 = time.perf_counter()
    for _ in range(calls):
        out = step()
    jax.block_until_ready(out)
    host = (time.perf_counter() - t0) / (calls * per_call)
    traced = min(calls, 20)
    events = gpu_events(step, calls=traced)  # one trace for both figures
    ranked = sorted(kernel_totals(events, traced * per_call).items(), key=lambda kv: -kv[1][0])[:top]
    busy = busy_seconds(events, traced * per_call)
    described = {}
    if ranked and inputs == "device":  # say what each kernel computes, from the step's optimised HLO
        described = kernel_descriptions(runner.decode_steps_hlo(state["cache"], state["batch"], block, sampling))
    return host, busy, [(_named(name, described), (ns / 1e3, count)) for name, (ns, count) in ranked]


def _named(kernel: str, described: dict[str, str]) -> str:
    return f"{kernel}  [{described[kernel]}]" if kernel in described else kernel


def time_prefill(runner: ModelRunner, top: int = 0, rows: int = 1):
    """GPU busy seconds of one prefill call (`ModelRunner.prefill_chunks`: a full chunk of the runner's prefill_chunk
    tokens for each of `rows` prompts, into slots 0 .. rows-1 at position 0) and its `top` kernels, as
    `time_decode` gives them."""
    chunk = runner.geometry.prefill_chunk
    pieces = [(varied_tokens(runner, chunk, seed=2 + row), row, 0) for row in range(rows)]
    state = {"cache": runner.new_cache()}

    def step():  # prefill donates the cache it is given
        state["cache"], logits = runner.prefill_chunks(state["cache"], pieces)
        return logits

    for _ in range(2):
        jax.block_until_ready(step())
    events = gpu_events(step, calls=10)
    ranked = sorted(kernel_totals(events, 10).items(), key=lambda kv: -kv[1][0])[:top]
    return busy_seconds(events, 10), [(name, (ns / 1e3, count)) for name, (ns, count) in ranked]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--override", action="append", default=[], help="section.key=value (repeatable)")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--context", type=int, default=1024, help="cache positions per slot")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--copy-bytes", type=int, default=2**31)
    ap.add_argument("--scan", action="store_true", help="loop over the layer stack (ModelRunner unroll_layers=False)")
    ap.add_argument(
        "--layout",
        nargs="+",
        choices=["decode", "model"],
        default=["decode"],
        help="projection weights with their input dims minor (the engine's default) or as the model keeps them",
    )
    ap.add_argument(
        "--inputs",
        choices=["device", "host"],
        default="device",
        help="device: the engine's step (decode_steps); host: the model's step with inputs sent each step",
    )
    ap.add_argument(
        "--decode-steps",
        type=int,
        nargs="+",
        default=[1],
        help="with --inputs device: steps per launch (ModelRunner.decode_steps)",
    )
    ap.add_argument(
        "--sampling",
        choices=["greedy", "sample"],
        default="greedy",
        help="sampling mode of the engine's step (every row is greedy: the engine takes 'greedy'; 'sample' runs the "
        "sort and draw over the vocabulary that a sampled request needs)",
    )
    ap.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="also time one prefill chunk of this many tokens on the GPU's clock (prefill_ms; default: not timed)",
    )
    ap.add_argument(
        "--prefill-rows",
        type=int,
        nargs="+",
        default=[1],
        help="with --prefill: prompts per prefill call, one chunk each (each at most the batch; prefill_ms_by_rows)",
    )
    ap.add_argument(
        "--kernels",
        nargs="+",
        choices=["serial", "concurrent"],
        default=["serial"],
        help="concurrent: a step's independent GPU kernels may run side by side (ModelRunner concurrent_kernels); "
        "serial (the engine's default): as XLA schedules them",
    )
    ap.add_argument(
        "--top",
        type=int,
        default=0,
        help="print the N kernels that take the most GPU time per step (decode: each with what it computes, from the "
        "step's optimised HLO, which costs one more compilation)",
    )
    ap.add_argument("--out", default=None, help="append one JSON line per batch size here")
    args = ap.parse_args()

    loaded = load_model(args.config, args.override)
    cfg = loaded.cfg
    counts = count_params(cfg.model)
    weight_bytes = tree_bytes(loaded.params)
    itemsize = weight_bytes / counts["total"]
    active = counts.get("active", counts["total"] - counts["embedding"])  # one embedding row is read, not all
    bandwidth = copy_bandwidth(args.copy_bytes)
    device = jax.devices()[0].device_kind
    print(f"{cfg.name} on {device}: weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    if args.prefill > args.context:
        raise SystemExit(f"--prefill {args.prefill} does not fit a slot of --context {args.context}")
    if args.prefill and max(args.prefill_rows) > min(args.batch):
        raise SystemExit(f"--prefill-rows {max(args.prefill_rows)} needs as many slots: --batch of at least that")
    if args.inputs == "host" and args.decode_steps != [1]:
        raise SystemExit("--decode-steps times the engine's step: use it with --inputs device")
    for layout, kernels, batch, block in itertools.product(args.layout, args.kernels, args.batch, args.decode_steps):
        geometry = CacheGeometry(batch, args.context, args.prefill or batch, prefill_rows=max(args.prefill_rows))
        runner = ModelRunner.from_loaded(
            loaded,
            geometry,
            unroll_layers=not args.scan,
            decode_layout=layout == "decode",
            concurrent_kernels=kernels == "concurrent",
        )
        cache_bytes = tree_bytes(jax.eval_shape(runner.new_cache))
        step_s, busy_s, top = time_decode(
            runner, batch, args.context, args.steps, args.top, args.inputs, block, args.sampling
        )
        used_cache = cache_bytes * (args.context // 2) / args.context
        needed = active * itemsize + used_cache
        kernel_used = runner.attention_kernel_reason is None
        read = weight_bytes - counts["embedding"] * itemsize + (used_cache if kernel_used else cache_bytes)
        row = {
            "model": cfg.name,
            "device": device,
            "batch": batch,
            "context": args.context,
            "step_ms": step_s * 1e3,
            "gpu_busy_ms": busy_s * 1e3,
            "tokens_per_s": batch / step_s,
            "copy_tb_s": bandwidth / 1e12,
            "needed_gb": needed / 1e9,
            "read_gb": read / 1e9,
            "roofline_needed": needed / bandwidth / step_s,
            "roofline_read": read / bandwidth / step_s,
            "unroll": not args.scan,
            "layout": layout,
            "kernels": "concurrent" if runner.concurrent_kernels else "serial",
            "inputs": args.inputs,
            "decode_steps": block,  # steps per launch
            "sampling": args.sampling if args.inputs == "device" else None,
            # the kernel choice, and whether this model's attention runs on it (DeepSeek: `write_attend_latent`)
            "decode_kernels": runner.decode_kernels,
            "decode_kernel_used": kernel_used,
            "tokens": "random",
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "overrides": args.override,
        }
        if args.prefill:
            by_rows = {}
            for rows in args.prefill_rows:
                if rows not in runner.prefill_sizes:  # a call of 3 prompts would run the program of 4
                    raise SystemExit(f"--prefill-rows {rows}: prefill runs {runner.prefill_sizes} prompts per call")
                prefill_s, prefill_top = time_prefill(runner, args.top, rows)
                by_rows[str(rows)] = prefill_s * 1e3
                for name, (us, count) in prefill_top:
                    print(f"  prefill of {rows} {us:10.1f} µs in {count:3d} kernels  {name}")
            row |= {"prefill_tokens": args.prefill, "prefill_ms_by_rows": by_rows}
            if "1" in by_rows:
                row["prefill_ms"] = by_rows["1"]
        print(json.dumps(row))
        for name, (us, count) in top:
            print(f"    {us:8.1f} µs per step in {count:3d} kernels  {name}")
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        del runner


if __name__ == "__main__":
    main()
