"""Launching the Triton kernels: block shapes, grids, and two runners.

- runner "triton": `jax_triton.triton_call` (GPU; traceable under jit).
- runner "interpret": Triton's interpreter on the host through `jax.pure_callback` (CPU; slow, for
  tests). It runs the same kernel source with the same argument order and launch parameters, and
  allocates every output filled with NaN (0x7FFF.. for integers), so unwritten elements show.

Each op function takes and returns 2-D [rows, hidden] arrays and float32 per-row statistics; backward
functions return per-program partial sums of the parameter gradients, shape [programs, hidden].

A launch configuration with `prefetch` runs the version-3 kernels (`*_v3` in triton_kernels.py):
persistent programs that load their next row tile while reducing the current one. Both versions
compute the same values; `TUNING` says which one each kernel family uses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from kernels import triton_runtime

MAX_HIDDEN = 16384  # widest row held in registers by one program
DEFAULT_NUM_SMS = 132  # H100 SXM; used when the device does not report its multiprocessor count

ACTIVATIONS = {None: 0, "gelu": 1, "gelu_tanh": 2}


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class LaunchConfig:
    """How one kernel is launched; `programs` is set for the persistent kernels (backward, version 3)."""

    block_m: int  # rows per tile
    block_n: int  # columns per tile: next power of two >= hidden
    num_warps: int
    num_stages: int = 1
    programs: int | None = None
    prefetch: bool = False  # version 3: persistent programs, next tile's loads issued before this tile's reductions
    hold_params: bool = True  # version 3: scale/bias held in registers for the program's life (else re-read per tile)
    one_pass: bool | None = None  # version-3 LayerNorm forward: shifted one-reduction statistics; None: 16-bit x only


@dataclasses.dataclass
class Tuning:
    """Launch heuristics of one kernel family, as elements per thread so they carry across widths."""

    fwd_elems_per_thread: int = 32
    bwd_elems_per_thread: int = 16
    bwd_stages: int = 1  # >1: the backward's row loop is software-pipelined (cp.async into shared memory)
    bwd_programs_per_sm: int = 1
    fwd_prefetch: bool = False  # version-3 forward (persistent, register prefetch of the next tile)
    fwd_warps_per_sm: int = 32  # version-3 forward grid: programs per SM = this / warps per program (at least 1)
    fwd_hold_params: bool = True  # version 3: scale/bias in registers for the program's life, else re-read per tile
    fwd_one_pass: bool | None = None  # version-3 LayerNorm statistics in one reduction; None: for 16-bit inputs only
    bwd_prefetch: bool = False  # version-3 backward (register prefetch, c1/c2 in one reduction)
    bwd_hold_params: bool = True
    fwd_tile_elems: int = 4096  # forward: rows narrower than this are grouped until a tile holds this many elements


# Picked at 16384 x 8192 bf16 by `bench_norms.py --tune --vs-v2` on an H200 (experiments/benchmarks/NORMS_NOTES.md):
# version 3 won every op, 1.03-1.38x faster than version 2 (`Tuning()`, the H100 pick before version 3).
TUNING = {
    "layer_norm": Tuning(fwd_elems_per_thread=16, fwd_prefetch=True, bwd_prefetch=True),
    "rms_norm": Tuning(fwd_elems_per_thread=8, fwd_prefetch=True, bwd_prefetch=True),
}
TILE_ELEMS = 4096  # backward: rows narrower than this are grouped until a tile holds this many elements


def _warps_for(tile_elems: int, elems_per_thread: int) -> int:
    return int(min(32, max(4, tile_elems // (32 * elems_per_thread))))


def _programs(rows: int | None, block_m: int, num_sms: int, per_sm: int) -> int:
    """Persistent grid size: `per_sm` programs per SM, never more than there are row tiles."""
    limit = num_sms * per_sm
    return limit if rows is None else max(1, min(-(-rows // block_m), limit))


def forward_config(
    hidden: int, kind: str = "layer_norm", *, rows: int | None = None, num_sms: int = DEFAULT_NUM_SMS, **override: Any
) -> LaunchConfig:
    tuning = TUNING[kind]
    block_n = next_power_of_2(hidden)
    block_m = override.pop("block_m", max(1, tuning.fwd_tile_elems // block_n))
    warps = _warps_for(block_m * block_n, tuning.fwd_elems_per_thread)
    per_sm = override.pop("programs_per_sm", max(1, tuning.fwd_warps_per_sm // warps))
    prefetch = override.pop("prefetch", tuning.fwd_prefetch)
    cfg = LaunchConfig(
        block_m,
        block_n,
        warps,
        programs=_programs(rows, block_m, num_sms, per_sm) if prefetch else None,
        prefetch=prefetch,
        hold_params=tuning.fwd_hold_params,
        one_pass=tuning.fwd_one_pass,
    )
    return dataclasses.replace(cfg, **override)


def backward_config(rows: int, hidden: int, num_sms: int, kind: str = "layer_norm", **override: Any) -> LaunchConfig:
    tuning = TUNING[kind]
    block_n = next_power_of_2(hidden)
    block_m = override.pop("block_m", max(1, TILE_ELEMS // block_n))
    per_sm = override.pop("programs_per_sm", tuning.bwd_programs_per_sm)
    prefetch = override.pop("prefetch", tuning.bwd_prefetch)
    warps = _warps_for(block_m * block_n, tuning.bwd_elems_per_thread)
    cfg = LaunchConfig(
        block_m,
        block_n,
        warps,
        num_stages=1 if prefetch else tuning.bwd_stages,  # version 3 prefetches by hand
        programs=_programs(rows, block_m, num_sms, per_sm),
        prefetch=prefetch,
        hold_params=tuning.bwd_hold_params,
    )
    return dataclasses.replace(cfg, **override)


def num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or DEFAULT_NUM_SMS)


def _sms(runner: str) -> int:
    return num_sms() if runner == "triton" else DEFAULT_NUM_SMS


def _kernel(name: str, cfg: LaunchConfig, rows: int, meta: dict) -> tuple[str, tuple[int], dict]:
    """Kernel name, grid and meta-parameters: version 2, or version 3 when `cfg.prefetch`."""
    grid = (cfg.programs or -(-rows // cfg.block_m),)  # persistent, or one program per row tile
    if not cfg.prefetch:
        return name, grid, meta
    meta = {k: v for k, v in meta.items() if k != "STAGES"}  # version 3 prefetches by hand
    return name + "_v3", grid, dict(meta, HOLD_PARAMS=cfg.hold_params)


# ----------------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------------
def _run(runner: str, name, inputs, out_shapes, grid, cfg: LaunchConfig, meta, poison: bool):
    warps, stages = cfg.num_warps, cfg.num_stages
    return triton_runtime.run("kernels.norms", runner, name, inputs, out_shapes, grid, warps, stages, meta, poison)


# ----------------------------------------------------------------------------------------------------
# Ops on [rows, hidden] arrays
# ----------------------------------------------------------------------------------------------------
def _f32(shape: Sequence[int]) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), jnp.float32)


def layer_norm_fwd(x, w, b, *, eps, activation, runner="triton", poison=False, config=None):
    """-> (y [M, N] x.dtype, mean [M] f32, rstd [M] f32)."""
    m, n = x.shape
    cfg = config or forward_config(n, rows=m, num_sms=_sms(runner))
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), _f32([m]), _f32([m])]
    meta = dict(N=n, EPS=float(eps), ACT=ACTIVATIONS[activation], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    name, grid, meta = _kernel("layer_norm_fwd", cfg, m, meta)
    if cfg.prefetch:  # one-pass statistics: worst case ~hidden x float32 rounding, fine below 16-bit rounding only
        meta["ONE_PASS"] = jnp.dtype(x.dtype).itemsize <= 2 if cfg.one_pass is None else cfg.one_pass
    y, mean, rstd = _run(runner, name, [x, w, b, m], out, grid, cfg, meta, poison)
    return y, mean, rstd


def layer_norm_bwd(x, w, b, dy, mean, rstd, *, activation, runner="triton", poison=False, config=None):
    """-> (dx [M, N] x.dtype, dw partials [G, N] f32, db partials [G, N] f32)."""
    m, n = x.shape
    cfg = config or backward_config(m, n, _sms(runner), "layer_norm")
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), _f32([cfg.programs, n]), _f32([cfg.programs, n])]
    meta = dict(N=n, ACT=ACTIVATIONS[activation], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages)
    name, grid, meta = _kernel("layer_norm_bwd", cfg, m, meta)
    inputs = [x, w, b, dy.astype(x.dtype), mean, rstd, m]
    dx, dw, db = _run(runner, name, inputs, out, grid, cfg, meta, poison)
    return dx, dw, db


def rms_norm_fwd(x, residual, w, *, eps, runner="triton", poison=False, config=None):
    """-> (y, h, rstd); h = x + residual rounded to x.dtype, or None when residual is None."""
    m, n = x.shape
    cfg = config or forward_config(n, "rms_norm", rows=m, num_sms=_sms(runner))
    has_res = residual is not None
    h_shape = x.shape if has_res else (1,)
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(h_shape, x.dtype), _f32([m])]
    meta = dict(N=n, EPS=float(eps), HAS_RESIDUAL=has_res, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    name, grid, meta = _kernel("rms_norm_fwd", cfg, m, meta)
    inputs = [x, residual.astype(x.dtype) if has_res else x, w, m]
    y, h, rstd = _run(runner, name, inputs, out, grid, cfg, meta, poison)
    return y, (h if has_res else None), rstd


def rms_norm_bwd(x, w, dy, d_residual, rstd, *, runner="triton", poison=False, config=None):
    """-> (dx, dw partials [G, N] f32); dx includes d_residual when given (the add+RMSNorm backward)."""
    m, n = x.shape
    cfg = config or backward_config(m, n, _sms(runner), "rms_norm")
    has_dres = d_residual is not None
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), _f32([cfg.programs, n])]
    meta = dict(N=n, HAS_DRES=has_dres, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages)
    name, grid, meta = _kernel("rms_norm_bwd", cfg, m, meta)
    dy = dy.astype(x.dtype)
    inputs = [x, w, dy, d_residual.astype(x.dtype) if has_dres else dy, rstd, m]
    dx, dw = _run(runner, name, inputs, out, grid, cfg, meta, poison)
    return dx, dw
