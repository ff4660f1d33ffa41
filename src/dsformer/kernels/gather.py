"""The dense-sparse product with the sparse stage as weighted bags of rows (CPU and CUDA).

``W = C B`` with ``C`` in ELL form (``N`` rows of ``s`` atom indices and values). The dense stage
is one GEMM; the sparse stage gathers whole rows of a token-minor matrix, so every gathered
row is ``T`` contiguous floats and the work is ``N·s·T`` multiply-adds instead of ``N·k·T``:

- row vectors (``out >= in``): ``Zᵀ = B Xᵀ`` (``k x T``), then output row ``i`` of ``Yᵀ`` is
  ``Σⱼ values[i, j] · Zᵀ[indices[i, j]]``: an embedding-bag with one bag of ``s`` per output.
- column vectors (``out < in``): ``Uᵀ = Cᵀ Xᵀ`` gathers, for each atom, the input rows that use
  it (the ELL transposed to a CSR of variable bags), then ``Y = U B``.

The bags run on the compiled CPU kernel of :mod:`dsformer.kernels.native` where it builds,
else on ``F.embedding_bag`` (CUDA, other CPUs). Both work one sequence at a time
(``x (..., L, f)``): the gathered rows are that sequence's ``L`` tokens, which stay in cache;
sequences shorter than ``SHORT`` tokens (decode steps) are gathered together as one.
A widening row layer (an FFN's up-projection) returns a transposed view of its ``(N, L)``
storage rather than copying it back: the activation keeps that layout, and the column-vector
layer after it reads it without a copy. Other layers write token-major rows, which attention
and residual sums need, straight from the kernel (with the bias added there).

Example:
    >>> import torch
    >>> from dsformer.kernels.gather import ds_rows
    >>> basis, x = torch.randn(4, 3), torch.randn(5, 3)
    >>> indices, values = torch.tensor([[0, 2], [1, 3], [0, 1], [2, 3]]), torch.randn(4, 2)
    >>> c = torch.zeros(4, 4).scatter_(1, indices, values)
    >>> torch.allclose(ds_rows(x, basis, indices, values, None), x @ (c @ basis).T, atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.nn import functional as F

from dsformer.kernels import native


class ColumnPlan(NamedTuple):
    """The ELL coefficients of a column-vector layer regrouped by atom (a CSR of ``Cᵀ``)."""

    vectors: torch.Tensor  # (N·s,) which input row each entry reads, grouped by atom: uint8 or int16 where N fits
    offsets: torch.Tensor  # (k + 1,) int32: where each atom's group starts, then the total
    values: torch.Tensor  # (N·s,) the coefficients in the same order


def column_plan(indices: torch.Tensor, values: torch.Tensor, k: int) -> ColumnPlan:
    """Regroup ``indices (N, s)`` and ``values (N, s)`` by atom; atoms nobody uses get empty groups."""
    n, s = indices.shape
    atoms = indices.reshape(-1).long()
    order = torch.argsort(atoms, stable=True)
    vectors = torch.arange(n, device=indices.device).repeat_interleave(s)[order]
    offsets = torch.searchsorted(atoms[order], torch.arange(k + 1, device=indices.device))
    narrow = torch.uint8 if n <= 256 else torch.int16 if n <= 32768 else torch.int32
    return ColumnPlan(vectors.to(narrow), offsets.int(), values.reshape(-1)[order])


def _bags(
    rows: torch.Tensor,
    index: torch.Tensor,
    weights: torch.Tensor,
    offsets: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    token_major: bool = False,
    gelu: bool = False,
) -> torch.Tensor:
    """``rows (S, R, L) -> (S, B, L)``: weighted sums of rows plus ``bias``, one bag per output row.

    ELL bags (``offsets`` None: ``index`` and ``weights`` are ``(B, s)``) or CSR bags (``offsets``
    ``(B + 1,)`` over flat ``index`` and ``weights``); ``token_major`` gives ``(S, L, B)``; ``gelu``
    applies GELU to the result. The compiled kernel where it runs (:mod:`dsformer.kernels.native`),
    else an embedding-bag per sequence; both give the same sums.
    """
    if rows.dtype == torch.float32 and rows.device.type == "cpu" and native.available():
        index = native.readable(index)  # widening stored uint8 or int16 would move more bytes than the product
        bag_size = index.shape[1] if offsets is None else 0
        return native.bags_of_checked(
            rows, index.reshape(-1), weights.reshape(-1), offsets, bag_size, bias, token_major, gelu
        )
    index = index if index.dtype in (torch.int32, torch.int64) else index.int()
    bags = index.shape[0] if offsets is None else offsets.shape[0] - 1
    out = rows.new_empty(rows.shape[0], bags, rows.shape[2])
    for i in range(rows.shape[0]):
        out[i] = F.embedding_bag(
            index, rows[i], offsets, per_sample_weights=weights, mode="sum", include_last_offset=offsets is not None
        )
    if bias is not None:
        out += bias[:, None]
    if gelu:
        out = F.gelu(out)
    return out.mT.contiguous() if token_major else out


SHORT = 16  # sequences shorter than this (decode steps) are gathered as one


def _sequences(x: torch.Tensor) -> torch.Tensor:
    """``x (..., L, f)`` as ``(S, L, f)``: a 2-D input is one sequence of ``T`` tokens, and so are short
    sequences (a batch decoding a token each), whose rows of a few floats would leave the vectors idle."""
    if x.dim() == 2 or x.shape[-2] < SHORT:
        return x.reshape(1, -1, x.shape[-1])
    return x.reshape(-1, *x.shape[-2:])


def ds_rows(
    x: torch.Tensor,
    basis: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    dense_stage: Callable[[torch.Tensor], torch.Tensor] | None = None,
    gelu: bool = False,
) -> torch.Tensor:
    """``x (..., L, d) -> (..., L, N)`` for row vectors: ``y = C (B x)`` (a transposed view when ``N > d``).

    One sequence at a time, so the ``k x L`` rows being gathered stay in cache. ``dense_stage``
    computes ``X Bᵀ`` another way (int8: ``dsformer.kernels.int8``); default one float GEMM.
    ``gelu`` returns ``gelu(y)``, applied in the kernel before each output is stored.
    """
    seqs = _sequences(x)
    if dense_stage is None and seqs.shape[1] == 1:  # one token: (S, 1, k) is (S, k, 1) in memory
        zt = F.linear(seqs, basis).mT
    elif dense_stage is None:
        zt = torch.matmul(basis, seqs.mT)  # (S, k, L)
    else:
        zt = dense_stage(seqs).mT.contiguous()
    # a layer that does not widen feeds attention or a residual sum, which want token-major rows
    # (CPU flash attention needs the head dimension contiguous); a widening one keeps (N, L) storage
    widening = indices.shape[0] > seqs.shape[-1]
    y = _bags(zt, indices, values, None, bias, token_major=not widening, gelu=gelu)
    y = y.mT if widening else y  # (S, L, N)
    return y.reshape(*x.shape[:-1], indices.shape[0])


def ds_columns(
    x: torch.Tensor,
    plan: ColumnPlan,
    basis: torch.Tensor,
    bias: torch.Tensor | None,
    dense_stage: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x (..., L, N) -> (..., L, d)`` for column vectors: ``y = Bᵀ (Cᵀ x)``; ``dense_stage`` computes
    ``U B`` another way (as in :func:`ds_rows`)."""
    xt = _sequences(x).mT.contiguous()  # (S, N, L): no copy when x came from a row layer's gather
    # atom-major: the scatter of token-major output costs more than the GEMM saves on a transposed input
    ut = _bags(xt, plan.vectors, plan.values, plan.offsets)  # (S, k, L)
    y = torch.matmul(ut.mT, basis) if dense_stage is None else dense_stage(ut.mT.contiguous())
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], basis.shape[1])
