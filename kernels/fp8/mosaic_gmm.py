"""Grouped block-scaled FP8 GEMM (MoE experts) for Hopper in Pallas Mosaic GPU: `mosaic_gemm`'s pipeline per group.

out[t, :] = lhs[t, :] @ rhs[g(t)] for rows sorted by group (the semantics of `reference.scaled_gmm`), with lhs in
1 × 128 tiles and each expert's weight in 128 × 128 blocks, given K-major (`rhs_t` [E, N, K]).

Work items are (group, 128-row block) pairs: each group covers the row blocks its rows touch, so a block holding
the end of one group and the start of the next is computed once per group, each time with that group's weight,
and each computation stores only its own group's rows, through a ladder of TMA copies of 64, 32, ..., 1 rows
(TMA boxes have static sizes). The item table is computed before the kernel (a few small XLA ops); empty groups
own no item. Each SM runs one pipeline across all its (item, column block) tiles where it gets at least two
(`mosaic_gemm.chains`), so a tile's fill and epilogue overlap its neighbours' loads.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from kernels.fp8.mosaic_gemm import TILE_K, TILE_N
from kernels.triton_runtime import varying_like

BLOCK_M = 128  # rows per work item: two compute warpgroups of 64
STAGES = 4  # shared-memory pipeline stages


def work_items(group_sizes: jax.Array, rows: int) -> tuple[jax.Array, jax.Array]:
    """(table [max_items, 4] of (group, row block, first row, end row within the block), number of items) for
    rows sorted by group; max_items bounds the count for any group sizes summing to at most `rows`."""
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    first_block = starts // BLOCK_M
    blocks = jnp.where(sizes > 0, (jnp.maximum(ends, 1) - 1) // BLOCK_M - first_block + 1, 0)
    item_ends = jnp.cumsum(blocks)
    max_items = -(-rows // BLOCK_M) + sizes.shape[0] - 1
    item = jnp.arange(max_items, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(item_ends, item, side="right"), sizes.shape[0] - 1).astype(jnp.int32)
    block = first_block[group] + item - (item_ends[group] - blocks[group])
    lo = jnp.maximum(starts[group] - block * BLOCK_M, 0)
    hi = jnp.minimum(ends[group] - block * BLOCK_M, BLOCK_M)
    return jnp.stack([group, block, lo, hi], axis=1), item_ends[-1]


def scaled_gmm_nt(
    lhs: jax.Array,
    lhs_scales: jax.Array,
    rhs_t: jax.Array,
    rhs_scales: jax.Array,
    group_sizes: jax.Array,
    out_dtype=jnp.bfloat16,
) -> jax.Array:
    """lhs [T, K] E4M3 (scales [T, K/128]) rows sorted by group; rhs_t [E, N, K] E4M3, each expert's weight
    transposed, with the block scales of the [K, N] weight, [E, K/128, N/128]; group_sizes [E]. Returns [T, N]
    in `out_dtype`, zero past sum(group_sizes). K and N must be multiples of 128."""
    import jax.experimental.pallas as pl
    import jax.experimental.pallas.mosaic_gpu as plgpu

    (t, k), n = lhs.shape, rhs_t.shape[1]
    if k % TILE_K or n % TILE_N:
        raise ValueError(f"scaled_gmm_nt needs K and N multiples of 128, got K={k}, N={n}")
    t_pad = -(-t // BLOCK_M) * BLOCK_M
    lhs_p = jnp.pad(lhs, ((0, t_pad - t), (0, 0)))
    scales_t = jnp.pad(lhs_scales.astype(jnp.float32), ((0, t_pad - t), (0, 0)), constant_values=1.0).T
    rhs_scales_t = rhs_scales.astype(jnp.float32).transpose(0, 2, 1)  # [E, N/128, K/128]
    table, n_items = work_items(group_sizes, t)
    meta = jnp.concatenate([n_items[None], table.reshape(-1)])
    steps, n_tiles = k // TILE_K, n // TILE_N
    stages = min(STAGES, steps)
    sms = jax.devices()[0].core_count
    swizzle = 128
    operand = (plgpu.TilingTransform((8, swizzle)), plgpu.SwizzleTransform(swizzle))
    half = BLOCK_M // 2
    out_elems = swizzle // jnp.dtype(out_dtype).itemsize
    out_transforms = (plgpu.TilingTransform((8, out_elems)), plgpu.SwizzleTransform(swizzle))

    def kernel(meta_gmem, a_gmem, as_gmem, bt_gmem, bs_gmem, out_gmem):
        def pipeline(body, context, state=None):
            return plgpu.emit_pipeline_warp_specialized(
                body,
                grid=(steps,),
                memory_registers=40,
                in_specs=[
                    plgpu.BlockSpec((BLOCK_M, TILE_K), lambda s: (0, s), transforms=operand),
                    plgpu.BlockSpec((TILE_N, TILE_K), lambda s: (0, s), transforms=operand),
                    plgpu.BlockSpec((1, BLOCK_M), lambda s: (s, 0)),
                ],
                wg_axis="wg",
                num_compute_wgs=2,
                max_concurrent_steps=stages,
                compute_context=context,
                pipeline_state=state,
            )

        ignore = lambda *_, **__: None  # noqa: E731

        @functools.partial(
            pl.run_scoped,
            allocations=pipeline(ignore, ignore).get_allocations(a_gmem, bt_gmem.at[0], as_gmem),
            # Whole 64-row halves (most of them) leave through a swizzled buffer, free of bank conflicts; the
            # halves at group boundaries through an untiled one, from which any run of rows can be stored.
            out_swizzled=plgpu.SMEM((2, half, TILE_N), out_dtype, transforms=out_transforms),
            out_smem=plgpu.SMEM((2, half, TILE_N), out_dtype),
            collective_axes="wg",
        )
        def scope(allocations, out_swizzled, out_smem):
            wg = lax.axis_index("wg")
            tiles = meta_gmem[0] * n_tiles

            def run_tiles(chained: bool):
                @plgpu.nd_loop((tiles,), collective_axes="sm")
                def _(info):
                    (linear,) = info.index
                    item, ni = lax.div(linear, n_tiles), lax.rem(linear, n_tiles)
                    group, block = meta_gmem[1 + 4 * item], meta_gmem[2 + 4 * item]
                    lo, hi = meta_gmem[3 + 4 * item], meta_gmem[4 + 4 * item]
                    own_rows = pl.ds(wg * half, half)
                    cols = pl.ds(ni * TILE_N, TILE_N)
                    # This warpgroup's rows of the item: [first, first + count) of its 64.
                    first = jnp.clip(lo - wg * half, 0, half)
                    count = jnp.clip(hi - wg * half, 0, half) - first

                    def context(run):
                        acc = run(plgpu.layout_cast(jnp.zeros((half, TILE_N), jnp.float32), plgpu.Layout.WGMMA))
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                        row0 = block * BLOCK_M + wg * half

                        @pl.when(count == half)
                        def _():
                            out_swizzled[wg] = acc.astype(out_dtype)
                            plgpu.commit_smem()
                            plgpu.copy_smem_to_gmem(out_swizzled.at[wg], out_gmem.at[pl.ds(row0, half), cols])

                        @pl.when(count < half)
                        def _():
                            out_smem[wg] = acc.astype(out_dtype)
                            plgpu.commit_smem()
                            offset, size = first, half // 2
                            while size >= 1:  # a ladder of static TMA boxes covers any count of rows

                                @pl.when((count & size) != 0)
                                def _(offset=offset, size=size):
                                    src = out_smem.at[wg, pl.ds(offset, size)]
                                    plgpu.copy_smem_to_gmem(src, out_gmem.at[pl.ds(row0 + offset, size), cols])

                                offset = offset + (count & size)
                                size //= 2

                    def step(idx, a_smem, bt_smem, as_smem, acc):
                        (s,) = idx

                        def chunk(partial_ref):
                            plgpu.wgmma(partial_ref, a_smem.at[own_rows], plgpu.transpose_ref(bt_smem, (1, 0)))
                            return partial_ref[...]

                        product = pl.run_scoped(chunk, plgpu.ACC((half, TILE_N), jnp.float32))
                        row_scale = plgpu.load(as_smem.at[0, own_rows], (), layout=plgpu.Layout.WGMMA.reduce(1))
                        scale = row_scale * bs_gmem[group, ni, s]
                        return acc + product * lax.broadcast_in_dim(scale, product.shape, [0])

                    state = None
                    if chained:
                        phase = plgpu.PipelinePipeline
                        last = info.local_index == info.num_local_steps - 1
                        state = jnp.where(
                            info.local_index == 0, int(phase.START), jnp.where(last, int(phase.STOP), int(phase.STEADY))
                        )
                    pipeline(step, context, state)(
                        a_gmem.at[pl.ds(block * BLOCK_M, BLOCK_M), :],
                        bt_gmem.at[group, pl.ds(ni * TILE_N, TILE_N), :],
                        as_gmem.at[:, pl.ds(block * BLOCK_M, BLOCK_M)],
                        allocations=allocations,
                    )

            if steps % stages == 0:  # the stage ring turns whole per tile: chain where every SM gets two tiles
                enough = tiles >= 2 * sms
                pl.when(enough)(lambda: run_tiles(True))
                pl.when(jnp.logical_not(enough))(lambda: run_tiles(False))
            else:
                run_tiles(False)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel,
        out_type=jax.ShapeDtypeStruct((t_pad, n), out_dtype),
        grid=(sms,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    out = call(meta, lhs_p, scales_t, rhs_t, rhs_scales_t)
    rows = jnp.arange(t)[:, None] < jnp.sum(group_sizes)
    out = jnp.where(rows, out[:t], jnp.zeros((), out_dtype))  # rows no group covers were never written
    return varying_like([out], lhs, rhs_t)[0]  # inside shard_map: see varying_like
