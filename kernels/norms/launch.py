"""Launching the Triton kernels: block shapes, grids, and two runners.

- runner "triton": `jax_triton.triton_call` (GPU; traceable under jit).
- runner "interpret": Triton's interpreter on the host through `jax.pure_callback` (CPU; slow, for
  tests). It runs the same kernel source with the same argument order and launch parameters, and
  allocates every output filled with NaN (0x7FFF.. for integers), so unwritten elements show.

Each op function takes and returns 2-D [rows, hidden] arrays and float32 per-row statistics; backward
functions return per-program partial sums of the parameter gradients, shape [programs, hidden].
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
    """How one kernel is launched; `programs` is set for the persistent backward kernels only."""

    block_m: int  # rows per tile
    block_n: int  # columns per tile: next power of two >= hidden
    num_warps: int
    num_stages: int = 1
    programs: int | None = None


@dataclasses.dataclass
class Tuning:
    """Launch heuristics of one kernel family, as elements per thread so they carry across widths."""

    fwd_elems_per_thread: int = 32
    bwd_elems_per_thread: int = 16
    bwd_stages: int = 1  # >1: the backward's row loop is software-pipelined (cp.async into shared memory)
    bwd_programs_per_sm: int = 1


# Picked on an H100 at 16384 x 8192 bf16 by `bench_norms.py --tune` (experiments/benchmarks/NORMS_NOTES.md).
TUNING = {"layer_norm": Tuning(), "rms_norm": Tuning()}
TILE_ELEMS = 4096  # rows narrower than this are grouped until a tile holds this many elements


def _warps_for(tile_elems: int, elems_per_thread: int) -> int:
    return int(min(32, max(4, tile_elems // (32 * elems_per_thread))))


def forward_config(hidden: int, kind: str = "layer_norm", **override: Any) -> LaunchConfig:
    tuning = TUNING[kind]
    block_n = next_power_of_2(hidden)
    block_m = max(1, TILE_ELEMS // block_n)
    cfg = LaunchConfig(block_m, block_n, _warps_for(block_m * block_n, tuning.fwd_elems_per_thread))
    return dataclasses.replace(cfg, **override)


def backward_config(rows: int, hidden: int, num_sms: int, kind: str = "layer_norm", **override: Any) -> LaunchConfig:
    tuning = TUNING[kind]
    block_n = next_power_of_2(hidden)
    block_m = override.pop("block_m", max(1, TILE_ELEMS // block_n))
    per_sm = override.pop("programs_per_sm", tuning.bwd_programs_per_sm)
    tiles = -(-rows // block_m)
    programs = max(1, min(tiles, num_sms * per_sm))
    warps = _warps_for(block_m * block_n, tuning.bwd_elems_per_thread)
    cfg = LaunchConfig(block_m, block_n, warps, num_stages=tuning.bwd_stages, programs=programs)
    return dataclasses.replace(cfg, **override)


def num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or DEFAULT_NUM_SMS)


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
    cfg = config or forward_config(n)
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), _f32([m]), _f32([m])]
    meta = dict(N=n, EPS=float(eps), ACT=ACTIVATIONS[activation], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    grid = (-(-m // cfg.block_m),)
    y, mean, rstd = _run(runner, "layer_norm_fwd", [x, w, b, m], out, grid, cfg, meta, poison)
    return y, mean, rstd


def layer_norm_bwd(x, w, b, dy, mean, rstd, *, activation, runner="triton", poison=False, config=None):
    """-> (dx [M, N] x.dtype, dw partials [G, N] f32, db partials [G, N] f32)."""
    m, n = x.shape
    sms = num_sms() if runner == "triton" else DEFAULT_NUM_SMS
    cfg = config or backward_config(m, n, sms, "layer_norm")
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), _f32([cfg.programs, n]), _f32([cfg.programs, n])]
    meta = dict(N=n, ACT=ACTIVATIONS[activation], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages)
    inputs = [x, w, b, dy.astype(x.dtype), mean, rstd, m]
    dx, dw, db = _run(runner, "layer_norm_bwd", inputs, out, (cfg.programs,), cfg, meta, poison)
    return dx, dw, db


def rms_norm_fwd(x, residual, w, *, eps, runner="triton", poison=False, config=None):
    """-> (y, h, rstd); h = x + residual rounded to x.dtype, or None when residual is None."""
    m, n = x.shape
    cfg = config or forward_config(n, "rms_norm")
    has_res = residual is not None
    h_shape = x.shape if has_res else (1,)
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(h_shape, x.dtype), _f32([m])]
    meta = dict(N=n, EPS=float(eps), HAS_RESIDUAL=has_res, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
    inputs = [x, residual.astype(x.dtype) if has_res else x, w, m]
    grid = (-(-m // cfg.block_m),)
    y, h, rstd = _run(runner, "rms_norm_fwd", inputs, out, grid, cfg, meta, poison)
    return y, (h if has_res else None), rstd


def rms_norm_bwd(x, w, dy, d_residual, rstd, *, runner="triton", poison=False, config=None):
    """-> (dx, dw partials [G, N] f32); dx includes d_residual when given (the add+RMSNorm backward)."""
    m, n = x.shape
    cfg = config or backward_config(m, n, num_sms() if runner == "triton" else DEFAULT_NUM_SMS, "rms_norm")
    has_dres = d_residual is not None
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), _f32([cfg.programs, n])]
    meta = dict(N=n, HAS_DRES=has_dres, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, STAGES=cfg.num_stages)
    dy = dy.astype(x.dtype)
    inputs = [x, w, dy, d_residual.astype(x.dtype) if has_dres else dy, rstd, m]
    dx, dw = _run(runner, "rms_norm_bwd", inputs, out, (cfg.programs,), cfg, meta, poison)
    return dx, dw
