"""Benchmark the FP8 Triton kernels (kernels/fp8): block-scaled GEMM, quantisers and the grouped GEMM.

In one run:
- GEMM, per shape [M, K] x [K, N]: XLA's bf16 `jnp.dot`; XLA's own FP8 dot (`jnp.dot` of E4M3 operands with a
  float32 result: no scales at all, so a ceiling rather than a competitor); our pure-JAX `scaled_matmul`
  reference under jit; our Triton `scaled_matmul` with the weight K-major ([N, K], the layout the FP8 tensor
  cores take, what `fp8_linear` uses) and with the weight read as stored ([K, N], N-major), scaling included;
  on Hopper also the Pallas Mosaic GPU kernel (`kernels/fp8/mosaic_gemm.py`), weight K-major, where shapes tile;
  with `--cublas`, cuBLAS's block-scaled FP8 GEMM through PyTorch (the peers' kernel) on the same card.
  Shapes: 8192^3, and DeepSeek-V3 layers for M = 4096 and 16384 tokens.
- Quantisers on [M, K] activations / [K, N] weights: TB/s of bytes read + written, against a copy kernel
  (XLA, uint8 x + 1) moving the same number of bytes.
- Grouped GEMM (MoE experts, E=64, T=65536, D=2048, F=1408, equal groups): FP8 `scaled_gmm` (rhs K-major and
  as stored) against the bf16 Triton grouped GEMM of kernels/gmm.
- Grouped weight gradient (`grouped_wgrad`, the same shape, skewed groups too): the bf16 Triton kernel of
  kernels/gmm (`gmm_drhs`) alone, and with its FP8-rounded operands prepared by XLA or by the Triton quantisers.
Times are medians of several samples after warm-up, each sample the mean of back-to-back calls synchronised
once with `jax.block_until_ready`.

  python experiments/benchmarks/bench_fp8.py                           # everything, default launch configs
  python experiments/benchmarks/bench_fp8.py --sections gemm --tune    # sweep GEMM tiles, warps, stages first
  python experiments/benchmarks/bench_fp8.py --tiny --runner interpret # check the script on a CPU
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

import timing  # noqa: E402  (experiments/benchmarks/timing.py, next to this script)

from kernels import fp8  # noqa: E402
from kernels.fp8 import launch, mosaic_gemm, reference  # noqa: E402
from kernels.gmm import launch as gmm_launch  # noqa: E402

E4M3 = jnp.float8_e4m3fn
BF16, F32 = jnp.bfloat16, jnp.float32
SHARED_MEMORY_BYTES = 227 * 1024  # per block on Hopper
TIMING = {"warmup": 2, "inner": 10}  # one each under the interpreter (see main)
CLOCK = {"clock": "wall"}  # "device": the GPU's busy time from a profiler trace (timing.device_seconds)


# ----------------------------------------------------------------------------------------------------
# Timing (experiments/benchmarks/timing.py; one warm-up and one call per sample under the interpreter)
# ----------------------------------------------------------------------------------------------------
def try_time(fn, *args, reps: int) -> float | str:
    return timing.try_time(fn, *args, reps=reps, device=CLOCK["clock"] == "device", **TIMING)


def rate(amount: float, t, unit: float) -> str:
    return f"{amount / t / unit:.1f}" if isinstance(t, float) else ""


def print_rows(title: str, header: str, rows) -> None:
    print(f"\n## {title}\n| {header} |\n|{'---|' * (header.count('|') + 1)}")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |", flush=True)


def ms(t) -> str:
    return f"{t * 1e3:.3f} ms" if isinstance(t, float) else t


# ----------------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Gemm:
    name: str
    m: int
    k: int
    n: int


def gemm_shapes(tiny: bool) -> list[Gemm]:
    if tiny:
        return [Gemm("tiny", 256, 384, 256), Gemm("tiny kv_a (N=576 / 4)", 128, 256, 144)]
    layers = [  # DeepSeek-V3: (name, K, N)
        ("q_a 7168->1536", 7168, 1536),
        ("kv_a 7168->576", 7168, 576),  # N not a multiple of 128: the last column tile is masked
        ("o_proj 16384->7168", 16384, 7168),
        ("mlp up 7168->18432", 7168, 18432),
        ("mlp down 18432->7168", 18432, 7168),
        ("expert up 7168->2048", 7168, 2048),
        ("expert down 2048->7168", 2048, 7168),
    ]
    out = [Gemm("8192^3", 8192, 8192, 8192)]
    for m in (4096, 16384):
        out += [Gemm(f"{name}, M={m}", m, k, n) for name, k, n in layers]
    return out


def gemm_operands(g: Gemm, seed: int = 0):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    x = jax.random.normal(k1, (g.m, g.k), F32).astype(BF16)
    w = (jax.random.normal(k2, (g.k, g.n), F32) / np.sqrt(g.k)).astype(BF16)
    xq, xs = fp8.quantize_tiles(x)
    wq, ws = fp8.quantize_blocks(w)
    return x, w, xq, xs, wq, ws, jnp.asarray(wq.T)


# ----------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------
def bench_gemm(shapes, runner: str, reps: int, skip_reference: bool, config=None, cublas: bool = False) -> None:
    print_rows("GEMM (bf16 output; scaling included for scaled_matmul)", "shape | impl | time | TFLOP/s", [])
    for g in shapes:
        x, w, xq, xs, wq, ws, wq_t = gemm_operands(g)
        flops = 2.0 * g.m * g.n * g.k
        fns = [
            ("xla bf16 dot", jax.jit(lambda x, w: jnp.dot(x, w)), (x, w)),
            (
                "xla fp8 dot (no scaling)",
                jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=F32)),
                (xq, wq),
            ),
        ]
        if not skip_reference:
            fns.append(("reference scaled_matmul (jit)", jax.jit(reference.scaled_matmul), (xq, xs, wq, ws)))
        kmajor = lambda *a: launch.scaled_matmul_nt(*a, BF16, runner=runner, config=config)  # noqa: E731
        nmajor = lambda *a: launch.scaled_matmul(*a, BF16, runner=runner, config=config)  # noqa: E731
        fns.append(("triton scaled_matmul, w K-major", jax.jit(kmajor), (xq, xs, wq_t, ws)))
        if runner == "triton" and fp8.mosaic_unavailable_reason() is None and mosaic_gemm.supported(g.m, g.n, g.k):
            mosaic = lambda *a: mosaic_gemm.scaled_matmul_nt(*a, BF16)  # noqa: E731
            fns.append(("mosaic scaled_matmul, w K-major", jax.jit(mosaic), (xq, xs, wq_t, ws)))
        fns.append(("triton scaled_matmul, w N-major", jax.jit(nmajor), (xq, xs, wq, ws)))
        for impl, fn, args in fns:
            t = try_time(fn, *args, reps=reps)
            print(f"| {g.name} | {impl} | {ms(t)} | {rate(flops, t, 1e12)} |", flush=True)  # row by row: long runs
        if cublas:
            try:
                t = cublas_block_scaled_seconds(g, reps)
            except Exception as err:  # a row that says why, not the end of a long run
                t = f"failed: {type(err).__name__}: {str(err)[:120]}"
            impl = "cuBLAS block-scaled (torch scaled_mm, CUDA events)"
            print(f"| {g.name} | {impl} | {ms(t)} | {rate(flops, t, 1e12)} |", flush=True)


def cublas_block_scaled_seconds(g: Gemm, reps: int) -> float:
    """cuBLAS's DeepSeek-style block-scaled FP8 GEMM (1 x 128 activation tiles, 128 x 128 weight blocks, bf16
    out) through PyTorch, the peer baseline on the same card. Timed with CUDA events around `reps` back-to-back
    calls: the GPU's time, as `--clock device` times ours."""
    import torch
    import torch.nn.functional as tf

    recipe = tf.ScalingType
    tiles = getattr(recipe, "BlockWise1x128", None) or recipe.Blockwise_1x128
    blocks = getattr(recipe, "BlockWise128x128", None) or recipe.Blockwise_128x128
    x = torch.randn(g.m, g.k, device="cuda").to(torch.float8_e4m3fn)
    w_t = torch.randn(g.n, g.k, device="cuda").to(torch.float8_e4m3fn)  # K-major: passed as its transpose
    x_scales = (torch.rand(g.m, -(-g.k // 128), device="cuda") + 0.5).t().contiguous().t()  # M-major, as cuBLAS wants
    k_blocks = -(-g.k // 128)
    padded = -(-k_blocks // 4) * 4  # cuBLAS wants the rows of the 128 x 128 scales padded to a multiple of 4
    w_scales = (torch.rand(-(-g.n // 128), padded, device="cuda") + 0.5)[:, :k_blocks].t()
    call = lambda: tf.scaled_mm(x, w_t.t(), x_scales, tiles, w_scales, blocks, output_dtype=torch.bfloat16)  # noqa: E731
    for _ in range(3):
        call()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(5):
        start.record()
        for _ in range(reps):
            call()
        end.record()
        torch.cuda.synchronize()
        samples.append(start.elapsed_time(end) / 1e3 / reps)
    return float(np.median(samples))


def bench_quantize(runner: str, reps: int, tiny: bool) -> None:
    m, k = (256, 384) if tiny else (16384, 7168)
    wk, wn = (384, 256) if tiny else (7168, 18432)
    x = jax.random.normal(jax.random.PRNGKey(1), (m, k), F32).astype(BF16)
    w = jax.random.normal(jax.random.PRNGKey(2), (wk, wn), F32) * 0.02
    xq, xs = fp8.quantize_tiles(x)
    scales = m * (-(-k // 128)) * 4
    run = dict(runner=runner)
    cases = [  # name, fn, args, bytes read + written
        ("quantize_rows (bf16 x)", lambda x: launch.quantize_rows(x, **run), (x,), m * k * 3 + scales),
        ("quantize_rows_and_cols (bf16 dy)", lambda x: launch.quantize_rows_and_cols(x, **run), (x,),
         m * k * 4 + 2 * scales),
        ("requantize_cols (fp8 x)", lambda q, s: launch.requantize_cols(q, s, **run), (xq, xs), m * k * 2 + 2 * scales),
        ("quantize_blocks_t (f32 w)", lambda w: launch.quantize_blocks(w, transposed=True, **run), (w,), wk * wn * 6),
        ("reference quantize_tiles (jit)", jax.jit(fp8.quantize_tiles), (x,), m * k * 3 + scales),
    ]  # fmt: skip
    copy = jax.jit(lambda a: a + jnp.uint8(1))
    rows = []
    for name, fn, args, nbytes in cases:
        t = try_time(jax.jit(fn), *args, reps=reps)
        buf = jnp.zeros((nbytes // 2,), jnp.uint8)  # a copy reads and writes nbytes / 2 each
        t_copy = try_time(copy, buf, reps=reps)
        rows.append(
            (name, f"{nbytes / 1e6:.1f} MB", ms(t), rate(nbytes, t, 1e12), ms(t_copy), rate(nbytes, t_copy, 1e12))
        )
    print_rows(
        f"Quantisers (x [{m}, {k}], w [{wk}, {wn}])", "kernel | bytes moved | time | TB/s | copy time | copy TB/s", rows
    )


def bench_grouped(runner: str, reps: int, tiny: bool, config=None) -> None:
    e, t, d, f = (4, 512, 256, 176) if tiny else (64, 65536, 2048, 1408)
    sizes = np.full(e, t // e, np.int32)
    gs = jnp.asarray(sizes)
    k1, k2 = jax.random.split(jax.random.PRNGKey(3))
    lhs = jax.random.normal(k1, (t, d), F32).astype(BF16)
    rhs = (jax.random.normal(k2, (e, d, f), F32) / np.sqrt(d)).astype(BF16)
    lq, ls = fp8.quantize_tiles(lhs)
    rq, rs = jax.vmap(fp8.quantize_blocks)(rhs)
    rq_t, rs_t = jnp.asarray(rq.transpose(0, 2, 1)), jnp.asarray(rs.transpose(0, 2, 1))
    flops = 2.0 * t * d * f
    run = dict(runner=runner, config=config)
    fns = [
        ("bf16 triton gmm (kernels.gmm)", lambda a, b, g: gmm_launch.gmm_fwd(a, b, g, runner=runner), (lhs, rhs, gs)),
        ("fp8 scaled_gmm, rhs K-major", lambda *a: launch.scaled_gmm(*a, BF16, rhs_transposed=True, **run),
         (lq, ls, rq_t, rs_t, gs)),
        ("fp8 scaled_gmm, rhs N-major", lambda *a: launch.scaled_gmm(*a, BF16, **run), (lq, ls, rq, rs, gs)),
    ]  # fmt: skip
    rows = []
    for name, fn, args in fns:
        tt = try_time(jax.jit(fn), *args, reps=reps)
        rows.append((name, ms(tt), rate(flops, tt, 1e12)))
    print_rows(f"Grouped GEMM forward (E={e}, T={t}, D={d}, F={f}, equal groups)", "impl | time | TFLOP/s", rows)


def bench_grouped_wgrad(runner: str, reps: int, tiny: bool) -> None:
    """The experts' weight gradient dw[e] = x_e^T dy_e: the bf16 kernel alone, then with its operands prepared as
    the FP8 grouped layer's backward prepares them, from the saved FP8 x and a bf16 dy (both paths also quantise
    dy for the Dgrad): by XLA (the layer before) and by the Triton rounding quantisers (now)."""
    e, t, d, f = (4, 512, 256, 176) if tiny else (64, 65536, 2048, 1408)
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    x = jax.random.normal(k1, (t, d), F32).astype(BF16)
    dy = jax.random.normal(k2, (t, f), F32).astype(BF16)
    xq, xs = fp8.quantize_tiles(x)
    flops = 2.0 * t * d * f

    def drhs(a, b, g):
        return gmm_launch.gmm_drhs(a, b, g, e, out_dtype=F32, runner=runner)

    def xla(xq, xs, dy, g):
        dy32 = dy.astype(F32)
        dyq, dys = fp8.quantize_tiles(dy32)
        xt = fp8.dequantize_tiles(*fp8.quantize_tiles(fp8.dequantize_tiles(xq, xs).T)).T.astype(BF16)
        dyt = fp8.dequantize_tiles(*fp8.quantize_tiles(dy32.T)).T.astype(BF16)
        return dyq, dys, drhs(xt, dyt, g)

    def triton(xq, xs, dy, g):  # as `grouped._kernel_grads` runs them
        dyq, dys = launch.quantize_rows(dy, runner=runner)
        xt = launch.requantize_rounded_cols(xq, xs, runner=runner)
        return dyq, dys, drhs(xt, launch.quantize_rounded_cols(dy, runner=runner), g)

    zipf = np.random.default_rng(0).zipf(1.5, e).astype(np.float64)
    skewed = np.floor(zipf / zipf.sum() * (t - 37)).astype(np.int32)  # 37 padding tokens at the end
    for label, sizes in (("equal groups", np.full(e, t // e, np.int32)), ("Zipf-skewed groups", skewed)):
        gs = jnp.asarray(sizes)
        rows = [
            ("bf16 gmm_drhs alone (kernels.gmm)", try_time(jax.jit(drhs), x, dy, gs, reps=reps)),
            ("operands by XLA's re-tiling + gmm_drhs (before)", try_time(jax.jit(xla), xq, xs, dy, gs, reps=reps)),
            ("operands by the Triton quantisers + gmm_drhs", try_time(jax.jit(triton), xq, xs, dy, gs, reps=reps)),
        ]
        print_rows(
            f"Grouped weight gradient (E={e}, T={t}, D={d}, F={f}, {label})",
            "impl | time | TFLOP/s",
            [(name, ms(tt), rate(flops, tt, 1e12)) for name, tt in rows],
        )


MOSAIC_SWEEP = (
    mosaic_gemm.MosaicGemmConfig(chain=False),
    mosaic_gemm.MosaicGemmConfig(),
    mosaic_gemm.MosaicGemmConfig(k_chunks=2, stages=2),
    mosaic_gemm.MosaicGemmConfig(band=16),
)


def sweep_mosaic(shapes, reps: int) -> None:
    """Launch configurations of the Mosaic GEMM (Hopper) on the given shapes; `chained` says whether each SM ran
    one pipeline across its tiles."""
    reason = fp8.mosaic_unavailable_reason()
    if reason:
        raise SystemExit(f"--mosaic-sweep: {reason}")
    print_rows("Mosaic GEMM launch configurations", "shape | config | chained | time | TFLOP/s", [])
    sms = jax.devices()[0].core_count
    for g in shapes:
        _, _, xq, xs, _, ws, wq_t = gemm_operands(g)
        for cfg in MOSAIC_SWEEP:
            if not mosaic_gemm.supported(g.m, g.n, g.k, cfg):
                continue
            fn = jax.jit(lambda *a, cfg=cfg: mosaic_gemm.scaled_matmul_nt(*a, BF16, cfg))
            t = try_time(fn, xq, xs, wq_t, ws, reps=reps)
            chained = mosaic_gemm.chains(g.m, g.n, g.k, cfg, sms)
            print(f"| {g.name} | {cfg} | {chained} | {ms(t)} | {rate(2.0 * g.m * g.n * g.k, t, 1e12)} |", flush=True)


def tune_quantize(runner: str, reps: int, tiny: bool) -> None:
    """Rows per program and warps of the quantisers."""
    m, k = (256, 384) if tiny else (16384, 7168)
    x = jax.random.normal(jax.random.PRNGKey(1), (m, k), F32).astype(BF16)
    for block_r, warps in itertools.product((16, 32, 64), (4, 8)):
        cfg = launch.QuantConfig(block_r, warps)
        t = try_time(jax.jit(lambda x, cfg=cfg: launch.quantize_rows(x, runner=runner, config=cfg)), x, reps=reps)
        print(f"quantize_rows {cfg}  {ms(t)}  {rate(m * k * 3, t, 1e12)} TB/s", flush=True)
    for warps in (2, 4, 8, 16):
        cfg = launch.QuantConfig(128, warps)
        fn = jax.jit(lambda x, cfg=cfg: launch.quantize_rows_and_cols(x, runner=runner, config=cfg))
        t = try_time(fn, x, reps=reps)
        print(f"quantize_rows_and_cols {cfg}  {ms(t)}  {rate(m * k * 4, t, 1e12)} TB/s", flush=True)
    xq, xs = fp8.quantize_tiles(x)
    for block_c, warps in itertools.product((16, 32, 64, 128), (1, 2, 4, 8)):
        cfg = launch.QuantConfig(128, warps, block_c)
        fn = jax.jit(lambda q, s, cfg=cfg: launch.requantize_cols(q, s, runner=runner, config=cfg))
        t = try_time(fn, xq, xs, reps=reps)
        print(f"requantize_cols {cfg}  {ms(t)}  {rate(m * k * 2, t, 1e12)} TB/s", flush=True)


def tune(runner: str, reps: int, tiny: bool) -> None:
    """Sweep tiles, warps and stages for the K-major GEMM on 8192^3 and the grouped GEMM; print the best."""
    tune_quantize(runner, reps, tiny)
    g = gemm_shapes(tiny)[0]
    _, _, xq, xs, _, ws, wq_t = gemm_operands(g)
    flops = 2.0 * g.m * g.n * g.k
    results = []
    for bm, bn, warps, stages, group_m in itertools.product((64, 128), (128, 256), (4, 8), (3, 4, 5), (8, 16)):
        if stages * (bm + bn) * 128 > SHARED_MEMORY_BYTES or (bm * bn >= 128 * 256 and warps < 8):
            continue
        cfg = launch.GemmConfig(bm, bn, group_m, warps, stages)
        fn = jax.jit(lambda *a, cfg=cfg: launch.scaled_matmul_nt(*a, BF16, runner=runner, config=cfg))
        t = try_time(fn, xq, xs, wq_t, ws, reps=reps)
        results.append((t, cfg))
        print(f"{g.name} {cfg}  {ms(t)}  {rate(flops, t, 1e12)} TFLOP/s", flush=True)
    ok = sorted((r for r in results if isinstance(r[0], float)), key=lambda r: r[0])
    if ok:
        print(f"best GEMM config: {ok[0][1]}  {flops / ok[0][0] / 1e12:.1f} TFLOP/s")
        for cfg in (ok[0][1], launch.GemmConfig(block_m=64), launch.GemmConfig(num_warps=4, block_m=64)):
            bench_grouped(runner, reps, tiny, config=cfg)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sections", default="gemm,quantize,grouped", help="comma-separated: gemm, quantize, grouped, grouped_wgrad"
    )
    p.add_argument("--runner", default="triton", choices=("triton", "interpret"))
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--tiny", action="store_true", help="tiny shapes (checks the script, e.g. on a CPU)")
    p.add_argument("--tune", action="store_true", help="sweep launch configurations before the tables")
    p.add_argument("--skip-reference", action="store_true", help="skip the slow pure-JAX reference GEMM")
    p.add_argument("--shapes", default="", help="GEMM shapes whose name contains this text (e.g. 8192), all if empty")
    p.add_argument("--clock", default="wall", choices=("wall", "device"), help="host clock, or the GPU's busy time")
    p.add_argument("--cublas", action="store_true", help="add cuBLAS's block-scaled GEMM (needs PyTorch with CUDA)")
    p.add_argument("--mosaic-sweep", action="store_true", help="time the Mosaic GEMM's launch configs (Hopper)")
    args = p.parse_args(argv)
    CLOCK["clock"] = args.clock
    reps = 1 if args.runner == "interpret" else args.reps
    if args.runner == "interpret":
        TIMING.update(warmup=1, inner=1)
    import triton

    dev = jax.devices()[0]
    print(f"# bench_fp8: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, triton {triton.__version__}, "
          f"python {platform.python_version()}, runner {args.runner}")  # fmt: skip
    sections = args.sections.split(",")
    if args.tune:
        tune(args.runner, reps, args.tiny)
    shapes = [g for g in gemm_shapes(args.tiny) if args.shapes in g.name]
    if args.mosaic_sweep:
        sweep_mosaic(shapes, reps)
    if "gemm" in sections:
        bench_gemm(shapes, args.runner, reps, args.skip_reference, cublas=args.cublas)
    if "quantize" in sections:
        bench_quantize(args.runner, reps, args.tiny)
    if "grouped" in sections:
        bench_grouped(args.runner, reps, args.tiny)
    if "grouped_wgrad" in sections:
        bench_grouped_wgrad(args.runner, reps, args.tiny)


if __name__ == "__main__":
    main()
