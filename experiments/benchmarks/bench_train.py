"""Training throughput and MFU of an experiment config on the local devices.

    python experiments/benchmarks/bench_train.py experiments/dense_1b.yaml \
        --variant model.remat=none --variant "model.remat=save_matmuls data.global_batch_size=16"

Each variant is the config plus overrides. It times the real jitted train step (the one `jaxdeep train`
runs) on random tokens: warm-up steps first, then the median of timed steps, each synchronised.
MFU = FLOPs per step / step time / (peak bf16 FLOP/s × devices), FLOPs from
`jaxdeep.model.flops_per_token` (6 × matmul params + 12·L·heads·head_dim·seq, full attention).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time

import jax
import numpy as np

from jaxdeep.config import load_config
from jaxdeep.model import count_params, flops_per_token
from jaxdeep.train.loop import mesh_from_config
from jaxdeep.train.metrics import device_peak_flops
from jaxdeep.train.state import build_setup, init_train_state
from jaxdeep.train.step import batch_sharding, make_train_step


def bench(config: str, overrides: list[str], warmup: int, steps: int) -> dict:
    cfg = load_config(config, overrides)
    mesh, _ = mesh_from_config(cfg)
    setup = build_setup(cfg, mesh)
    state = init_train_state(setup)
    step_fn = make_train_step(setup)
    rng = np.random.default_rng(0)
    shape = (cfg.data.global_batch_size, cfg.data.seq_len + 1)
    batches = [
        jax.device_put(rng.integers(1, cfg.model.vocab_size, shape).astype(np.int32), batch_sharding(setup))
        for _ in range(4)
    ]
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batches[0])
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        state, metrics = step_fn(state, batches[i % 4])
    jax.block_until_ready(metrics)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        state, metrics = step_fn(state, batches[i % 4])
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = float(np.median(times))
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    flops = flops_per_token(cfg.model, cfg.data.seq_len) * tokens
    device = mesh.devices.flat[0]
    peak = device_peak_flops(device.device_kind, cfg.train.peak_tflops)
    n = mesh.devices.size
    stats = device.memory_stats() or {}
    return {
        **compiled_memory(step_fn, state, batches[0]),
        "overrides": " ".join(overrides),
        "device": device.device_kind,
        "devices": n,
        "params_b": count_params(cfg.model)["total"] / 1e9,
        "batch": cfg.data.global_batch_size,
        "seq": cfg.data.seq_len,
        "compile_s": round(compile_s, 1),
        "step_ms": round(1e3 * step_s, 2),
        "step_ms_spread": round(1e3 * (max(times) - min(times)), 2),
        "tokens_per_s": round(tokens / step_s),
        "tflops_per_device": round(flops / step_s / n / 1e12, 1),
        "mfu": round(flops / step_s / (peak * n), 4) if peak else None,
        "peak_mem_gib": round(stats.get("peak_bytes_in_use", 0) / 2**30, 1),
        "loss": float(metrics["loss"]),
    }


def compiled_memory(step_fn, state, batch) -> dict:
    """XLA's plan for the step: temporaries (activations saved for the backward plus workspace) and arguments."""
    try:
        analysis = step_fn.lower(state, batch).compile().memory_analysis()
    except Exception as e:  # not a jitted function, or a backend without the analysis
        print(f"no memory analysis: {type(e).__name__}: {e}", file=sys.stderr)
        return {}
    if analysis is None:
        return {}
    gib = 2**30
    return {
        "temp_gib": round(analysis.temp_size_in_bytes / gib, 3),
        "argument_gib": round(analysis.argument_size_in_bytes / gib, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--variant", action="append", default=[], help="space-separated overrides for one variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--json", help="append one JSON line per variant to this file")
    args = p.parse_args()
    rows = []
    for variant in args.variant or [""]:
        try:
            row = bench(args.config, shlex.split(variant), args.warmup, args.steps)
        except Exception as e:  # one failing variant (e.g. out of memory) must not hide the others
            row = {"overrides": variant, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n| variant | batch | step ms | tokens/s | TFLOP/s/dev | MFU | peak GiB | temp GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['overrides']} | error: {r['error'][:80]} |")
        else:
            print(
                f"| {r['overrides'] or '(config)'} | {r['batch']} | {r['step_ms']} | {r['tokens_per_s']} | "
                f"{r['tflops_per_device']} | {(format(r['mfu'], '.1%') if r['mfu'] else 'n/a')} | "
                f"{r['peak_mem_gib']} | {r.get('temp_gib', 'n/a')} |"
            )


if __name__ == "__main__":
    main()
