"""The metric of a layer's inputs: fitting ``Ŵ`` to minimize ``||(W - Ŵ) X||`` instead of ``||W - Ŵ||``.

With ``G = X Xᵀ / tokens`` (the inputs' second moment, ``in x in``) the output error is
``tr((W - Ŵ) G (W - Ŵ)ᵀ)``. Any root ``S Sᵀ = G`` turns it into the plain ``||(W - Ŵ) S||²``, so a
structure whose right factor can absorb ``S`` fits ``W S`` and multiplies by ``S⁻¹`` afterwards
(SVD-LLM's whitening). ``G`` is damped by a small multiple of its mean diagonal: calibration with
fewer tokens than inputs leaves it singular.

Example:
    >>> import torch
    >>> x = torch.randn(1000, 8)
    >>> white = whitening(x.T @ x / 1000)
    >>> bool(torch.allclose(white.root @ white.root.T, white.gram, atol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsformer.errors import DsformerError

# the damping GPTQ and SVD-LLM use, relative to the mean diagonal of G
DAMPING = 0.01


class CalibrationError(DsformerError, ValueError):
    """Input statistics that cannot weight a fit: of another width, non-finite, not positive semi-definite."""


@dataclass
class Whitening:
    """``root`` ``S`` (lower triangular, ``S Sᵀ = gram``), its ``inverse``, the damped ``gram`` and
    the relative ``damping`` that made ``gram`` positive definite."""

    gram: torch.Tensor
    root: torch.Tensor
    inverse: torch.Tensor
    damping: float


def check_gram(gram: torch.Tensor, width: int) -> None:
    """A layer's input metric must be a finite, symmetric ``(width, width)`` matrix."""
    if gram.shape != (width, width):
        raise CalibrationError(f"input statistics must be {width}x{width} for this layer (got {tuple(gram.shape)})")
    if not bool(torch.isfinite(gram).all()):
        raise CalibrationError("input statistics hold non-finite values (the calibration text overflowed the model?)")


def whitening(gram: torch.Tensor, damping: float = DAMPING) -> Whitening:
    """Cholesky root of ``gram + damping · mean(diag) · I``; the damping grows tenfold until it succeeds."""
    g = gram.detach().double()
    g = (g + g.T) / 2
    scale = g.diagonal().mean().clamp_min(1e-30)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    while True:
        damped = g + damping * scale * eye
        root, info = torch.linalg.cholesky_ex(damped)
        if int(info) == 0:
            break
        damping *= 10
        if damping > 1e6:
            raise CalibrationError("input statistics are not positive semi-definite")
    inverse = torch.linalg.solve_triangular(root, eye, upper=False)
    return Whitening(damped, root, inverse, damping)


def column_scale(gram: torch.Tensor) -> torch.Tensor:
    """The diagonal part of the metric as a per-input scale ``√G_jj`` with mean 1 (Wanda's ``||X_j||``)."""
    root = gram.detach().double().diagonal().clamp_min(0).sqrt()
    return root / root.mean().clamp_min(1e-30) + 1e-6


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor | None) -> float:
    """``||(W - Ŵ) X|| / ||W X||`` (the relative weight error without a metric)."""
    diff, w = (weight - approx).double(), weight.double()
    if gram is None:
        return float(diff.norm() / w.norm().clamp_min(1e-30))
    g = gram.double()
    return float(((diff @ g * diff).sum().clamp_min(0) / (w @ g * w).sum().clamp_min(1e-30)).sqrt())
