"""Shapes shared by the host wrappers and the kernels: the chunk size, the solve blocks, the constant masks.

The kernels take their masks and identity from one host-built fp32 array instead of building them with
iota/affine_select on the device: it is loaded into SBUF once per launch (C x 920 fp32, 3.6 KiB per
partition) and keeps the kernels to the few instructions the emulator models.
"""

from __future__ import annotations

import functools

import numpy as np

C = 128  # tokens per chunk, on the partition axis
BLOCK = 16  # rows per diagonal block of the intra-chunk triangular solve
N_BLOCKS = C // BLOCK
MAX_HEAD_DIM = 128  # K and V: one partition per key dim, and PSUM packing in the kernels (4 * V <= 512 fp32)
MASKED = -1e30  # added to the upper triangle of G_i - G_j before exp: exp(-1e30) = 0, no inf * 0

# Column blocks of the constants array, C columns each, then single-column row masks.
IDENT, UPPER, SLOWER, NEG_UPPER, NEG_LOWER, BLOCKDIAG, ONES = range(7)
ROW_MASKS = 7 * C  # + s, s < BLOCK: 1 where row % BLOCK <= s (rows final after sweep s of the block inverse)
BLOCK_MASKS = ROW_MASKS + BLOCK  # + n, n < N_BLOCKS: 1 where row // BLOCK <= n (blocks final after step n)
N_CONST_COLS = BLOCK_MASKS + N_BLOCKS


def block(index: int) -> slice:
    """Columns of the C x C constant number `index`."""
    return slice(index * C, (index + 1) * C)


@functools.cache
def constants() -> np.ndarray:
    """[C, N_CONST_COLS] fp32, cached (never write to it).

    Columns: I | U (r <= c) | SL (r > c) | NU | NL | BD (block diagonal) | ones | row masks | block masks.
    """
    r, c = np.indices((C, C))
    out = np.zeros((C, N_CONST_COLS), dtype=np.float32)
    out[:, block(IDENT)] = r == c
    out[:, block(UPPER)] = r <= c  # stationary for cumulative sums: G = U^T g
    out[:, block(SLOWER)] = r > c  # strictly lower: the mask of A, and G_last - G = SL^T g
    out[:, block(NEG_UPPER)] = np.where(c > r, MASKED, 0.0)  # masks [i, j] with j > i
    out[:, block(NEG_LOWER)] = np.where(r > c, MASKED, 0.0)  # masks [j, i] with j > i
    out[:, block(BLOCKDIAG)] = r // BLOCK == c // BLOCK
    out[:, block(ONES)] = 1.0
    rows = np.arange(C)
    for s in range(BLOCK):
        out[:, ROW_MASKS + s] = rows % BLOCK <= s
    for n in range(N_BLOCKS):
        out[:, BLOCK_MASKS + n] = rows // BLOCK <= n
    return out
