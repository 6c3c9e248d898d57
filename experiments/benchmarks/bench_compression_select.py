"""Cost of choosing which gradient entries to send: exact `lax.top_k` against the sampled threshold.

    python experiments/benchmarks/bench_compression_select.py --sizes 1048576 4194304 --ratios 0.05 0.01 0.001

Prints one JSON line per (size, ratio, method) with the median time over `--repeats` runs after a warm-up, beside
one elementwise pass over the same vector (a floor: any selection reads the vector at least once), and how close
the sampled selection came: its share of the exact top-k's total magnitude.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxdeep.optim.selection import k_for_ratio, select_exact, select_sampled


def _median_time(fn, *args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1 << 20, 1 << 22])
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.05, 0.01, 0.001])
    parser.add_argument("--sample-size", type=int, default=16384)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = jax.devices()[0]
    for n in args.sizes:
        x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
        key = jax.random.key(1)
        one_pass = _median_time(jax.jit(lambda v: v * 2.0), x, repeats=args.repeats)
        for ratio in args.ratios:
            k = k_for_ratio(ratio, n)
            exact = jax.jit(lambda v, k=k: select_exact(v, k))
            sampled = jax.jit(lambda v, key, k=k: select_sampled(v, k, key, args.sample_size))
            exact_mass = float(jnp.sum(jnp.abs(exact(x)[1])))
            sampled_mass = float(jnp.sum(jnp.abs(sampled(x, key)[1])))
            row = {
                "device": device.device_kind,
                "jax": jax.__version__,
                "n": n,
                "ratio": ratio,
                "k": k,
                "elementwise_ms": 1e3 * one_pass,
                "exact_ms": 1e3 * _median_time(exact, x, repeats=args.repeats),
                "sampled_ms": 1e3 * _median_time(sampled, x, key, repeats=args.repeats),
                "sampled_mass_share": sampled_mass / exact_mass,
            }
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
