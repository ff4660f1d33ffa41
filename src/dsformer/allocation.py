"""A global budget: one compression ratio for all targets together, each layer's own ratio chosen by an
estimate of its damage.

The damage of compressing a layer at ratio ``r`` is estimated from the SVD of its whitened weight
``W S`` (``S Sᵀ`` the second moment of its inputs): a rank ``k(r)`` truncation, ``k(r)`` being the
rank that the ratio's parameters buy, leaves the output error ``ΔY = U_tail Σ_tail V_tailᵀ S⁻¹ X``
(SVD-LLM's truncation loss; exact for low rank, a proxy for the other structures). What that error
costs is weighed by the loss: with ``f_i`` the mean squared gradient of the model's loss at the
layer's output ``i`` (the diagonal Fisher of the outputs), the estimate is ``Σ_i f_i ||ΔY_i||²``,
proportional to the loss increase and so comparable across layers. A greedy allocator starts
every layer at the largest ratio on offer and repeatedly gives bytes to the layer whose next
smaller ratio removes the most estimated loss per byte, while the total stays within the budget.

Without gradients (a model without a loss) the estimate falls back to each layer's share of its
output energy; on SmolLM2 that version lost to one ratio for every layer, and an unweighted
absolute energy starved the first blocks, whose activations are small (``docs/lm.md``).

Example:
    >>> import torch
    >>> flat = torch.randn(64, 64)
    >>> steep = torch.randn(64, 8) @ torch.randn(8, 64) + 0.01 * torch.randn(64, 64)  # nearly rank 8
    >>> weights = {"flat": flat, "steep": steep}
    >>> ratios = allocate(weights, {name: torch.eye(64) for name in weights}, 2.0)
    >>> ratios["flat"] < 2.0 < ratios["steep"]  # the layer with more to lose keeps more
    True
"""

from __future__ import annotations

import heapq
import math
from dataclasses import replace

import torch

from dsformer.errors import DsformerError, InfeasibleRatioError
from dsformer.structures import Structure
from dsformer.structures.whitening import whitening

# ratios on offer, as multiples of the asked ratio (those at or below 1.05 are dropped); by share of
# the output energy, 0.5x to 3x sent a few layers of SmolLM2 whose spectra a handful of outlier
# directions dominate to 6x; weighed by the loss, a layer may go from half to 2.5 times the asked ratio
SPREAD = (0.5, 0.625, 0.75, 0.875, 1.0, 1.25, 1.6, 2.0, 2.5)


def choices_for(ratio: float) -> list[float]:
    return sorted({round(ratio * f, 4) for f in SPREAD if ratio * f > 1.05})


def truncation_losses(
    weight: torch.Tensor, gram: torch.Tensor, ratios: list[float], sensitivity: torch.Tensor | None = None
) -> list[float]:
    """For each ratio, what a rank ``k(r)`` truncation of ``W S`` loses: the share of the output energy, or,
    given ``sensitivity`` (each output's mean squared loss gradient), ``Σ_i f_i ||ΔY_i||²``, proportional
    to the loss increase (comparable across layers; the diagonal Fisher of the outputs)."""
    out_features, in_features = weight.shape
    white = whitening(gram)
    u, s, _ = torch.linalg.svd(weight.detach().double() @ white.root, full_matrices=False)
    if sensitivity is None:
        energy = s.pow(2) / s.pow(2).sum().clamp_min(1e-30)
    else:  # ΔY's rows are U's rows over the dropped directions: row i loses Σ_j U_ij² σ_j²
        energy = s.pow(2) * (sensitivity.double().to(u.device)[:, None] * u.pow(2)).sum(0)
    tail = energy.flip(0).cumsum(0).flip(0)  # tail[k]: what the directions from k on carry
    losses = []
    for r in ratios:
        rank = math.floor(out_features * in_features / (r * (out_features + in_features)))
        losses.append(float(tail[rank]) if rank < len(tail) else 0.0)
    return losses


def allocate(
    weights: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor],
    ratio: float,
    choices: list[float] | None = None,
    fixed: dict[str, float] | None = None,
    sensitivities: dict[str, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Each layer's ratio, so that the layers together store their dense bytes over ``ratio``.

    ``fixed`` layers keep the ratio given (per-layer overrides) and spend their share of the
    budget first. ``sensitivities`` (each output's mean squared loss gradient; a layer without one
    got no gradient: its errors cost nothing) make the estimate proportional to a loss increase
    rather than each layer's share of its output. Raises
    InfeasibleRatioError when the choices cannot meet the budget.
    """
    choices = sorted(choices or choices_for(ratio))
    fixed = fixed or {}
    dense = {name: w.numel() for name, w in weights.items()}
    budget = sum(dense.values()) / ratio - sum(dense[name] / r for name, r in fixed.items())
    free = [name for name in weights if name not in fixed]
    level = {name: len(choices) - 1 for name in free}  # index into choices: start at the largest ratio
    spent = sum(dense[name] / choices[-1] for name in free)
    if spent > budget + 1e-6:
        raise InfeasibleRatioError(
            f"a global ratio of {ratio:g} needs layers beyond {choices[-1]:g}x; give a smaller ratio"
        )
    costs: dict[str, torch.Tensor | None] = dict.fromkeys(free)
    if sensitivities is not None:  # outputs that got no gradient do not reach the loss: their errors cost nothing
        costs = {name: sensitivities.get(name, torch.zeros(weights[name].shape[0])) for name in free}
    losses = {name: truncation_losses(weights[name], grams[name], choices, costs[name]) for name in free}
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        i = level[name]
        if i == 0:
            return
        cost = dense[name] / choices[i - 1] - dense[name] / choices[i]
        gain = losses[name][i] - losses[name][i - 1]
        heapq.heappush(heap, (-gain / cost, name))

    for name in free:
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        i = level[name]
        cost = dense[name] / choices[i - 1] - dense[name] / choices[i]
        if spent + cost > budget + 1e-6:
            continue  # this step does not fit; a cheaper one of another layer may
        level[name], spent = i - 1, spent + cost
        push(name)
    return {**fixed, **{name: choices[level[name]] for name in free}}


def allocate_structures(
    base: Structure,
    structures: dict[str, Structure],
    weights: dict[str, torch.Tensor],
    grams: dict[str, torch.Tensor],
    sensitivities: dict[str, torch.Tensor] | None = None,
) -> dict[str, Structure]:
    """Each target's structure at the ratio :func:`allocate` gives it, ``base.ratio`` being the ratio of all
    targets together; the targets planned with another structure than ``base`` (per-layer overrides)
    keep theirs and spend their share of the budget first."""
    if not base.allocatable or getattr(base, "ratio", None) is None:
        raise DsformerError(f"a global budget needs a structure that takes any ratio (ds, svd); not {base.name}")
    overridden = {name: s for name, s in structures.items() if s is not base}
    if any(getattr(s, "ratio", None) is None for s in overridden.values()):
        raise DsformerError("with a global budget every override needs a ratio (its share of the budget)")
    fixed = {name: s.ratio for name, s in overridden.items()}
    ratios = allocate(weights, grams, base.ratio, fixed=fixed, sensitivities=sensitivities)
    configs = {r: replace(base, ratio=r) for r in set(ratios.values())}
    return {name: (s if s is not base else configs[ratios[name]]) for name, s in structures.items()}
