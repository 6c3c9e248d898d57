"""Where a training step's GPU time goes: kernel time per category (GEMMs, FP8 quantisers, attention, fusions)
and the top kernels, from a profiler trace of a few steps, for each variant of an experiment config.

    python experiments/benchmarks/profile_train_step.py experiments/dense_1b.yaml \\
        --variant "precision.matmul=bf16 data.global_batch_size=8" \\
        --variant "precision.matmul=fp8 kernels.fp8=auto data.global_batch_size=8"

Times are kernel durations summed per step (two kernels on two streams at once both count), so "busy" here can
exceed `timing.device_seconds`; the profiler also slows short kernels slightly. GPU only.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import timing  # noqa: E402  (experiments/benchmarks/timing.py, next to this script)

from jaxdeep.config import load_config  # noqa: E402
from jaxdeep.train.loop import mesh_from_config  # noqa: E402
from jaxdeep.train.state import build_setup, init_train_state  # noqa: E402
from jaxdeep.train.step import batch_sharding, make_train_step  # noqa: E402


def category(kernel: str) -> str:
    name = kernel.lower()
    if "mosaic" in name or "scaled_matmul" in name:
        return "fp8 gemm"
    if "quant" in name:
        return "fp8 quantise"
    if any(word in name for word in ("gemm", "cutlass", "cublas", "matmul", "dot", "xmma", "nvjet")):
        return "gemm (xla/cublas/triton)"
    if any(word in name for word in ("flash", "attention", "fmha", "sdpa")):
        return "attention"
    if "transpose" in name or "copy" in name:
        return "transpose/copy"
    if "reduce" in name:
        return "reduce fusions"
    if "fusion" in name or "loop" in name:
        return "elementwise fusions"
    return "other"


def profile(config: str, overrides: list[str], steps: int, top: int) -> None:
    cfg = load_config(config, overrides)
    mesh, _ = mesh_from_config(cfg)
    setup = build_setup(cfg, mesh)
    box = {"state": init_train_state(setup)}
    step_fn = make_train_step(setup)
    shape = (cfg.data.global_batch_size, cfg.data.seq_len + 1)
    tokens = np.random.default_rng(0).integers(1, cfg.model.vocab_size, shape)
    batch = jax.device_put(tokens.astype(np.int32), batch_sharding(setup))

    def step():
        box["state"], metrics = step_fn(box["state"], batch)
        return metrics

    jax.block_until_ready(step())  # one more warm step than gpu_events takes
    first_gpu = dict([next(iter(timing.gpu_events(step, calls=steps).items()))])
    totals = timing.kernel_totals(first_gpu, steps)
    by_category, by_kernel = collections.Counter(), collections.Counter()
    for name, (ns, _) in totals.items():
        by_category[category(name)] += ns / 1e6
        by_kernel[name] += ns / 1e6
    print(f"## {' '.join(overrides) or 'as configured'}: {sum(by_category.values()):.1f} ms of kernels per step, "
          f"{sum(count for _, count in totals.values())} kernels")  # fmt: skip
    for name, ms in by_category.most_common():
        print(f"| {name} | {ms:.2f} ms |")
    for name, ms in by_kernel.most_common(top):
        print(f"|   {name[:100]} | {ms:.2f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--variant", action="append", default=[], help="space-separated overrides for one variant")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per variant")
    parser.add_argument("--top", type=int, default=25, help="kernels listed per variant")
    args = parser.parse_args()
    for variant in args.variant or [""]:
        profile(args.config, variant.split(), args.steps, args.top)


if __name__ == "__main__":
    main()
