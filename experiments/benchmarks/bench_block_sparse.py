"""Benchmark the Triton block-sparse matmul (kernels/block_sparse) against XLA's dense matmul.

For a shape A [M, K] x B [K, N] and each block size and density, in one run: XLA's dense matmul (forward, and
the backward as its two dense products), the reference path (blocks scattered into a dense B, then a dense
matmul; forward and backward), and the Triton kernels: forward, dA, dValues and the backward (dA + dValues).
The mask holds exactly round(density x blocks) blocks at random places.

Columns: time (median of --reps calls after warm-up), effective TFLOP/s (only the present blocks' FLOPs:
2 * M * bs^2 * nnz per product), and the speedup over the dense XLA pass doing the same job (the forward
against the dense forward; dA, dValues and the backward against the dense backward's share). The issue's target
on an H100/H200 at 8192^3 bf16, block size 128: forward >= 5x at density 0.1, >= 1.6x at 0.5.

  python experiments/benchmarks/bench_block_sparse.py                      # 8192^3, bs 64 and 128, 4 densities
  python experiments/benchmarks/bench_block_sparse.py --tune --block-sizes 128 --densities 0.1,0.5
  python experiments/benchmarks/bench_block_sparse.py --shape 4096,8192,8192 --dtype float32
  python experiments/benchmarks/bench_block_sparse.py --runner interpret --tiny   # check the script on a CPU
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

from kernels.block_sparse import block_sparse_matmul, launch, layout_from_block_mask  # noqa: E402

SHARED_MEMORY_BYTES = 227 * 1024  # per block on Hopper


def random_block_mask(kb: int, nb: int, density: float, seed: int = 0) -> np.ndarray:
    count = int(round(density * kb * nb))
    mask = np.zeros(kb * nb, bool)
    mask[np.random.default_rng(seed).choice(kb * nb, count, replace=False)] = True
    return mask.reshape(kb, nb)


def fwd_configs(bs: int, itemsize: int) -> list[launch.Config]:
    """Product / dA sweep: rows per tile x reduction step x warps x stages that fit in shared memory."""
    out = []
    steps = sorted({min(bs, 64), bs} if itemsize < 4 else {32, 64})
    for bm, bk, warps, stages in itertools.product((64, 128, 256), steps, (4, 8), (3, 4, 5)):
        if bm == 256 and warps < 8:  # a 256-row accumulator needs 8 warps' registers
            continue
        if stages * (bm * bk + bk * bs) * itemsize <= SHARED_MEMORY_BYTES:
            out.append(launch.Config(block_m=bm, block_k=bk, group_m=8, num_warps=warps, num_stages=stages))
    return out


def dvalues_configs(bs: int, itemsize: int) -> list[launch.Config]:
    """dValues sweep: the tile is a whole block; block_m is the step over M."""
    out = []
    for bm, warps, stages in itertools.product((32, 64, 128), (4, 8), (3, 4, 5)):
        if stages * 2 * bm * bs * itemsize <= SHARED_MEMORY_BYTES:
            out.append(launch.Config(block_m=bm, num_warps=warps, num_stages=stages))
    return out


def kernel_fns(layout, runner: str):
    """Each kernel as a jitted fn(a, values, dout, config)."""

    def jit(f):
        return lambda cfg: jax.jit(lambda a, v, d: f(a, v, d, cfg))

    return {
        "fwd": jit(lambda a, v, d, cfg: launch.bsmm(a, layout, v, runner=runner, config=cfg)),
        "dA": jit(lambda a, v, d, cfg: launch.bsmm_da(d, layout, v, runner=runner, config=cfg)),
        "dValues": jit(lambda a, v, d, cfg: launch.bsmm_dvalues(a, d, layout, runner=runner, config=cfg)),
    }


@dataclasses.dataclass
class Case:
    m: int
    k: int
    n: int
    bs: int
    density: float
    dtype: jnp.dtype


def operands(case: Case, seed: int = 0):
    kb, nb = case.k // case.bs, case.n // case.bs
    layout = layout_from_block_mask(random_block_mask(kb, nb, case.density, seed), case.bs)
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    a = jax.random.normal(k1, (case.m, case.k), jnp.float32).astype(case.dtype)
    values = (jax.random.normal(k2, layout.values_shape, jnp.float32) / np.sqrt(case.k)).astype(case.dtype)
    dout = jax.random.normal(k3, (case.m, case.n), jnp.float32).astype(case.dtype)
    return layout, a, values, dout


def fmt(t, flops: float, dense_t) -> str:
    if not isinstance(t, float):
        return f"{t} | | |"
    speedup = f"{dense_t / t:.2f}x" if isinstance(dense_t, float) else ""
    return f"{t * 1e6:.0f} | {flops / t / 1e12:.1f} | {speedup} |"


def tune(case: Case, reps: int, runner: str) -> None:
    layout, a, values, dout = operands(case)
    flops = 2.0 * case.m * case.bs**2 * layout.nnz
    itemsize = jnp.dtype(case.dtype).itemsize
    print(f"\n## tune: bs {case.bs}, density {case.density}, {jnp.dtype(case.dtype).name}")
    for kind, make in kernel_fns(layout, runner).items():
        configs = dvalues_configs(case.bs, itemsize) if kind == "dValues" else fwd_configs(case.bs, itemsize)
        results = []
        for cfg in configs:
            t = try_time(make(cfg), a, values, dout, reps=reps)
            results.append((t, cfg))
            label = f"{t * 1e6:8.0f} us {flops / t / 1e12:7.1f} TFLOP/s" if isinstance(t, float) else t
            print(f"{kind:7s} {cfg}  {label}", flush=True)
        ok = sorted(((t, c) for t, c in results if isinstance(t, float)), key=lambda x: x[0])
        if ok:
            print(f"best {kind}: {ok[0][1]}  {ok[0][0] * 1e6:.0f} us, {flops / ok[0][0] / 1e12:.1f} TFLOP/s")


def run(case: Case, dense: dict, reps: int, skip_reference: bool, runner: str) -> None:
    layout, a, values, dout = operands(case)
    flops = 2.0 * case.m * case.bs**2 * layout.nnz
    impl = "interpret" if runner == "interpret" else "triton"

    def bwd(impl):
        def f(a, v, d):
            _, vjp = jax.vjp(lambda a, v: block_sparse_matmul(a, layout, v, impl=impl), a, v)
            return vjp(d)

        return jax.jit(f)

    rows = []
    if not skip_reference:
        ref = jax.jit(lambda a, v, d: block_sparse_matmul(a, layout, v, impl="reference"))
        ref_bwd = try_time(bwd("reference"), a, values, dout, reps=reps)
        rows.append(("reference", "fwd", flops, try_time(ref, a, values, dout, reps=reps), dense["fwd"]))
        rows.append(("reference", "bwd", 2 * flops, ref_bwd, dense["bwd"]))
    half_bwd = dense["bwd"] / 2 if isinstance(dense["bwd"], float) else dense["bwd"]
    for kind, make in kernel_fns(layout, runner).items():
        t = try_time(make(None), a, values, dout, reps=reps)
        rows.append(("triton", kind, flops, t, dense["fwd"] if kind == "fwd" else half_bwd))
    kernel_bwd = try_time(bwd(impl), a, values, dout, reps=reps)
    rows.append(("triton", "bwd (dA + dValues, custom_vjp)", 2 * flops, kernel_bwd, dense["bwd"]))
    print(f"\n## bs {case.bs}, density {case.density} ({layout.nnz} of {np.prod(layout.block_shape)} blocks), "
          f"{case.m}x{case.k}x{case.n} {jnp.dtype(case.dtype).name}")  # fmt: skip
    print("| impl | pass | µs | effective TFLOP/s | speedup vs dense XLA |\n|---|---|---|---|---|")
    for impl_name, what, fl, t, dense_t in rows:
        print(f"| {impl_name} | {what} | {fmt(t, fl, dense_t)}", flush=True)
    print(f"check: forward relative error vs the reference {forward_error(layout, a, values, impl):.1e}")


def forward_error(layout, a, values, impl: str) -> float:
    """Relative Frobenius error of the kernel's forward against the reference (both round to the dtype)."""
    got = block_sparse_matmul(a, layout, values, impl=impl, preferred_element_type=jnp.float32)
    want = block_sparse_matmul(a, layout, values, impl="reference", preferred_element_type=jnp.float32)
    return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def time_dense(m: int, k: int, n: int, dtype, reps: int) -> dict:
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(1), 3)
    a = jax.random.normal(k1, (m, k), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (k, n), jnp.float32).astype(dtype)
    d = jax.random.normal(k3, (m, n), jnp.float32).astype(dtype)
    fwd = try_time(jax.jit(jnp.dot), a, b, reps=reps)
    bwd = try_time(jax.jit(lambda a, b, d: jax.vjp(jnp.dot, a, b)[1](d)), a, b, d, reps=reps)
    flops = 2.0 * m * k * n
    print(f"\n## XLA dense {m}x{k}x{n} {jnp.dtype(dtype).name}")
    print("| impl | pass | µs | TFLOP/s |\n|---|---|---|---|")
    for what, t, fl in (("fwd", fwd, flops), ("bwd (dA + dB)", bwd, 2 * flops)):
        cells = f"{t * 1e6:.0f} | {fl / t / 1e12:.1f} |" if isinstance(t, float) else f"{t} | |"
        print(f"| xla dense | {what} | {cells}")
    return {"fwd": fwd, "bwd": bwd}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="8192,8192,8192", help="M,K,N")
    p.add_argument("--densities", default="0.1,0.25,0.5,1.0", help="comma-separated fractions of blocks present")
    p.add_argument("--block-sizes", default="64,128", help="comma-separated: 64, 128")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=20, help="timed calls per measurement (median)")
    p.add_argument("--skip-reference", action="store_true", help="leave out the reference (scatter + dense) path")
    p.add_argument("--tune", action="store_true", help="sweep rows per tile, reduction step, warps and stages first")
    p.add_argument("--runner", default="triton", choices=["triton", "interpret"], help="interpret: check the "
                   "script on a CPU with --tiny (times mean nothing there)")  # fmt: skip
    p.add_argument("--tiny", action="store_true", help="a tiny shape (64x256x256, bs 64, one rep) to check the script")
    args = p.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    m, k, n = (int(x) for x in args.shape.split(","))
    block_sizes = [int(x) for x in args.block_sizes.split(",")]
    reps = args.reps
    if args.tiny:
        m, k, n, block_sizes, reps = 64, 256, 256, [64], 1

    import triton

    if args.runner == "triton":
        import jax_triton

        versions = f"triton {triton.__version__}, jax-triton {jax_triton.__version__}"
    else:
        versions = f"triton {triton.__version__} (interpreter)"
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind}; jax {jax.__version__}, {versions}, python {platform.python_version()}")
    dense = time_dense(m, k, n, dtype, reps)
    for bs in block_sizes:
        for density in (float(x) for x in args.densities.split(",")):
            case = Case(m, k, n, bs, density, dtype)
            if args.tune:
                tune(case, reps=max(3, reps // 2), runner=args.runner)
            run(case, dense, reps, args.skip_reference, args.runner)


if __name__ == "__main__":
    main()
