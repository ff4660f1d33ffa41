"""The dense-sparse compact layer: ``y = C (B x)`` for row vectors, ``y = Bᵀ (Cᵀ x)`` for columns.

Its fast backends (a compiled CPU gather, Triton on CUDA, int8) are registered by
:mod:`dsformer.kernels.dense_sparse`; the reference backend here is two GEMMs with ``C`` densified.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from dsformer.structures.backends import Backend, register_backend
from dsformer.structures.base import CompactLinear, layout_ints
from dsformer.structures.dense_sparse.layout import DenseSparseFactors, DenseSparseLayout, dense_coefficients


class DenseSparseLinear(CompactLinear):
    """``nn.Linear`` with a dense-sparse weight ``W = C B`` (or its transpose for column vectors)."""

    structure: ClassVar[str] = "ds"

    def __init__(self, factors: DenseSparseFactors, bias: torch.Tensor | None = None) -> None:
        super().__init__(factors.layout, bias)
        lay = factors.layout
        self.rows = lay.rows
        self.k = lay.k
        self.basis = nn.Parameter(factors.basis.detach().clone())
        self.values = nn.Parameter(factors.values.detach().clone())
        self.register_buffer("indices", factors.indices.detach().to(lay.index_dtype))

    @property
    def layout_shapes(self) -> DenseSparseLayout:
        return DenseSparseLayout(self.out_features, self.in_features, self.k, self.values.shape[-1])

    @property
    def factors(self) -> DenseSparseFactors:
        return DenseSparseFactors(self.layout_shapes, self.basis, self.values, self.indices.long())

    def coefficients(self) -> torch.Tensor:
        def build() -> torch.Tensor:
            return dense_coefficients(self.indices.long(), self.values, self.k)

        return self.cached("coefficients", build, self.values, self.indices)

    def materialize(self) -> torch.Tensor:
        return self.factors.reconstruct()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        coeffs = self.coefficients()
        if self.rows:  # W = C B: project onto the basis, then combine
            y = (x @ self.basis.mT) @ coeffs.mT
        else:  # W = (C B)^T = B^T C^T
            y = (x @ coeffs) @ self.basis
        return y + self.bias if self.bias is not None else y

    def index_bounds(self) -> dict[str, int]:
        return {"indices": self.k}  # an atom number

    def layout(self) -> dict[str, Any]:
        return {"k": self.k, "s": int(self.values.shape[-1])}

    @classmethod
    def from_layout(cls, shape: tuple[int, int], layout: dict[str, Any], bias: bool, dtype: torch.dtype):
        d = min(shape)
        k = layout_ints(layout, ("k", 1, d))[0]
        lay = DenseSparseLayout(shape[0], shape[1], k, layout_ints(layout, ("s", 1, k))[0])
        factors = DenseSparseFactors(
            lay,
            torch.zeros(lay.k, lay.d, dtype=dtype),
            torch.zeros(lay.n, lay.s, dtype=dtype),
            torch.zeros(lay.n, lay.s, dtype=torch.long),
        )
        return cls(factors, torch.zeros(shape[0], dtype=dtype) if bias else None)

    def describe(self) -> str:
        return f"k={self.k} s={self.values.shape[-1]}"


def _reference_work(layer: DenseSparseLinear) -> int:
    """Two GEMMs with ``C`` densified: ``k (d + N)`` multiply-adds per token."""
    lay = layer.layout_shapes
    return lay.k * (lay.d + lay.n)


register_backend(
    DenseSparseLinear,
    Backend("reference", run=lambda layer, x: layer.reference(x), work=_reference_work, slots=("coefficients",)),
)
