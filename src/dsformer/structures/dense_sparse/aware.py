"""Data-aware dense-sparse fits: the layer's output error ``||(W - Ŵ) X||`` instead of the weight error.

Vectors as rows (``out >= in``): ``Ŵ S = C (B S)``, so the plain fit of ``W S`` gives the codes and
``B = (B S) S⁻¹`` is exact. Vectors as columns: ``Ŵ = Bᵀ Cᵀ`` puts the metric on the sparse side,
where a full ``S`` would fill in the codes. Its diagonal does not (it only scales each vector),
so the fit runs on ``W diag(√G_jj)`` (Wanda's scale) and :func:`refine_columns` then alternates
under the full metric with the support fixed: the basis in closed form, the values by conjugate
gradients. ``benchmarks/lm_fit.py`` measures what each step buys on SmolLM2.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from dsformer.structures.dense_sparse.layout import DenseSparseFactors, dense_coefficients
from dsformer.structures.whitening import Whitening, column_scale, whitening

REFINE_ROUNDS = 4
REFINE_CG_STEPS = 8


class InputMetric:
    """How one layer's input metric enters and leaves a plain DS fit."""

    def __init__(self, weight: torch.Tensor, gram: torch.Tensor) -> None:
        self.rows = weight.shape[0] >= weight.shape[1]
        self.gram = gram.detach().to(weight.device)
        if self.rows:
            self.white: Whitening = whitening(self.gram)
            self.damping = self.white.damping
        else:
            self.scale = column_scale(self.gram)
            self.damping = 0.0

    def into(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight the plain fit sees."""
        if self.rows:
            return (weight.detach().double() @ self.white.root).to(weight.dtype)
        return weight.detach() * self.scale.to(weight)[None, :]

    def warm_into(self, factors: DenseSparseFactors | None) -> DenseSparseFactors | None:
        if factors is None:
            return None
        if self.rows:
            return replace(factors, basis=(factors.basis.double() @ self.white.root).to(factors.basis.dtype))
        return replace(factors, values=factors.values * self.scale.to(factors.values)[:, None])

    def out_of(self, factors: DenseSparseFactors) -> DenseSparseFactors:
        """The factors of the original weight."""
        if self.rows:
            return replace(factors, basis=(factors.basis.double() @ self.white.inverse).to(factors.basis.dtype))
        return replace(factors, values=factors.values / self.scale.to(factors.values)[:, None])


@torch.no_grad()
def refine_columns(
    factors: DenseSparseFactors,
    weight: torch.Tensor,
    gram: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    rounds: int = REFINE_ROUNDS,
    cg_steps: int = REFINE_CG_STEPS,
) -> DenseSparseFactors:
    """Lower ``tr(R (W - Ŵ) G (W - Ŵ)ᵀ R)`` for a column layout, its support fixed; never raises it.

    ``V = Wᵀ ≈ C B``: the basis step solves ``(Cᵀ G C) B = Cᵀ G V`` (each output coordinate on its
    own, so the row weights ``R`` drop out); the value step is CG on the masked quadratic with the
    operator ``P -> mask ⊙ (G P B R² Bᵀ)``.
    """
    lay = factors.layout
    dtype = torch.float32
    v = weight.detach().T.to(dtype)  # (N, d): the vectors
    g = gram.detach().to(v.device, torch.float64)
    g = ((g + g.T) / 2 / g.diagonal().mean().clamp_min(1e-30)).to(dtype)
    r2 = torch.ones(lay.d, dtype=dtype, device=v.device) if row_weights is None else row_weights.to(v.device, dtype)
    r2 = r2 if row_weights is None else r2.pow(2)
    r2 = r2 / r2.mean()
    mask = factors.support()
    coeffs = dense_coefficients(factors.indices, factors.values.to(dtype), lay.k)
    basis = factors.basis.to(dtype)
    gv = g @ v

    def loss(c: torch.Tensor, b: torch.Tensor) -> float:
        e = v - c @ b
        return float(((g @ e) * e * r2).double().sum())

    best = (loss(coeffs, basis), coeffs, basis)
    eye = torch.eye(lay.k, dtype=dtype, device=v.device)
    for _ in range(rounds):
        gc = g @ coeffs
        normal = coeffs.T @ gc
        ridge = 1e-6 * normal.diagonal().mean().clamp_min(1e-30)
        basis = torch.linalg.solve(normal + ridge * eye, gc.T @ v)
        m = (basis * r2) @ basis.T
        x = coeffs
        res = (gv @ (basis * r2).T - g @ x @ m) * mask
        p, rr = res, res.pow(2).sum()
        for _ in range(cg_steps):
            ap = (g @ p @ m) * mask
            alpha = rr / (p * ap).sum().clamp_min(1e-30)
            x = x + alpha * p
            res = res - alpha * ap
            rr_new = res.pow(2).sum()
            p = res + (rr_new / rr.clamp_min(1e-30)) * p
            rr = rr_new
        coeffs = x
        current = loss(coeffs, basis)
        if not current < best[0]:
            break
        best = (current, coeffs, basis)
    _, coeffs, basis = best
    values = coeffs.gather(-1, factors.indices.long()).to(factors.values.dtype)
    return replace(factors, basis=basis.to(factors.basis.dtype).contiguous(), values=values.contiguous())
