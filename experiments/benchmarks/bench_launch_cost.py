"""Host time of a jax-triton kernel launch inside a jitted program, against an XLA kernel of the same size.

One jitted program chains `--ops` tiny RMSNorms over a [1, 2048] bf16 row: once as XLA fusions (each kept apart
by an optimization barrier) and once as the fused Triton kernel (`kernels.norms`). For each: the host's time per
call (what a decode step waits for when its kernels are this small) and the GPU's busy time per call (the sum of
its kernels' durations, `timing.device_seconds`). XLA records its kernels into command buffers (CUDA graphs);
a jax-triton custom call is launched from the host each time.

    python experiments/benchmarks/bench_launch_cost.py --ops 100
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import device_seconds  # noqa: E402

from kernels.norms import launch  # noqa: E402


def xla_rms_norm(x):
    ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axis=-1, keepdims=True)
    return jax.lax.optimization_barrier((x * jax.lax.rsqrt(ms + 1e-6)).astype(x.dtype))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=100, help="kernels chained in one program")
    p.add_argument("--calls", type=int, default=20)
    args = p.parse_args()
    if jax.default_backend() != "gpu":
        print("no GPU: nothing to time", file=sys.stderr)
        return 1
    x = jax.random.normal(jax.random.key(0), (1, 2048), jnp.bfloat16)
    scale = jnp.ones((2048,), jnp.float32)
    steps = {
        "xla": xla_rms_norm,
        "jax-triton": lambda x: launch.rms_norm_fwd(x, None, scale, eps=1e-6)[0],
    }
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, {args.ops} kernels per program")
    for name, step in steps.items():

        def chain(x, step=step):
            for _ in range(args.ops):
                x = step(x)
            return x

        program = jax.jit(chain)
        program(x).block_until_ready()
        times = []
        for _ in range(args.calls):
            t0 = time.perf_counter()
            program(x).block_until_ready()
            times.append(time.perf_counter() - t0)
        host = statistics.median(times)
        busy = device_seconds(program, x, calls=args.calls)
        print(
            f"{name:10s} host {host * 1e6:7.0f} µs per call ({host / args.ops * 1e6:5.1f} per kernel), "
            f"GPU busy {busy * 1e6:6.0f} µs ({busy / args.ops * 1e6:5.2f} per kernel)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
