"""Low-rank factorization, ``W ≈ L @ R`` by truncated SVD (the baseline DS is measured against).

Optional per-row importance weights give Fisher-weighted SVD (FWSVD): the SVD of
``diag(sqrt(I)) W``, then the weights are divided back out of the left factor.

Example:
    >>> import torch
    >>> from dsformer.structures.low_rank import LowRankConfig
    >>> (factors,) = LowRankConfig(ratio=2.0).fit([torch.randn(64, 32)])
    >>> factors.layout.rank, factors.reconstruct().shape
    (10, torch.Size([64, 32]))
"""

from __future__ import annotations

import math
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
)
from dsformer.structures.budget import check_ratio, infeasible
from dsformer.structures.registry import register
from dsformer.structures.whitening import check_gram, whitening


@dataclass(frozen=True)
class LowRankLayout:
    out_features: int
    in_features: int
    rank: int

    @property
    def value_params(self) -> int:
        return self.rank * (self.out_features + self.in_features)

    @property
    def ratio(self) -> float:
        return self.out_features * self.in_features / self.value_params

    def stored_bytes(self, element_size: int) -> int:
        return element_size * self.value_params


@dataclass
class LowRankFactors(Factors):
    """``left (out, r)`` and ``right (r, in)``, with the singular values split evenly between them."""

    layout: LowRankLayout
    left: torch.Tensor
    right: torch.Tensor

    def reconstruct(self) -> torch.Tensor:
        return self.left @ self.right


class LowRankLinear(CompactLinear):
    """``nn.Linear`` with a rank-``r`` weight: two thin matrix products."""

    structure: ClassVar[str] = "svd"

    def __init__(self, factors: LowRankFactors, bias: torch.Tensor | None = None) -> None:
        super().__init__(factors.layout, bias)
        self.left = nn.Parameter(factors.left.detach().clone())
        self.right = nn.Parameter(factors.right.detach().clone())

    @property
    def factors(self) -> LowRankFactors:
        return LowRankFactors(LowRankLayout(self.out_features, self.in_features, self.rank), self.left, self.right)

    def materialize(self) -> torch.Tensor:
        return self.left @ self.right

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        y = (x @ self.right.mT) @ self.left.mT
        return y + self.bias if self.bias is not None else y

    @property
    def rank(self) -> int:
        return int(self.right.shape[0])

    def layout(self) -> dict[str, Any]:
        return {"rank": self.rank}

    @classmethod
    def from_layout(cls, shape: tuple[int, int], layout: dict[str, Any], bias: bool, dtype: torch.dtype):
        (rank,) = layout_ints(layout, ("rank", 1, min(shape)))
        lay = LowRankLayout(shape[0], shape[1], rank)
        factors = LowRankFactors(
            lay, torch.zeros(shape[0], rank, dtype=dtype), torch.zeros(rank, shape[1], dtype=dtype)
        )
        return cls(factors, torch.zeros(shape[0], dtype=dtype) if bias else None)

    def describe(self) -> str:
        return f"rank={self.rank}"


# the reference is already the fast backend: two thin GEMMs, r (out + in) multiply-adds per token
register_backend(
    LowRankLinear,
    Backend(
        "reference",
        run=lambda layer, x: layer.reference(x),
        work=lambda layer: layer.rank * (layer.out_features + layer.in_features),
    ),
)


@register
@dataclass
class LowRankConfig(Structure):
    """Truncated SVD at the rank that the ratio's budget allows (or a fixed ``rank``)."""

    ratio: float | None = 2.0
    rank: int | None = None

    name: ClassVar[str] = "svd"
    allocatable: ClassVar[bool] = True
    layer: ClassVar[type[CompactLinear]] = LowRankLinear

    @property
    def sized_by_ratio(self) -> bool:
        return super().sized_by_ratio and self.rank is None

    def candidates(self, out_features: int, in_features: int) -> list[LowRankLayout]:
        full = min(out_features, in_features)
        if self.rank is not None:
            if not 1 <= self.rank < full:
                raise InfeasibleRatioError(
                    f"svd: rank must be in 1..{full - 1} for a {out_features}x{in_features} weight (got {self.rank})"
                )
            return [LowRankLayout(out_features, in_features, self.rank)]
        if self.ratio is None:
            raise InfeasibleRatioError("svd: give a ratio or a rank")
        ratio = check_ratio(self.ratio)
        rank = math.floor(out_features * in_features / ratio / (out_features + in_features) + 1e-9)
        if rank < 1:
            hi = out_features * in_features / (out_features + in_features)
            raise infeasible("svd", (out_features, in_features), ratio, 1.0, hi)
        return [LowRankLayout(out_features, in_features, rank)]

    def fit(
        self, weights: Weights, warm: Warm = None, importance: Importance = None, inputs: Inputs = None
    ) -> list[LowRankFactors]:
        """Factorize each weight; ``importance[i]`` (shape ``(out,)``, positive) weights its rows (FWSVD);
        ``inputs[i]`` whitens its inputs: the truncation then minimizes the output error (SVD-LLM).
        ``warm[i]``, earlier factors, keeps its rank (an SVD needs no start; a layer keeps its layout,
        as STF's later projections do for every structure)."""
        count = len(weights)
        importance, inputs, warm = importance or [None] * count, inputs or [None] * count, warm or [None] * count
        return [self._fit_one(*args) for args in zip(weights, importance, inputs, warm, strict=True)]

    def _fit_one(
        self, w: torch.Tensor, importance: torch.Tensor | None, gram: torch.Tensor | None, warm: Any = None
    ) -> LowRankFactors:
        kept = getattr(warm, "layout", None)
        shape = (w.shape[0], w.shape[1])
        if isinstance(kept, LowRankLayout) and (kept.out_features, kept.in_features) == shape:
            layout = kept
        else:
            (layout,) = self.candidates(*w.shape)
        a = w.detach().to(torch.promote_types(w.dtype, torch.float32))
        if importance is not None:
            scale = importance.detach().to(a).clamp_min(1e-12).sqrt()
            a = a * scale[:, None]
        if gram is not None:
            check_gram(gram, w.shape[1])
            white = whitening(gram.to(a.device))
            a = (a.double() @ white.root).to(a.dtype)
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        root = s[: layout.rank].sqrt()
        left = u[:, : layout.rank] * root
        right = root[:, None] * vh[: layout.rank]
        if importance is not None:
            left = left / scale[:, None]
        if gram is not None:
            right = (right.double() @ white.inverse).to(right.dtype)
        return LowRankFactors(layout, left.to(w.dtype).contiguous(), right.to(w.dtype).contiguous())
