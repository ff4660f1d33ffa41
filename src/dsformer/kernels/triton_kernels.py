"""The Triton kernels behind :mod:`dsformer.kernels.triton_ds` (imported only when one is launched).

Module-level, because Triton resolves the helpers a kernel calls among its module's globals.
"""

import triton
import triton.language as tl

from dsformer.hardware import triton_interpreting

TOKEN_BLOCKS = (1, 2, 4, 8, 16)  # tokens per program (triton_ds._token_block)

# (BLOCK_N, BLOCK_S, warps) of the row kernel and (BLOCK_A, BLOCK_B, warps) of the column kernel on a GPU
ROW_TILES = (
    # small BLOCK_N too: at decode a 11008-row layer has only N / BLOCK_N programs to fill the SMs
    (8, 128, 2), (16, 64, 2), (16, 128, 4), (32, 64, 4), (64, 32, 4), (128, 32, 8),
    (16, 16, 4), (32, 16, 4), (16, 32, 4), (32, 32, 8), (64, 16, 8),  # for 8-16 tokens
)  # fmt: skip
COLUMN_TILES = ((4, 128, 2), (8, 128, 4), (16, 32, 4), (16, 64, 4), (32, 32, 4), (64, 16, 4), (8, 64, 4), (32, 16, 4))


def configs(tiles: tuple, a: str, b: str) -> list:
    return [triton.Config({a: x, b: y}, num_warps=w) for x, y, w in tiles]


if triton_interpreting():  # the interpreter runs every config it is given: one is enough to check results
    row_configs = configs(((16, 8, 1),), "BLOCK_N", "BLOCK_S")
    column_configs = configs(((16, 8, 1),), "BLOCK_A", "BLOCK_B")
else:
    row_configs = configs(ROW_TILES, "BLOCK_N", "BLOCK_S")
    column_configs = configs(COLUMN_TILES, "BLOCK_A", "BLOCK_B")


def fitting(configs: list, block_t: int, a: str, b: str, low: int, high: int = 64) -> list:
    """The configs whose gathered ``block_t x a x b`` tile holds ``low..high`` values per thread.

    Above 64 the tile spills registers (ptxas for sm_90 at 16 tokens: up to 9 KB of spill stores
    per thread, and half a minute to compile each config); below ``low`` a program does too little.
    Falls back to the smallest tile, so a token block always has a config.
    """

    def per_thread(config) -> float:
        return block_t * config.kwargs[a] * config.kwargs[b] / (32 * config.num_warps)

    return [c for c in configs if low <= per_thread(c) <= high] or [min(configs, key=per_thread)]


@triton.jit
def weighted_sums(src_ptr, stride, t, t_ok, pos_ptr, val_ptr, entry, entry_ok):
    """``(BLOCK_T, B)``: for each token ``t`` and bag ``b``, Σ over the bag's entries of value · src[t, pos]."""
    pos = tl.load(pos_ptr + entry, mask=entry_ok, other=0).to(tl.int64)
    value = tl.load(val_ptr + entry, mask=entry_ok, other=0.0).to(tl.float32)
    gathered = tl.load(
        src_ptr + t[:, None, None].to(tl.int64) * stride + pos[None, :, :],
        mask=t_ok[:, None, None] & entry_ok[None, :, :],
        other=0.0,
    ).to(tl.float32)
    return tl.sum(gathered * value[None, :, :], axis=2)


@triton.jit
def rows_kernel(
    z_ptr, idx_ptr, val_ptr, bias_ptr, y_ptr, T, T_TUNE, N, S, stride_z, stride_y,
    HAS_BIAS: tl.constexpr, GELU: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    n_ok, t_ok = n < N, t < T
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for s0 in range(0, S, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        entry_ok = n_ok[:, None] & (s[None, :] < S)
        entry = n[:, None].to(tl.int64) * S + s[None, :]
        acc += weighted_sums(z_ptr, stride_z, t, t_ok, idx_ptr, val_ptr, entry, entry_ok)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GELU:
        acc = 0.5 * acc * (1.0 + tl.math.erf(acc * 0.7071067811865476))
    out = y_ptr + t[:, None].to(tl.int64) * stride_y + n[None, :]
    tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=t_ok[:, None] & n_ok[None, :])


@triton.jit
def columns_kernel(
    x_ptr, vec_ptr, off_ptr, val_ptr, u_ptr, T, T_TUNE, K, stride_x, stride_u,
    BLOCK_T: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr,
):  # fmt: skip
    a = tl.program_id(0) * BLOCK_A + tl.arange(0, BLOCK_A)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    a_ok, t_ok = a < K, t < T
    start = tl.load(off_ptr + a, mask=a_ok, other=0)
    length = tl.load(off_ptr + a + 1, mask=a_ok, other=0) - start
    acc = tl.zeros((BLOCK_T, BLOCK_A), dtype=tl.float32)
    # bags differ in length (atoms are used unevenly): run to this block's longest
    for j0 in range(0, tl.max(length, axis=0), BLOCK_B):
        j = j0 + tl.arange(0, BLOCK_B)
        entry_ok = j[None, :] < length[:, None]
        entry = start[:, None].to(tl.int64) + j[None, :]
        acc += weighted_sums(x_ptr, stride_x, t, t_ok, vec_ptr, val_ptr, entry, entry_ok)
    out = u_ptr + t[:, None].to(tl.int64) * stride_u + a[None, :]
    tl.store(out, acc.to(u_ptr.dtype.element_ty), mask=t_ok[:, None] & a_ok[None, :])


def for_rows(configs: list, block_t: int) -> list:
    return fitting(configs, block_t, "BLOCK_N", "BLOCK_S", low=16 if block_t == 1 else 32)


def for_columns(configs: list, block_t: int) -> list:
    return fitting(configs, block_t, "BLOCK_A", "BLOCK_B", low=4)


# One autotuner per token block, each over the configs that fit it (what a layer meets at decode,
# short and long prompts), tuned per layer shape and per power of two of tokens (``T_TUNE``, unused by
# the kernels): 16 tokens and 4,096 share a token block but not a best tile (16 tokens leave few
# programs to fill the SMs, 4,096 leave plenty).
rows = {
    bt: triton.autotune(configs=for_rows(row_configs, bt), key=["N", "S", "T_TUNE"])(rows_kernel) for bt in TOKEN_BLOCKS
}
columns = {
    bt: triton.autotune(configs=for_columns(column_configs, bt), key=["K", "T_TUNE"])(columns_kernel)
    for bt in TOKEN_BLOCKS
}
