"""The dense-sparse product on the GPU: the dense stage on cuBLAS, the sparse stage as Triton kernels.

``W = C B`` with ``C`` in ELL form (``N`` rows of ``s`` atom indices and values):

- row vectors (``out >= in``): ``Z = X Bᵀ`` (``T x k``, one GEMM), then
  ``Y[t, i] = Σⱼ values[i, j] · Z[t, indices[i, j]]`` (+ bias, then GELU where fused). A program
  computes a ``BLOCK_T x BLOCK_N`` tile of ``Y`` and reads each tile of indices and values once
  for its ``BLOCK_T`` tokens; at decode (``T = 1``) the kernel streams ``C`` once, the byte floor
  of the product, while the ``k``-long row of ``Z`` it gathers from stays in cache.
- column vectors (``out < in``): ``U = X Cᵀ`` gathers, for each atom, the inputs in its bag
  (the ELL transposed to a CSR, :class:`dsformer.kernels.gather.ColumnPlan`), then ``Y = U B``
  on cuBLAS with the bias.

Fusing the two stages into one kernel does not pay: every output needs ``Z`` entries from all of
``B``, so a fused program would have to recompute or wait for the whole dense stage. Bias and
GELU are fused into the sparse stage, which is where the outputs are stored.

The kernels accumulate in float32 and store in the input's dtype (float16, bfloat16 or float32).
They run on CUDA; with ``TRITON_INTERPRET=1`` set before this module is imported, Triton's
interpreter runs them on CPU tensors (slowly), which is how the tests check them without a GPU.
Each is a ``torch.library`` custom op, so ``torch.compile`` treats it as one opaque call.

Example (on a GPU, or on CPU under ``TRITON_INTERPRET=1``):
    >>> import torch
    >>> from dsformer.kernels import triton_ds
    >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
    >>> basis, x = torch.randn(4, 3, device=dev), torch.randn(5, 3, device=dev)
    >>> indices = torch.tensor([[0, 2], [1, 3], [0, 1], [2, 3]], device=dev)
    >>> values = torch.randn(4, 2, device=dev)
    >>> c = torch.zeros(4, 4, device=dev).scatter_(1, indices, values)
    >>> y = triton_ds.ds_rows(x, basis, indices, values, None) if triton_ds.runs_on(x) else x @ (c @ basis).T
    >>> torch.allclose(y, x @ (c @ basis).T, atol=1e-4)
    True
"""

from __future__ import annotations

import importlib

import torch

from dsformer.hardware import triton_installed, triton_interpreting
from dsformer.kernels.gather import ColumnPlan


def runs_on(x: torch.Tensor) -> bool:
    """Whether the kernels can run on ``x``'s device here: CUDA with Triton, or CPU under the interpreter."""
    if not triton_installed():
        return False
    return x.device.type == "cuda" or (x.device.type == "cpu" and triton_interpreting())


def ds_rows(
    x: torch.Tensor,
    basis: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    gelu: bool = False,
) -> torch.Tensor:
    """``x (..., d) -> (..., N)`` for row vectors: ``y = C (B x)`` (+ bias, GELU); token-major output."""
    tokens = x.reshape(-1, x.shape[-1])
    z = torch.matmul(tokens, basis.mT)  # (T, k)
    y = _op_rows(z, indices, values, bias, gelu)
    return y.reshape(*x.shape[:-1], indices.shape[0])


def ds_columns(x: torch.Tensor, plan: ColumnPlan, basis: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x (..., N) -> (..., d)`` for column vectors: ``y = Bᵀ (Cᵀ x)`` (+ bias)."""
    tokens = x.reshape(-1, x.shape[-1])
    u = _op_columns(tokens, plan.vectors, plan.offsets, plan.values, basis.shape[0])  # (T, k)
    y = torch.matmul(u, basis) if bias is None else torch.addmm(bias, u, basis)
    return y.reshape(*x.shape[:-1], basis.shape[1])


def _token_block(tokens: int) -> int:
    """Tokens per program: every token at decode, up to 16 (the configs that fit 16 tokens already
    hold 64 values per thread; see ``triton_kernels.fitting``)."""
    return min(16, _tuning_bucket(tokens))


def _tuning_bucket(tokens: int) -> int:
    """Tokens rounded up to a power of two: the autotuners' key, so a tile is tuned once per bucket."""
    return 1 << max(0, tokens - 1).bit_length()


def _rows(
    z: torch.Tensor, indices: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None, gelu: bool
) -> torch.Tensor:
    z, indices, values = z.contiguous(), indices.contiguous(), values.contiguous()
    bias = None if bias is None else bias.contiguous()
    tokens, (n, s) = z.shape[0], indices.shape
    y = z.new_empty(tokens, n)
    if tokens == 0 or n == 0:
        return y
    block_t = _token_block(tokens)
    kernel = _kernels().rows[block_t]
    grid = lambda meta: (_cdiv(n, meta["BLOCK_N"]), _cdiv(tokens, meta["BLOCK_T"]))  # noqa: E731
    kernel[grid](
        z, indices, values, bias if bias is not None else values, y,
        tokens, _tuning_bucket(tokens), n, s, z.stride(0), y.stride(0),
        HAS_BIAS=bias is not None, GELU=gelu, BLOCK_T=block_t,
    )  # fmt: skip
    return y


def _columns(
    x: torch.Tensor, vectors: torch.Tensor, offsets: torch.Tensor, values: torch.Tensor, atoms: int
) -> torch.Tensor:
    x, vectors, offsets, values = x.contiguous(), vectors.contiguous(), offsets.contiguous(), values.contiguous()
    tokens = x.shape[0]
    u = x.new_empty(tokens, atoms)
    if tokens == 0 or atoms == 0:
        return u
    block_t = _token_block(tokens)
    kernel = _kernels().columns[block_t]
    grid = lambda meta: (_cdiv(atoms, meta["BLOCK_A"]), _cdiv(tokens, meta["BLOCK_T"]))  # noqa: E731
    kernel[grid](
        x, vectors, offsets, values, u, tokens, _tuning_bucket(tokens), atoms, x.stride(0), u.stride(0),
        BLOCK_T=block_t,
    )  # fmt: skip
    return u


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_op_rows = torch.library.custom_op("dsformer::ds_rows_sparse_stage", mutates_args=())(_rows)
_op_columns = torch.library.custom_op("dsformer::ds_columns_sparse_stage", mutates_args=())(_columns)


@_op_rows.register_fake
def _(z, indices, values, bias, gelu):
    return z.new_empty(z.shape[0], indices.shape[0])


@_op_columns.register_fake
def _(x, vectors, offsets, values, atoms):
    return x.new_empty(x.shape[0], atoms)


def _kernels():
    """The Triton kernels (compiled on first launch); Triton is imported only when one is launched, by name
    (``dsformer.kernels.triton_kernels`` imports Triton at its top)."""
    return importlib.import_module("dsformer.kernels.triton_kernels")


__all__ = ["ds_columns", "ds_rows", "runs_on"]
