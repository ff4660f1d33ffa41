"""Compression ratios: their check, and the error a structure raises for a ratio that no layout of a shape reaches.

Example:
    >>> from dsformer.structures.budget import check_ratio
    >>> check_ratio(2)
    2.0
"""

from __future__ import annotations

import math

from dsformer.errors import InfeasibleRatioError


def check_ratio(ratio: float) -> float:
    """Validate a compression ratio (dense parameters / compressed parameters)."""
    if not isinstance(ratio, (int, float)) or not math.isfinite(ratio) or ratio <= 1.0:
        raise InfeasibleRatioError(
            f"compression ratio must be a finite number > 1 (got {ratio!r}); "
            "for example 2.0 keeps half of the weight parameters"
        )
    return float(ratio)


def infeasible(structure: str, shape: tuple[int, int], ratio: float, lo: float, hi: float) -> InfeasibleRatioError:
    return InfeasibleRatioError(
        f"{structure}: ratio {ratio:g} is infeasible for a {shape[0]}x{shape[1]} weight; "
        f"feasible ratios for this shape are {lo:.3g} to {hi:.3g}"
    )
