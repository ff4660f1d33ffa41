"""A global budget: one compression ratio for all targets together, each layer's own ratio chosen by an
estimate of its damage.

The damage of compressing a layer at ratio ``r`` is estimated from the spectrum of its whitened
weight ``W S`` (``S Sᵀ`` the second moment of its inputs): the share of the output energy
``||W X||²`` that a rank ``k(r)`` truncation loses, ``k(r)`` being the rank that the ratio's
parameters buy. That is SVD-LLM's truncation loss relative to the layer's output, exact for low
rank and a proxy for the other structures. A greedy allocator starts every layer at the largest
ratio on offer and repeatedly gives bytes to the layer whose next smaller ratio removes the most
estimated loss per byte, while the total stays within the budget.

On SmolLM2 at 2x it loses to one ratio for every layer (``docs/lm.md``): the proxy misjudges
layers. By absolute energy it starved the first blocks, whose activations are small (6.5x
there, 1.4x at the end); relative and within 0.625x to 1.6x of the asked ratio it still lost.

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

# ratios on offer, as multiples of the asked ratio (those at or below 1.05 are dropped); a narrow
# spread, because the estimate is a proxy: with 0.5x to 3x it sent a few layers of SmolLM2 whose
# spectra a handful of outlier directions dominate to 6x
SPREAD = (0.625, 0.75, 0.875, 1.0, 1.25, 1.6)


def choices_for(ratio: float) -> list[float]:
    return sorted({round(ratio * f, 4) for f in SPREAD if ratio * f > 1.05})


def truncation_losses(weight: torch.Tensor, gram: torch.Tensor, ratios: list[float]) -> list[float]:
    """The share of the output energy that a rank ``k(r)`` truncation of ``W S`` loses, for each ratio."""
    out_features, in_features = weight.shape
    white = whitening(gram)
    spectrum = torch.linalg.svdvals(weight.detach().double() @ white.root).pow(2)
    tail = spectrum.flip(0).cumsum(0).flip(0) / spectrum.sum().clamp_min(1e-30)  # tail[k]: the share from k on
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
) -> dict[str, float]:
    """Each layer's ratio, so that the layers together store their dense bytes over ``ratio``.

    ``fixed`` layers keep the ratio given (per-layer overrides) and spend their share of the
    budget first. Raises InfeasibleRatioError when the choices cannot meet the budget.
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
    losses = {name: truncation_losses(weights[name], grams[name], choices) for name in free}
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
) -> dict[str, Structure]:
    """Each target's structure at the ratio :func:`allocate` gives it, ``base.ratio`` being the ratio of all
    targets together; the targets planned with another structure than ``base`` (per-layer overrides)
    keep theirs and spend their share of the budget first."""
    if not base.allocatable or getattr(base, "ratio", None) is None:
        raise DsformerError(f"a global budget needs a structure that takes any ratio (ds, svd); not {base.name}")
    overridden = {name: s for name, s in structures.items() if s is not base}
    if any(getattr(s, "ratio", None) is None for s in overridden.values()):
        raise DsformerError("with a global budget every override needs a ratio (its share of the budget)")
    ratios = allocate(weights, grams, base.ratio, fixed={name: s.ratio for name, s in overridden.items()})
    configs = {r: replace(base, ratio=r) for r in set(ratios.values())}
    return {name: (s if s is not base else configs[ratios[name]]) for name, s in structures.items()}
