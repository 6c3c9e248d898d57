"""The block layout of a block-sparse matrix B [K, N]: which square blocks are present, in two orders.

B is cut into (K / bs) x (N / bs) blocks of bs x bs. The present ("nonzero") blocks are numbered in
block-column-major order (BSC): all blocks of block column 0 by increasing block row, then block column 1, ...
`values[p]` [bs, bs] holds block p. Two index sets are built once, on the host, when the layout is made:

- by block column (forward: out = A @ B): `col_offsets[j] .. col_offsets[j + 1]` are the blocks of block column
  j, `block_rows[p]` / `block_cols[p]` the block row / column of block p;
- by block row (input gradient: dA = dOut @ B^T, whose block columns are B's block rows):
  `row_offsets[i] .. row_offsets[i + 1]` index `row_block_cols` (block column of each block of block row i, by
  increasing column) and `row_positions` (where that block sits in `values`).

The index arrays are pytree leaves (int32 device arrays); the block size and shape are static. The number of
present blocks is fixed when the layout is built, so every shape is static under jit.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["SUPPORTED_BLOCK_SIZES", "BlockLayout", "block_mask_of", "from_dense", "layout_from_block_mask", "to_dense"]

# 64 and 128 are the sizes the kernels are tuned for; 16 and 32 keep CPU tests small (tl.dot needs >= 16).
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockLayout:
    col_offsets: jax.Array  # int32 [N / bs + 1]
    block_rows: jax.Array  # int32 [nnz], BSC order
    block_cols: jax.Array  # int32 [nnz], BSC order
    row_offsets: jax.Array  # int32 [K / bs + 1]
    row_block_cols: jax.Array  # int32 [nnz], by block row
    row_positions: jax.Array  # int32 [nnz], by block row: index into values
    block_size: int = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))  # (K, N) of the dense B

    @property
    def nnz(self) -> int:
        return self.block_rows.shape[0]

    @property
    def block_shape(self) -> tuple[int, int]:
        """(K / bs, N / bs): blocks along each dimension."""
        return self.shape[0] // self.block_size, self.shape[1] // self.block_size

    @property
    def values_shape(self) -> tuple[int, int, int]:
        return self.nnz, self.block_size, self.block_size

    @property
    def density(self) -> float:
        kb, nb = self.block_shape
        return self.nnz / max(kb * nb, 1)

    def block_mask(self) -> np.ndarray:
        """The bool [K / bs, N / bs] mask of present blocks (host; needs concrete index arrays)."""
        mask = np.zeros(self.block_shape, bool)
        mask[np.asarray(self.block_rows), np.asarray(self.block_cols)] = True
        return mask


def _check_block_size(block_size: int, k: int, n: int) -> None:
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {SUPPORTED_BLOCK_SIZES}, got {block_size!r}")
    if k % block_size or n % block_size:
        raise ValueError(f"block_size {block_size} must divide both dimensions of B, got shape {(k, n)}")


def layout_from_block_mask(block_mask, block_size: int) -> BlockLayout:
    """The layout of the blocks marked True in a bool [K / bs, N / bs] mask (a concrete array)."""
    mask = np.asarray(block_mask)
    if mask.ndim != 2:
        raise ValueError(f"block mask must be 2-D [K / bs, N / bs], got shape {mask.shape}")
    if mask.dtype != np.bool_:
        raise ValueError(f"block mask must be boolean, got {mask.dtype}")
    kb, nb = mask.shape
    _check_block_size(block_size, kb * block_size, nb * block_size)
    cols, rows = np.nonzero(mask.T)  # BSC order: by block column, then block row
    col_offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=0))])
    by_row = np.lexsort((cols, rows))  # stable: by block row, then block column
    row_offsets = np.concatenate([[0], np.cumsum(mask.sum(axis=1))])
    i32 = lambda x: jnp.asarray(np.asarray(x, np.int32))
    return BlockLayout(
        col_offsets=i32(col_offsets),
        block_rows=i32(rows),
        block_cols=i32(cols),
        row_offsets=i32(row_offsets),
        row_block_cols=i32(cols[by_row]),
        row_positions=i32(by_row),
        block_size=int(block_size),
        shape=(kb * block_size, nb * block_size),
    )


def _blocks(b: jax.Array, block_size: int) -> jax.Array:
    """[K, N] -> [K / bs, N / bs, bs, bs]."""
    k, n = b.shape
    return b.reshape(k // block_size, block_size, n // block_size, block_size).transpose(0, 2, 1, 3)


def block_mask_of(b, block_size: int) -> np.ndarray:
    """bool [K / bs, N / bs]: the blocks of a concrete dense matrix holding any nonzero."""
    b = np.asarray(b)
    _check_block_size(block_size, *b.shape)
    return np.asarray(_blocks(b != 0, block_size).any(axis=(2, 3)))


def from_dense(b, mask=None, block_size: int = 128) -> tuple[BlockLayout, jax.Array]:
    """(layout, values [nnz, bs, bs]) of the dense B [K, N] restricted to some blocks.

    `mask`: a bool block mask [K / bs, N / bs]; an element mask [K, N] (a block is kept when any of its
    elements is, and elements outside the mask become zero); or None: the blocks of B holding a nonzero (B must
    then be concrete). The mask is read on the host; B may be traced when a mask is given.
    """
    if b.ndim != 2:
        raise ValueError(f"B must be 2-D [K, N], got shape {b.shape}")
    k, n = b.shape
    _check_block_size(block_size, k, n)
    if mask is None:
        block_mask = block_mask_of(b, block_size)
    else:
        mask = np.asarray(mask)
        if mask.shape == (k, n):
            b = jnp.where(mask, b, 0)
            block_mask = np.asarray(_blocks(mask.astype(bool), block_size).any(axis=(2, 3)))
        elif mask.shape == (k // block_size, n // block_size):
            block_mask = mask
        else:
            raise ValueError(
                f"mask must be a block mask {(k // block_size, n // block_size)} or an element mask {(k, n)}, "
                f"got {mask.shape}"
            )
    layout = layout_from_block_mask(block_mask, block_size)
    values = _blocks(jnp.asarray(b), block_size)[layout.block_rows, layout.block_cols]
    return layout, values


def to_dense(layout: BlockLayout, values: jax.Array) -> jax.Array:
    """The dense B [K, N]: `values` scattered into their blocks, zeros elsewhere (traceable, differentiable)."""
    if values.shape != layout.values_shape:
        raise ValueError(f"values must have shape {layout.values_shape} for this layout, got {values.shape}")
    (kb, nb), bs = layout.block_shape, layout.block_size
    blocks = jnp.zeros((kb, nb, bs, bs), values.dtype).at[layout.block_rows, layout.block_cols].set(values)
    return blocks.transpose(0, 2, 1, 3).reshape(layout.shape)
