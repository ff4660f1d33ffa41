"""Dense-sparse (DS) factorization, ``W ≈ C @ B`` (see docs/METHOD.md).

The weight vectors are the longer side of ``W`` (rows when ``out >= in``, else columns): ``N``
vectors of dimension ``d``. ``B`` (``k x d``) is a dense basis shared by the layer; ``C``
(``N x k``) has exactly ``s`` non-zeros in every row, stored in ELL form: ``values (N, s)`` and
``indices (N, s)``. ``s == k`` is rank-``k`` low rank; ``s < k`` puts each vector in its own
``s``-dimensional subspace of the basis (a union of subspaces).

Fitting is alternating minimization (MOD-style, with K-SVD's atom re-seeding), batched over all
layers of one shape, with a guard that keeps every vector's error from increasing.

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

import functools
import math
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from dsformer.errors import InfeasibleRatioError
from dsformer.structures.base import CompactLinear, check_ratio, infeasible

# Ridge of the basis update, relative to the mean diagonal of C^T C: keeps it solvable while atoms go unused.
_BASIS_RIDGE = 1e-7
# Conjugate-gradient steps for refitting values on the current support (warm) and on a swapped one.
_CG_WARM = 2
_CG_NEW = 4
# Atoms swapped per vector and round, as a fraction of s (see _update_codes).
_SWAP_FRACTION = 0.02


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
        return torch.uint8 if self.k <= 256 else torch.int16


def max_ratio(out_features: int, in_features: int) -> float:
    """The largest DS ratio for a shape: ``k = s = 1``."""
    return out_features * in_features / (out_features + in_features)


def budget_layouts(out_features: int, in_features: int, ratio: float) -> list[DenseSparseLayout]:
    """All layouts with ``1 <= s <= k <= d`` that spend as much of the ratio's budget as possible.

    For each ``k`` the budget fixes ``s``; ``k`` below the rank that low rank would get at this
    budget leaves budget unused, so the list starts at that rank (where ``s == k``).
    """
    ratio = check_ratio(ratio)
    n, d = max(out_features, in_features), min(out_features, in_features)
    budget = math.floor(out_features * in_features / ratio + 1e-9)
    layouts = []
    for k in range(1, d + 1):
        s = min(k, (budget - k * d) // n)
        if s >= 1 and (s < k or (k + 1) * (d + n) > budget):
            layouts.append(DenseSparseLayout(out_features, in_features, k, s))
    if not layouts:
        raise infeasible("ds", (out_features, in_features), ratio, 1.0, max_ratio(out_features, in_features))
    return layouts


@dataclass
class DenseSparseFactors:
    """``basis (k, d)``, ``values (N, s)`` and ``indices (N, s)`` (int64) of one layer."""

    layout: DenseSparseLayout
    basis: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor

    def coefficients(self) -> torch.Tensor:
        """The dense ``(N, k)`` coefficient matrix ``C``."""
        return _dense_coefficients(self.indices, self.values, self.layout.k)

    def reconstruct(self) -> torch.Tensor:
        """The ``(out, in)`` weight these factors represent."""
        w = self.coefficients() @ self.basis
        return w if self.layout.rows else w.T


@dataclass
class DenseSparseConfig:
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

    name = "ds"

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
        layouts = budget_layouts(out_features, in_features, self.ratio)
        if k is not None:
            fixed = [lay for lay in layouts if lay.k == k]
            if not fixed:
                ks = [lay.k for lay in layouts]
                raise InfeasibleRatioError(
                    f"ds: k={k} does not fit ratio {self.ratio:g} for a {out_features}x{in_features} weight; "
                    f"k must be in {min(ks)}..{max(ks)}"
                )
            return fixed
        if self.k_multiple < 1:
            raise InfeasibleRatioError(f"ds: k_multiple must be at least 1 (got {self.k_multiple})")
        aligned = [lay for lay in layouts if lay.k % self.k_multiple == 0]
        return _spread(aligned or layouts, self.search_points)

    def fit(
        self,
        weights: list[torch.Tensor],
        warm: list[DenseSparseFactors | None] | None = None,
        importance: list[torch.Tensor | None] | None = None,
    ) -> list[DenseSparseFactors]:
        """Factorize each ``(out, in)`` weight; layers of one shape are fitted together.

        ``warm`` gives previous factors to start from (their layouts are kept, no search).
        ``importance[i]`` (shape ``(out,)``, positive; Fisher information from task gradients)
        weights the fit's error on each output row, as FWSVD does for low rank: the fit runs on
        ``diag(√I) W`` and the factors are scaled back (a row layer's values, a column layer's basis).
        """
        if importance is not None and any(imp is not None for imp in importance):
            return self._fit_weighted(weights, warm, importance)
        if self.share_basis and len(weights) > 1:
            return self._fit_shared(weights, warm)
        warm = warm or [None] * len(weights)
        results: list[DenseSparseFactors | None] = [None] * len(weights)
        groups: dict[Any, list[int]] = {}
        for i, (w, prev) in enumerate(zip(weights, warm, strict=True)):
            key = (tuple(w.shape), prev.layout if prev is not None else None)
            groups.setdefault(key, []).append(i)
        for (shape, warm_layout), members in groups.items():
            stack = torch.stack([_vectors(weights[i]) for i in members])
            if warm_layout is not None:
                start = _stack_state([warm[i] for i in members])
                state = _alternate(stack, start, self.iters)
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
        warm: list[DenseSparseFactors | None] | None,
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

    def _fit_shared(
        self, weights: list[torch.Tensor], warm: list[DenseSparseFactors | None] | None
    ) -> list[DenseSparseFactors]:
        """One fit of every layer's vectors stacked (one basis), split back per layer; bases are one tensor."""
        shapes = {tuple(w.shape) for w in weights}
        if len(shapes) != 1:
            raise ValueError(f"share_basis: the layers of one fit must have one shape (got {sorted(shapes)})")
        vectors = [_vectors(w).to(weights[0].dtype) for w in weights]
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
        trials = {c: (every, _init(stack, lay.k, lay.s, vh)) for c, lay in enumerate(layouts)}
        done = 0
        while True:
            alive = {c: members for c, (members, _) in trials.items() if members}
            if max(sum(j in m for m in alive.values()) for j in every) == 1 or done >= self.iters:
                break
            rounds = min(self.search_iters, self.iters - done)
            for c, members in alive.items():
                trials[c] = (members, _alternate(stack[members], trials[c][1], rounds))
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
                state = _alternate(stack[members], state, self.iters - done)
            for m, j in enumerate(members):
                if float(state.error[m]) < best[j]:
                    best[j], per_layer[j], chosen[j] = float(state.error[m]), state[m], layouts[c]
        return per_layer, chosen


def _spread(layouts: list[DenseSparseLayout], points: int) -> list[DenseSparseLayout]:
    """At most ``points`` layouts evenly spaced in ``k``, always including both ends."""
    if len(layouts) <= points:
        return layouts
    if points <= 1:
        return [layouts[len(layouts) // 2]]
    picks = {round(i * (len(layouts) - 1) / (points - 1)) for i in range(points)}
    return [layouts[i] for i in sorted(picks)]


def _row_scaled(factors: DenseSparseFactors, scale: torch.Tensor) -> DenseSparseFactors:
    """The factors of ``diag(scale) W``: a row layer's vectors are the rows (scale the values), a
    column layer's vectors have the rows as coordinates (scale the basis)."""
    if factors.layout.rows:
        return replace(factors, values=factors.values * scale[:, None].to(factors.values))
    return replace(factors, basis=factors.basis * scale[None, :].to(factors.basis))


def _vectors(w: torch.Tensor) -> torch.Tensor:
    """The weight vectors of ``w`` as rows, in fp32 at least."""
    v = w.detach() if w.shape[0] >= w.shape[1] else w.detach().T
    return v.to(torch.promote_types(v.dtype, torch.float32)).contiguous()


def _dense_coefficients(indices: torch.Tensor, values: torch.Tensor, k: int) -> torch.Tensor:
    dense = values.new_zeros(*indices.shape[:-1], k)
    return dense.scatter_(-1, indices, values)


@dataclass
class _State:
    """Batched factors of ``L`` layers: basis ``(L,k,d)``, indices/values ``(L,N,s)``, error ``(L,)``."""

    basis: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    error: torch.Tensor

    def select(self, members: list[int]) -> _State:
        return _State(self.basis[members], self.indices[members], self.values[members], self.error[members])

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.basis[j], self.indices[j], self.values[j]


def _stack_state(factors: list[DenseSparseFactors]) -> _State:
    basis = torch.stack([f.basis for f in factors]).float()
    indices = torch.stack([f.indices for f in factors]).long()
    values = torch.stack([f.values for f in factors]).float()
    return _State(basis, indices, values, torch.full((len(factors),), math.inf))


def _init(V: torch.Tensor, k: int, s: int, vh: torch.Tensor | None = None) -> _State:
    """Basis = top-k right singular vectors (``vh``: those of ``V``, if known); support = the s largest coefficients."""
    if vh is None:
        vh = torch.linalg.svd(V, full_matrices=False).Vh
    basis = vh[:, :k].contiguous()
    corr = V @ basis.mT
    indices = corr.abs().topk(s, dim=-1).indices.sort(dim=-1).values
    values = corr.gather(-1, indices)
    return _State(basis, indices, values, torch.full((V.shape[0],), math.inf))


def _alternate(V: torch.Tensor, state: _State, iters: int) -> _State:
    """``iters`` rounds of basis update then sparse coding; no vector's error ever increases."""
    sq_norms = V.pow(2).sum(-1)
    basis, indices, values = state.basis, state.indices, state.values
    vec_err = _vector_errors(V, basis, indices, values)
    for _ in range(iters):
        basis, values = _update_basis(V, basis, indices, values, vec_err)
        indices, values, vec_err = _update_codes(V, sq_norms, basis, indices, values)
    return _State(basis, indices, values, vec_err.sum(-1))


def _vector_errors(V, basis, indices, values) -> torch.Tensor:
    k = basis.shape[-2]
    return (V - _dense_coefficients(indices, values, k) @ basis).pow(2).sum(-1)


def _update_basis(V, basis, indices, values, vec_err):
    """``B = argmin ||V - C B||`` with ``C`` fixed; unused atoms re-seeded from the worst vectors.

    Layers whose error would increase (the ridge can do that) keep their basis. Atoms are then
    scaled to unit norm, the scale moving into the values, which keeps the product unchanged.
    """
    k = basis.shape[-2]
    coeffs = _dense_coefficients(indices, values, k)
    gram = coeffs.mT @ coeffs
    eye = torch.eye(k, dtype=V.dtype, device=V.device)
    trace = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(1e-30)
    new = torch.linalg.solve(gram + (_BASIS_RIDGE * trace / k)[:, None, None] * eye, coeffs.mT @ V)
    new_err = (V - coeffs @ new).pow(2).sum(-1)
    worse = new_err.sum(-1) > vec_err.sum(-1)
    new = torch.where(worse[:, None, None], basis, new)
    unused = (coeffs != 0).sum(-2) == 0  # (L, k)
    if unused.any():
        for layer in unused.any(-1).nonzero().flatten().tolist():
            atoms = unused[layer].nonzero().flatten()
            residual = V[layer] - coeffs[layer] @ new[layer]
            worst = residual.pow(2).sum(-1).topk(len(atoms)).indices
            new[layer, atoms] = residual[worst]
    norms = new.norm(dim=-1).clamp_min(1e-12)
    new = new / norms[..., None]
    values = values * norms.gather(-1, indices.flatten(1)).view_as(indices)
    return new, values


def _update_codes(V, sq_norms, basis, indices, values):
    """Refit every vector's values on its support, then try one support swap; keep whichever is better.

    The swap drops the ``m`` atoms of the support that carry the least energy and adds the ``m``
    outside atoms whose correlation with the residual promises the largest gain (``m`` is about
    2% of ``s``). Small swaps are accepted far more often than whole new supports, and a
    full re-selection (largest least-squares coefficients) gained nothing on top of them.
    Values are fitted by conjugate gradients on the masked normal equations, all vectors at once
    as dense ``(N, k)`` GEMMs; CG never increases the error from its start, so no vector gets worse.
    """
    s, k = indices.shape[-1], basis.shape[-2]
    gram = basis @ basis.mT  # (L, k, k)
    corr = V @ basis.mT  # (L, N, k)
    mask = _support_mask(indices, k)
    coeffs, residual, err = _refit(sq_norms, corr, gram, mask, _dense_coefficients(indices, values, k), _CG_WARM)
    if s == k:  # low rank: nothing to swap
        return indices, coeffs.gather(-1, indices), err

    diag = gram.diagonal(dim1=-2, dim2=-1)[:, None, :]
    m = min(k - s, max(1, round(s * _SWAP_FRACTION)))
    energy = torch.where(mask, coeffs.pow(2) * diag, math.inf)
    gain = torch.where(mask, -math.inf, residual.pow(2) / diag)
    drop = energy.topk(m, dim=-1, largest=False).indices
    add = gain.topk(m, dim=-1).indices
    swapped = mask.scatter(-1, drop, False).scatter(-1, add, True)
    new_coeffs, _, new_err = _refit(sq_norms, corr, gram, swapped, coeffs * swapped, _CG_NEW)

    take = new_err < err
    best = torch.where(take[..., None], swapped, mask)
    coeffs = torch.where(take[..., None], new_coeffs, coeffs)
    indices = best.to(torch.int8).topk(s, dim=-1).indices.sort(dim=-1).values
    return indices, coeffs.gather(-1, indices), torch.minimum(new_err, err)


def _support_mask(indices: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros(*indices.shape[:-1], k, dtype=torch.bool, device=indices.device)
    return mask.scatter_(-1, indices, True)


def _refit(sq_norms, corr, gram, mask, start, iters):
    """Least-squares values on the support ``mask``, by ``iters`` CG steps from ``start`` (dense ``(L,N,k)``).

    Returns the dense coefficients, the residual correlations ``corr - x G`` and each vector's
    squared error ``(L, N)``.
    """
    x = start
    r = corr - x @ gram  # minus half the gradient, on the whole basis
    g = r * mask
    p = g
    gg = g.pow(2).sum(-1, keepdim=True)
    for _ in range(iters):
        full_ap = p @ gram
        ap = full_ap * mask
        alpha = gg / (p * ap).sum(-1, keepdim=True).clamp_min(1e-30)
        x = x + alpha * p
        r = r - alpha * full_ap
        g = g - alpha * ap
        gg_new = g.pow(2).sum(-1, keepdim=True)
        p = g + (gg_new / gg.clamp_min(1e-30)) * p
        gg = gg_new
    # ||v - x B||^2 = ||v||^2 - 2 x.corr + x.(x G), and x G = corr - r
    errors = (sq_norms - (x * corr).sum(-1) - (x * r).sum(-1)).clamp_min(0)
    return x, r, errors


# paths that run the dense stage as a GEMM and the sparse stage as weighted sums of gathered entries
_SPARSE_PATHS = ("gather", "int8", "triton")


class DenseSparseLinear(CompactLinear):
    """``nn.Linear`` with a dense-sparse weight: ``y = C (B x)`` for row vectors, ``y = Bᵀ (Cᵀ x)`` for columns."""

    structure = "ds"

    def __init__(self, factors: DenseSparseFactors, bias: torch.Tensor | None = None) -> None:
        lay = factors.layout
        super().__init__(lay.in_features, lay.out_features, bias)
        self.rows = lay.rows
        self.k = lay.k
        self.basis = nn.Parameter(factors.basis.detach().clone())
        self.values = nn.Parameter(factors.values.detach().clone())
        self.register_buffer("indices", factors.indices.detach().to(lay.index_dtype))
        self.basis_owner = True  # False where the basis is another layer's (share_bases): counted there

    @property
    def layout_shapes(self) -> DenseSparseLayout:
        return DenseSparseLayout(self.out_features, self.in_features, self.k, self.values.shape[-1])

    @property
    def factors(self) -> DenseSparseFactors:
        return DenseSparseFactors(self.layout_shapes, self.basis, self.values, self.indices.long())

    def coefficients(self) -> torch.Tensor:
        def build() -> torch.Tensor:
            return _dense_coefficients(self.indices.long(), self.values, self.k)

        return self._cached("coefficients", build, self.values, self.indices)

    def materialize(self) -> torch.Tensor:
        return self.factors.reconstruct()

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        coeffs = self.coefficients()
        if self.rows:  # W = C B: project onto the basis, then combine
            y = (x @ self.basis.mT) @ coeffs.mT
        else:  # W = (C B)^T = B^T C^T
            y = (x @ coeffs) @ self.basis
        return y + self.bias if self.bias is not None else y

    def backends(self) -> tuple[str, ...]:
        from dsformer.kernels import triton_ds

        on_gpu = self.basis.device.type == "cuda" and triton_ds.installed()
        return ("reference", "dense", "gather", "int8") + (("triton",) if on_gpu else ())

    def unavailable(self) -> dict[str, str]:
        if "triton" in self.backends():
            return {}
        return {"triton": "a CUDA device and Triton installed"}

    def value_params(self) -> int:
        return super().value_params() - (0 if self.basis_owner else self.basis.numel())

    def weight_bytes(self) -> int:
        return super().weight_bytes() - (0 if self.basis_owner else self.basis.numel() * self.basis.element_size())

    def index_limit(self) -> int:
        return self.k  # an atom number

    def cache_slots(self, path: str) -> tuple[str, ...]:
        slots = {
            "reference": ("coefficients",),
            "gather": ("indices", "plan"),
            "triton": ("plan",),
            "int8": ("indices", "plan", "int8_basis"),
        }
        return slots.get(path, super().cache_slots(path))

    def work(self, path: str) -> int:
        lay = self.layout_shapes
        if path in _SPARSE_PATHS:  # the dense stage, then s multiply-adds per output vector
            return lay.k * lay.d + lay.s * lay.n
        if path == "reference":  # two GEMMs with C densified
            return lay.k * (lay.d + lay.n)
        return super().work(path)

    def run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name not in _SPARSE_PATHS:
            return super().run(name, x)
        return self._sparse(name, x, gelu=False)

    def run_activated(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if name in _SPARSE_PATHS and self.activation == "gelu" and self.rows:
            return self._sparse(name, x, gelu=True)  # the kernel applies it before storing each output
        return super().run_activated(name, x)

    def _sparse(self, name: str, x: torch.Tensor, gelu: bool) -> torch.Tensor:
        """The dense stage, then the sparse stage on its own kernel: ``gather`` and ``int8`` on
        ``dsformer.kernels.gather``, ``triton`` on ``dsformer.kernels.triton_ds``."""
        from dsformer.kernels import gather, triton_ds

        if name == "triton" and not triton_ds.runs_on(x):
            raise NotImplementedError(f"the triton path needs CUDA and Triton (input on {x.device})")
        basis, values = self.basis.detach(), self.values.detach()  # inference only: the kernels skip autograd
        bias = self.bias.detach() if self.bias is not None else None
        plan = None
        if not self.rows:
            build = functools.partial(gather.column_plan, self.indices, values, self.k)
            plan = self._cached("plan", build, self.values, self.indices)
        if name == "triton":
            if self.rows:
                return triton_ds.ds_rows(x, basis, self.indices, values, bias, gelu=gelu)
            return triton_ds.ds_columns(x, plan, basis, bias)
        dense_stage = None
        if name == "int8":  # the basis GEMM in int8; the sparse stage stays a float gather
            from dsformer.kernels.int8 import int8_linear, int8_weight

            # rows: Zᵀ = B Xᵀ; columns: Y = U B, that is U times the weight Bᵀ
            weight8 = self._cached("int8_basis", lambda: int8_weight(basis if self.rows else basis.T), self.basis)
            dense_stage = functools.partial(int8_linear, weight=weight8)
        if self.rows:
            indices = self._cached("indices", self.indices.int, self.indices)
            return gather.ds_rows(x, basis, indices, values, bias, dense_stage, gelu=gelu)
        return gather.ds_columns(x, plan, basis, bias, dense_stage)

    def layout(self) -> dict[str, Any]:
        return {"k": self.k, "s": int(self.values.shape[-1])}

    @classmethod
    def from_layout(cls, shape: tuple[int, int], layout: dict[str, Any], bias: bool, dtype: torch.dtype):
        lay = DenseSparseLayout(shape[0], shape[1], int(layout["k"]), int(layout["s"]))
        factors = DenseSparseFactors(
            lay,
            torch.zeros(lay.k, lay.d, dtype=dtype),
            torch.zeros(lay.n, lay.s, dtype=dtype),
            torch.zeros(lay.n, lay.s, dtype=torch.long),
        )
        return cls(factors, torch.zeros(shape[0], dtype=dtype) if bias else None)

    def describe(self) -> str:
        return f"k={self.k} s={self.values.shape[-1]}"


def share_bases(layers: list[DenseSparseLinear]) -> None:
    """Tie the bases of layers fitted with one shared basis to the first layer's parameter (it owns it)."""
    for layer in layers[1:]:
        layer.basis = layers[0].basis
        layer.basis_owner = False
