"""Alternating minimization for dense-sparse factors, batched over the layers of one shape.

MOD-style basis updates with K-SVD's re-seeding of unused atoms, and sparse coding by conjugate
gradients on each vector's support with one small support swap per round; a guard keeps every
vector's error from increasing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dsformer.structures.base import support_mask
from dsformer.structures.dense_sparse.layout import DenseSparseFactors, dense_coefficients

# Ridge of the basis update, relative to the mean diagonal of C^T C: keeps it solvable while atoms go unused.
_BASIS_RIDGE = 1e-7
# Conjugate-gradient steps for refitting values on the current support (warm) and on a swapped one.
_CG_WARM = 2
_CG_NEW = 4
# Atoms swapped per vector and round, as a fraction of s (see _update_codes).
_SWAP_FRACTION = 0.02


def weight_vectors(w: torch.Tensor) -> torch.Tensor:
    """The weight vectors of ``w`` as rows, in fp32 at least."""
    v = w.detach() if w.shape[0] >= w.shape[1] else w.detach().T
    return v.to(torch.promote_types(v.dtype, torch.float32)).contiguous()


@dataclass
class State:
    """Batched factors of ``L`` layers: basis ``(L,k,d)``, indices/values ``(L,N,s)``, error ``(L,)``."""

    basis: torch.Tensor
    indices: torch.Tensor
    values: torch.Tensor
    error: torch.Tensor

    def select(self, members: list[int]) -> State:
        return State(self.basis[members], self.indices[members], self.values[members], self.error[members])

    def __getitem__(self, j: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.basis[j], self.indices[j], self.values[j]


def stack_state(factors: list[DenseSparseFactors]) -> State:
    basis = torch.stack([f.basis for f in factors]).float()
    indices = torch.stack([f.indices for f in factors]).long()
    values = torch.stack([f.values for f in factors]).float()
    return State(basis, indices, values, torch.full((len(factors),), math.inf))


def initial_state(V: torch.Tensor, k: int, s: int, vh: torch.Tensor | None = None) -> State:
    """Basis = top-k right singular vectors (``vh``: those of ``V``, if known); support = the s largest coefficients."""
    if vh is None:
        vh = torch.linalg.svd(V, full_matrices=False).Vh
    basis = vh[:, :k].contiguous()
    corr = V @ basis.mT
    indices = corr.abs().topk(s, dim=-1).indices.sort(dim=-1).values
    values = corr.gather(-1, indices)
    return State(basis, indices, values, torch.full((V.shape[0],), math.inf))


def alternate(V: torch.Tensor, state: State, iters: int) -> State:
    """``iters`` rounds of basis update then sparse coding; no vector's error ever increases."""
    sq_norms = V.pow(2).sum(-1)
    basis, indices, values = state.basis, state.indices, state.values
    vec_err = _vector_errors(V, basis, indices, values)
    for _ in range(iters):
        basis, values = _update_basis(V, basis, indices, values, vec_err)
        indices, values, vec_err = _update_codes(V, sq_norms, basis, indices, values)
    return State(basis, indices, values, vec_err.sum(-1))


def _vector_errors(V, basis, indices, values) -> torch.Tensor:
    k = basis.shape[-2]
    return (V - dense_coefficients(indices, values, k) @ basis).pow(2).sum(-1)


def _update_basis(V, basis, indices, values, vec_err):
    """``B = argmin ||V - C B||`` with ``C`` fixed; unused atoms re-seeded from the worst vectors.

    Layers whose error would increase (the ridge can do that) keep their basis. Atoms are then
    scaled to unit norm, the scale moving into the values, which keeps the product unchanged.
    """
    k = basis.shape[-2]
    coeffs = dense_coefficients(indices, values, k)
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
    mask = support_mask(indices, k)
    coeffs, residual, err = _refit(sq_norms, corr, gram, mask, dense_coefficients(indices, values, k), _CG_WARM)
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
