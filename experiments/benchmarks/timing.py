"""Timing jitted device work for the benchmark scripts in this folder (run as scripts, so `import timing` works).

`median_seconds` queues `inner` calls back to back and synchronises once per sample, so host dispatch and the
synchronisation gap stay out of kernels that take well under a millisecond; the median over `reps` samples
drops clock dips."""

from __future__ import annotations

import statistics
import time

import jax


def median_seconds(fn, *args, reps: int, warmup: int = 2, inner: int = 10) -> float:
    """Median over `reps` samples of the mean seconds of one call of `fn(*args)`."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def try_time(fn, *args, reps: int, warmup: int = 2, inner: int = 10) -> float | str:
    """Seconds, or a one-line reason when the call cannot run (for example out of memory)."""
    try:
        return median_seconds(fn, *args, reps=reps, warmup=warmup, inner=inner)
    except Exception as e:  # XLA and Triton errors alike: the row says why
        return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
