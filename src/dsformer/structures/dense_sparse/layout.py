"""Shapes and budgets of a dense-sparse factorization, and the factors of one layer.

The weight vectors are the longer side of ``W`` (rows when ``out >= in``, else columns): ``N``
vectors of dimension ``d``. ``B`` (``k x d``) is a dense basis shared by the layer; ``C``
(``N x k``) has exactly ``s`` non-zeros in every row, stored in ELL form: ``values (N, s)`` and
``indices (N, s)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsformer.structures.base import Factors, support_mask
from dsformer.structures.budget import check_ratio, infeasible


@dataclass(frozen=True)
class DenseSparseLayout:
    """Shapes of one DS-factorized ``(out_features, in_features)`` weight."""

    out_features: int
    in_features: int
    k: int
    s: int

    @property
    def rows(self) -> bool:
        """Whether the weight vectors are rows of ``W`` (else columns)."""
        return self.out_features >= self.in_features

    @property
    def n(self) -> int:
        return max(self.out_features, self.in_features)

    @property
    def d(self) -> int:
        return min(self.out_features, self.in_features)

    @property
    def value_params(self) -> int:
        return self.k * self.d + self.s * self.n

    @property
    def ratio(self) -> float:
        return self.out_features * self.in_features / self.value_params

    @property
    def index_dtype(self) -> torch.dtype:
        return index_dtype(self.k)

    def stored_bytes(self, element_size: int) -> int:
        """Bytes of the stored weight: the values, and an index per non-zero."""
        return element_size * self.value_params + self.s * self.n * self.index_dtype.itemsize


def index_dtype(k: int) -> torch.dtype:
    """The narrowest type that holds indices into ``k`` basis vectors: uint8 up to 256, int16 up to 32,768."""
    return torch.uint8 if k <= 256 else torch.int16 if k <= 32768 else torch.int32


def max_ratio(out_features: int, in_features: int) -> float:
    """The largest DS ratio for a shape: ``k = s = 1``."""
    return out_features * in_features / (out_features + in_features)


def budget_layouts(
    out_features: int, in_features: int, ratio: float, value_bytes: int | None = None
) -> list[DenseSparseLayout]:
    """All layouts with ``1 <= s <= k <= d`` that spend as much of the ratio's budget as possible.

    The budget counts value parameters (``value_bytes=None``), or stored bytes: values of
    ``value_bytes`` each plus an index per non-zero (:func:`index_dtype`: 1 byte for ``k <= 256``, else 2). For each
    ``k`` the budget fixes ``s``; ``k`` below the rank that low rank would get at this budget
    leaves budget unused, so the list starts at that rank (where ``s == k``).
    """
    ratio = check_ratio(ratio)
    n, d = max(out_features, in_features), min(out_features, in_features)
    unit = value_bytes or 1
    budget = math.floor(unit * out_features * in_features / ratio + 1e-9)
    layouts = []

    def per_nonzero(k: int) -> int:
        return unit + (0 if value_bytes is None else index_dtype(k).itemsize)

    for k in range(1, d + 1):
        s = min(k, (budget - unit * k * d) // (n * per_nonzero(k)))
        richer = unit * (k + 1) * d + n * (k + 1) * per_nonzero(k + 1)  # the next k at full rank
        if s >= 1 and (s < k or richer > budget):
            layouts.append(DenseSparseLayout(out_features, in_features, k, s))
    if not layouts:
        raise infeasible("ds", (out_features, in_features), ratio, 1.0, max_ratio(out_features, in_features))
    return layouts


def spread(layouts: list[DenseSparseLayout], points: int) -> list[DenseSparseLayout]:
    """At most ``points`` layouts evenly spaced in ``k``, always including both ends."""
    if len(layouts) <= points:
        return layouts
    if points <= 1:
        return [layouts[len(layouts) // 2]]
    picks = {round(i * (len(layouts) - 1) / (points - 1)) for i in range(points)}
    return [layouts[i] for i in sorted(picks)]


def dense_coefficients(indices: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    """The dense ``(..., N, k)`` coefficients of ELL ``indices`` and ``values`` ``(..., N, s)``."""
    dense = values.new_zeros(*indices.shape[:-1], k)
    return dense.scatter_(-1, indices, values)


@dataclass
class DenseSparseFactors(Factors):
    """``basis (k, d)``, ``values (N, s)`` and ``indices (N, s)`` (int64) of one layer."""

    layout: DenseSparseLayout
    basis: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor

    def coefficients(self) -> torch.Tensor:
        """The dense ``(N, k)`` coefficient matrix ``C``."""
        return dense_coefficients(self.indices, self.values, self.layout.k)

    def reconstruct(self) -> torch.Tensor:
        w = self.coefficients() @ self.basis
        return w if self.layout.rows else w.T

    def support(self) -> torch.Tensor:
        return support_mask(self.indices, self.layout.k)
