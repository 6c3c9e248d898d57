"""Benchmark the fused normalisation kernels against XLA and against a plain copy of the same bytes.

For each op and shape, in one run: XLA reference (jitted), the Triton kernel, and a plain pass (`b + 1`
on 32-bit words) over a buffer holding the op's byte count (half read, half written), forward; then
backward (kernel only: XLA fuses its backward with the forward) and forward+backward. Times are per op:
each timed call runs the op over K distinct input sets (K large enough that one call moves >= ~4 GB, so
the L2 cache drops out). By default the time is the GPU's: its busy time in a profiler trace of several
calls (`timing.device_seconds`), divided by calls x K (`--clock wall` times each call on the host clock
instead, which adds dispatch and synchronisation to every call).

Effective bytes (the fewest any implementation must move):
  forward:  read x (+ residual) + params, write y (+ new residual)
  backward: read x (or the new residual), dy (+ its cotangent), params, write dx + parameter grads
Per-row statistics (8 bytes a row) are not counted.

  python experiments/benchmarks/bench_norms.py                       # the issue's table, bf16
  python experiments/benchmarks/bench_norms.py --shapes 16384x8192 --markdown out.md
  python experiments/benchmarks/bench_norms.py --tune --markdown t.md  # pick launch variants first
  python experiments/benchmarks/bench_norms.py --tune --shapes 4096x1024 --budget 100

`--tune` times launch variants of the kernels (see kernels/norms/launch.py) side by side at 16384x8192,
the current tuning first, prints the winner of each op and kernel family against the current tuning,
and keeps the winners for the table.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import device_seconds  # noqa: E402

from kernels.norms import launch, reference  # noqa: E402

OPS = ("layer_norm_gelu", "rms_norm", "add_rms_norm")
ISSUE_SHAPES = [(16384, 8192)] + [
    (r, h) for r in (4096, 16384, 65536) for h in (1024, 2048, 4096, 7168, 8192) if (r, h) != (16384, 8192)
]
TARGET_BYTES_PER_CALL = 4e9
MAX_RESIDENT_BYTES = 24e9


@dataclasses.dataclass
class Row:
    op: str
    shape: tuple[int, int]
    dtype: str
    direction: str  # fwd | bwd | fwd+bwd
    bytes: float
    copy_us: float
    xla_us: float | None
    kernel_us: float

    def tbps(self, us: float | None) -> float | None:
        return None if us is None else self.bytes / (us * 1e-6) / 1e12


def effective_bytes(op: str, m: int, n: int, itemsize: int, param_itemsize: int = 4) -> dict[str, float]:
    act = m * n * itemsize
    if op.startswith("layer_norm"):
        fwd = 2 * act + 2 * n * param_itemsize
        bwd = 3 * act + 4 * n * param_itemsize
    elif op == "rms_norm":
        fwd = 2 * act + n * param_itemsize
        bwd = 3 * act + 2 * n * param_itemsize
    else:  # add_rms_norm
        fwd = 4 * act + n * param_itemsize
        bwd = 4 * act + 2 * n * param_itemsize
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


# "device": kernel time from a profiler trace (what the GPU spends, as CUDA events would see it);
# "wall": host clock around each call, which also counts dispatch and any gap between the call's kernels.
TIMING = {"clock": "device"}


def time_per_op(fn, sets, reps: int = 7, warmup: int = 1) -> float:
    """Seconds per op of jitted fn mapped over the K input sets in one call: the GPU's busy time over `reps` calls
    per call (device clock), or the median wall time of a call (wall clock), divided by K."""
    multi = jax.jit(lambda sets: [fn(*s) for s in sets])
    for _ in range(warmup):
        jax.block_until_ready(multi(sets))
    if TIMING["clock"] == "device":
        return device_seconds(multi, sets, calls=reps) / len(sets)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(multi(sets))
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / len(sets)


def n_sets(bytes_per_op: float, resident_per_set: float) -> int:
    k = math.ceil(TARGET_BYTES_PER_CALL / bytes_per_op)
    k = min(k, int(MAX_RESIDENT_BYTES // max(resident_per_set, 1)))
    return max(2, min(16, k))


def make_sets(op, m, n, dtype, k, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), k)
    with_residual = op == "add_rms_norm"

    @jax.jit
    def one(key):
        kx, kr, kw, kb, kd, ke = jax.random.split(key, 6)
        d = dict(
            x=(jax.random.normal(kx, (m, n), jnp.float32) + 0.5).astype(dtype),
            scale=1.0 + 0.1 * jax.random.normal(kw, (n,), jnp.float32),
            bias=0.1 * jax.random.normal(kb, (n,), jnp.float32),
            dy=jax.random.normal(kd, (m, n), dtype),
        )
        if with_residual:
            d["residual"] = jax.random.normal(kr, (m, n), dtype)
            d["dres"] = jax.random.normal(ke, (m, n), dtype)
        return d

    return [one(key) for key in keys]


def resident_per_set(op: str, act_bytes: int) -> int:
    """Device bytes one input set ties up while timed (inputs, saved outputs, outputs of the call)."""
    return (9 if op == "add_rms_norm" else 6) * act_bytes


# op -> (reference fwd, kernel fwd (returns outputs and residuals), kernel bwd from residuals)
def _ln_fwd_kernel(x, w, b, act, cfg=None):
    y, mean, rstd = launch.layer_norm_fwd(x, w, b, eps=1e-5, activation=act, config=cfg)
    return y, (mean, rstd)


def _ln_bwd_kernel(x, w, b, dy, mean, rstd, act, cfg=None):
    dx, dw, db = launch.layer_norm_bwd(x, w, b, dy, mean, rstd, activation=act, config=cfg)
    return dx, dw.sum(0), db.sum(0)


def _rms_bwd_kernel(x, w, dy, dres, rstd, cfg=None):
    dx, dw = launch.rms_norm_bwd(x, w, dy, dres, rstd, config=cfg)
    return dx, dw.sum(0)


def op_functions(op):
    """(reference fwd, kernel fwd, kernel bwd, fused public op, arg names of the public op)."""
    from kernels import norms

    if op == "layer_norm_gelu":
        ref = lambda d: reference.layer_norm(d["x"], d["scale"], d["bias"], activation="gelu")
        fwd = lambda d, cfg=None: launch.layer_norm_fwd(
            d["x"], d["scale"], d["bias"], eps=1e-5, activation="gelu", config=cfg
        )
        bwd = lambda d, st, cfg=None: _ln_bwd_kernel(d["x"], d["scale"], d["bias"], d["dy"], st[1], st[2], "gelu", cfg)
        pub = lambda impl: lambda x, s, b: norms.layer_norm_gelu(x, s, b, impl=impl)
        return ref, fwd, bwd, pub, ("x", "scale", "bias")
    if op == "rms_norm":
        ref = lambda d: reference.rms_norm(d["x"], d["scale"])
        fwd = lambda d, cfg=None: launch.rms_norm_fwd(d["x"], None, d["scale"], eps=1e-6, config=cfg)
        bwd = lambda d, st, cfg=None: _rms_bwd_kernel(d["x"], d["scale"], d["dy"], None, st[2], cfg)
        pub = lambda impl: lambda x, s: norms.rms_norm(x, s, impl=impl)
        return ref, fwd, bwd, pub, ("x", "scale")
    ref = lambda d: reference.add_rms_norm(d["x"], d["residual"], d["scale"])
    fwd = lambda d, cfg=None: launch.rms_norm_fwd(d["x"], d["residual"], d["scale"], eps=1e-6, config=cfg)
    bwd = lambda d, st, cfg=None: _rms_bwd_kernel(st[1], d["scale"], d["dy"], d["dres"], st[2], cfg)
    pub = lambda impl: lambda x, r, s: norms.add_rms_norm(x, r, s, impl=impl)
    return ref, fwd, bwd, pub, ("x", "residual", "scale")


def _cotangents(op, d):
    return (d["dy"], d["dres"]) if op == "add_rms_norm" else d["dy"]


@contextlib.contextmanager
def tuning(tunings: dict):
    """launch.TUNING set to `tunings` inside the block (kernels choose their launch at trace time)."""
    old = dict(launch.TUNING)
    launch.TUNING.update(tunings)
    jax.clear_caches()
    try:
        yield
    finally:
        launch.TUNING.update(old)
        jax.clear_caches()


def bench_shape(op, m, n, dtype, *, fwd_cfg=None, bwd_cfg=None, directions=("fwd", "bwd", "fwd+bwd")):
    """Rows for one op and shape."""
    itemsize = jnp.dtype(dtype).itemsize
    nbytes = effective_bytes(op, m, n, itemsize)
    ref, fwd, bwd, pub, names = op_functions(op)
    act_bytes = m * n * itemsize
    k = n_sets(nbytes["fwd"], resident_per_set(op, act_bytes))
    sets = make_sets(op, m, n, dtype, k)
    rows = []
    if "fwd" in directions:
        t_copy = _copy_time(nbytes["fwd"], k)
        t_ref = time_per_op(lambda d: ref(d), [(d,) for d in sets])
        t_ker = time_per_op(lambda d: fwd(d, fwd_cfg), [(d,) for d in sets])
        rows.append(Row(op, (m, n), jnp.dtype(dtype).name, "fwd", nbytes["fwd"], *us(t_copy, t_ref, t_ker)))
    if "bwd" in directions:
        fwd_jit = jax.jit(lambda d: fwd(d))
        stats = [fwd_jit(d) for d in sets]
        t_copy = _copy_time(nbytes["bwd"], k)
        t_ker = time_per_op(lambda d, st: bwd(d, st, bwd_cfg), list(zip(sets, stats, strict=True)))
        rows.append(Row(op, (m, n), jnp.dtype(dtype).name, "bwd", nbytes["bwd"], *us(t_copy, None, t_ker)))
        del stats
    if "fwd+bwd" in directions:

        def fwd_bwd(impl):
            f = pub(impl)

            def run(d):
                out, vjp = jax.vjp(f, *[d[a] for a in names])
                return out, vjp(_cotangents(op, d))

            return run

        t_copy = _copy_time(nbytes["fwd+bwd"], k)
        t_ref = time_per_op(fwd_bwd("reference"), [(d,) for d in sets])
        t_ker = time_per_op(fwd_bwd("fused"), [(d,) for d in sets])
        rows.append(Row(op, (m, n), jnp.dtype(dtype).name, "fwd+bwd", nbytes["fwd+bwd"], *us(t_copy, t_ref, t_ker)))
    del sets
    return rows


def us(*seconds):
    return [None if t is None else t * 1e6 for t in seconds]


def fmt_rows(rows: list[Row], markdown: bool) -> str:
    head = ["op", "rows x hidden", "dtype", "pass", "MB", "copy µs (TB/s)", "XLA µs (TB/s)",
            "kernel µs (TB/s)", "XLA / kernel", "kernel / copy"]  # fmt: skip

    def cell(us, tb):
        return "—" if us is None else f"{us:8.1f} ({tb:4.2f})"

    lines = []
    for r in rows:
        lines.append([
            r.op, f"{r.shape[0]}x{r.shape[1]}", r.dtype, r.direction, f"{r.bytes / 1e6:.0f}",
            cell(r.copy_us, r.tbps(r.copy_us)), cell(r.xla_us, r.tbps(r.xla_us)),
            cell(r.kernel_us, r.tbps(r.kernel_us)),
            "—" if r.xla_us is None else f"{r.xla_us / r.kernel_us:.2f}x",
            f"{r.kernel_us / r.copy_us:.2f}",
        ])  # fmt: skip
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(c.strip() for c in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    return "\n".join(out)


# (label, launch.Tuning fields changed from the current tuning). Each family's list is timed after the current tuning
# itself ("current"), less the variants that leave it unchanged.
TUNE_FWD = (
    ("32 el/thread", dict(fwd_elems_per_thread=32)),
    ("16 el/thread", dict(fwd_elems_per_thread=16)),
    ("8 el/thread", dict(fwd_elems_per_thread=8)),
    ("16 el/thread, params re-read", dict(fwd_elems_per_thread=16, fwd_hold_params=False)),
    ("16 el/thread, two-pass stats", dict(fwd_elems_per_thread=16, fwd_one_pass=False)),
    # two 8192-wide rows per tile: twice the bytes in flight per program
    ("16 el/thread, 16K-element tiles", dict(fwd_elems_per_thread=16, fwd_tile_elems=16384)),
    ("32 el/thread, 16K-element tiles", dict(fwd_elems_per_thread=32, fwd_tile_elems=16384)),
    ("16K tiles, params re-read", dict(fwd_tile_elems=16384, fwd_hold_params=False)),
)
TUNE_BWD = (
    ("16 el/thread", dict(bwd_elems_per_thread=16)),
    ("8 el/thread", dict(bwd_elems_per_thread=8)),
)
TUNE_OPS = {"layer_norm": ("layer_norm_gelu",), "rms_norm": ("rms_norm", "add_rms_norm")}


def _rate_line(op: str, label: str, seconds: float, nbytes: float, copy: float) -> str:
    rate = nbytes / seconds / 1e12
    return f"{op:16s} {label:40s} {seconds * 1e6:8.1f} µs  {rate:5.2f} TB/s  {seconds / copy:5.2f}x copy"


def _winner_line(what: str, times: dict[str, float], copy: float | None = None) -> str:
    best = min(times, key=times.get)
    base = next(iter(times))  # the current tuning
    if len(times) == 1:
        line = f"winner {what}: {best} (the only variant"
    elif best == base:
        second = min((label for label in times if label != base), key=times.get)
        line = f"winner {what}: {best} (the best other, {second}, takes {times[second] / times[best]:.2f}x as long"
    else:
        line = f"winner {what}: {best} ({times[base] / times[best]:.2f}x faster than {base}"
    return line + (f"; {times[best] / copy:.2f}x copy)" if copy else ")")


def _variants(base: launch.Tuning, table, *, layer_norm: bool) -> list[tuple[str, dict]]:
    """("current", {}) and the entries of `table` that change `base` (one-pass statistics: LayerNorm only)."""
    out = [("current", {})]
    seen = [base]
    for label, fields in table:
        if "fwd_one_pass" in fields and not layer_norm:
            continue
        tuned = dataclasses.replace(base, **fields)
        if tuned not in seen:
            seen.append(tuned)
            out.append((label, fields))
    return out


def tune(dtype, m=16384, n=8192) -> str:
    """Time the launch variants at one shape beside a copy of the same bytes, printing as it goes; the fastest
    (summed over a family's ops) becomes launch.TUNING. Returns the winners of each kernel family, each compared
    with the current tuning."""
    itemsize = jnp.dtype(dtype).itemsize
    print(f"tuning at {m}x{n} {jnp.dtype(dtype).name} ({launch.num_sms()} SMs)", flush=True)
    summary = []
    for kind, ops in TUNE_OPS.items():
        base = launch.TUNING[kind]
        variants = {
            "fwd": _variants(base, TUNE_FWD, layer_norm=kind == "layer_norm"),
            "bwd": _variants(base, TUNE_BWD, layer_norm=kind == "layer_norm"),
        }
        family = {direction: dict.fromkeys((lbl for lbl, _ in v), 0.0) for direction, v in variants.items()}
        for op in ops:
            _, fwd, bwd, _, _ = op_functions(op)
            nbytes = effective_bytes(op, m, n, itemsize)
            k = n_sets(nbytes["fwd"], resident_per_set(op, m * n * itemsize))
            sets = make_sets(op, m, n, dtype, k)
            fwd_jit = jax.jit(lambda d, f=fwd: f(d))
            stats = [fwd_jit(d) for d in sets]
            for direction, vs in variants.items():
                copy = _copy_time(nbytes[direction], k)
                print(_rate_line(op, f"{direction} copy of the same bytes", copy, nbytes[direction], copy), flush=True)
                times = {}
                for label, fields in vs:
                    with tuning({kind: dataclasses.replace(base, **fields)}):
                        if direction == "fwd":
                            t = time_per_op(lambda d, f=fwd: f(d), [(d,) for d in sets])
                        else:
                            t = time_per_op(lambda d, s_, f=bwd: f(d, s_), list(zip(sets, stats, strict=True)))
                    times[label] = t
                    family[direction][label] += t
                    print(_rate_line(op, f"{direction} {label}", t, nbytes[direction], copy), flush=True)
                summary.append(_winner_line(f"{op} {direction}", times, copy))
                print(summary[-1], flush=True)
            del sets, stats
        fields = {}
        for direction, vs in variants.items():
            summary.append(_winner_line(f"{kind} family {direction}", family[direction]))
            fields.update(dict(vs)[min(family[direction], key=family[direction].get)])
        launch.TUNING[kind] = dataclasses.replace(base, **fields)
        summary.append(f"-> {kind}: {launch.TUNING[kind]}")
    jax.clear_caches()
    return "\n".join(summary)


def _copy_time(nbytes: float, k: int) -> float:
    """Seconds per call of a plain pass over `nbytes` (half read, half written): `b + 1` on 32-bit words, the
    fastest elementwise program XLA emits (a 16-bit `x * 2` ran at 3.3 TB/s where this ran at 4.3 on an H200)."""
    words = int(nbytes / 2 / 4)
    bufs = [jnp.full((words,), i, jnp.uint32) for i in range(k)]
    return time_per_op(lambda b: b + 1, [(b,) for b in bufs])


def check() -> bool:
    """One small call of each fused op (scale/bias held in registers, and re-read per tile) against the reference;
    prints the errors."""

    ok = True
    reread = {k: dataclasses.replace(t, fwd_hold_params=False, bwd_hold_params=False) for k, t in launch.TUNING.items()}
    for variant, tunings in (("params held", dict(launch.TUNING)), ("params re-read", reread)):
        with tuning(tunings):
            for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)):
                for op in OPS:
                    d = make_sets(op, 100, 1000, dtype, 1)[0]
                    _, _, _, pub, names = op_functions(op)
                    args = [d[a] for a in names]
                    got = pub("fused")(*args)
                    want = pub("reference")(*args)
                    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                        g, w = g.astype(jnp.float32), w.astype(jnp.float32)
                        err = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
                        ok &= err < tol
                        print(f"check {variant:14s} {op:16s} {jnp.dtype(dtype).name:8s} rel err {err:.2e}", flush=True)
    return ok


def parse_shapes(text: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in s.split("x")) for s in text.split(",") if s]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", default=",".join(OPS), help="comma-separated: " + ", ".join(OPS))
    p.add_argument("--shapes", default=None, help="comma-separated ROWSxHIDDEN (default: the issue's table)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--markdown", type=Path, default=None, help="also write the table as markdown here")
    p.add_argument("--tune", action="store_true", help="first time launch variants at 16384x8192, keep the best")
    p.add_argument("--fwdbwd-shapes", default="16384x8192", help="shapes also timed forward+backward")
    p.add_argument("--check", action="store_true", help="only check each fused op against the reference")
    p.add_argument("--budget", type=float, default=None, help="seconds: start no new table shape after this")
    p.add_argument("--clock", choices=["device", "wall"], default="device", help="kernel time or host wall time")
    args = p.parse_args(argv)
    TIMING["clock"] = args.clock
    start = time.perf_counter()

    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}", flush=True)
    if jax.default_backend() != "gpu":
        print("no GPU: nothing to time", file=sys.stderr)
        return 1
    dtype = jnp.dtype(args.dtype)
    if args.check:
        return 0 if check() else 1
    if args.tune:
        print("\n" + tune(dtype), flush=True)
    shapes = parse_shapes(args.shapes) if args.shapes else ISSUE_SHAPES
    fwdbwd = parse_shapes(args.fwdbwd_shapes)
    tuning = ", ".join(f"{k}: {v}" for k, v in launch.TUNING.items())
    header = (
        f"device: {dev.device_kind}, jax {jax.__version__}, dtype {dtype.name}, {args.clock} clock\n\n"
        f"launch tuning: {tuning}\n\n"
    )
    print(header, flush=True)
    rows: list[Row] = []
    for op in args.ops.split(","):
        for m, n in shapes:
            if args.budget is not None and time.perf_counter() - start > args.budget:
                print(f"budget of {args.budget:.0f} s spent: skipping {op} {m}x{n}", flush=True)
                continue
            directions = ("fwd", "bwd", "fwd+bwd") if (m, n) in fwdbwd else ("fwd", "bwd")
            new = bench_shape(op, m, n, dtype, directions=directions)
            rows += new
            print(*fmt_rows(rows, markdown=False).splitlines()[-len(new) :], sep="\n", flush=True)
            if args.markdown:  # rewritten after every shape, so a cut-short run still leaves its rows
                args.markdown.write_text(header + fmt_rows(rows, markdown=True) + "\n")
    print("\n" + fmt_rows(rows, markdown=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
