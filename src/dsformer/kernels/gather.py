"""The dense-sparse product with the sparse stage as a weighted embedding-bag (CPU and CUDA).

``W = C B`` with ``C`` in ELL form (``N`` rows of ``s`` atom indices and values). The dense stage
is one GEMM; the sparse stage gathers whole rows of a token-minor matrix, so every gathered
row is ``T`` contiguous floats and the work is ``N·s·T`` multiply-adds instead of ``N·k·T``:

- row vectors (``out >= in``): ``Zᵀ = B Xᵀ`` (``k x T``), then output row ``i`` of ``Yᵀ`` is
  ``Σⱼ values[i, j] · Zᵀ[indices[i, j]]``: an embedding-bag with one bag of ``s`` per output.
- column vectors (``out < in``): ``Uᵀ = Cᵀ Xᵀ`` gathers, for each atom, the input rows that use
  it (the ELL transposed to a CSR of variable bags), then ``Y = U B``.

Both work one sequence at a time (``x (..., L, f)``): the gathered rows are that sequence's
``L`` tokens, which stay in cache. A widening row layer (an FFN's up-projection) returns a
transposed view of its ``(N, L)`` storage rather than copying it back: the activation keeps
that layout, and the column-vector layer after it reads it without a copy. Other row layers
copy back to token-major rows, which attention and residual sums need.

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


class ColumnPlan(NamedTuple):
    """The ELL coefficients of a column-vector layer regrouped by atom (a CSR of ``Cᵀ``)."""

    vectors: torch.Tensor  # (N·s,) int64: which input row each entry reads, grouped by atom
    offsets: torch.Tensor  # (k,) int64: where each atom's group starts
    values: torch.Tensor  # (N·s,) the coefficients in the same order


def column_plan(indices: torch.Tensor, values: torch.Tensor, k: int) -> ColumnPlan:
    """Regroup ``indices (N, s)`` and ``values (N, s)`` by atom; atoms nobody uses get empty groups."""
    n, s = indices.shape
    atoms = indices.reshape(-1).long()
    order = torch.argsort(atoms, stable=True)
    vectors = torch.arange(n, device=indices.device).repeat_interleave(s)[order]
    offsets = torch.searchsorted(atoms[order], torch.arange(k, device=indices.device))
    return ColumnPlan(vectors, offsets, values.reshape(-1)[order])


def _sequences(x: torch.Tensor) -> torch.Tensor:
    """``x (..., L, f)`` as ``(S, L, f)``: a 2-D input is one sequence of ``T`` tokens."""
    return x.unsqueeze(0) if x.dim() == 2 else x.reshape(-1, *x.shape[-2:])


def ds_rows(
    x: torch.Tensor,
    basis: torch.Tensor,
    indices: torch.Tensor,
    values: torch.Tensor,
    bias: torch.Tensor | None,
    dense_stage: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``x (..., L, d) -> (..., L, N)`` for row vectors: ``y = C (B x)`` (a transposed view when ``N > d``).

    One sequence at a time, so the ``k x L`` rows being gathered stay in cache. ``dense_stage``
    computes ``X Bᵀ`` another way (int8: ``dsformer.kernels.int8``); default one float GEMM.
    """
    seqs = _sequences(x)
    if dense_stage is None:
        zt = torch.matmul(basis, seqs.mT)  # (S, k, L)
    else:
        zt = dense_stage(seqs).mT.contiguous()
    yt = zt.new_empty(seqs.shape[0], indices.shape[0], seqs.shape[1])  # (S, N, L)
    for i in range(seqs.shape[0]):
        yt[i] = F.embedding_bag(indices, zt[i], per_sample_weights=values, mode="sum")
    if bias is not None:
        yt += bias[:, None]
    y = yt.mT
    if indices.shape[0] <= seqs.shape[-1]:
        # a layer that does not widen feeds attention or a residual sum, which want token-major
        # rows (CPU flash attention needs the head dimension contiguous): transpose back
        y = y.contiguous()
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
    ut = xt.new_empty(xt.shape[0], plan.offsets.shape[0], xt.shape[2])  # (S, k, L)
    for i in range(xt.shape[0]):
        ut[i] = F.embedding_bag(plan.vectors, xt[i], plan.offsets, per_sample_weights=plan.values, mode="sum")
    y = torch.matmul(ut.mT, basis) if dense_stage is None else dense_stage(ut.mT.contiguous())
    if bias is not None:
        y += bias
    return y.reshape(*x.shape[:-1], basis.shape[1])
