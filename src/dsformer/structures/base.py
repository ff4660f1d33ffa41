"""What every weight structure shares: the compact layer base class and budget helpers."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
from torch import nn

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


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class CompactLinear(nn.Module):
    """A layer that computes ``x @ W.T + bias`` like ``nn.Linear``, with ``W`` held in a compact form.

    Subclasses define ``materialize`` (the dense ``(out, in)`` weight), ``layout`` (a JSON-able
    dict that rebuilds an empty layer of the same shapes through ``from_layout``) and the counts
    used by reports. ``merge`` turns the layer back into a plain ``nn.Linear``.
    """

    structure: ClassVar[str]
    # "linear", or "conv1d" for a layer that replaced a GPT-2 style Conv1D (merge restores the type)
    source_kind: str = "linear"

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(bias.detach().clone()) if bias is not None else None

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError

    def _cached(self, build, *sources: torch.Tensor) -> torch.Tensor:
        """``build()``, reused across calls at inference while ``sources`` are unchanged.

        While gradients flow (training) it is rebuilt every call, so autograd sees it.
        """
        if torch.is_grad_enabled() and any(t.requires_grad for t in sources):
            return build()
        key = tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in sources)
        if getattr(self, "_cache_key", None) != key:
            self._cache_value, self._cache_key = build(), key
        return self._cache_value

    def layout(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_layout(
        cls, shape: tuple[int, int], layout: dict[str, Any], bias: bool, dtype: torch.dtype
    ) -> CompactLinear:
        raise NotImplementedError

    def factor_tensors(self) -> list[torch.Tensor]:
        """The tensors that store the weight (bias excluded)."""
        return [t for name, t in self.state_dict().items() if name != "bias"]

    def value_params(self) -> int:
        """Stored weight values (indices excluded): the parameter count that ratios use."""
        return sum(t.numel() for t in self.factor_tensors() if t.is_floating_point())

    def weight_bytes(self) -> int:
        """Bytes of the stored weight, indices included."""
        return tensor_bytes(*self.factor_tensors())

    def describe(self) -> str:
        """A short human description of the layout, e.g. ``k=128 s=64``."""
        raise NotImplementedError

    def merge(self) -> nn.Linear:
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        w = self.materialize().detach()
        dense = dense.to(dtype=w.dtype, device=w.device)
        with torch.no_grad():
            dense.weight.copy_(w)
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.describe()}"
