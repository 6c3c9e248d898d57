"""Benchmark the Triton grouped matmul (kernels/gmm) against `jax.lax.ragged_dot` and a dense batched GEMM.

For each shape and group-size distribution, in one run: `ragged_dot` forward and backward (both gradients),
the Triton kernels forward, input gradient, weight gradient and backward (both gradients), and a dense
batched einsum [E, T/E, D] x [E, D, F] with the same FLOPs as the ceiling the card reaches on plain GEMMs.
FLOPs count only routed rows: forward 2 * rows * D * F, each gradient the same again. Times are medians of
several calls after warm-up (each call is milliseconds, so launch overhead drops out).

Shapes:
  anchor: E=64 experts, T=65536 rows, D=2048, F=1408 (ANCHORS.md: ragged_dot 11 TFLOP/s on an H100)
  dsv3:   DeepSeek-V3 experts, E=256, D=7168, F=2048, rows = tokens x top-8 (--dsv3-tokens, default 16384)
Group sizes: "equal", or "zipf" (expert i gets a share proportional to 1 / i^s, experts shuffled).

  python experiments/benchmarks/bench_gmm.py                          # both shapes, equal and zipf
  python experiments/benchmarks/bench_gmm.py --shapes anchor --dists zipf --zipf-s 1.5
  python experiments/benchmarks/bench_gmm.py --tune --shapes anchor     # sweep launch configurations first
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from timing import try_time  # noqa: E402

from kernels.gmm import launch  # noqa: E402

SHARED_MEMORY_BYTES = 227 * 1024  # per block on Hopper


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    groups: int
    rows: int
    d: int
    f: int


def shapes(names: list[str], dsv3_tokens: int) -> list[Shape]:
    known = {
        "anchor": Shape("anchor", 64, 65536, 2048, 1408),
        "dsv3": Shape(f"dsv3 ({dsv3_tokens} tokens x top-8)", 256, dsv3_tokens * 8, 7168, 2048),
        "tiny": Shape("tiny", 8, 256, 64, 48),  # checks the script itself (with --runner interpret on a CPU)
    }
    return [known[n] for n in names]


def group_sizes(dist: str, groups: int, rows: int, zipf_s: float, seed: int = 0) -> np.ndarray:
    if dist == "equal":
        share = np.full(groups, 1.0 / groups)
    else:
        share = 1.0 / np.arange(1, groups + 1) ** zipf_s
        share = np.random.default_rng(seed).permutation(share / share.sum())
    exact = share * rows
    sizes = np.floor(exact).astype(np.int64)
    remainder = rows - int(sizes.sum())
    sizes[np.argsort(exact - sizes)[::-1][:remainder]] += 1
    return sizes.astype(np.int32)


def make_operands(shape: Shape, dtype, seed: int = 0):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    lhs = jax.random.normal(k1, (shape.rows, shape.d), jnp.float32).astype(dtype)
    rhs = (jax.random.normal(k2, (shape.groups, shape.d, shape.f), jnp.float32) / np.sqrt(shape.d)).astype(dtype)
    dout = jax.random.normal(k3, (shape.rows, shape.f), jnp.float32).astype(dtype)
    return lhs, rhs, dout


def candidate_configs(itemsize: int) -> list[launch.GemmConfig]:
    """Tile shapes x warps x stages that fit in shared memory (about 35 for bf16)."""
    out = []
    block_ks = (64, 128) if itemsize < 4 else (32, 64)
    for bm, bn, bk, warps, stages in itertools.product((64, 128), (128, 256), block_ks, (4, 8), (3, 4, 5)):
        smem = stages * (bm * bk + bk * bn) * itemsize
        if smem > SHARED_MEMORY_BYTES or (bm * bn >= 128 * 256 and warps < 8):
            continue
        out.append(launch.GemmConfig(bm, bn, bk, group_m=8, num_warps=warps, num_stages=stages))
    return out


def kernel_fns(groups: int, runner: str):
    return {
        "fwd": lambda cfg: jax.jit(lambda a, b, gs, d: launch.gmm_fwd(a, b, gs, config=cfg, runner=runner)),
        "dlhs": lambda cfg: jax.jit(lambda a, b, gs, d: launch.gmm_dlhs(d, b, gs, config=cfg, runner=runner)),
        "drhs": lambda cfg: jax.jit(lambda a, b, gs, d: launch.gmm_drhs(a, d, gs, groups, config=cfg, runner=runner)),
    }


def tune(shape: Shape, sizes: np.ndarray, dtype, reps: int, runner: str) -> None:
    """Sweep tile shapes, warps and stages per kernel; then, for the three best, the grid size and band height."""
    lhs, rhs, dout = make_operands(shape, dtype)
    gs = jnp.asarray(sizes)
    flops = 2.0 * int(sizes.sum()) * shape.d * shape.f
    print(f"\n## tune: {shape.name}, {jnp.dtype(dtype).name}, max group {sizes.max()} rows")
    sms = launch.num_sms() if runner == "triton" else launch.DEFAULT_NUM_SMS

    def sweep(kind, make, configs):
        results = []
        for cfg in configs:
            t = try_time(make(cfg), lhs, rhs, gs, dout, reps=reps)
            results.append((t, cfg))
            label = f"{t * 1e3:8.3f} ms {flops / t / 1e12:7.1f} TFLOP/s" if isinstance(t, float) else t
            print(f"{kind:5s} {cfg}  {label}", flush=True)
        return sorted(((t, c) for t, c in results if isinstance(t, float)), key=lambda r: r[0])

    for kind, make in kernel_fns(shape.groups, runner).items():
        ok = sweep(kind, make, candidate_configs(jnp.dtype(dtype).itemsize))
        # 1 << 30 programs: one per work item (the grid is capped at the item count), i.e. not persistent
        variants = [
            dataclasses.replace(cfg, programs=programs, group_m=group_m)
            for _, cfg in ok[:3]
            for programs, group_m in ((2 * sms, 8), (1 << 30, 8), (None, 4), (None, 16))
        ]
        ok = sorted(ok + sweep(kind, make, variants), key=lambda r: r[0])
        if ok:
            print(f"best {kind}: {ok[0][1]}  {flops / ok[0][0] / 1e12:.1f} TFLOP/s")


def run(shape: Shape, dist: str, sizes: np.ndarray, dtype, reps: int, skip_reference: bool, runner: str) -> list:
    lhs, rhs, dout = make_operands(shape, dtype)
    gs = jnp.asarray(sizes)
    flops = 2.0 * int(sizes.sum()) * shape.d * shape.f

    def ragged(a, b, gs):
        return jax.lax.ragged_dot(a, b, gs)

    def ragged_bwd(a, b, gs, d):
        _, vjp = jax.vjp(lambda a, b: ragged(a, b, gs), a, b)
        return vjp(d)

    def kernel_bwd(a, b, gs, d):
        return launch.gmm_dlhs(d, b, gs, runner=runner), launch.gmm_drhs(a, d, gs, shape.groups, runner=runner)

    per_group = shape.rows // shape.groups
    dense_a = lhs[: per_group * shape.groups].reshape(shape.groups, per_group, shape.d)
    dense = jax.jit(lambda a, b: jnp.einsum("etd,edf->etf", a, b))
    dense_flops = 2.0 * per_group * shape.groups * shape.d * shape.f

    operands = (lhs, rhs, gs, dout)
    rows = []
    if not skip_reference:
        rows.append(("ragged_dot", "fwd", flops, try_time(jax.jit(ragged), lhs, rhs, gs, reps=reps)))
        bwd = try_time(jax.jit(ragged_bwd), *operands, reps=reps)
        rows.append(("ragged_dot", "bwd (both grads)", 2 * flops, bwd))
    rows.append(("dense einsum", "fwd", dense_flops, try_time(dense, dense_a, rhs, reps=reps)))
    fns = kernel_fns(shape.groups, runner)
    for kind in ("fwd", "dlhs", "drhs"):
        rows.append(("triton", kind, flops, try_time(fns[kind](None), *operands, reps=reps)))
    rows.append(("triton", "bwd (both grads)", 2 * flops, try_time(jax.jit(kernel_bwd), *operands, reps=reps)))
    print(f"\n## {shape.name}, {dist} groups (largest {sizes.max()} rows, {int((sizes == 0).sum())} empty), "
          f"{jnp.dtype(dtype).name}")  # fmt: skip
    print("| impl | pass | time | TFLOP/s |\n|---|---|---|---|")
    for impl, what, fl, t in rows:
        if isinstance(t, float):
            print(f"| {impl} | {what} | {t * 1e3:.3f} ms | {fl / t / 1e12:.1f} |")
        else:
            print(f"| {impl} | {what} | {t} | |")
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="anchor,dsv3", help="comma-separated: anchor, dsv3")
    p.add_argument("--dists", default="equal,zipf", help="comma-separated: equal, zipf")
    p.add_argument("--zipf-s", type=float, default=1.2, help="Zipf exponent of the skewed group sizes")
    p.add_argument("--dsv3-tokens", type=int, default=16384, help="tokens routed (top-8) in the dsv3 shape")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--reps", type=int, default=10, help="timed calls per measurement (median)")
    p.add_argument("--skip-reference", action="store_true", help="leave out ragged_dot (slow, and its backward "
                   "may not fit in memory at the dsv3 shape)")  # fmt: skip
    p.add_argument("--tune", action="store_true", help="sweep block sizes, warps and stages for each kernel")
    p.add_argument("--runner", default="triton", choices=["triton", "interpret"], help="interpret: check the "
                   "script on a CPU with --shapes tiny (times mean nothing there)")  # fmt: skip
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)

    import triton

    if args.runner == "triton":
        import jax_triton

        versions = f"triton {triton.__version__}, jax-triton {jax_triton.__version__}"
    else:
        versions = f"triton {triton.__version__} (interpreter)"
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({launch.num_sms()} SMs); jax {jax.__version__}, {versions}, "
          f"python {platform.python_version()}")  # fmt: skip
    for shape in shapes(args.shapes.split(","), args.dsv3_tokens):
        for dist in args.dists.split(","):
            sizes = group_sizes(dist, shape.groups, shape.rows, args.zipf_s)
            if args.tune:
                tune(shape, sizes, dtype, reps=max(3, args.reps // 2), runner=args.runner)
            run(shape, dist, sizes, dtype, args.reps, args.skip_reference, args.runner)


if __name__ == "__main__":
    main()
