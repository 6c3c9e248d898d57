"""Launching the Triton kernels: block shapes, grids, and two runners.

- runner "triton": `jax_triton.triton_call` (GPU; traceable under jit).
- runner "interpret": Triton's interpreter on the host through `jax.pure_callback` (CPU; slow, for
  tests). It runs the same kernel source with the same argument order and launch parameters, and
  allocates every output filled with NaN (0x7FFF.. for integers), so unwritten elements show.

Each op function takes and returns 2-D [rows, hidden] arrays and float32 per-row statistics; backward
functions return per-program partial sums of the parameter gradients, shape [programs, hidden].

Every kernel runs on a persistent grid (see triton_kernels.py): `programs` programs, each taking row
tiles g, g + programs, ... and loading its next tile while it reduces the current one.
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
    """How one kernel is launched: a persistent grid of `programs` programs over tiles of `block_m` rows."""

    block_m: int  # rows per tile
    block_n: int  # columns per tile: next power of two >= hidden
    num_warps: int
    programs: int  # persistent grid size
    hold_params: bool = True  # scale/bias held in registers for the program's life (else re-read per tile)
    one_pass: bool | None = None  # LayerNorm forward: shifted one-reduction statistics; None: for 16-bit x only


@dataclasses.dataclass
class Tuning:
    """Launch heuristics of one kernel family, as elements per thread so they carry across widths."""

    fwd_elems_per_thread: int = 32
    bwd_elems_per_thread: int = 16
    bwd_programs_per_sm: int = 1
    fwd_warps_per_sm: int = 32  # forward grid: programs per SM = this / warps per program (at least 1)
    fwd_hold_params: bool = True  # scale/bias in registers for the program's life, else re-read per tile
    fwd_one_pass: bool | None = None  # LayerNorm statistics in one reduction; None: for 16-bit inputs only
    bwd_hold_params: bool = True
    fwd_tile_elems: int = 4096  # forward: rows narrower than this are grouped until a tile holds this many elements


# Picked at 16384 x 8192 bf16 by `bench_norms.py --tune` on an H200 on the host's clock (NORMS_NOTES.md run 3),
# where these kernels ran every op 1.03-1.38x faster than earlier ones that did not prefetch; re-checked on the
# GPU's clock (run 6: one variant wins at width 8192 only, so these stay).
TUNING = {
    "layer_norm": Tuning(fwd_elems_per_thread=16),
    "rms_norm": Tuning(fwd_elems_per_thread=8),
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
    cfg = LaunchConfig(
        block_m,
        block_n,
        warps,
        programs=_programs(rows, block_m, num_sms, per_sm),
        hold_params=tuning.fwd_hold_params,
        one_pass=tuning.fwd_one_pass,
    )
    return dataclasses.replace(cfg, **override)


def backward_config(rows: int, hidden: int, num_sms: int, kind: str = "layer_norm", **override: Any) -> LaunchConfig:
    tuning = TUNING[kind]
    block_n = next_power_of_2(hidden)
    block_m = override.pop("block_m", max(1, TILE_ELEMS // block_n))
    per_sm = override.pop("programs_per_sm", tuning.bwd_programs_per_sm)
    warps = _warps_for(block_m * block_n, tuning.bwd_elems_per_thread)
    cfg = LaunchConfig(
        block_m,
        block_n,
        warps,
        programs=_programs(rows, block_m, num_sms, per_sm),
        hold_params=tuning.bwd_hold_params,
    )
    return dataclasses.replace(cfg, **override)


def num_sms() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or DEFAULT_NUM_SMS)


def _sms(runner: str) -> int:
    return num_sms() if runner == "triton" else DEFAULT_NUM_SMS


# ----------------------------------------------------------------------------------------------------
# Runners
# ----------------------------------------------------------------------------------------------------
def _meta(cfg: LaunchConfig, **meta) -> dict:
    """The kernel's meta-parameters: the op's own and the launch configuration's."""
    return dict(meta, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, HOLD_PARAMS=cfg.hold_params)


def _run(runner: str, name, inputs, out_shapes, cfg: LaunchConfig, meta, poison: bool):
    """Kernel `name` on its persistent grid; one stage, as the kernels prefetch their next tile themselves."""
    grid, warps = (cfg.programs,), cfg.num_warps
    return triton_runtime.run("kernels.norms", runner, name, inputs, out_shapes, grid, warps, 1, meta, poison)


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
    # one-pass statistics: worst case ~hidden x float32 rounding, fine below 16-bit rounding only
    one_pass = jnp.dtype(x.dtype).itemsize <= 2 if cfg.one_pass is None else cfg.one_pass
    meta = _meta(cfg, N=n, EPS=float(eps), ACT=ACTIVATIONS[activation], ONE_PASS=one_pass)
    y, mean, rstd = _run(runner, "layer_norm_fwd", [x, w, b, m], out, cfg, meta, poison)
    return y, mean, rstd


def layer_norm_bwd(x, w, b, dy, mean, rstd, *, activation, runner="triton", poison=False, config=None):
    """-> (dx [M, N] x.dtype, dw partials [G, N] f32, db partials [G, N] f32)."""
    m, n = x.shape
    cfg = config or backward_config(m, n, _sms(runner), "layer_norm")
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), _f32([cfg.programs, n]), _f32([cfg.programs, n])]
    meta = _meta(cfg, N=n, ACT=ACTIVATIONS[activation])
    inputs = [x, w, b, dy.astype(x.dtype), mean, rstd, m]
    dx, dw, db = _run(runner, "layer_norm_bwd", inputs, out, cfg, meta, poison)
    return dx, dw, db


def rms_norm_fwd(x, residual, w, *, eps, runner="triton", poison=False, config=None):
    """-> (y, h, rstd); h = x + residual rounded to x.dtype, or None when residual is None."""
    m, n = x.shape
    cfg = config or forward_config(n, "rms_norm", rows=m, num_sms=_sms(runner))
    has_res = residual is not None
    h_shape = x.shape if has_res else (1,)
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(h_shape, x.dtype), _f32([m])]
    meta = _meta(cfg, N=n, EPS=float(eps), HAS_RESIDUAL=has_res)
    inputs = [x, residual.astype(x.dtype) if has_res else x, w, m]
    y, h, rstd = _run(runner, "rms_norm_fwd", inputs, out, cfg, meta, poison)
    return y, (h if has_res else None), rstd


def rms_norm_bwd(x, w, dy, d_residual, rstd, *, runner="triton", poison=False, config=None):
    """-> (dx, dw partials [G, N] f32); dx includes d_residual when given (the add+RMSNorm backward)."""
    m, n = x.shape
    cfg = config or backward_config(m, n, _sms(runner), "rms_norm")
    has_dres = d_residual is not None
    out = [jax.ShapeDtypeStruct(x.shape, x.dtype), _f32([cfg.programs, n])]
    meta = _meta(cfg, N=n, HAS_DRES=has_dres)
    dy = dy.astype(x.dtype)
    inputs = [x, w, dy, d_residual.astype(x.dtype) if has_dres else dy, rstd, m]
    dx, dw = _run(runner, "rms_norm_bwd", inputs, out, cfg, meta, poison)
    return dx, dw
