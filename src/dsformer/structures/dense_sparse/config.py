"""The dense-sparse structure's config: the budget solver, the ``k`` search and the fit.

Example:
    >>> import torch
    >>> from dsformer.structures.dense_sparse import DenseSparseConfig
    >>> w = torch.randn(96, 64)
    >>> (factors,) = DenseSparseConfig(ratio=2.0).fit([w])
    >>> factors.layout.value_params <= w.numel() / 2
    True
    >>> bool((factors.reconstruct() - w).norm() < w.norm())
    True
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch

from dsformer.errors import DsformerError, InfeasibleRatioError
from dsformer.structures.base import CompactLinear, Factors, Importance, Inputs, Structure, Warm, Weights
from dsformer.structures.dense_sparse.aware import InputMetric, refine_columns
from dsformer.structures.dense_sparse.layout import (
    DenseSparseFactors,
    DenseSparseLayout,
    budget_layouts,
    spread,
)
from dsformer.structures.dense_sparse.linear import DenseSparseLinear
from dsformer.structures.dense_sparse.solver import alternate, initial_state, stack_state, weight_vectors
from dsformer.structures.registry import register
from dsformer.structures.whitening import CalibrationError, check_gram


@register
@dataclass
class DenseSparseConfig(Structure):
    """How to factorize layers as dense-sparse.

    Give ``ratio`` (dense / value parameters) and let a short search pick ``k`` per layer, or fix
    ``k`` (or ``gamma = k/d``) and let the ratio's budget fix ``s``; or fix ``k``/``gamma`` and
    ``delta = s/k`` with ``ratio=None``.

    ``share_basis``: the layers of one ``fit`` call (``compress`` passes every target of one
    shape) share a single basis, fitted on all their vectors at once; the basis is counted once,
    so the budget buys more non-zeros per vector (ALBERT-style sharing, applied to the basis only).
    """

    ratio: float | None = 2.0
    k: int | None = None
    gamma: float | None = None
    delta: float | None = None
    iters: int = 25
    search_iters: int = 3
    search_points: int = 8
    # layers fitted together (every target of one shape) share one basis; the ratio is the group's
    share_basis: bool = False
    # the search tries only k that are multiples of this (where the budget allows any): the basis
    # GEMM runs 10-30% faster at k = 96, 256, 352 than at 97, 266, 351 on a CPU (docs/speed.md)
    k_multiple: int = 1
    # what the ratio counts: "params" (stored values, as low rank counts) or "bytes" (values of
    # value_bytes each plus an index per non-zero: uint8 while k <= 256, else int16)
    budget: str = "params"
    value_bytes: int = 4
    # data-aware fits of column layouts: rounds of refinement under the full input metric (0: the
    # diagonal metric alone; benchmarks/lm_fit.py measures both)
    refine_rounds: int = 4

    name: ClassVar[str] = "ds"
    allocatable: ClassVar[bool] = True
    layer: ClassVar[type[CompactLinear]] = DenseSparseLinear

    @property
    def sized_by_ratio(self) -> bool:
        return super().sized_by_ratio and self.k is None and self.gamma is None

    def __post_init__(self) -> None:
        if self.budget not in ("params", "bytes"):
            raise DsformerError(f"ds: budget is params or bytes (got {self.budget!r})")
        if self.value_bytes not in (1, 2, 4, 8):
            raise DsformerError(f"ds: value_bytes is 1, 2, 4 or 8 (got {self.value_bytes})")
        if self.refine_rounds < 0:
            raise DsformerError(f"ds: refine_rounds must be at least 0 (got {self.refine_rounds})")
        for field in ("iters", "search_iters", "search_points", "k_multiple"):
            if getattr(self, field) < 1:
                raise DsformerError(f"ds: {field} must be at least 1 (got {getattr(self, field)})")
        for field in ("gamma", "delta"):
            value = getattr(self, field)
            if value is not None and not 0 < value <= 1:
                raise DsformerError(f"ds: {field} is a fraction in (0, 1] (got {value})")

    def candidates(self, out_features: int, in_features: int) -> list[DenseSparseLayout]:
        """Layouts the fit chooses from for this shape (one when ``k`` is fixed)."""
        d = min(out_features, in_features)
        k = self.k if self.k is not None else (round(self.gamma * d) if self.gamma is not None else None)
        if k is not None and not 1 <= k <= d:
            raise InfeasibleRatioError(f"ds: k must be in 1..{d} for a {out_features}x{in_features} weight (got {k})")
        if self.ratio is None:
            if k is None or self.delta is None:
                raise InfeasibleRatioError("ds: give a ratio, or both k (or gamma) and delta")
            s = max(1, min(k, round(self.delta * k)))
            return [DenseSparseLayout(out_features, in_features, k, s)]
        value_bytes = self.value_bytes if self.budget == "bytes" else None
        layouts = budget_layouts(out_features, in_features, self.ratio, value_bytes)
        if k is not None:
            fixed = [lay for lay in layouts if lay.k == k]
            if not fixed:
                ks = [lay.k for lay in layouts]
                raise InfeasibleRatioError(
                    f"ds: k={k} does not fit ratio {self.ratio:g} for a {out_features}x{in_features} weight; "
                    f"k must be in {min(ks)}..{max(ks)}"
                )
            return fixed
        aligned = [lay for lay in layouts if lay.k % self.k_multiple == 0]
        return spread(aligned or layouts, self.search_points)

    def with_rounds(self, iters: int) -> DenseSparseConfig:
        return replace(self, iters=iters)

    def tie(self, layers: list[CompactLinear]) -> None:
        """With ``share_basis``, the layers of one fit use the first one's basis (it owns and stores it)."""
        if self.share_basis:
            for layer in layers[1:]:
                layer.borrow(layers[0], "basis")

    def fit(
        self, weights: Weights, warm: Warm = None, importance: Importance = None, inputs: Inputs = None
    ) -> list[DenseSparseFactors]:
        """Factorize each ``(out, in)`` weight; layers of one shape are fitted together.

        ``warm`` gives previous factors to start from (their layouts are kept, no search).
        ``importance[i]`` (shape ``(out,)``, positive; Fisher information from task gradients)
        weights the fit's error on each output row, as FWSVD does for low rank: the fit runs on
        ``diag(√I) W`` and the factors are scaled back (a row layer's values, a column layer's basis).
        ``inputs[i]`` (the second moment of the layer's inputs) makes the fit minimize the output
        error instead (:mod:`dsformer.structures.dense_sparse.aware`).
        """
        if inputs is not None and any(gram is not None for gram in inputs):
            return self._fit_aware(weights, warm, importance, inputs)
        if importance is not None and any(imp is not None for imp in importance):
            return self._fit_weighted(weights, warm, importance)
        if self.share_basis and len(weights) > 1:
            return self._fit_shared(weights, warm)
        warm = warm or [None] * len(weights)
        results: list[Factors | None] = [None] * len(weights)
        groups: dict[Any, list[int]] = {}
        for i, (w, prev) in enumerate(zip(weights, warm, strict=True)):
            key = (tuple(w.shape), prev.layout if prev is not None else None)
            groups.setdefault(key, []).append(i)
        for (shape, warm_layout), members in groups.items():
            stack = torch.stack([weight_vectors(weights[i]) for i in members])
            if warm_layout is not None:
                start = stack_state([warm[i] for i in members])
                state = alternate(stack, start, self.iters)
                chosen = [warm_layout] * len(members)
            else:
                state, chosen = self._search(stack, shape)
            for j, i in enumerate(members):
                lay = chosen[j]
                results[i] = DenseSparseFactors(
                    lay, state[j][0].to(weights[i].dtype), state[j][2].to(weights[i].dtype), state[j][1]
                )
        return results  # type: ignore[return-value]

    def _fit_weighted(
        self,
        weights: list[torch.Tensor],
        warm: list[Factors | None] | None,
        importance: list[torch.Tensor | None],
    ) -> list[DenseSparseFactors]:
        if self.share_basis and len(weights) > 1:
            raise ValueError("share_basis: one basis cannot be weighted per layer; fit shared bases without importance")
        scales = []
        for w, imp in zip(weights, importance, strict=True):
            if imp is None:
                scales.append(torch.ones(w.shape[0], dtype=w.dtype, device=w.device))
                continue
            if imp.shape != (w.shape[0],) or not bool((imp > 0).all()):
                raise ValueError(
                    f"importance must be positive, one per output row ({w.shape[0]}); got {tuple(imp.shape)}"
                )
            root = imp.detach().to(w.device, torch.float64).sqrt()
            scales.append((root / root.mean()).to(w.dtype))  # mean 1: the fit's scale is unchanged
        scaled = [w * scale[:, None] for w, scale in zip(weights, scales, strict=True)]
        starts = warm or [None] * len(weights)
        warm = [None if f is None else _row_scaled(f, scale) for f, scale in zip(starts, scales, strict=True)]
        fitted = self.fit(scaled, warm)
        return [_row_scaled(f, 1 / scale) for f, scale in zip(fitted, scales, strict=True)]

    def _fit_aware(
        self, weights: list[torch.Tensor], warm: Warm, importance: Importance, inputs: list[torch.Tensor | None]
    ) -> list[DenseSparseFactors]:
        if self.share_basis and len(weights) > 1:
            raise CalibrationError(
                "share_basis: one basis cannot be whitened per layer; fit shared bases without inputs"
            )
        if any(gram is None for gram in inputs):
            raise CalibrationError("a data-aware fit needs the inputs of every layer fitted with it")
        for w, gram in zip(weights, inputs, strict=True):
            check_gram(gram, w.shape[1])
        metrics = [InputMetric(w, gram) for w, gram in zip(weights, inputs, strict=True)]
        starts = warm or [None] * len(weights)
        fitted = self.fit(
            [metric.into(w) for metric, w in zip(metrics, weights, strict=True)],
            [metric.warm_into(f) for metric, f in zip(metrics, starts, strict=True)],
            importance,
        )
        out = []
        for i, (metric, factors) in enumerate(zip(metrics, fitted, strict=True)):
            factors = metric.out_of(factors)
            if not metric.rows and self.refine_rounds:
                rows = None if not importance or importance[i] is None else importance[i].sqrt()
                factors = refine_columns(factors, weights[i], metric.gram, rows, self.refine_rounds)
            out.append(factors)
        return out

    def _fit_shared(self, weights: list[torch.Tensor], warm: list[Factors | None] | None) -> list[DenseSparseFactors]:
        """One fit of every layer's vectors stacked (one basis), split back per layer; bases are one tensor."""
        shapes = {tuple(w.shape) for w in weights}
        if len(shapes) != 1:
            raise ValueError(f"share_basis: the layers of one fit must have one shape (got {sorted(shapes)})")
        vectors = [weight_vectors(w).to(weights[0].dtype) for w in weights]
        n, d = vectors[0].shape
        stacked_warm = None
        if warm is not None and all(f is not None for f in warm):
            lay = warm[0].layout
            stacked_warm = [
                DenseSparseFactors(
                    DenseSparseLayout(n * len(weights), d, lay.k, lay.s),
                    warm[0].basis,
                    torch.cat([f.values for f in warm]),
                    torch.cat([f.indices for f in warm]),
                )
            ]
        (joint,) = replace(self, share_basis=False).fit([torch.cat(vectors)], warm=stacked_warm)
        out_features, in_features = weights[0].shape
        layout = DenseSparseLayout(out_features, in_features, joint.layout.k, joint.layout.s)
        part = [slice(j * n, (j + 1) * n) for j in range(len(weights))]
        return [DenseSparseFactors(layout, joint.basis, joint.values[p], joint.indices[p]) for p in part]

    def _search(self, stack: torch.Tensor, shape: tuple[int, int]):
        """Pick ``k`` per layer by successive halving, then finish each layer's best fit.

        Every candidate layout runs ``search_iters`` rounds; each layer keeps its better half of
        candidates for another ``search_iters`` rounds, and so on until one is left, so the choice
        is made on fits that have run for a while (the best ``k`` grows with the rounds).
        """
        layouts = self.candidates(*shape)
        n_layers = stack.shape[0]
        every = list(range(n_layers))
        # candidate -> (layers still trying it, their batched state)
        vh = torch.linalg.svd(stack, full_matrices=False).Vh
        trials = {c: (every, initial_state(stack, lay.k, lay.s, vh)) for c, lay in enumerate(layouts)}
        done = 0
        while True:
            alive = {c: members for c, (members, _) in trials.items() if members}
            if max(sum(j in m for m in alive.values()) for j in every) == 1 or done >= self.iters:
                break
            rounds = min(self.search_iters, self.iters - done)
            for c, members in alive.items():
                trials[c] = (members, alternate(stack[members], trials[c][1], rounds))
            done += rounds
            errors = torch.full((len(layouts), n_layers), math.inf)
            for c, (members, state) in trials.items():
                errors[c, members] = state.error.float().cpu()
            for j in every:
                tried = int(torch.isfinite(errors[:, j]).sum())
                losers = errors[:, j].argsort()[(tried + 1) // 2 : tried].tolist()
                for c in losers:
                    members, state = trials[c]
                    keep = [m for m in range(len(members)) if members[m] != j]
                    trials[c] = ([members[m] for m in keep], state.select(keep))
        # the rounds can run out before the halving ends: then each layer takes its best survivor
        chosen: list[DenseSparseLayout] = [layouts[0]] * n_layers
        per_layer: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = [None] * n_layers  # type: ignore[list-item]
        best = [math.inf] * n_layers
        for c, (members, state) in trials.items():
            if not members:
                continue
            if done < self.iters:
                state = alternate(stack[members], state, self.iters - done)
            for m, j in enumerate(members):
                if float(state.error[m]) < best[j]:
                    best[j], per_layer[j], chosen[j] = float(state.error[m]), state[m], layouts[c]
        return per_layer, chosen


def _row_scaled(factors: DenseSparseFactors, scale: torch.Tensor) -> DenseSparseFactors:
    """The factors of ``diag(scale) W``: a row layer's vectors are the rows (scale the values), a
    column layer's vectors have the rows as coordinates (scale the basis)."""
    if factors.layout.rows:
        return replace(factors, values=factors.values * scale[:, None].to(factors.values))
    return replace(factors, basis=factors.basis * scale[None, :].to(factors.basis))
