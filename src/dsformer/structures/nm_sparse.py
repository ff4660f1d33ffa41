"""N:M semi-structured sparsity: in every group of ``m`` consecutive inputs of a row, keep ``n``.

The mask keeps the largest magnitudes. Values are stored compactly, ``(out, in/m, n)``, with the
position of each inside its group (uint8).

Example:
    >>> import torch
    >>> from dsformer.structures.nm_sparse import NMConfig
    >>> (factors,) = NMConfig(ratio=2.0).fit([torch.randn(8, 16)])
    >>> factors.layout.n, factors.layout.m, int((factors.reconstruct() != 0).sum())
    (2, 4, 64)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from dsformer.errors import InfeasibleRatioError
from dsformer.structures.backends import Backend, register_backend
from dsformer.structures.base import (
    CompactLinear,
    Factors,
    Importance,
    Inputs,
    Structure,
    Warm,
    Weights,
    layout_ints,
    support_mask,
)
from dsformer.structures.budget import check_ratio, infeasible
from dsformer.structures.registry import register
from dsformer.structures.whitening import check_gram

# Group sizes tried when only a ratio is given, smallest first (smaller groups run faster on hardware).
MAX_GROUP = 32


@dataclass(frozen=True)
class NMLayout:
    out_features: int
    in_features: int
    n: int
    m: int

    @property
    def value_params(self) -> int:
        return self.out_features * self.in_features // self.m * self.n

    @property
    def ratio(self) -> float:
        return self.m / self.n

    def stored_bytes(self, element_size: int) -> int:
        return (element_size + 1) * self.value_params  # a uint8 position per kept value


@dataclass
class NMFactors(Factors):
    """Kept ``values (out, in/m, n)`` and their positions ``indices (out, in/m, n)`` inside each group."""

    layout: NMLayout
    values: torch.Tensor
    indices: torch.Tensor

    def reconstruct(self) -> torch.Tensor:
        lay = self.layout
        grouped = self.values.new_zeros(lay.out_features, lay.in_features // lay.m, lay.m)
        grouped.scatter_(-1, self.indices.long(), self.values)
        return grouped.view(lay.out_features, lay.in_features)

    def support(self) -> torch.Tensor:
        return support_mask(self.indices, self.layout.m)


class NMLinear(CompactLinear):
    """``nn.Linear`` with an N:M-sparse weight (reference execution: scatter to dense, then GEMM)."""

    structure: ClassVar[str] = "nm"

    def __init__(self, factors: NMFactors, bias: torch.Tensor | None = None) -> None:
        super().__init__(factors.layout, bias)
        lay = factors.layout
        self.m = lay.m
        self.values = nn.Parameter(factors.values.detach().clone())
        self.register_buffer("indices", factors.indices.detach().to(torch.uint8))

    @property
    def factors(self) -> NMFactors:
        lay = NMLayout(self.out_features, self.in_features, self.values.shape[-1], self.m)
        return NMFactors(lay, self.values, self.indices)

    def materialize(self) -> torch.Tensor:
        return self.factors.reconstruct()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        # no CPU kernel gains from N:M sparsity, so the reference is the dense product
        weight = self.cached("dense", self.materialize, self.values, self.indices)
        return nn.functional.linear(x, weight, self.bias)

    def index_bounds(self) -> dict[str, int]:
        return {"indices": self.m}  # a position in a group of m

    def layout(self) -> dict[str, Any]:
        return {"n": int(self.values.shape[-1]), "m": self.m}

    @classmethod
    def from_layout(cls, shape: tuple[int, int], layout: dict[str, Any], bias: bool, dtype: torch.dtype):
        (m,) = layout_ints(layout, ("m", 2, shape[1]))
        (n,) = layout_ints(layout, ("n", 1, m - 1))
        if shape[1] % m:
            raise ValueError(f"layout m={m} does not divide the input size {shape[1]}")
        lay = NMLayout(shape[0], shape[1], n, m)
        groups = (shape[0], shape[1] // m, n)
        factors = NMFactors(lay, torch.zeros(groups, dtype=dtype), torch.zeros(groups, dtype=torch.uint8))
        return cls(factors, torch.zeros(shape[0], dtype=dtype) if bias else None)

    def describe(self) -> str:
        return f"{self.values.shape[-1]}:{self.m}"


register_backend(NMLinear, Backend("reference", run=lambda layer, x: layer.reference(x), slots=("dense",)))


@register
@dataclass
class NMConfig(Structure):
    """N:M sparsity; with only a ratio, the (n, m) whose ``m/n`` is the smallest ratio at or above it."""

    ratio: float | None = 2.0
    n: int | None = None
    m: int | None = None

    name: ClassVar[str] = "nm"
    layer: ClassVar[type[CompactLinear]] = NMLinear

    def candidates(self, out_features: int, in_features: int) -> list[NMLayout]:
        if self.n is not None and self.m is not None:
            if not (1 <= self.n < self.m and in_features % self.m == 0):
                raise InfeasibleRatioError(
                    f"nm: {self.n}:{self.m} needs 1 <= n < m and m dividing the input size {in_features}"
                )
            return [NMLayout(out_features, in_features, self.n, self.m)]
        if self.ratio is None:
            raise InfeasibleRatioError("nm: give a ratio or both n and m")
        ratio = check_ratio(self.ratio)
        groups = [m for m in range(2, MAX_GROUP + 1) if in_features % m == 0]
        if not groups:
            raise InfeasibleRatioError(f"nm: input size {in_features} has no group size in 2..{MAX_GROUP}")
        options = [(m / n, m, n) for m in groups for n in range(1, m) if m / n >= ratio - 1e-9]
        if not options:
            lo = max(groups) / (max(groups) - 1)
            raise infeasible("nm", (out_features, in_features), ratio, lo, max(groups))
        # the smallest ratio at or above the target; among equal ratios the hardware-friendly m=4 (2:4)
        _, _, m, n = min((r, m != 4, m, n) for r, m, n in options)
        return [NMLayout(out_features, in_features, n, m)]

    def fit(
        self, weights: Weights, warm: Warm = None, importance: Importance = None, inputs: Inputs = None
    ) -> list[NMFactors]:
        """Keep the ``n`` largest scores of every group: ``|W_ij|``, or Wanda's ``|W_ij| · ||X_j||`` given
        ``inputs``. A group lies within one row, so weights of the rows (``importance``) leave the
        choice as it is; a warm start has no state worth keeping."""
        inputs = inputs or [None] * len(weights)
        out = []
        for w, gram in zip(weights, inputs, strict=True):
            (lay,) = self.candidates(*w.shape)
            score = w.detach().abs()
            if gram is not None:
                check_gram(gram, w.shape[1])
                score = score * gram.detach().diagonal().clamp_min(0).sqrt().to(score)
            shape = (lay.out_features, lay.in_features // lay.m, lay.m)
            indices = score.reshape(shape).topk(lay.n, dim=-1).indices.sort(dim=-1).values
            values = w.detach().reshape(shape).gather(-1, indices).contiguous()
            out.append(NMFactors(lay, values, indices.to(torch.uint8)))
        return out
