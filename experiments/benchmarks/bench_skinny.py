"""Benchmark the skinny matmul (kernels/skinny) against XLA's `x @ w` at decode shapes, in device time.

For each shape x [M, K] @ w [K, N] (bf16 by default): XLA's jitted `x @ w` and the Triton kernel (with its
float32 sum over the K splits; both jitted), timed as device time from a profiler trace
(`timing.device_seconds`: the summed durations of the kernels each call ran, no launch gaps). Each timed call
runs the product on R distinct (x, w) pairs, one after the other (unfused), R chosen so the weights of one call
hold at least 256 MiB (several times the L2 cache): every weight comes from HBM, as in decode, where each layer's
weights are evicted by the others'. Times are per product. Bandwidth is weight bytes / time; the ceiling printed
first is a plain float32 `a + 1.0` over 2 GiB (2 x bytes / time: read and write). A last column checks the
kernel's result against XLA's (relative Frobenius error; bf16 rounding gives a few 1e-3).

  python experiments/benchmarks/bench_skinny.py                                   # the decode table, bf16
  python experiments/benchmarks/bench_skinny.py --rows 1 --shapes 2048x2048,7168x2048 --out skinny.jsonl
  python experiments/benchmarks/bench_skinny.py --tune --rows 1                    # sweep launch configurations
  python experiments/benchmarks/bench_skinny.py --runner interpret --rows 1 --shapes 96x80 --no-copy  # CPU check

`--tune` times a small sweep of block sizes, splits, warps and stages around the default for each shape and
prints the best; put better values into kernels/skinny/launch.py.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from timing import device_seconds, median_seconds  # noqa: E402

from kernels.skinny import launch  # noqa: E402

ROWS = (1, 4, 16)
SHAPES = ((2048, 2048), (2048, 8192), (8192, 2048), (2048, 6144), (7168, 2048), (2048, 129280))
WEIGHT_BYTES_PER_CALL = 256 * 2**20
MAX_COPIES = 64
COPY_BYTES = 2 * 2**30


def copy_ceiling_tbps(timer) -> float:
    """Bandwidth of a float32 `a + 1.0` over COPY_BYTES: 2 x bytes (read and write) / device time."""
    a = jnp.zeros((COPY_BYTES // 4,), jnp.float32)
    seconds = timer(jax.jit(lambda a: a + 1.0), a)
    del a
    return 2 * COPY_BYTES / seconds / 1e12


def make_operands(m, k, n, dtype, copies, seed=0):
    key = jax.random.key(seed)
    xs, ws = [], []
    for i in range(copies):
        kx, kw = jax.random.split(jax.random.fold_in(key, i))
        xs.append(jax.random.normal(kx, (m, k), jnp.float32).astype(dtype))
        ws.append((jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype))
    return xs, ws


def per_product(fn):
    """fn(x, w) applied to each of R pairs in one jitted call, one after the other: an optimization barrier ties
    each x to the previous product, so XLA cannot fuse the R products' kernels into fewer, larger ones."""

    def run(xs, ws):
        outs = []
        for x, w in zip(xs, ws, strict=True):
            if outs:
                x, _ = jax.lax.optimization_barrier((x, outs[-1]))
            outs.append(fn(x, w))
        return outs

    return jax.jit(run)


def kernel_fn(runner, config=None):
    return lambda x, w: launch.skinny_matmul(x, w, runner=runner, config=config)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def tune_candidates(m, k, n, itemsize):
    base = launch.default_config(m, k, n, itemsize, launch.num_sms())
    seen = {base}
    yield base
    for block_n in (64, 128, 256):
        for tile_bytes in (16 * 1024, 32 * 1024, 64 * 1024):
            block_k = max(16, tile_bytes // (block_n * itemsize))
            for split in sorted({max(1, base.split_k // 2), base.split_k, base.split_k * 2}):
                for warps, stages in ((4, 2), (4, 3), (8, 3), (4, 4)):
                    cfg = launch.make_config(
                        m, k, block_n, block_k, split, itemsize=itemsize, num_warps=warps, num_stages=stages
                    )
                    smem = stages * (cfg.block_k * block_n + cfg.block_m * cfg.block_k) * itemsize
                    if cfg not in seen and smem <= 200 * 1024:
                        seen.add(cfg)
                        yield cfg


def tune(m, k, n, dtype, runner, timer, calls):
    copies = min(MAX_COPIES, max(1, -(-WEIGHT_BYTES_PER_CALL // (k * n * jnp.dtype(dtype).itemsize))))
    xs, ws = make_operands(m, k, n, dtype, copies, seed=1)
    results, wbytes = [], k * n * jnp.dtype(dtype).itemsize
    for cfg in tune_candidates(m, k, n, jnp.dtype(dtype).itemsize):
        try:
            t = timer(per_product(kernel_fn(runner, cfg)), xs, ws, calls=calls) / copies
        except Exception as e:  # Triton out of resources and the like: skip the configuration
            print(f"  {cfg}: failed ({type(e).__name__})")
            continue
        results.append((t, cfg))
    if not results:
        print(f"\n## tune {m}x{k}x{n}: no configuration ran")
        return results
    base = launch.default_config(m, k, n, jnp.dtype(dtype).itemsize, launch.num_sms())
    default = next((f"{t * 1e6:.2f} us ({wbytes / t / 1e12:.2f} TB/s)" for t, c in results if c == base), "failed")
    results.sort(key=lambda r: r[0])
    print(f"\n## tune {m}x{k}x{n}: default {default}, best:")
    for t, cfg in results[:5]:
        print(f"  {t * 1e6:8.2f} us  {wbytes / t / 1e12:5.2f} TB/s  {cfg}")
    return results


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=",".join(map(str, ROWS)), help="comma-separated M values")
    p.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES), help="comma-separated KxN")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--calls", type=int, default=20, help="calls traced per measurement")
    p.add_argument("--tune", action="store_true", help="sweep launch configurations for each shape first")
    p.add_argument("--no-copy", action="store_true", help="skip the 2 GiB copy ceiling")
    p.add_argument("--out", help="append one JSON line per shape to this file")
    p.add_argument("--runner", default="triton", choices=["triton", "interpret"], help="interpret: check the "
                   "script on a CPU with small shapes (wall-clock times there, meaning nothing)")  # fmt: skip
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    rows = [int(r) for r in args.rows.split(",")]
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    if args.runner == "triton":
        timer = device_seconds
    else:  # no GPU trace on a CPU: wall clock, only to exercise the script
        timer = lambda fn, *a, calls=20: median_seconds(fn, *a, reps=1, warmup=1, inner=1)

    import triton

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({launch.num_sms()} SMs); jax {jax.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}")  # fmt: skip
    ceiling = None if args.no_copy else copy_ceiling_tbps(timer)
    if ceiling is not None:
        print(f"copy ceiling (f32 a + 1.0 over {COPY_BYTES / 2**30:.0f} GiB): {ceiling:.2f} TB/s")
    print("\n| M | K | N | weight MiB | XLA us | kernel us | kernel TB/s | XLA TB/s | speed-up | config | err |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for k, n in shapes:
        for m in rows:
            wbytes = k * n * dtype.itemsize
            copies = min(MAX_COPIES, max(1, -(-WEIGHT_BYTES_PER_CALL // wbytes)))
            if args.tune:
                tune(m, k, n, dtype, args.runner, timer, args.calls)
            xs, ws = make_operands(m, k, n, dtype, copies)
            xla = per_product(lambda x, w: x @ w)
            kernel = per_product(kernel_fn(args.runner))
            t_xla = timer(xla, xs, ws, calls=args.calls) / copies
            t_kernel = timer(kernel, xs, ws, calls=args.calls) / copies
            err = rel_err(kernel(xs[:1], ws[:1])[0], xla(xs[:1], ws[:1])[0])
            cfg = launch.default_config(m, k, n, dtype.itemsize, launch.num_sms())
            cfg_s = f"{cfg.block_n}x{cfg.block_k} split {cfg.split_k} w{cfg.num_warps} s{cfg.num_stages}"
            print(f"| {m} | {k} | {n} | {wbytes / 2**20:.1f} | {t_xla * 1e6:.2f} | {t_kernel * 1e6:.2f} | "
                  f"{wbytes / t_kernel / 1e12:.2f} | {wbytes / t_xla / 1e12:.2f} | {t_xla / t_kernel:.2f}x | {cfg_s} | "
                  f"{err:.1e} |", flush=True)  # fmt: skip
            if args.out:
                record = dict(
                    bench="skinny", device=dev.device_kind, dtype=dtype.name, m=m, k=k, n=n, weight_bytes=wbytes,
                    copies=copies, xla_us=t_xla * 1e6, kernel_us=t_kernel * 1e6,
                    kernel_tbps=wbytes / t_kernel / 1e12, xla_tbps=wbytes / t_xla / 1e12,
                    speedup=t_xla / t_kernel, copy_tbps=ceiling, config=cfg_s, rel_err=err,
                    runner=args.runner, timing="device" if args.runner == "triton" else "wall", time=time.time(),
                    jax=jax.__version__, triton=triton.__version__,
                )  # fmt: skip
                with open(args.out, "a") as f:
                    f.write(json.dumps(record) + "\n")
            del xs, ws


if __name__ == "__main__":
    main()
